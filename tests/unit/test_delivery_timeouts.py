"""Handler time limits: a handler that never returns fails its attempt instead of stalling."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence

import pytest

from callboard import DefaultEventsService, Event, MemoryBroker, RetryPolicy, SubscriptionError
from callboard.brokers.base import Delivery
from callboard.brokers.memory import MemoryConsumer

NO_WAIT = RetryPolicy(attempts=2, initial_delay=0, max_delay=0, jitter=0)


def service(**options: object) -> DefaultEventsService:
    options.setdefault("retry", NO_WAIT)
    return DefaultEventsService(MemoryBroker(), **options)  # type: ignore[arg-type]


async def drain(events: DefaultEventsService) -> None:
    assert isinstance(events.broker, MemoryBroker)
    await events.broker.drain(5)


async def test_a_handler_that_never_returns_is_cancelled_retried_and_dead_lettered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0
    cancelled = 0

    async def hangs(event: Event) -> None:
        nonlocal calls, cancelled
        calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled += 1
            raise

    async with service(handler_timeout=0.05) as events:
        await events.subscribe("s", "t", hangs)
        event = Event(topic="t")
        await events.publish(event)
        await drain(events)
        [letter] = await events.dead_letters("s")
    assert (calls, cancelled) == (2, 2)
    assert letter.attempts == 2
    assert letter.error.startswith("HandlerTimeoutError: the handler did not finish within 0.05s")
    assert "events.delivery.handlerTimeoutMs" in letter.error
    warnings = [r.getMessage() for r in caplog.records if "did not finish event" in r.getMessage()]
    assert len(warnings) == 2
    assert "'s'" in warnings[0]
    assert event.id in warnings[0]
    assert "events.delivery.handlerTimeoutMs" in warnings[0]


async def test_a_timed_out_event_is_acknowledged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    acks: Counter[str] = Counter()
    ack = MemoryConsumer.ack

    async def counting_ack(self: MemoryConsumer, deliveries: Sequence[Delivery]) -> None:
        acks.update(delivery.event.id for delivery in deliveries)
        await ack(self, deliveries)

    monkeypatch.setattr(MemoryConsumer, "ack", counting_ack)
    calls = 0

    async def slow_first(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(60)

    async with service(handler_timeout=0.05) as events:
        await events.subscribe("s", "t", slow_first)
        event = Event(topic="t")
        await events.publish(event)
        await drain(events)
        assert await events.dead_letters("s") == []
    assert calls == 2
    assert acks == {event.id: 1}


async def test_a_handler_that_swallows_the_cancellation_still_fails_its_attempt_once() -> None:
    """A handler that catches the cancellation and goes on is taken at its word; the worker's
    own task is not left cancelled (it goes on to the next event)."""
    seen: list[object] = []

    async def stubborn(event: Event) -> None:
        seen.append(event.payload)
        if event.payload == "slow":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                raise ValueError("interrupted") from None

    async with service(handler_timeout=0.05, retry=RetryPolicy(attempts=1)) as events:
        subscription = await events.subscribe("s", "t", stubborn)
        await events.publish(Event(topic="t", payload="slow"))
        await events.publish(Event(topic="t", payload="next"))
        await drain(events)
        [letter] = await events.dead_letters("s")
        assert not subscription.tasks[0].done()
    assert seen == ["slow", "next"]
    assert letter.error.startswith("HandlerTimeoutError")


@pytest.mark.parametrize("no_limit", [None, 0])
async def test_no_time_limit_only_when_asked_for(
    no_limit: float | None, caplog: pytest.LogCaptureFixture
) -> None:
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.2)

    async with service(handler_timeout=0.05) as events:
        await events.subscribe("s", "t", slow, handler_timeout=no_limit)
        await events.publish(Event(topic="t"))
        await drain(events)
        assert await events.dead_letters("s") == []
    assert "has no handler time limit, so it waits" in caplog.text
    assert "did not finish event" not in caplog.text


async def test_the_service_default_limit_applies_to_every_subscription() -> None:
    async def hangs(event: Event) -> None:
        await asyncio.sleep(60)

    async with service(handler_timeout=0.05, retry=RetryPolicy(attempts=1)) as events:
        await events.subscribe("s", "t", hangs)
        await events.publish(Event(topic="t"))
        await drain(events)
        assert len(await events.dead_letters("s")) == 1


async def test_a_negative_limit_is_refused() -> None:
    async def fine(event: Event) -> None:
        pass

    async with service() as events:
        with pytest.raises(SubscriptionError, match="handler_timeout"):
            await events.subscribe("s", "t", fine, handler_timeout=-1)


async def test_closing_while_a_handler_hangs_ends_within_the_shutdown_timeout() -> None:
    started = asyncio.Event()

    async def hangs(event: Event) -> None:
        started.set()
        await asyncio.sleep(3600)

    events = service(handler_timeout=60, shutdown_timeout=0.1)
    await events.start()
    await events.subscribe("s", "t", hangs)
    await events.publish(Event(topic="t"))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(events.close(), 5)
    assert isinstance(events.broker, MemoryBroker)
    assert await events.broker.take_dead_letters("s") == []


async def test_closing_while_a_timed_out_handler_resists_still_ends() -> None:
    """The shutdown's cancellation is not mistaken for the time limit's, and not swallowed."""
    resisting = asyncio.Event()

    async def resists_once(event: Event) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            resisting.set()
            await asyncio.sleep(3600)  # ends at the second cancellation

    events = service(handler_timeout=0.05, shutdown_timeout=0.1)
    await events.start()
    subscription = await events.subscribe("s", "t", resists_once)
    await events.publish(Event(topic="t"))
    # The first cancellation, the one the handler resists, came from the time limit.
    await asyncio.wait_for(resisting.wait(), 5)
    await asyncio.wait_for(events.close(), 5)
    assert subscription.tasks[0].done()


async def test_the_oldest_unacknowledged_event_and_a_stall_are_visible() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def waits(event: Event) -> None:
        started.set()
        await release.wait()

    async with service(handler_timeout=30) as events:
        subscription = await events.subscribe("s", "t", waits, handler_timeout=None)
        assert events.oldest_unacked() == {"s": 0.0}
        assert events.stalled() == []
        await events.publish(Event(topic="t", payload=1))
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.05)
        assert events.oldest_unacked()["s"] >= 0.04
        worker = subscription.workers[0]
        assert worker.stalled() is None  # not yet past the report age (30 s)
        stall = worker.stalled(now=time.monotonic() + 120)
        assert stall is not None
        assert (stall.subscription, stall.topic, stall.timeout) == ("s", "t", None)
        assert stall.seconds >= 120
        release.set()
        await drain(events)
        assert events.oldest_unacked() == {"s": 0.0}
