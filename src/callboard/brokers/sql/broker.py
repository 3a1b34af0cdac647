"""The durable broker over a SQL database: one implementation, any ``SqlStore``.

Design
------
The tables are the same in every database (``sql/<dialect>/``): an append-only ``events`` table
numbered by ``seq`` in publish order, in which a (topic, delivery id) pair is unique while the
event is retained (the redelivery window); ``subscriptions``, one row per consumer group with its
topic patterns and ``position`` (every event up to it has been handed out); leases of the events
handed out and not acknowledged, naming the consumer that holds each and until when
(acknowledging deletes it); and ``dead_letters``, kept until taken, outside the retention window.

Fan-out happens on read: a publish writes one row whatever the number of groups. A consumer's
claim, in one transaction, first re-leases the group's events whose lease ran out or was handed
back (oldest first, their attempt grown by one), then leases the next events after ``position``
that match the group's patterns and moves ``position`` past them. Competing consumers of one
group therefore never get the same event, each one receives its events in publish order, and a
group's progress is ``position`` less what is still leased. While a process lives it renews its
consumers' leases (every third of a lease); a process killed with ``kill -9`` stops renewing, and
its leases run out and go to another consumer. A consumer hands leases back at once when it
releases deliveries or closes.

Publishes and acknowledgements go through ONE group-commit engine each
(``callboard.group_commit``): whatever queues while a commit runs goes out in the next, as one
operation of the store, so concurrent publishes share a transaction, and a publish returns once
its event is committed. Once a commit's publishers have been answered, this process's consumers
of its topics are woken; what other processes commit reaches them through the store's ``watch``.
Every ``poll_interval`` one query of the broker (``due``) finds the groups read here that have
events to claim again (leases run out or handed back elsewhere) or that were deleted, and wakes
their consumers; an idle consumer costs nothing until then.

Retention runs every ``RetentionPolicy.interval``, one pass at a time: the pass finds the range
of ``seq`` it may delete once, without reading the events it keeps (``sql/retention.py``), then
deletes it in batches of ``batch_size`` by ranges of the primary key, each batch a transaction of
its own (off the event loop: on SQLite it runs on the store's thread), so a pass costs what it
deletes and publishes, acknowledgements and lease renewals go on between its batches. Events it
deletes before a group received them are counted as that group's ``lost``; a pass is logged once,
with its totals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    Delivery,
    EventPage,
    EventQuery,
    Outcome,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.brokers.sql import cancel_all, encode_event, eventlog, repeat
from callboard.brokers.sql.backlog import BacklogCounter
from callboard.brokers.sql.consumer import ConsumerRegistry, LeasedConsumer
from callboard.brokers.sql.store import Ack, Publish, SqlStore
from callboard.errors import BrokerUnavailable, ServiceClosedError, SubscriptionError
from callboard.events import Event
from callboard.group_commit import GroupCommit
from callboard.topics import normalize_patterns

#: Most publishes (or acknowledgements) committed in one transaction.
MAX_BATCH = 1_000

#: Retention batches on a store with a ``retention_step``: the first one's size, the least.
FIRST_STEP = 100
MIN_STEP = 16
#: After each retention batch the pass rests this many times as long as the batch took.
RETENTION_REST = 1.0


def _next_step(step: int, took: float, seconds: float | None, most: int) -> int:
    """The size of the next retention batch, from how long the last one of ``step`` took: to
    take about ``seconds`` (``None``: ``most``), never over ``most`` nor twice the last."""
    if seconds is None:
        return most
    wanted = int(step * seconds / took) if took > 0 else most
    return max(min(MIN_STEP, most), min(most, step * 2, wanted))


class SqlBroker:
    """``Broker``, ``BrokerAdmin``, ``EventLog`` and ``BrokerHealth`` over a ``SqlStore``."""

    def __init__(
        self,
        store: SqlStore,
        *,
        lease: float,
        poll_interval: float,
        retention: RetentionPolicy | None,
        capabilities: Capabilities,
        log: logging.Logger,
        publish_regroup: float = 0.0,
    ) -> None:
        self.lease = lease
        self.poll_interval = poll_interval
        self.retention = retention if retention is not None else RetentionPolicy()
        self._store = store
        self._capabilities = capabilities
        self._log = log
        self._registry = ConsumerRegistry()
        self._leases = _Leases(self)
        self._publishes: GroupCommit[Publish, bool] = GroupCommit(
            store.insert_events, MAX_BATCH, regroup=publish_regroup, settled=self._published
        )
        self._acks: GroupCommit[Ack, bool] = GroupCommit(store.ack, MAX_BATCH)
        self._backlog = BacklogCounter(store)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = True

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        if not self._closed:
            return
        await self._store.open()
        self._closed = False
        try:
            await self._store.migrate()
        except BaseException:
            await self._stop(release=False)
            raise
        label = self._store.label
        self._spawn(
            repeat(
                self.lease / 3, self._renew, f"renewing leases of {label} failed", log=self._log
            ),
            "leases",
        )
        interval = self.retention.interval
        self._spawn(
            repeat(
                interval,
                self.clean,
                f"retention on {label} failed",
                log=self._log,
                first=min(10.0, interval),
            ),
            "retention",
        )
        self._spawn(self._store.watch(self._registry.wake), "watch")
        self._spawn(
            repeat(self.poll_interval, self._sweep, f"sweeping {label} failed", log=self._log),
            "sweep",
        )

    async def close(self) -> None:
        await self._stop(release=True)

    async def abandon(self) -> None:
        """Stop as a killed process would: leases are neither handed back nor renewed.

        For tests of crash recovery; another broker on the same store takes the events over once
        the leases run out.
        """
        await self._stop(release=False)

    async def migrate(self) -> list[str]:
        """Create or upgrade the schema (``callboard migrate``); what was applied."""
        return await self._store.migrate()

    async def check(self) -> None:
        """``BrokerHealth``: the store answers a trivial statement, within its own timeout."""
        if self._closed:
            raise BrokerUnavailable(f"{self._store.label} is not running")
        await self._store.check()

    async def publish(self, event: Event) -> bool:
        self._check_open()
        stored = encode_event(event)
        if event.topic.startswith(DEAD_LETTER_PREFIX):
            await self._store.keep_dead_letter(event.topic[len(DEAD_LETTER_PREFIX) :], stored)
            return True
        return await self._publishes.submit((stored, None))

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
        if await self._store.join(group, patterns, start, owner):
            self._log.info("created subscription %r on %s from %s", group, list(patterns), start)
        return LeasedConsumer(
            self._leases,
            self._registry,
            group,
            patterns,
            poll_interval=self.poll_interval,
            ack_patience=self.lease,
        )

    async def deliver_to(self, group: str, event: Event) -> None:
        self._check_open()
        await self._store.deliver_to(group, encode_event(event))
        self._registry.wake((), (group,))

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        self._check_open()
        return await self._store.dead_letters(group, ids, remove, limit)

    async def subscriptions(self) -> list[SubscriptionInfo]:
        """Every group; its backlog costs what was stored since the last call (``backlog``)."""
        self._check_open()
        return await self._backlog.subscriptions()

    async def delete_subscription(self, group: str) -> bool:
        self._check_open()
        self._registry.check_unread(group)
        deleted = await self._store.delete_subscription(group)
        if deleted:
            self._log.info("deleted subscription %r", group)
        return deleted

    async def find_events(self, query: EventQuery) -> EventPage:
        self._check_open()
        return await self._store.find_events(query)

    async def event_outcomes(self, event_id: str) -> list[Outcome]:
        self._check_open()
        return eventlog.outcomes(await self._store.event_facts(event_id))

    async def clean(self) -> int:
        """Apply the retention policy now: one pass; the number of events deleted.

        The pass finds its range once, then deletes it in batches of at most ``batch_size``,
        each its own transaction (publishes, acknowledgements and lease renewals go between
        two), sized as the pass goes to take about the store's ``retention_step``, with a rest
        after each (``RETENTION_REST``), for at most half the interval; what is left goes in
        the next pass. It is logged once, with its totals.
        """
        self._check_open()
        policy = self.retention
        started = time.monotonic()
        budget = started + max(1.0, policy.interval / 2)
        deleted, batches, lost = 0, 0, Counter[str]()
        ended = "done"
        bounds = await self._store.expire_range(policy)
        after = 0
        seconds = self._store.retention_step
        step = policy.batch_size if seconds is None else min(policy.batch_size, FIRST_STEP)
        while bounds is not None:
            began = time.monotonic()
            expired = await self._store.expire(replace(policy, batch_size=step), bounds, after)
            took = time.monotonic() - began
            step = _next_step(step, took, seconds, policy.batch_size)
            if expired is None:
                ended = "left to another process cleaning"
                break
            batches += 1
            deleted += expired.deleted
            lost.update(expired.lost)
            if expired.resume is None:
                break
            after = expired.resume
            if time.monotonic() >= budget:
                ended = "stopped at its time limit, the rest goes in the next pass"
                break
            # The pass takes at most a share of the store's time: what serves webhooks and
            # subscribers meanwhile waits behind one batch at most, not behind a stream of them.
            await asyncio.sleep(took * RETENTION_REST)
        self._report_pass(deleted, batches, lost, time.monotonic() - started, ended)
        return deleted

    # -- internals ---------------------------------------------------------------------------

    def _report_pass(
        self, deleted: int, batches: int, lost: Counter[str], took: float, ended: str
    ) -> None:
        """One line for a retention pass, and one warning per group that lost events in it."""
        for name, count in sorted(lost.items()):
            self._log.warning(
                "subscription %r fell behind the retained window: retention deleted %d events "
                "it had not received",
                name,
                count,
            )
        if deleted:
            self._log.info(
                "retention deleted %d events from %s in %.2fs (%d batches; %d events lost by "
                "%d subscriptions); %s",
                deleted,
                self._store.label,
                took,
                batches,
                lost.total(),
                len(lost),
                ended,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceClosedError(f"{self._store.label} is not running")

    def _published(self, batch: list[Publish]) -> None:
        """Wake this process's consumers of a commit, once its publishers have been answered.

        Not at the commit: under load the publishers' callers are answered first, and the
        consumers claim and handle the events while the next publish commit is under way.
        """
        self._registry.wake(
            {e.topic for e, t in batch if t is None}, {t for _, t in batch if t is not None}
        )

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        kind = self._log.name.rpartition(".")[2]
        self._tasks.append(asyncio.create_task(work, name=f"callboard-{kind}-{name}"))

    async def _stop(self, *, release: bool) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_all(self._tasks)
        # Publishes and acknowledgements under way are answered before the store goes.
        await self._publishes.wait_idle()
        await self._acks.wait_idle()
        await self._registry.end_all(release=release)
        await self._store.close()

    async def _sweep(self) -> None:
        """Wake the groups read here that have events to claim again, or that are gone.

        What a wake-up does not report: leases run out (their process died) or handed back by
        another process, and a group deleted by another process. One query for every group,
        instead of every idle consumer claiming on a timer.
        """
        reading = self._registry.groups()
        if not reading:
            return
        due = await self._store.due(self.lease)
        self._registry.wake((), [g for g in reading if due.get(g, True)])

    async def _renew(self) -> None:
        consumers = self._registry.live_ids()
        if consumers:
            await self._store.renew(consumers, self.lease)


class _Leases:
    """The broker's lease operations, as its consumers see them (``LeaseStore``)."""

    def __init__(self, broker: SqlBroker) -> None:
        self._broker = broker

    async def claim(self, group: str, consumer: str, limit: int) -> list[Delivery]:
        return await self._broker._store.claim(group, consumer, limit, self._broker.lease)

    async def ack(self, group: str, leases: Sequence[tuple[str, int]]) -> list[bool]:
        return await self._broker._acks.submit_many(
            [(group, consumer, seq) for consumer, seq in leases]
        )

    async def release(self, group: str, consumer: str, seqs: Sequence[int] | None) -> None:
        if await self._broker._store.release(group, consumer, seqs):
            self._broker._registry.wake((), (group,))
