"""Consumers of the SQL-backed brokers: leases claimed from a store, wake-ups, renewals.

A consumer claims events for its group from the store; each claimed event is leased to it until
a deadline. While the consumer's process lives, the broker renews the leases of all its live
consumers (``ConsumerRegistry.live_ids``), so a slow handler never loses its event to another
consumer; when the process dies the renewals stop, the leases run out and another consumer of the
group claims the events again. Releasing deliveries hands their leases back at once, and closing
a consumer all of its leases.

Waiting for events costs nothing when idle: a consumer that found nothing sleeps until its
broker wakes it: an event on one of its topics was stored (by this process, or by another one,
which the store's ``watch`` reports), or its group has leases to claim again or is gone (which
the broker's sweep finds every ``poll_interval``, for all groups in one query). A consumer also
claims by itself after ``IDLE_POLLS`` intervals without a wake-up, spread at random so idle
consumers never claim together; that catches only what the wake-ups would have missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import uuid
from collections.abc import Iterable, Sequence
from typing import Protocol

from callboard.brokers.base import Delivery
from callboard.errors import BrokerError, BrokerUnavailable, SubscriptionError
from callboard.topics import TopicIndex

logger = logging.getLogger("callboard.brokers")

#: Longest pause between two attempts to reach a store that is down.
MAX_BACKOFF = 5.0

#: Poll intervals an idle consumer waits for a wake-up before claiming anyway (at random
#: between half of it and all of it).
IDLE_POLLS = 30


class LeaseStore(Protocol):
    """What a SQL broker does for its consumers."""

    async def claim(self, group: str, consumer: str, limit: int) -> list[Delivery]:
        """Lease up to ``limit`` events of ``group`` to ``consumer``, oldest first."""
        ...

    async def ack(self, group: str, leases: Sequence[tuple[str, int]]) -> list[bool]:
        """Delete leases ``(consumer, seq)`` of ``group``; per lease, whether it was still held."""
        ...

    async def release(self, group: str, consumer: str, seqs: Sequence[int] | None) -> None:
        """Hand leases ``seqs`` of ``consumer`` (``None``: all of them) back to the group."""
        ...


class ConsumerRegistry:
    """The live consumers of one broker: whom to wake, whose leases to renew.

    Consumers are indexed by their topic patterns and by group, so a wake-up costs what it
    wakes: the consumers of the committed topics, not a test of every live consumer's patterns.
    """

    def __init__(self) -> None:
        #: By the id a consumer claims under now (``LeasedConsumer._rejoin`` changes it).
        self._consumers: dict[str, LeasedConsumer] = {}
        self._groups: dict[str, set[LeasedConsumer]] = {}
        self._topics: TopicIndex[LeasedConsumer] = TopicIndex()

    def add(self, consumer: LeasedConsumer) -> None:
        self._consumers[consumer.id] = consumer
        self._groups.setdefault(consumer.group, set()).add(consumer)
        self._topics.add(consumer, consumer.patterns)

    def remove(self, consumer: LeasedConsumer) -> None:
        if self._consumers.get(consumer.id) is not consumer:
            return
        del self._consumers[consumer.id]
        members = self._groups[consumer.group]
        members.discard(consumer)
        if not members:
            del self._groups[consumer.group]
        self._topics.remove(consumer)

    def renamed(self, consumer: LeasedConsumer, old_id: str) -> None:
        """``consumer`` claims under a new id from now on: renew that one's leases."""
        if self._consumers.get(old_id) is consumer:
            del self._consumers[old_id]
            self._consumers[consumer.id] = consumer

    def groups(self) -> list[str]:
        """The groups that consumers of this broker read."""
        return list(self._groups)

    def live_ids(self) -> list[str]:
        return list(self._consumers)

    def group_patterns(self, group: str) -> set[tuple[str, ...]]:
        return {c.patterns for c in self._groups.get(group, ())}

    def check_unread(self, group: str) -> None:
        """Refuse to forget a group that a live consumer of this broker still reads."""
        readers = len(self._groups.get(group, ()))
        if readers:
            raise SubscriptionError(
                f"subscription {group!r} is still read by {readers} consumer(s) in this "
                "process; stop them before deleting it"
            )

    def wake(self, topics: Iterable[str] | None = None, groups: Iterable[str] = ()) -> None:
        """Wake consumers reading any of ``topics`` or belonging to ``groups`` (``None``: all)."""
        if topics is None:
            for consumer in self._consumers.values():
                consumer.wake()
            return
        for topic in topics:
            for consumer in self._topics(topic):
                consumer.wake()
        for group in groups:
            for consumer in self._groups.get(group, ()):
                consumer.wake()

    async def end_all(self, *, release: bool) -> None:
        """End every live consumer: closed (leases handed back) or, if not ``release``, detached."""
        consumers = list(self._consumers.values())
        self._consumers.clear()
        self._groups.clear()
        self._topics = TopicIndex()
        for consumer in consumers:
            if release:
                await consumer.close()
            else:
                consumer.detach()


