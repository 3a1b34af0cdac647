"""Wake-ups across instances: one LISTEN connection per broker, reconnecting by itself.

Every instance's commits notify one channel with what they stored (topics) or handed back
(groups). The listener wakes the local consumers concerned. When its connection fails it says so
(``up`` is false, and the broker polls instead), reconnects with backoff, and on reconnecting
wakes every consumer, since notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson
import psycopg
from psycopg import sql

logger = logging.getLogger("callboard.brokers.postgres")

#: Seconds without a notification after which the connection is checked with a query.
KEEPALIVE = 30.0
MAX_BACKOFF = 10.0


def notification(topics: set[str], groups: set[str]) -> str:
    """The payload of a notification; ``*`` when it would be too long for NOTIFY (8000 bytes)."""
    message = orjson.dumps({"t": sorted(topics), "g": sorted(groups)}).decode()
    return message if len(message) < 7_000 else "*"


class Listener:
    def __init__(
        self,
        conninfo: str,
        channel: str,
        wake: Callable[[list[str] | None, list[str]], None],
        *,
        connect_timeout: float,
    ) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._wake = wake
        self._connect_timeout = connect_timeout
        self.up = False
        self.connection: psycopg.AsyncConnection[object] | None = None

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as error:
                if self.up:
                    logger.warning(
                        "lost the PostgreSQL notification connection; polling until it is back: %s",
                        error,
                    )
                    backoff = 0.1
                else:
                    backoff = min(MAX_BACKOFF, backoff * 2)
                self.up = False
                self.connection = None
            await asyncio.sleep(backoff)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=max(1, round(self._connect_timeout)),
            application_name="callboard-listener",
        ) as connection:
            await connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self.connection = connection
            if not self.up:
                logger.info("listening for PostgreSQL notifications on %r", self._channel)
            self.up = True
            self._wake(None, [])
            while True:
                async for notice in connection.notifies(timeout=KEEPALIVE):
                    self._received(notice.payload)
                await connection.execute("SELECT 1")

    def _received(self, payload: str) -> None:
        if payload == "*":
            self._wake(None, [])
            return
        try:
            message = orjson.loads(payload)
            self._wake(list(message["t"]), list(message["g"]))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            logger.warning("ignored an unexpected notification on %r", self._channel)
