"""The in-process broker: the library's default and the broker of unit tests.

Nothing survives the process. Each consumer group has one queue; a publish appends the event to
the queue of every group whose patterns match its topic, so a slow group never holds up the
publisher or another group. ``drain()`` waits until every event published so far has been
acknowledged, which lets tests wait for delivery without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    Delivery,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.brokers.storable import check_storable
from callboard.errors import ServiceClosedError, SubscriptionError
from callboard.events import Event
from callboard.topics import TopicIndex, normalize_patterns


class _Group:
    __slots__ = ("consumers", "in_flight", "name", "queue", "topics", "waiters")

    def __init__(self, name: str, topics: tuple[str, ...]) -> None:
        self.name = name
        self.topics = topics
        self.queue: deque[Delivery] = deque()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.consumers = 0
        self.in_flight = 0

    def put(self, delivery: Delivery, *, front: bool = False) -> None:
        if front:
            self.queue.appendleft(delivery)
        else:
            self.queue.append(delivery)
        self.wake_one()

    def wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break


class _DeliveryWindow:
    """The delivery ids accepted recently, bounded by count and age."""

    def __init__(self, max_ids: int, max_age: float) -> None:
        self._ids: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._max_ids = max_ids
        self._max_age = max_age

    def seen(self, topic: str, delivery_id: str) -> bool:
        """Record the id and tell whether it was already there."""
        now = time.monotonic()
        ids = self._ids
        while ids and now - next(iter(ids.values())) >= self._max_age:
            ids.popitem(last=False)
        key = (topic, delivery_id)
        if key in ids:
            return True
        # Make room only for a new id, so a full window still recognises every id it holds.
        while len(ids) >= self._max_ids:
            ids.popitem(last=False)
        ids[key] = now
        return False


class MemoryConsumer:
    """One member of an in-memory consumer group."""

    def __init__(self, broker: MemoryBroker, group: _Group) -> None:
        self._broker = broker
        self._group = group
        self._unacked: dict[int, Delivery] = {}
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        group = self._group
        while not group.queue:
            if self._closed:
                return ()
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            group.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and group.queue:
                    # Woken for an event and cancelled before taking it: pass the wake-up on.
                    group.wake_one()
                raise
            finally:
                self._waiter = None
        if self._closed:
            return ()
        queue = group.queue
        batch = [queue.popleft() for _ in range(min(max_count, len(queue)))]
        for delivery in batch:
            self._unacked[id(delivery)] = delivery
        group.in_flight += len(batch)
        if queue and group.waiters:
            # Other members are waiting and events are left: wake one of them.
            group.wake_one()
        return batch

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        unacked = self._unacked
        settled = 0
        for delivery in deliveries:
            if unacked.pop(id(delivery), None) is not None:
                settled += 1
        if settled:
            self._group.in_flight -= settled
            self._broker._settled(settled)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        unacked = self._unacked
        wanted = {id(delivery) for delivery in deliveries}
        # In the order they were fetched, whatever the order they are handed back in.
        released = [unacked.pop(key) for key in list(unacked) if key in wanted]
        if released:
            self._group.in_flight -= len(released)
            self._hand_back(released)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        group = self._group
        group.consumers -= 1
        unacked = list(self._unacked.values())
        self._unacked.clear()
        group.in_flight -= len(unacked)
        if group.consumers == 0:
            # The last member left: the in-memory subscription ends with it.
            self._broker._remove_group(group, len(unacked))
            return
        self._hand_back(unacked)
        if group.queue:
            # This member may have been woken for events it will now never take: pass the
            # wake-up on, or the others sleep while events wait.
            group.wake_one()

    def _hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Put deliveries back first in line, in their order, each one attempt further."""
        group = self._group
        for delivery in reversed(deliveries):
            group.put(Delivery(delivery.event, delivery.attempt + 1), front=True)


