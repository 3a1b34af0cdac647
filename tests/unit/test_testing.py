from __future__ import annotations

import pytest

from callboard import DefaultEventsService, Event, RetryPolicy
from callboard.testing import FAST_RETRY, RecordingEventsService, SubscribeCall


async def test_published_and_subscribed_are_recorded(events: RecordingEventsService) -> None:
    async def handler(event: Event) -> None:
        pass

    assert isinstance(events, DefaultEventsService)
    await events.subscribe("s", ["a", "b.*"], handler)
    await events.publish(Event(topic="a", payload=1))
    await events.publish(Event(topic="b.c", payload=2))
    assert events.subscribed == [SubscribeCall("s", ("a", "b.*"))]
    assert [e.payload for e in events.published] == [1, 2]
    assert [e.payload for e in events.published_on("b.c")] == [2]
    assert events.published_on("nothing") == []

    events.reset()
    assert events.published == []
    assert events.subscribed == []


async def test_drain_waits_for_handlers_retries_and_routing(events: RecordingEventsService) -> None:
    handled: list[object] = []
    failures = 0

    async def flaky(event: Event) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("flaky")
        handled.append(event.payload)

    async def route(event: Event) -> None:
        await events.publish(event.with_topic("routed"))

    await events.subscribe("router", "in", route)
    await events.subscribe("flaky", "routed", flaky)
    await events.publish(Event(topic="in", payload="x"))
    await events.drain()
    assert handled == ["x"]


async def test_drain_waits_for_dead_letters(events: RecordingEventsService) -> None:
    async def broken(event: Event) -> None:
        raise RuntimeError("broken")

    await events.subscribe("s", "t", broken)
    await events.publish(Event(topic="t"))
    await events.drain()
    [letter] = await events.dead_letters("s")
    assert letter.attempts == FAST_RETRY.attempts


async def test_drain_gives_up_after_its_timeout(events: RecordingEventsService) -> None:
    async def stuck(event: Event) -> None:
        await events.memory.drain(timeout=60)  # waits for itself: never done

    await events.subscribe("s", "t", stuck)
    await events.publish(Event(topic="t"))
    with pytest.raises(TimeoutError):
        await events.drain(timeout=0.05)
    await events.close(timeout=0)


def test_fast_retry_does_not_wait() -> None:
    assert FAST_RETRY.delay(1) == 0
    assert FAST_RETRY.delay(FAST_RETRY.attempts) == 0


async def test_a_custom_policy() -> None:
    async with RecordingEventsService(retry=RetryPolicy(attempts=1, initial_delay=0)) as events:
        calls = 0

        async def broken(event: Event) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("no")

        await events.subscribe("s", "t", broken)
        await events.publish(Event(topic="t"))
        await events.drain()
        assert calls == 1
