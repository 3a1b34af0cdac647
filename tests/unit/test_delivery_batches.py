"""How much a worker fetches at once: ``batch_size``, more while its handler is quick."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from callboard import DefaultEventsService, Event, MemoryBroker, RetryPolicy
from callboard.brokers.base import Capabilities, Delivery
from callboard.brokers.memory import MemoryConsumer
from callboard.delivery import GROWTH, QUICK_BATCH


class AcrossTheNetwork(MemoryBroker):
    """A memory broker that says it is durable, as the brokers with a round trip are."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=True)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """What each fetch of any memory consumer asked for, in turn."""
    sizes: list[int] = []
    fetch = MemoryConsumer.fetch

    async def recording(self: MemoryConsumer, max_count: int) -> list[Delivery]:
        sizes.append(max_count)
        return list(await fetch(self, max_count))

    monkeypatch.setattr(MemoryConsumer, "fetch", recording)
    return sizes


async def drain(
    broker: MemoryBroker, count: int, *, pause: float = 0.0, quick_first: int = 0
) -> None:
    """Publish ``count`` events, then handle them all with a handler taking ``pause`` each
    (but the first ``quick_first``, which take no time)."""
    done = asyncio.Event()
    seen = 0

    async def handler(event: Event) -> None:
        nonlocal seen
        if pause and seen >= quick_first:
            await asyncio.sleep(pause)
        seen += 1
        if seen == count:
            done.set()

    async with DefaultEventsService(broker, batch_size=4) as events:
        holder = await broker.consume("s", ["t"])  # keeps the group while events are published
        for n in range(count):
            await events.publish(Event(topic="t", payload=n))
        await events.subscribe("s", "t", handler)
        await asyncio.wait_for(done.wait(), 10)
        await holder.close()


async def test_a_quick_handler_gets_ever_larger_batches_up_to_a_bound(asked: list[int]) -> None:
    await drain(AcrossTheNetwork(), 200)
    top = 4 * GROWTH
    assert asked[:4] == [4, 8, 16, 32]
    assert max(asked) == top
    assert asked[asked.index(top) :].count(top) >= 3  # and stays there while events last


async def test_a_slow_handler_keeps_to_the_batch_size(asked: list[int]) -> None:
    # Each event takes a third of the quick limit: a batch of four is never quick.
    await drain(AcrossTheNetwork(), 20, pause=QUICK_BATCH / 3)
    assert set(asked) == {4}


async def test_a_slow_batch_brings_the_batch_back_to_its_size(asked: list[int]) -> None:
    # Quick for the first 100 events (the batch grows to its bound), slow after.
    await drain(AcrossTheNetwork(), 160, pause=QUICK_BATCH / 3, quick_first=100)
    top = asked.index(4 * GROWTH)
    back = asked.index(4, top)
    assert set(asked[back:]) == {4}


async def test_the_memory_broker_keeps_to_the_batch_size(asked: list[int]) -> None:
    await drain(MemoryBroker(), 200)
    assert set(asked) == {4}


async def test_out_of_line_failures_do_not_grow_the_batch(asked: list[int]) -> None:
    # Every event set aside at once takes no time: a batch of them is quick, yet growing it
    # would let a worker hold many times batchSize out of line.
    calls = 0

    async def failing(event: Event) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("downstream is down")

    policy = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.01, jitter=0)
    broker = AcrossTheNetwork()
    async with DefaultEventsService(broker, batch_size=4, retry=policy, ordered=False) as events:
        holder = await broker.consume("s", ["t"])
        for n in range(100):
            await events.publish(Event(topic="t", payload=n))
        await events.subscribe("s", "t", failing)
        for _ in range(500):
            if calls >= 200:
                break
            await asyncio.sleep(0.01)
        await holder.close()
    assert calls >= 200
    assert set(asked) == {4}


async def test_a_failed_acknowledgement_stops_an_idle_worker_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(self: MemoryConsumer, deliveries: Sequence[Delivery]) -> None:
        raise RuntimeError("the store refused the acknowledgement")

    monkeypatch.setattr(MemoryConsumer, "ack", broken)
    handled = asyncio.Event()

    async def handler(event: Event) -> None:
        handled.set()

    async with DefaultEventsService(AcrossTheNetwork(), batch_size=4) as events:
        subscription = await events.subscribe("s", "t", handler)
        await events.publish(Event(topic="t", payload=1))
        await asyncio.wait_for(handled.wait(), 5)
        # No more events come: the worker must not wait for one to say its consumer failed.
        worker = subscription.workers[0]
        for _ in range(200):
            if worker.failure is not None:
                break
            await asyncio.sleep(0.01)
        assert worker.failure is not None
        assert "refused the acknowledgement" in worker.failure


async def test_closing_keeps_its_time_limit_while_an_acknowledgement_hangs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A store down at shutdown: the SQL brokers retry an acknowledgement for a whole lease.
    release = asyncio.Event()
    ack = MemoryConsumer.ack

    async def hanging(self: MemoryConsumer, deliveries: Sequence[Delivery]) -> None:
        await release.wait()
        await ack(self, deliveries)

    monkeypatch.setattr(MemoryConsumer, "ack", hanging)
    handled = asyncio.Event()

    async def handler(event: Event) -> None:
        handled.set()

    events = DefaultEventsService(AcrossTheNetwork(), batch_size=4)
    await events.start()
    try:
        await events.subscribe("s", "t", handler)
        await events.publish(Event(topic="t", payload=1))
        await asyncio.wait_for(handled.wait(), 5)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(events.close(timeout=0.2), 5)
        assert loop.time() - began < 2
    finally:
        release.set()