class MemoryBroker:
    """In-process broker. ``memory://`` in configuration; a ``Broker`` and a ``BrokerAdmin``."""

    def __init__(self, *, dedupe_window_ids: int = 10_000, dedupe_window_seconds: float = 600.0):
        self._groups: dict[str, _Group] = {}
        #: The groups by their topic patterns: a publish finds the groups of its topic.
        self._routes: TopicIndex[_Group] = TopicIndex()
        self._window = _DeliveryWindow(dedupe_window_ids, dedupe_window_seconds)
        self._dead_letters: dict[str, list[Event]] = {}
        #: Owners outlive their groups, as dead letters do, until the subscription is deleted.
        self._owners: dict[str, str] = {}
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> MemoryBroker:
        if retention is None:
            return cls()
        # Nothing is stored, but delivery ids are remembered for the window a durable broker
        # keeps them: at least ``min_age``, at most ``max_count`` of them.
        return cls(dedupe_window_ids=retention.max_count, dedupe_window_seconds=retention.min_age)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True

    async def publish(self, event: Event) -> bool:
        if self._closed:
            raise ServiceClosedError("the memory broker is closed")
        check_storable(event)  # refused here as every durable broker refuses it
        topic = event.topic
        if topic.startswith(DEAD_LETTER_PREFIX):
            self._dead_letters.setdefault(topic[len(DEAD_LETTER_PREFIX) :], []).append(event)
            return True
        delivery_id = event.delivery_id
        if delivery_id is not None and self._window.seen(topic, delivery_id):
            return False
        groups = self._routes(topic)
        if groups:
            self._pending += len(groups)
            self._idle.clear()
            delivery = Delivery(event)
            for group in groups:
                group.put(delivery)
        return True

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> MemoryConsumer:
        if start != "end":
            raise SubscriptionError(
                f"subscription {group!r}: the memory broker keeps no history to start from "
                f"{start!r}; use a durable broker (sqlite:// or postgresql://) to replay"
            )
        patterns = normalize_patterns(topics)
        existing = self._groups.get(group)
        if existing is None:
            existing = self._groups[group] = _Group(group, patterns)
            self._routes.add(existing, patterns)
        elif set(existing.topics) != set(patterns):
            raise SubscriptionError(
                f"subscription {group!r} already reads {list(existing.topics)}; "
                f"cannot join it with {list(patterns)}: use another subscription id"
            )
        if owner is not None:
            self._owners.setdefault(group, owner)
        existing.consumers += 1
        return MemoryConsumer(self, existing)

    async def deliver_to(self, group: str, event: Event) -> None:
        target = self._groups.get(group)
        if target is None:
            raise SubscriptionError(f"no subscription {group!r} to deliver to")
        self._pending += 1
        self._idle.clear()
        target.put(Delivery(event))

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        letters = self._dead_letters.get(group, [])
        wanted = set(ids) if ids is not None else None
        chosen = [e for e in letters if wanted is None or e.id in wanted][:limit]
        if remove and chosen:
            taken = {e.id for e in chosen}
            self._dead_letters[group] = [e for e in letters if e.id not in taken]
        return chosen

    async def subscriptions(self) -> list[SubscriptionInfo]:
        return [
            SubscriptionInfo(
                name=group.name,
                topics=group.topics,
                in_flight=group.in_flight,
                backlog=len(group.queue),
                owner=self._owners.get(group.name),
            )
            for group in sorted(self._groups.values(), key=lambda g: g.name)
        ]

    async def delete_subscription(self, group: str) -> bool:
        # A group in memory lives as long as its consumers: only its dead letters outlive it.
        live = self._groups.get(group)
        if live is not None:
            raise SubscriptionError(
                f"subscription {group!r} is still read by {live.consumers} consumer(s) in this "
                "process; stop them before deleting it"
            )
        self._owners.pop(group, None)
        return bool(self._dead_letters.pop(group, None))

    async def clean(self) -> int:
        """Nothing is kept beyond the process, so there is nothing to delete: 0."""
        return 0

    async def migrate(self) -> list[str]:
        """No schema: ``[]``."""
        return []

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every event published so far has been acknowledged by every group."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    def _remove_group(self, group: _Group, unacked: int) -> None:
        if self._groups.get(group.name) is group:
            del self._groups[group.name]
            self._routes.remove(group)
        self._settled(unacked + len(group.queue))
        group.queue.clear()

    def _settled(self, count: int) -> None:
        self._pending -= count
        if self._pending <= 0:
            self._pending = 0
            self._idle.set()
