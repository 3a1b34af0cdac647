"""A bus feed over one broker consumer (``callboard.bus.feeds``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from callboard.brokers.base import Capabilities, Consumer, Delivery, Start
from callboard.brokers.memory import MemoryBroker
from callboard.bus.feeds import Feed
from callboard.bus.wire import NOTIFIED
from callboard.events import Event

TOPIC = "orders.created"


class Counted:
    """A consumer that counts what the feed asks of it and signals releases and closing."""

    def __init__(self, inner: Consumer, broker: Counting) -> None:
        self.inner = inner
        self.broker = broker

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        return await self.inner.fetch(max_count)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.broker.acked += len(deliveries)
        await self.inner.ack(deliveries)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        await self.inner.release(deliveries)
        self.broker.released.set()

    async def close(self) -> None:
        await self.inner.close()
        self.broker.closes += 1
        self.broker.closed.set()


class Counting:
    """A memory broker that counts joins; ``durable`` makes it say its groups outlive members."""

    def __init__(self, inner: MemoryBroker, *, durable: bool = False) -> None:
        self.inner = inner
        self.durable = durable
        self.joins = 0
        self.closes = 0
        self.acked = 0
        self.released = asyncio.Event()
        self.closed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def capabilities(self) -> Capabilities:
        return replace(self.inner.capabilities, durable=self.durable)

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> Counted:
        self.joins += 1
        return Counted(await self.inner.consume(group, topics, start=start, owner=owner), self)


async def _setup(
    *, durable: bool = False, hold: float = 5.0, linger: float = 60.0
) -> tuple[MemoryBroker, Counting, Feed]:
    memory = MemoryBroker()
    await memory.start()
    broker = Counting(memory, durable=durable)
    feed = Feed(broker, "reader", (TOPIC,), hold=hold, linger=linger)
    await feed.open()
    return memory, broker, feed


async def _publish(memory: MemoryBroker, *payloads: object) -> None:
    for payload in payloads:
        await memory.publish(Event(topic=TOPIC, payload=payload))


async def test_a_feed_reads_every_batch_with_its_one_consumer() -> None:
    memory, broker, feed = await _setup()
    await _publish(memory, *range(25))
    seen: list[object] = []
    while len(seen) < 25:
        batch = await feed.take(3.0)
        assert batch is not None
        seen += [d.event.payload for d in batch.events()]
        await feed.finish(batch, handled=True)
    assert seen == list(range(25))
    assert (broker.joins, broker.closes, broker.acked) == (1, 0, 25)
    [info] = await memory.subscriptions()
    assert (info.in_flight, info.backlog) == (0, 0)
    await feed.close()
    assert await memory.subscriptions() == []  # the group ended with its last member


async def test_a_reader_gets_no_more_than_it_asked_for_and_the_rest_waits_for_the_next() -> None:
    memory, broker, feed = await _setup()
    await _publish(memory, *range(5))
    first = await feed.take(3.0, limit=2)
    assert first is not None
    assert [d.event.payload for d in first.events()] == [0, 1]
    [info] = await memory.subscriptions()
    assert (info.in_flight, info.backlog) == (2, 3)  # fetched no more than asked for
    await feed.wait(3.0)  # a held read has the broker's batch fetched
    second = await feed.take(3.0, limit=2)
    rest = await feed.take(3.0)
    assert second is not None
    assert rest is not None
    assert [d.event.payload for d in second.events()] == [2, 3]
    assert [d.event.payload for d in rest.events()] == [4]
    for batch in (first, second, rest):
        await feed.finish(batch, handled=True)
    assert broker.joins == 1
    [info] = await memory.subscriptions()
    assert (info.in_flight, info.backlog) == (0, 0)
    await feed.close()


async def test_a_batch_nobody_came_for_goes_back_first_in_line() -> None:
    memory, broker, feed = await _setup(hold=0.01)
    await _publish(memory, "first")
    await feed.wait(3.0)  # a held read: the batch waits for a reader who does not come
    await asyncio.wait_for(broker.released.wait(), 3)
    await _publish(memory, "second")
    batch = await feed.take(3.0)
    assert batch is not None
    assert [(d.event.payload, d.attempt) for d in batch.events()] == [("first", 2), ("second", 1)]
    assert broker.joins == 1
    await feed.close()


async def test_refused_deliveries_come_back_at_once_and_acknowledged_ones_never() -> None:
    memory, broker, feed = await _setup()
    await _publish(memory, 1, 2, 3)
    batch = await feed.take(3.0)
    assert batch is not None
    leased = {d.event.payload: d.ack_id for d in feed.lease(batch, 30.0)}
    assert await feed.nack([leased[2], "no-such-id"]) == ([leased[2]], ["no-such-id"])
    again = await feed.take(3.0)
    assert again is not None
    assert [(d.event.payload, d.attempt) for d in again.events()] == [(2, 2)]
    assert await feed.ack([leased[1], leased[3]]) == ([leased[1], leased[3]], [])
    assert await feed.ack([leased[1]]) == ([], [leased[1]])
    await feed.finish(again, handled=True)
    [info] = await memory.subscriptions()
    assert (info.in_flight, info.backlog) == (0, 0)
    assert broker.joins == 1
    await feed.close()


async def test_a_lease_that_runs_out_hands_the_rest_back() -> None:
    memory, _, feed = await _setup()
    await _publish(memory, 1, 2)
    batch = await feed.take(3.0)
    assert batch is not None
    leased = {d.event.payload: d.ack_id for d in feed.lease(batch, 0.01)}
    assert await feed.ack([leased[1]]) == ([leased[1]], [])
    again = await feed.take(3.0)
    assert again is not None
    assert [(d.event.payload, d.attempt) for d in again.events()] == [(2, 2)]
    assert feed.renew([leased[2]], 30.0) == ([], [leased[2]])
    await feed.close()


async def test_events_its_publisher_already_delivered_here_are_acknowledged_unread() -> None:
    memory, broker, feed = await _setup()
    await memory.publish(Event(topic=TOPIC, payload="seen", metadata={NOTIFIED: ["reader"]}))
    await memory.publish(Event(topic=TOPIC, payload="other", metadata={NOTIFIED: "someone"}))
    batch = await feed.take(3.0)
    assert batch is not None
    assert [d.event.payload for d in batch.events()] == ["other"]
    assert broker.acked == 1
    await feed.close()


async def test_closing_a_feed_hands_back_what_it_held() -> None:
    memory, _, feed = await _setup()
    other = await memory.consume("reader", [TOPIC])  # keeps the in-memory group alive
    await _publish(memory, 1, 2)
    batch = await feed.take(3.0)
    assert batch is not None
    feed.lease(batch, 30.0)
    await feed.close()
    back = await asyncio.wait_for(other.fetch(10), 3)
    assert [(d.event.payload, d.attempt) for d in back] == [(1, 2), (2, 2)]
    await other.close()


async def test_an_idle_feed_on_a_durable_broker_leaves_the_group_until_the_next_read() -> None:
    memory, broker, feed = await _setup(durable=True, linger=0.01)
    other = await memory.consume("reader", [TOPIC])  # a durable group outlives its members
    assert await feed.take(0.01) is None  # the reader leaves; its fetch is still waiting
    await asyncio.wait_for(broker.closed.wait(), 3)
    assert (broker.joins, broker.closes) == (1, 1)
    await _publish(memory, "later")
    batch = await feed.take(3.0)  # the next read joins again
    assert batch is not None
    assert [d.event.payload for d in batch.events()] == ["later"]
    assert broker.joins == 2
    await feed.close()
    await other.close()


async def test_a_resting_feed_keeps_its_consumer_while_a_batch_is_out_or_the_group_needs_it() -> (
    None
):
    memory, broker, feed = await _setup(durable=True)
    await _publish(memory, 1)
    batch = await feed.take(3.0)
    assert batch is not None
    feed._rest()  # what ``linger`` seconds without readers do
    assert broker.closes == 0  # the batch being sent is settled through it
    await feed.finish(batch, handled=True)
    feed._rest()
    await asyncio.wait_for(broker.closed.wait(), 3)
    await feed.close()
    assert broker.closes == 1

    memory, broker, feed = await _setup(durable=False)
    assert await feed.take(0.01) is None
    feed._rest()  # an in-memory group would end with its last member: the feed stays in it
    assert broker.closes == 0
    await _publish(memory, 2)
    batch = await feed.take(3.0)  # the cancelled fetch lost nothing
    assert batch is not None
    assert [d.event.payload for d in batch.events()] == [2]
    await feed.close()
    assert broker.closes == 1
