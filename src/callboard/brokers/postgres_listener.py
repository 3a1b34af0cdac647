"""Wake-ups across instances: one LISTEN connection per broker, reconnecting by itself.

Every instance's commits notify one channel with what they stored (topics) or handed back
(groups). The listener wakes the local consumers concerned. When its connection fails it says so
(``up`` is false, and the broker polls instead), reconnects with backoff, and on reconnecting
wakes every consumer, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

logger = logging.getLogger("callboard.brokers.postgres")

#: Seconds between two checks of a quiet connection with a query.
KEEPALIVE = 30.0
MAX_BACKOFF = 10.0

#: What a lost or unreachable server raises; anything else is a bug and ends the listener loudly.
_FAILURES = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def notification(topics: set[str], groups: set[str], origin: str | None = None) -> str:
    """The payload of a notification; ``*`` when it would be too long for NOTIFY (8000 bytes).

    ``origin`` names the broker that sent it, whose own listener then skips it: that broker
    wakes its consumers itself, when it chooses to.
    """
    fields: dict[str, object] = {"t": sorted(topics), "g": sorted(groups)}
    if origin is not None:
        fields["o"] = origin
    message = orjson.dumps(fields).decode()
    return message if len(message) < 7_000 else "*"


class Listener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        wake: Callable[[list[str] | None, list[str]], None],
        *,
        connect_timeout: float,
        origin: str | None = None,
    ) -> None:
        self._dsn = dsn
        self._channel = channel
        self._wake = wake
        self._connect_timeout = connect_timeout
        #: The ``origin`` of this listener's own broker's notifications, which it skips.
        self._origin = origin
        self.up = False
        #: The ``asyncpg.Connection`` while listening.
        self.connection: Any = None

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except _FAILURES as error:
                if self.up:
                    logger.warning(
                        "lost the PostgreSQL notification connection; polling until it is back: %s",
                        str(error) or type(error).__name__,
                    )
                    backoff = 0.1
                else:
                    backoff = min(MAX_BACKOFF, backoff * 2)
                self.up = False
                self.connection = None
            await asyncio.sleep(backoff)

    async def _listen(self) -> None:
        # Its own connection, not the pool's: LISTEN holds it for as long as the broker runs.
        connection = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            server_settings={"application_name": "callboard-listener"},
        )
        try:
            # asyncpg says when the connection is gone: no need to wait for the next check.
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def terminated(_: object) -> None:
                if not lost.done():
                    lost.set_result(None)

            connection.add_termination_listener(terminated)
            # asyncpg quotes the channel in its LISTEN.
            await connection.add_listener(self._channel, self._notified)
            self.connection = connection
            if not self.up:
                logger.info("listening for PostgreSQL notifications on %r", self._channel)
            self.up = True
            self._wake(None, [])
            while True:
                await asyncio.wait([lost], timeout=KEEPALIVE)
                if lost.done():
                    raise ConnectionResetError("the server closed the connection")
                # A server that stopped answering leaves the connection open: ask it something.
                await connection.fetchval("SELECT 1", timeout=self._connect_timeout)
        finally:
            # Closing politely takes a round trip, which a partitioned server would never answer.
            with contextlib.suppress(*_FAILURES):
                await connection.close(timeout=1)

    def _notified(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self._received(payload)

    def _received(self, payload: str) -> None:
        if payload == "*":
            self._wake(None, [])
            return
        try:
            message = orjson.loads(payload)
            if self._origin is not None and message.get("o") == self._origin:
                return
            self._wake(list(message["t"]), list(message["g"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            logger.warning("ignored an unexpected notification on %r", self._channel)
