"""The embedded durable broker: one SQLite file, shared by the processes of one machine.

``sqlite:///callboard.db`` (relative to the working directory), ``sqlite:////var/lib/cb.db``
(absolute), or ``sqlite:///:memory:`` (nothing kept, one process: for tests and experiments).
``?synchronous=full`` makes every commit survive a power cut, not only a killed process.

Design
------
The domain is ``SqlBroker``'s (``sql/broker.py``); this module holds the SQLite store: its SQL
(``sql/sqlite/``, run by ``sqlite_store``) and its connection (``sqlite_thread``).

Leases are rows of ``leases``, one per event handed out; lease times are the wall clock's
(``clock``), which the processes on one machine share. A claim takes a lease ending more than a
lease's length from now as run out, since only a clock that moved back since it was written (a
process restarted with its clock behind) puts it there. A clock that jumps ahead runs leases out
early: the events go out again, which at-least-once allows.

Database work goes through one connection per broker (``sqlite_thread``): what is submitted in one
turn of the event loop runs in one ``BEGIN IMMEDIATE`` transaction, and a commit of the broker's
group-commit engine (a batch of publishes or acknowledgements) goes at once, with whatever else
waits. A transaction runs on the event loop while the file is free (a commit without a disk flush
is cheap) and on the broker's thread when it would wait: for another process's write lock, or for
the disk with ``synchronous=full``; retention's batches always run on the thread, each its own
transaction, so the loop serves requests while a pass runs. Processes on one machine share the
file in WAL mode.

Wake-ups: other processes' commits are noticed by polling ``PRAGMA data_version`` every
``watch_interval``, and their new events' topics read from the ``seq`` last seen.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar
from urllib.parse import parse_qs

from callboard.brokers import sqlite_store as store
from callboard.brokers.base import (
    Capabilities,
    Delivery,
    EventPage,
    EventQuery,
    RetentionPolicy,
    Start,
)
from callboard.brokers.sql import Expired, StoredEvent
from callboard.brokers.sql.backlog import Span, StoreState, Tally
from callboard.brokers.sql.broker import SqlBroker
from callboard.brokers.sql.eventlog import EventFacts
from callboard.brokers.sql.retention import RetentionRange
from callboard.brokers.sql.store import Ack, Publish, Wake
from callboard.brokers.sqlite_checkpoint import Checkpointer
from callboard.brokers.sqlite_thread import SQLiteThread
from callboard.errors import BrokerError, ConfigError
from callboard.events import Event

logger = logging.getLogger("callboard.brokers.sqlite")

MEMORY = ":memory:"

T = TypeVar("T")


class SQLiteBroker(SqlBroker):
    """Durable broker on a SQLite file. ``sqlite:///path`` in configuration."""

    def __init__(
        self,
        path: str = "callboard.db",
        *,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        watch_interval: float = 0.01,
        retention: RetentionPolicy | None = None,
        synchronous: Literal["normal", "full"] = "normal",
        busy_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        #: What lease times are read from: the wall clock, shared by the processes on the file.
        self.clock = clock
        self.watch_interval = watch_interval
        self.sqlite = SQLiteStore(
            path,
            synchronous=synchronous,
            busy_timeout=busy_timeout,
            clock=clock,
            watch_interval=watch_interval,
        )
        durable = path != MEMORY
        super().__init__(
            self.sqlite,
            lease=lease,
            poll_interval=poll_interval,
            retention=retention,
            capabilities=Capabilities(durable=durable, shared=durable, replay=True),
            log=logger,
        )

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> SQLiteBroker:
        rest = url.partition("://")[2]
        location, _, query = rest.partition("?")
        path = location[1:] if location.startswith("/") else ""
        if not path:
            raise ConfigError(
                "events.broker",
                f"{url!r} names no file; use sqlite:///callboard.db (relative), "
                "sqlite:////var/lib/callboard.db (absolute) or sqlite:///:memory:",
            )
        options = parse_qs(query)
        synchronous = options.pop("synchronous", ["normal"])[-1].lower()
        if options or synchronous not in ("normal", "full"):
            raise ConfigError(
                "events.broker", f"{url!r}: the only option is synchronous=normal|full"
            )
        return cls(
            path, retention=retention, synchronous="full" if synchronous == "full" else "normal"
        )


class SQLiteStore:
    """The ``SqlStore`` of a SQLite file: ``sqlite_store``'s operations on ``SQLiteThread``."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: Literal["normal", "full"],
        busy_timeout: float,
        clock: Callable[[], float],
        watch_interval: float,
    ) -> None:
        self.path = path
        self.label = f"the SQLite broker on {path}"
        # A request arriving during a retention batch waits for it: keep them short.
        self.retention_step: float | None = 0.001
        self._clock = clock
        self._watch_interval = watch_interval

        def connect() -> sqlite3.Connection:
            return store.connect(path, synchronous=synchronous, busy_timeout=busy_timeout)

        self.thread = SQLiteThread(
            connect,
            path,
            busy_timeout=busy_timeout,
            # A commit that waits for the disk would hold up the event loop.
            inline=synchronous != "full",
        )
        self._checkpointer = None if path == MEMORY else Checkpointer(path)

    async def open(self) -> None:
        self.thread.start()
        if self._checkpointer is not None:
            self._checkpointer.start()

    async def close(self) -> None:
        await self.thread.stop()
        if self._checkpointer is not None:
            await self._checkpointer.stop()

    async def migrate(self) -> list[str]:
        running = self.thread.running
        if not running:
            self.thread.start()
        try:
            found = await self._run(store.migrate)
        finally:
            if not running:
                await self.thread.stop()
        return [] if found == store.SCHEMA_VERSION else [f"schema version {store.SCHEMA_VERSION}"]

    async def check(self) -> None:
        # On the event loop while the file is free; on the thread, at most ``busy_timeout``,
        # while another process holds it.
        await self._run(store.ping, writes=False)

    async def insert_events(self, batch: list[Publish]) -> list[bool | BaseException]:
        accepted: list[bool | BaseException] = list(
            await self._run(store.publish_many, batch, now=True)
        )
        return accepted

    async def keep_dead_letter(self, group: str, event: StoredEvent) -> None:
        await self._run(store.keep_dead_letter, group, event)

    async def deliver_to(self, group: str, event: StoredEvent) -> None:
        await self._run(store.deliver_to, group, event)

    async def join(
        self, group: str, patterns: Sequence[str], start: Start, owner: str | None
    ) -> bool:
        return await self._run(store.join, group, patterns, start, owner)

    async def claim(self, group: str, consumer: str, limit: int, lease: float) -> list[Delivery]:
        return await self._run(store.claim, group, consumer, limit, lease, self._clock)

    async def ack(self, batch: list[Ack]) -> list[bool]:
        return await self._run(store.ack_many, batch, now=True)

    async def release(self, group: str, consumer: str, seqs: Sequence[int] | None) -> bool:
        return await self._run(store.release, group, consumer, seqs)

    async def renew(self, consumers: list[str], lease: float) -> None:
        await self._run(store.renew, consumers, lease, self._clock)

    async def due(self, lease: float) -> dict[str, bool]:
        return await self._run(store.due, self._clock(), lease, writes=False)

    async def dead_letters(
        self, group: str, ids: Sequence[str] | None, remove: bool, limit: int
    ) -> list[Event]:
        return await self._run(store.dead_letters, group, ids, remove, limit, writes=remove)

    async def backlog_state(self) -> StoreState:
        # On the thread, as every backlog read: the loop never waits for a count.
        return await self._run(store.backlog_state, self._clock(), writes=False, offload=True)

    async def tally_events(
        self, counts: Sequence[Span], rows: Sequence[Span], bucket: int
    ) -> Tally:
        return await self._run(store.tally_events, counts, rows, bucket, writes=False, offload=True)

    async def delete_subscription(self, group: str) -> bool:
        return await self._run(store.delete_subscription, group)

    async def find_events(self, query: EventQuery) -> EventPage:
        return await self._run(store.find_events, query, writes=False, offload=True)

    async def event_facts(self, event_id: str) -> EventFacts:
        return await self._run(
            store.event_facts, event_id, self._clock(), writes=False, offload=True
        )

    async def expire_range(self, policy: RetentionPolicy) -> RetentionRange | None:
        return await self._run(store.expire_range, policy, writes=False, offload=True)

    async def expire(self, policy: RetentionPolicy, bounds: RetentionRange, after: int) -> Expired:
        # On the thread: a batch of retention is too long for the event loop.
        return await self._run(store.expire, policy, bounds, after, offload=True)

    async def watch(self, wake: Wake) -> None:
        """Poll ``PRAGMA data_version``, which moves when another process commits; then wake
        the consumers of the topics (and targets) of the events stored since the last look.

        Other commits (acknowledgements, leases handed back, a subscription deleted) wake
        nobody here: the broker's sweep finds what they leave to claim (``SqlBroker``).
        """
        if self.path == MEMORY:
            return  # nobody else can write to it
        last: int | None = None
        seen = 0
        while True:
            await asyncio.sleep(self._watch_interval)
            try:
                version = await self._run(store.data_version, writes=False)
                if version != last:
                    head, topics, targets = await self._run(store.stored_since, seen, writes=False)
            except BrokerError as error:
                logger.warning("watching %s for other processes failed: %s", self.path, error)
                continue
            if version != last:
                if last is not None and (topics or targets):
                    wake(topics, targets)
                last, seen = version, head

    def _run(
        self,
        operation: Callable[..., T],
        *args: object,
        writes: bool = True,
        now: bool = False,
        offload: bool = False,
    ) -> asyncio.Future[T]:
        def bound(connection: sqlite3.Connection) -> T:
            return operation(connection, *args)

        return self.thread.submit(bound, writes=writes, now=now, offload=offload)