class LeasedConsumer:
    """One member of a consumer group of a SQL broker."""

    def __init__(
        self,
        store: LeaseStore,
        registry: ConsumerRegistry,
        group: str,
        patterns: tuple[str, ...],
        *,
        poll_interval: float,
        ack_patience: float,
    ) -> None:
        self.id = uuid.uuid4().hex
        #: Every id this consumer has claimed under (``_rejoin`` adds one): its leases' holders.
        self._claimers = {self.id}
        self.group = group
        self.patterns = patterns
        self._store = store
        self._registry = registry
        self._poll_interval = poll_interval
        self._ack_patience = ack_patience
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._ready: list[Delivery] = []
        self._claim: asyncio.Future[list[Delivery]] | None = None
        self._closed = False
        registry.add(self)

    def wake(self) -> None:
        self._wake.set()

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        backoff = self._poll_interval
        while not self._closed:
            if self._ready:
                batch, self._ready = self._ready[:max_count], self._ready[max_count:]
                return batch
            # Cleared before claiming: a wake-up that arrives during the claim is not lost.
            self._wake.clear()
            try:
                await self._claim_more(max_count)
            except BrokerUnavailable as error:
                self._rejoin()
                logger.warning(
                    "subscription %r cannot reach its broker; retrying in %.1fs: %s",
                    self.group,
                    backoff,
                    error,
                )
                await self._sleep(backoff)
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            except BrokerError as error:
                # The store refused the claim (a deadlock, a serialization failure, a statement
                # cancelled by an operator): rolled back, it leased nothing. Try again rather
                # than end the subscription; a refusal that lasts is logged at every attempt.
                logger.error(
                    "subscription %r: the broker refused a claim; retrying in %.1fs: %s",
                    self.group,
                    backoff,
                    error,
                )
                await self._pause(backoff)  # not cut short by wake-ups: they come at every commit
                backoff = min(MAX_BACKOFF, backoff * 2)
                continue
            backoff = self._poll_interval
            if not self._ready:
                await self._sleep(self._poll_interval * IDLE_POLLS * random.uniform(0.5, 1.0))
        return ()

    async def _claim_more(self, max_count: int) -> None:
        claim = self._claim
        if claim is None:
            claim = asyncio.ensure_future(self._store.claim(self.group, self.id, max_count))
            # The claim runs to its end even if this fetch is cancelled (``asyncio.wait_for``):
            # what it leased waits in ``_ready`` for the next fetch instead of being lost.
            claim.add_done_callback(functools.partial(self._claimed, self.id))
            self._claim = claim
        await asyncio.shield(claim)

    def _claimed(self, claimer: str, claim: asyncio.Future[list[Delivery]]) -> None:
        self._claim = None
        if not claim.cancelled() and claim.exception() is None:
            # Acknowledged under the id that leased them, whatever ``_rejoin`` does meanwhile.
            self._ready.extend(
                Delivery(d.event, d.attempt, (claimer, d.token)) for d in claim.result()
            )

    def _rejoin(self) -> None:
        """Claim under a new id from now on, after a claim or an ack that failed.

        A claim that failed on the way back (the connection dropped after the commit, or the
        broker gave up waiting) may still have leased events to this consumer, and an ack given
        up on leaves its lease behind. Renewed with the consumer's live leases they would stay
        leased to it and never be handled again; under an id nobody renews any more, they run
        out and go back to the group.
        """
        if self._closed:
            return  # no longer renewed anyway
        old_id, self.id = self.id, uuid.uuid4().hex
        self._claimers.add(self.id)
        self._registry.renamed(self, old_id)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _pause(self, seconds: float) -> None:
        """Sleep, woken early only by the consumer's end."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        leased: list[Delivery] = []
        leases: list[tuple[str, int]] = []
        for delivery in deliveries:
            claimer, seq = self._lease(delivery)
            if claimer:
                leased.append(delivery)
                leases.append((claimer, seq))
        if not leased:
            return
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._ack_patience
        delay = 0.05
        while True:
            try:
                held = await self._store.ack(self.group, leases)
            except BrokerError as error:
                # Unreachable, or refused (rolled back): either way the leases are still held.
                if loop.time() + delay > give_up:
                    self._rejoin()  # no longer renewed, the leases run out as promised below
                    logger.warning(
                        "subscription %r could not acknowledge %d events (%s...); they will be "
                        "delivered again: %s",
                        self.group,
                        len(leased),
                        leased[0].event.id,
                        error,
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(MAX_BACKOFF, delay * 2)
                continue
            for delivery, still_held in zip(leased, held, strict=True):
                if not still_held:
                    logger.warning(
                        "subscription %r acknowledged event %s after its lease ran out; another "
                        "consumer has it now and it will be handled again",
                        self.group,
                        delivery.event.id,
                    )
            return

    def _lease(self, delivery: Delivery) -> tuple[str, int]:
        """The lease ``(claimer, seq)`` of a delivery, ``("", 0)`` when this consumer took
        another member's delivery for one of its own: it holds no lease of it."""
        token = delivery.token
        if isinstance(token, tuple) and token[0] in self._claimers:
            return token[0], token[1]
        return "", 0

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        held: dict[str, list[int]] = {}
        for delivery in deliveries:
            claimer, seq = self._lease(delivery)
            if claimer:
                held.setdefault(claimer, []).append(seq)
        for claimer, seqs in held.items():
            try:
                await self._store.release(self.group, claimer, seqs)
            except BrokerError as error:
                # Still held, and renewed while this consumer lives: claiming under a new id
                # lets them run out and go back to the group within a lease.
                if claimer == self.id:
                    self._rejoin()
                logger.warning(
                    "subscription %r could not hand %d events back; they return to the group "
                    "when their leases run out: %s",
                    self.group,
                    len(seqs),
                    error,
                )

    def detach(self) -> None:
        """End this consumer without handing its leases back (its broker stopped abruptly)."""
        self._closed = True
        self._wake.set()
        self._closing.set()
        self._ready.clear()
        self._registry.remove(self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._closing.set()
        claim = self._claim
        if claim is not None:
            # Let a claim in flight finish, so what it leases is handed back below.
            await asyncio.wait([claim])
        self._ready.clear()
        self._registry.remove(self)
        try:
            await self._store.release(self.group, self.id, None)
        except BrokerUnavailable as error:
            logger.warning(
                "subscription %r could not hand its events back; they return to the group "
                "when their leases run out: %s",
                self.group,
                error,
            )
