"""The embedded durable broker: one SQLite file, shared by the processes of one machine.

``sqlite:///callboard.db`` (relative to the working directory), ``sqlite:////var/lib/cb.db``
(absolute), or ``sqlite:///:memory:`` (nothing kept, one process: for tests and experiments).
``?synchronous=full`` makes every commit survive a power cut, not only a killed process.

Design
------
Tables (``sql/sqlite/schema.sql``):

- ``events``: append-only, one row per published event, numbered by ``seq`` in publish order. The
  (topic, delivery id) pair is unique while the event is retained: that is the redelivery window.
- ``subscriptions``: one row per consumer group with its topic patterns and ``position``: every
  event up to it has been handed out.
- ``leases``: one row per event handed out and not yet acknowledged, naming the consumer that holds
  it and until when. Acknowledging deletes the row.
- ``dead_letters``: kept until taken, outside the retention window.

Fan-out happens on read: a publish writes one row whatever the number of groups. A consumer's
claim, in one transaction, first re-leases the group's events whose lease ran out or was handed
back (oldest first), then leases the next events after ``position`` that match the group's
patterns and moves ``position`` past them. Competing consumers of one group therefore never get
the same event, each one receives its events in publish order, and a group's progress is
``position`` less what is still leased. While a process lives it renews its consumers' leases; a
process killed with ``kill -9`` stops renewing, and its leases run out and go to another consumer.
Lease times are the wall clock's (``clock``), which the processes on one machine share; a claim
takes a lease ending more than a lease's length from now as run out, since only a clock that
moved back since it was written (a process restarted with its clock behind) puts it there. A
clock that jumps ahead runs leases out early: the events go out again, which at-least-once allows.

Database work goes through one connection per broker (``sqlite_thread``): whatever is submitted
in one turn of the event loop commits in one ``BEGIN IMMEDIATE`` transaction, so concurrent
publishes share a commit, and a publish returns once its event is committed. A group runs on the
event loop while the file is free (a commit without a disk flush is cheap) and on the broker's
thread when it would wait: for another process's write lock, or for the disk with
``synchronous=full``. Processes on one machine share the file in WAL mode.

Wake-ups: in this process, a commit wakes the consumers whose patterns match what it stored; other
processes' commits are noticed by polling ``PRAGMA data_version`` every ``watch_interval``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import parse_qs

from callboard.brokers import sqlite_store as store
from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    Delivery,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.brokers.sql import Expired, StoredEvent, cancel_all, encode_event, repeat
from callboard.brokers.sql.consumer import ConsumerRegistry, LeasedConsumer
from callboard.brokers.sqlite_thread import Changes, SQLiteThread
from callboard.errors import BrokerError, ConfigError, ServiceClosedError, SubscriptionError
from callboard.events import Event
from callboard.topics import normalize_patterns

logger = logging.getLogger("callboard.brokers.sqlite")

MEMORY = ":memory:"

T = TypeVar("T")
R = TypeVar("R")


class SQLiteBroker:
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
        self.lease = lease
        self.poll_interval = poll_interval
        self.watch_interval = watch_interval
        self.retention = retention if retention is not None else RetentionPolicy()
        self._registry = ConsumerRegistry()
        connect = functools.partial(
            store.connect, path, synchronous=synchronous, busy_timeout=busy_timeout
        )
        self._thread = SQLiteThread(
            connect,
            path,
            self._committed,
            busy_timeout=busy_timeout,
            # A commit that waits for the disk would hold up the event loop.
            inline=synchronous != "full",
        )
        self._publishes: _Batch[StoredEvent, bool] = _Batch(self, store.publish_many)
        self._acks: _Batch[tuple[str, str, int], bool] = _Batch(self, store.ack_many)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = True

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

    @property
    def capabilities(self) -> Capabilities:
        durable = self.path != MEMORY
        return Capabilities(durable=durable, shared=durable, replay=True)

    async def start(self) -> None:
        if not self._closed:
            return
        self._thread.start()
        self._closed = False
        try:
            await self._run(store.migrate)
        except BaseException:
            await self._stop(release=False)
            raise
        self._spawn(
            repeat(
                self.lease / 3,
                self._renew_leases,
                f"renewing leases on {self.path} failed",
                log=logger,
            ),
            "leases",
        )
        interval = self.retention.interval
        self._spawn(
            repeat(
                interval,
                self.clean,
                f"retention on {self.path} failed",
                log=logger,
                first=min(10.0, interval),
            ),
            "retention",
        )
        if self.capabilities.shared:
            self._spawn(self._watch(), "watch")

    async def close(self) -> None:
        await self._stop(release=True)

    async def migrate(self) -> list[str]:
        """Create or upgrade the schema (``callboard migrate``); what was applied."""
        running = not self._closed
        if not running:
            self._thread.start()
        try:
            found = await self._run(store.migrate)
        finally:
            if not running:
                await self._thread.stop()
        return [] if found == store.SCHEMA_VERSION else [f"schema version {store.SCHEMA_VERSION}"]

    async def abandon(self) -> None:
        """Stop as a killed process would: leases are neither handed back nor renewed.

        For tests of crash recovery; another broker on the same file takes the events over once
        the leases run out.
        """
        await self._stop(release=False)

    async def publish(self, event: Event) -> bool:
        self._check_open()
        stored = encode_event(event)
        if event.topic.startswith(DEAD_LETTER_PREFIX):
            group = event.topic[len(DEAD_LETTER_PREFIX) :]
            return bool(await self._run(store.keep_dead_letter, group, stored))
        (accepted,) = await self._publishes.submit([stored])
        return bool(accepted)

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> LeasedConsumer:
        self._check_open()
        patterns = normalize_patterns(topics)
        for live in self._registry.group_patterns(group):
            if set(live) != set(patterns):
                raise SubscriptionError(
                    f"subscription {group!r} already reads {list(live)}; cannot join it with "
                    f"{list(patterns)}: use another subscription id"
                )
        created = await self._run(store.join, group, patterns, start, owner)
        if created:
            logger.info("created subscription %r on %s from %s", group, list(patterns), start)
        return LeasedConsumer(
            _Leases(self),
            self._registry,
            group,
            patterns,
            poll_interval=self.poll_interval,
            ack_patience=self.lease,
        )

    async def deliver_to(self, group: str, event: Event) -> None:
        self._check_open()
        await self._run(store.deliver_to, group, encode_event(event))

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        self._check_open()
        letters: list[Event] = await self._run(
            store.dead_letters, group, ids, remove, limit, writes=remove
        )
        return letters

    async def subscriptions(self) -> list[SubscriptionInfo]:
        self._check_open()
        found: list[SubscriptionInfo] = await self._run(store.subscriptions, writes=False)
        return found

    async def delete_subscription(self, group: str) -> bool:
        self._check_open()
        self._registry.check_unread(group)
        deleted: bool = await self._run(store.delete_subscription, group)
        if deleted:
            logger.info("deleted subscription %r", group)
        return deleted

    async def clean(self) -> int:
        """Apply the retention policy now, in bounded batches; the number of events deleted."""
        self._check_open()
        deleted = 0
        budget = time.monotonic() + max(1.0, self.retention.interval / 2)
        while time.monotonic() < budget:
            expired: Expired = await self._run(store.expire, self.retention)
            deleted += expired.deleted
            for name, count in expired.lost.items():
                logger.warning(
                    "subscription %r fell behind the retained window: retention deleted %d "
                    "events it had not received",
                    name,
                    count,
                )
            if expired.deleted < self.retention.batch_size:
                break
        if deleted:
            logger.debug("retention deleted %d events from %s", deleted, self.path)
        return deleted

    # -- internals ---------------------------------------------------------------------------

    def _run(
        self, operation: Callable[..., T], *args: object, writes: bool = True
    ) -> asyncio.Future[T]:
        def bound(connection: sqlite3.Connection, changes: Changes) -> T:
            return operation(connection, changes, *args)

        return self._thread.submit(bound, writes=writes)

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError(f"the SQLite broker on {self.path} is not running")

    def _committed(self, changes: Changes) -> None:
        self._registry.wake(changes.topics, changes.groups)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(work, name=f"callboard-sqlite-{name}"))

    async def _stop(self, *, release: bool) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_all(self._tasks)
        await self._registry.end_all(release=release)
        await self._thread.stop()

    async def _renew_leases(self) -> None:
        consumers = self._registry.live_ids()
        if consumers:
            await self._run(store.renew, consumers, self.lease, self.clock)

    async def _watch(self) -> None:
        last: int | None = None
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                version = await self._run(store.data_version, writes=False)
            except BrokerError as error:
                logger.warning("watching %s for other processes failed: %s", self.path, error)
                continue
            if last is not None and version != last:
                self._registry.wake()
            last = version


class _Leases:
    """The broker's lease operations, as its consumers see them."""

    def __init__(self, broker: SQLiteBroker) -> None:
        self._broker = broker

    async def claim(self, group: str, consumer: str, limit: int) -> list[Delivery]:
        broker = self._broker
        deliveries: list[Delivery] = await broker._run(
            store.claim, group, consumer, limit, broker.lease, broker.clock
        )
        return deliveries

    async def ack(self, group: str, leases: Sequence[tuple[str, int]]) -> list[bool]:
        return await self._broker._acks.submit([(group, consumer, seq) for consumer, seq in leases])

    async def release(self, group: str, consumer: str) -> None:
        if self._broker._thread.running:
            await self._broker._run(store.release, group, consumer)


