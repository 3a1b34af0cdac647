"""Retries out of line: with ``ordered=False`` a failing event does not hold up the ones behind."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from callboard import DefaultEventsService, Event, MemoryBroker, RetryPolicy
from callboard.brokers.base import Delivery
from callboard.brokers.memory import MemoryConsumer
from callboard.brokers.sqlite import SQLiteBroker

POLICY = RetryPolicy(attempts=3, initial_delay=0.1, multiplier=1, jitter=0)


class FailsOn:
    """Fails the first ``times`` calls for the payload ``bad``; records every call."""

    def __init__(self, bad: object, times: int) -> None:
        self.bad = bad
        self.times = times
        self.calls: list[object] = []

    async def __call__(self, event: Event) -> None:
        self.calls.append(event.payload)
        if event.payload == self.bad and self.calls.count(self.bad) <= self.times:
            raise RuntimeError(f"cannot handle {event.payload}")


async def drain(events: DefaultEventsService) -> None:
    assert isinstance(events.broker, MemoryBroker)
    await events.broker.drain(5)


async def test_later_events_go_ahead_while_a_failed_one_waits() -> None:
    handler = FailsOn("a", times=2)
    async with DefaultEventsService(MemoryBroker(), retry=POLICY) as events:
        await events.subscribe("s", "t", handler, ordered=False)
        for payload in ("a", "b", "c"):
            await events.publish(Event(topic="t", payload=payload))
        await drain(events)
        assert await events.dead_letters("s") == []
    assert handler.calls == ["a", "b", "c", "a", "a"]


async def test_the_service_default_can_be_out_of_line() -> None:
    handler = FailsOn("a", times=1)
    async with DefaultEventsService(MemoryBroker(), retry=POLICY, ordered=False) as events:
        await events.subscribe("s", "t", handler)
        for payload in ("a", "b"):
            await events.publish(Event(topic="t", payload=payload))
        await drain(events)
    assert handler.calls == ["a", "b", "a"]


async def test_in_line_stays_the_default() -> None:
    handler = FailsOn("a", times=1)
    async with DefaultEventsService(MemoryBroker(), retry=POLICY) as events:
        await events.subscribe("s", "t", handler)
        for payload in ("a", "b"):
            await events.publish(Event(topic="t", payload=payload))
        await drain(events)
    assert handler.calls == ["a", "a", "b"]


async def test_an_event_retried_out_of_line_keeps_its_backoff_and_becomes_a_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acks: Counter[object] = Counter()
    ack = MemoryConsumer.ack

    async def counting_ack(self: MemoryConsumer, deliveries: Sequence[Delivery]) -> None:
        acks.update(delivery.event.payload for delivery in deliveries)
        await ack(self, deliveries)

    monkeypatch.setattr(MemoryConsumer, "ack", counting_ack)
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def broken(event: Event) -> None:
        if event.payload == "bad":
            times.append(loop.time())
            raise RuntimeError("always")

    policy = RetryPolicy(attempts=3, initial_delay=0.05, multiplier=2, jitter=0)
    async with DefaultEventsService(MemoryBroker(), retry=policy) as events:
        await events.subscribe("s", "t", broken, ordered=False)
        await events.publish(Event(topic="t", payload="bad"))
        await events.publish(Event(topic="t", payload="good"))
        await drain(events)
        [letter] = await events.dead_letters("s")
    assert letter.attempts == 3
    assert len(times) == 3
    assert times[1] - times[0] >= 0.05
    assert times[2] - times[1] >= 0.1
    # Settled once each: the good one at once, the bad one only as a dead letter.
    assert acks == {"good": 1, "bad": 1}


async def test_closing_with_a_retry_waiting_leaves_it_for_the_group() -> None:
    handler = FailsOn("a", times=10)
    policy = RetryPolicy(attempts=5, initial_delay=30)
    async with DefaultEventsService(MemoryBroker(), retry=policy) as events:
        first = await events.subscribe("s", "t", handler, ordered=False)
        await asyncio.sleep(0)
        second = await events.subscribe("s", "t", handler, ordered=False)
        await asyncio.sleep(0)
        await events.publish(Event(topic="t", payload="a"))
        for _ in range(100):
            if handler.calls:
                break
            await asyncio.sleep(0.01)
        assert handler.calls == ["a"]
        # The first member stops at once, though its retry waits 30 s, and the event goes back
        # to the group for the other member.
        await asyncio.wait_for(first.close(), 5)
        for _ in range(100):
            if len(handler.calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert handler.calls == ["a", "a"]
        await second.close(timeout=0)
        assert await events.dead_letters("s") == []


async def test_a_worker_with_a_full_waiting_room_takes_no_more_events() -> None:
    handler = FailsOn("a", times=1)
    policy = RetryPolicy(attempts=2, initial_delay=0.1, jitter=0)
    async with DefaultEventsService(MemoryBroker(), retry=policy, batch_size=1) as events:
        await events.subscribe("s", "t", handler, ordered=False)
        for payload in ("a", "b"):
            await events.publish(Event(topic="t", payload=payload))
        await drain(events)
    # With room for one waiting retry, "b" waits until "a" is settled.
    assert handler.calls == ["a", "a", "b"]


async def test_a_waiting_retry_keeps_its_lease_on_a_sql_broker(tmp_path: Path) -> None:
    """The lease (0.2 s) runs out many times over while the retry waits (0.8 s): the broker
    renews it, so the other member of the group never gets the event meanwhile."""
    handler = FailsOn("a", times=1)
    broker = SQLiteBroker(str(tmp_path / "events.db"), lease=0.2, poll_interval=0.05)
    policy = RetryPolicy(attempts=2, initial_delay=0.8, jitter=0)
    async with DefaultEventsService(broker, retry=policy) as events:
        await events.subscribe("s", "t", handler, concurrency=2, ordered=False)
        await events.publish(Event(topic="t", payload="a"))
        await events.publish(Event(topic="t", payload="b"))
        for _ in range(500):
            if handler.calls.count("a") == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # time for a wrong redelivery to show
        [info] = [i for i in await broker.subscriptions() if i.name == "s"]
        assert (info.in_flight, info.backlog) == (0, 0)
    assert sorted(map(str, handler.calls)) == ["a", "a", "b"]
