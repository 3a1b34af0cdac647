"""Consumer groups of the Kafka broker: per-event leases over one ordered log.

A Kafka consumer group hands whole partitions to its members; callboard's groups hand out single
events, acknowledged one by one. So a group is kept by the broker itself: ``next`` (the next log
offset not yet looked at), what was handed back (``pending``, delivered again first), what is in
flight, and what was acknowledged above the group's ``floor``, the lowest offset not settled. The
group's position is written to the compacted group topic as ``floor`` (what a Kafka commit would
say) plus the acknowledged offsets and delivery counts above it, so a group resumes where it was,
and the events leased now (by consumer), so other processes can tell what is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from callboard.brokers.base import Delivery
from callboard.brokers.kafka_log import Mirror, Stored
from callboard.errors import SubscriptionError
from callboard.topics import TopicMatcher

_consumer_ids = itertools.count(1)


class GroupState:
    """One group's position in the log, as this broker instance holds it."""

    def __init__(self, name: str, topics: tuple[str, ...], mirror: Mirror) -> None:
        self.name = name
        self.topics = topics
        self._matcher = TopicMatcher(topics)
        self._mirror = mirror
        self.next = mirror.end
        self.pending: list[int] = []
        self.in_flight: dict[int, int] = {}
        self.acked: set[int] = set()
        self.attempts: dict[int, int] = {}
        self.lost = 0
        self.consumers = 0
        #: The broker closed: consumers' fetches return nothing from now on.
        self.closed = False
        self.dirty = False
        self.changed = asyncio.Condition()

    def matches(self, stored: Stored) -> bool:
        if stored.target is not None:
            return stored.target == self.name
        return self._matcher(stored.event.topic)

    # -- position ---------------------------------------------------------------------------

    @property
    def floor(self) -> int:
        return min([self.next, *self.pending, *self.in_flight])

    def snapshot(self) -> dict[str, Any]:
        """The position as written to the group topic."""
        floor = self.floor
        return {
            "floor": floor,
            "next": self.next,
            "acked": sorted(o for o in self.acked if o >= floor),
            "attempts": {str(o): n for o, n in self.attempts.items() if o >= floor},
            "lost": self.lost,
            # Not read back by ``restore``: for what other processes tell of the group.
            "leased": {str(o): c for o, c in self.in_flight.items()},
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Resume from a written position: what was delivered and not acknowledged comes back."""
        start = self._mirror.floor
        self.next = max(int(saved["next"]), start)
        self.acked = {int(o) for o in saved["acked"]}
        self.attempts = {int(o): int(n) for o, n in saved["attempts"].items()}
        self.lost = int(saved.get("lost", 0))
        floor = max(int(saved["floor"]), start)
        self.pending = [
            o
            for o in range(floor, self.next)
            if o not in self.acked
            and (s := self._mirror.log.get(o)) is not None
            and self.matches(s)
        ]

    def start_at(self, offset: int) -> None:
        self.next = max(offset, self._mirror.floor)

    # -- figures ----------------------------------------------------------------------------

    def backlog(self) -> int:
        log = self._mirror.log
        waiting = sum(1 for o in self.pending if o in log)
        return waiting + sum(
            1 for o in range(self.next, self._mirror.end) if (s := log.get(o)) and self.matches(s)
        )

    def expire(self, floor: int) -> None:
        """The log below ``floor`` was deleted: count what this group had not received."""
        log = self._mirror.log
        gone = [o for o in self.pending if o < floor]
        lost = len(gone)
        for offset in range(self.next, floor):
            stored = log.get(offset)
            if stored is not None and self.matches(stored):
                lost += 1
        if gone:
            self.pending = [o for o in self.pending if o >= floor]
            heapq.heapify(self.pending)
        self.next = max(self.next, floor)
        self.lost += lost
        self.acked = {o for o in self.acked if o >= floor}
        self.attempts = {
            o: n for o, n in self.attempts.items() if o >= floor or o in self.in_flight
        }
        self.dirty = True

    # -- handing out ------------------------------------------------------------------------

    def take(self, consumer: int, max_count: int) -> list[Delivery]:
        """Up to ``max_count`` events for ``consumer``: handed-back ones first, then new ones."""
        log = self._mirror.log
        taken: list[Stored] = []
        while self.pending and len(taken) < max_count:
            stored = log.get(heapq.heappop(self.pending))
            if stored is not None:
                taken.append(stored)
        end = self._mirror.end
        while len(taken) < max_count and self.next < end:
            stored = log.get(self.next)
            self.next += 1
            if stored is not None and self.matches(stored):
                taken.append(stored)
        deliveries = []
        for stored in taken:
            attempt = self.attempts.get(stored.offset, 0) + 1
            self.attempts[stored.offset] = attempt
            self.in_flight[stored.offset] = consumer
            deliveries.append(Delivery(stored.event, attempt, (consumer, stored.offset)))
        if deliveries:
            self.dirty = True
        return deliveries

    def settle(self, consumer: int, deliveries: Sequence[Delivery], *, ack: bool) -> int:
        """Acknowledge or hand back what ``consumer`` holds of ``deliveries``."""
        count = 0
        for delivery in deliveries:
            token = delivery.token
            if not isinstance(token, tuple) or token[0] != consumer:
                continue
            offset = token[1]
            if self.in_flight.get(offset) != consumer:
                continue
            del self.in_flight[offset]
            count += 1
            if ack:
                self.acked.add(offset)
                self.attempts.pop(offset, None)
            else:
                heapq.heappush(self.pending, offset)
        if count:
            self.dirty = True
        return count

    def hand_back(self, consumer: int | None = None) -> None:
        """What ``consumer`` (``None``: every consumer) holds goes back to the group."""
        for offset, holder in list(self.in_flight.items()):
            if consumer is None or holder == consumer:
                del self.in_flight[offset]
                heapq.heappush(self.pending, offset)
                self.dirty = True

    def hand_back_all(self) -> None:
        """The broker closes: every consumer's events go back, every fetch ends."""
        self.hand_back()
        self.closed = True

    async def wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class KafkaConsumer:
    """One member of a group; what it fetched is leased to it while it lives.

    A group is read by one process at a time: a consumer made while another process holds the
    group stands by (``group`` is ``None``), its fetches waiting, and tries ``take`` every
    ``wait`` seconds until the group is this process's (the other one stopped, or crashed and
    its hold ran out); then it reads from the group's written position.
    """

    def __init__(
        self,
        name: str,
        group: GroupState | None,
        take: Callable[[], Awaitable[GroupState | None]],
        exists: Callable[[], bool],
        *,
        wait: float,
    ) -> None:
        self._name = name
        self._group: GroupState | None = None
        self._take = take
        self._wait = wait
        self._id = next(_consumer_ids)
        self._closed = False
        self._closing = asyncio.Event()
        #: Tells whether the group still exists (another instance may delete it).
        self._exists = exists
        if group is not None:
            self._attach(group)

    @property
    def standing_by(self) -> bool:
        return self._group is None and not self._closed

    def _attach(self, group: GroupState) -> None:
        self._group = group
        group.consumers += 1

    def stand_down(self) -> None:
        """The broker closes: a consumer still standing by ends its fetches."""
        if self._group is None:
            self._closed = True
            self._closing.set()

    async def _held(self) -> GroupState | None:
        """The group once this process holds it; ``None`` if the consumer closed first."""
        while self._group is None:
            if self._closed:
                return None
            self._check_exists()
            group = await self._take()
            if group is not None and not self._closed:
                self._attach(group)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._wait)
        return self._group

    def _check_exists(self) -> None:
        if not self._exists():
            raise SubscriptionError(
                f"the subscription {self._name!r} no longer exists (it was deleted); "
                "subscribe again to make it anew"
            )

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        group = await self._held()
        if group is None:
            return ()
        while True:
            if self._closed or group.closed:
                return ()
            self._check_exists()
            taken = group.take(self._id, max(1, max_count))
            if taken:
                return taken
            async with group.changed:
                await group.changed.wait()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if self._group is not None:
            self._group.settle(self._id, deliveries, ack=True)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        if self._group is not None and self._group.settle(self._id, deliveries, ack=False):
            await self._group.wake()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        group = self._group
        if group is None:
            return
        group.consumers -= 1
        group.hand_back(self._id)
        await group.wake()

    @property
    def closed(self) -> bool:
        return self._closed