class _Batch(Generic[T, R]):
    """Items submitted in one turn of the event loop, stored by ONE operation of the next group.

    Concurrent publishes (or acknowledgements) then cost one statement of that transaction
    together, not one each; ``operation`` returns one result per item. The items join the group
    formed at the end of this turn (``SQLiteThread.gather``), with whatever else was submitted.
    """

    def __init__(self, broker: SQLiteBroker, operation: Callable[..., list[R]]) -> None:
        self._broker = broker
        self._operation = operation
        self._items: list[T] = []
        #: One per ``submit``: how many of ``_items`` it added, and its future.
        self._callers: list[tuple[int, asyncio.Future[list[R]]]] = []

    def submit(self, items: Sequence[T]) -> asyncio.Future[list[R]]:
        """Store ``items`` with the rest of this turn's; their results, in order."""
        if not self._items:
            self._broker._thread.gather(self._flush)
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        self._items.extend(items)
        self._callers.append((len(items), future))
        return future

    def _flush(self) -> None:
        items, callers = self._items, self._callers
        self._items, self._callers = [], []
        operation = self._operation

        def run(connection: sqlite3.Connection, changes: Changes) -> list[R]:
            return operation(connection, changes, items)

        def settle(results: list[R] | BaseException) -> None:
            start = 0
            for count, future in callers:
                if not future.done():
                    if isinstance(results, BaseException):
                        future.set_exception(results)
                    else:
                        future.set_result(results[start : start + count])
                start += count

        self._broker._thread.enqueue(run, settle, writes=True)
