"""A bus feed's life around a batch being handed over (``callboard.bus.feeds``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from callboard.brokers.base import Start
from callboard.brokers.memory import MemoryBroker, MemoryConsumer
from callboard.bus.feeds import Feed
from callboard.events import Event


class SlowToJoin:
    """A memory broker whose joins after the first wait (``waiting``) until ``let_in`` is set."""

    def __init__(self, inner: MemoryBroker) -> None:
        self.inner = inner
        self.joins = 0
        self.waiting = asyncio.Event()
        self.let_in = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> MemoryConsumer:
        self.joins += 1
        if self.joins > 1:
            self.waiting.set()
            await self.let_in.wait()
        return await self.inner.consume(group, topics, start=start, owner=owner)


async def test_closing_a_feed_waits_for_the_batch_it_is_handing_over() -> None:
    memory = MemoryBroker()
    await memory.start()
    broker = SlowToJoin(memory)
    feed = Feed(broker, "reader", ("orders.created",))  # type: ignore[arg-type]
    await feed.open()
    await memory.publish(Event(topic="orders.created", payload=1))
    taking = asyncio.create_task(feed.take(5.0))
    # The batch is taken; the feed is opening its next consumer.
    await asyncio.wait_for(broker.waiting.wait(), 3)
    closing = asyncio.create_task(feed.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # it waits for the hand-over in progress
    broker.let_in.set()
    await asyncio.wait_for(closing, 3)
    assert await asyncio.wait_for(taking, 3) is None
    # Nothing of the closed feed still reads the group: it ended with its last member.
    assert await memory.subscriptions() == []
    await memory.close()
