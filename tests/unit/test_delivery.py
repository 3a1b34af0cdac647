from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from callboard import (
    BrokerUnavailable,
    DeadLetter,
    DefaultEventsService,
    Event,
    MemoryBroker,
    RetryPolicy,
    SubscriptionError,
)
from callboard.brokers.base import Delivery
from callboard.brokers.memory import MemoryConsumer
from callboard.delivery import Stopped, SubscriptionWorker
from callboard.service import Handler
from callboard.testing import RecordingEventsService


class Flaky:
    """A handler that fails its first ``failures`` calls per event."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[object] = []

    async def __call__(self, event: Event) -> None:
        self.calls.append(event.payload)
        if self.calls.count(event.payload) <= self.failures:
            raise ValueError(f"failure {self.calls.count(event.payload)} on {event.payload}")


def test_delays_grow_exponentially_up_to_the_maximum() -> None:
    policy = RetryPolicy(initial_delay=0.1, multiplier=2, max_delay=0.3, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_jitter_only_shortens_a_delay() -> None:
    policy = RetryPolicy(initial_delay=1, jitter=0.5)
    delays = [policy.delay(1) for _ in range(200)]
    assert all(0.5 <= d <= 1 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"initial_delay": -1},
        {"max_delay": -1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_a_policy_refuses_nonsense(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**options)  # type: ignore[arg-type]


async def test_a_failing_handler_is_retried_until_it_succeeds() -> None:
    handler = Flaky(failures=2)
    async with RecordingEventsService(retry=RetryPolicy(attempts=3, initial_delay=0)) as events:
        await events.subscribe("s", "t", handler)
        await events.publish(Event(topic="t", payload="a"))
        await events.drain()
        assert handler.calls == ["a", "a", "a"]
        assert await events.dead_letters("s") == []
        registry = events.metrics.registry
        labels = {"subscription": "s", "topic": "t"}
        assert registry.get_sample_value("callboard_handler_failures_total", labels) == 2
        assert (
            registry.get_sample_value("callboard_delivery_retries_total", {"subscription": "s"})
            == 2
        )
        assert registry.get_sample_value("callboard_events_delivered_total", labels) == 1


async def test_retries_wait_the_policy_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[float] = []

    async def stopped_within(self: SubscriptionWorker, seconds: float) -> bool:
        waited.append(seconds)
        return False

    monkeypatch.setattr(SubscriptionWorker, "_stopped_within", stopped_within)
    policy = RetryPolicy(attempts=4, initial_delay=1, multiplier=3, max_delay=5, jitter=0)
    async with RecordingEventsService(retry=policy) as events:
        await events.subscribe("s", "t", Flaky(failures=10))
        await events.publish(Event(topic="t"))
        await events.drain()
    assert waited == [1, 3, 5]


async def test_retries_really_back_off() -> None:
    times: list[float] = []
    loop = asyncio.get_running_loop()

    async def handler(event: Event) -> None:
        times.append(loop.time())
        raise RuntimeError("no")

    policy = RetryPolicy(attempts=3, initial_delay=0.02, multiplier=2, jitter=0)
    async with RecordingEventsService(retry=policy) as events:
        await events.subscribe("s", "t", handler)
        await events.publish(Event(topic="t"))
        await events.drain()
    assert len(times) == 3
    assert times[1] - times[0] >= 0.02
    assert times[2] - times[1] >= 0.04


async def test_after_the_last_attempt_the_event_is_a_dead_letter(
    events: RecordingEventsService,
) -> None:
    handler = Flaky(failures=100)
    await events.subscribe("s", "t", handler)
    original = Event(topic="t", payload={"n": 1}, metadata={"x-github-event": "push"})
    await events.publish(original)
    await events.drain()

    assert handler.calls == [{"n": 1}] * 3
    [letter] = await events.dead_letters("s")
    assert isinstance(letter, DeadLetter)
    assert letter.subscription == "s"
    assert letter.attempts == 3
    assert letter.error == "ValueError: failure 3 on {'n': 1}"
    assert letter.event == original
    assert letter.failed_at >= original.time
    registry = events.metrics.registry
    assert registry.get_sample_value("callboard_dead_letters_total", {"subscription": "s"}) == 1
    # Listing does not take them away.
    assert len(await events.dead_letters("s")) == 1


async def test_dead_letters_belong_to_their_subscription(events: RecordingEventsService) -> None:
    async def broken(event: Event) -> None:
        raise RuntimeError("broken")

    async def fine(event: Event) -> None:
        pass

    await events.subscribe("broken", "t", broken)
    await events.subscribe("fine", "t", fine)
    await events.publish(Event(topic="t"))
    await events.drain()
    assert len(await events.dead_letters("broken")) == 1
    assert await events.dead_letters("fine") == []
    # Dead letters are not delivered to wildcard subscribers.
    assert all(not e.topic.startswith("$") for e in events.published)


async def test_later_events_wait_for_the_retries_of_an_earlier_one(
    events: RecordingEventsService,
) -> None:
    handler = Flaky(failures=2)
    await events.subscribe("s", "t", handler)
    for payload in ("a", "b"):
        await events.publish(Event(topic="t", payload=payload))
    await events.drain()
    assert handler.calls == ["a", "a", "a", "b", "b", "b"]


async def test_redrive_delivers_dead_letters_again_and_removes_them() -> None:
    fixed = False
    got: list[object] = []

    async def handler(event: Event) -> None:
        if not fixed:
            raise RuntimeError("not yet")
        got.append(event.payload)

    async with RecordingEventsService(retry=RetryPolicy(attempts=1, initial_delay=0)) as events:
        await events.subscribe("s", "t", handler)
        for n in range(3):
            await events.publish(Event(topic="t", payload=n, metadata={"x-n": str(n)}))
        await events.drain()
        letters = await events.dead_letters("s")
        assert [d.event.payload for d in letters] == [0, 1, 2]
        assert [d.attempts for d in letters] == [1, 1, 1]

        fixed = True
        assert await events.redrive("s", ids=[letters[1].id]) == 1
        await events.drain()
        assert got == [1]
        assert [d.event.payload for d in await events.dead_letters("s")] == [0, 2]

        assert await events.redrive("s") == 2
        await events.drain()
        assert got == [1, 0, 2]
        assert await events.dead_letters("s") == []
        assert await events.redrive("s") == 0


async def test_a_redriven_event_is_the_original(events: RecordingEventsService) -> None:
    seen: list[Event] = []

    async def handler(event: Event) -> None:
        seen.append(event)
        if len(seen) <= 3:
            raise RuntimeError("first time round")

    await events.subscribe("s", "t", handler)
    original = Event(topic="t", payload=[1], metadata={"x-a": "b"})
    await events.publish(original)
    await events.drain()
    await events.redrive("s")
    await events.drain()
    assert seen[-1] == original


async def test_redrive_to_a_closed_subscription_keeps_the_dead_letters() -> None:
    async with DefaultEventsService(MemoryBroker(), retry=RetryPolicy(attempts=1)) as events:

        async def broken(event: Event) -> None:
            raise RuntimeError("no")

        subscription = await events.subscribe("s", "t", broken)
        await events.publish(Event(topic="t"))
        assert isinstance(events.broker, MemoryBroker)
        await events.broker.drain()
        await subscription.close()
        with pytest.raises(SubscriptionError):
            await events.redrive("s")
        assert len(await events.dead_letters("s")) == 1


async def test_closing_during_a_retry_delay_leaves_the_event_unacknowledged() -> None:
    calls: list[str] = []
    failed = asyncio.Event()

    def member(name: str) -> Handler:
        async def handler(event: Event) -> None:
            calls.append(name)
            failed.set()
            raise RuntimeError("down")

        return handler

    policy = RetryPolicy(attempts=5, initial_delay=30)
    async with DefaultEventsService(MemoryBroker(), retry=policy) as events:
        first = await events.subscribe("s", "t", member("first"))
        await asyncio.sleep(0)  # the first member waits for events before the second
        second = await events.subscribe("s", "t", member("second"))
        await asyncio.sleep(0)
        await events.publish(Event(topic="t"))
        await asyncio.wait_for(failed.wait(), 5)
        assert calls == ["first"]
        failed.clear()
        # The first member stops at once, although its retry delay is 30 s, and the event
        # goes back to the group for the other member.
        await asyncio.wait_for(first.close(), 5)
        await asyncio.wait_for(failed.wait(), 5)
        assert calls == ["first", "second"]
        await second.close(timeout=0)
        assert await events.dead_letters("s") == []


class DeadLetterlessBroker(MemoryBroker):
    """A memory broker whose dead-letter store is down."""

    async def publish(self, event: Event) -> bool:
        if event.topic.startswith("$deadletter."):
            raise BrokerUnavailable("the dead-letter store is down")
        return await super().publish(event)


async def test_a_failing_dead_letter_store_stops_neither_the_worker_nor_the_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fine = asyncio.Event()

    async def handler(event: Event) -> None:
        if event.payload == "poison":
            raise RuntimeError("poison")
        fine.set()

    broker = DeadLetterlessBroker()
    async with DefaultEventsService(broker, retry=RetryPolicy(attempts=1)) as events:
        subscription = await events.subscribe("s", "t", handler)
        await events.publish(Event(topic="t", payload="poison"))
        await events.publish(Event(topic="t", payload="fine"))
        # The worker lives on and handles the next event ...
        await asyncio.wait_for(fine.wait(), 5)
        assert not subscription.tasks[0].done()
        # ... and the poison event is not acknowledged, so it will be delivered again.
        with pytest.raises(TimeoutError):
            await broker.drain(timeout=0.05)
    assert "could not be moved to its dead letters" in caplog.text
    assert "moved to its dead letters: poison" not in caplog.text


async def test_a_worker_whose_consumer_fails_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def fetch(self: MemoryConsumer, max_count: int) -> list[Delivery]:
        raise BrokerUnavailable("connection lost")

    monkeypatch.setattr(MemoryConsumer, "fetch", fetch)
    async with DefaultEventsService(MemoryBroker()) as events:
        subscription = await events.subscribe("s", "t", Flaky(failures=0))
        await asyncio.wait_for(asyncio.gather(*subscription.tasks), 5)
        assert events.stopped() == [Stopped("s", "its consumer failed: connection lost")]
    assert "subscription 's' stopped: its consumer failed" in caplog.text
    assert "connection lost" in caplog.text


class GoneConsumer:
    """A consumer whose group another process deleted, as a SQL broker's finds it."""

    def __init__(self, group: str) -> None:
        self.group = group

    async def fetch(self, max_count: int) -> list[Delivery]:
        raise SubscriptionError(f"subscription {self.group!r} no longer exists")

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        pass

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        pass

    async def close(self) -> None:
        pass


class DeletedElsewhere(MemoryBroker):
    """A memory broker on which the groups named in ``deleted`` are gone."""

    def __init__(self, *deleted: str) -> None:
        super().__init__()
        self.deleted = set(deleted)

    async def consume(self, group: str, topics: Sequence[str], **options: Any) -> Any:
        if group in self.deleted:
            return GoneConsumer(group)
        return await super().consume(group, topics, **options)


async def test_a_subscription_whose_group_was_deleted_stops_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = DeletedElsewhere("s")
    async with DefaultEventsService(broker) as events:
        subscription = await events.subscribe("s", "t", Flaky(failures=0))
        running = await events.subscribe("other", "t", Flaky(failures=0))
        await asyncio.wait_for(asyncio.gather(*subscription.tasks), 5)
        assert events.stopped() == [Stopped("s", "subscription 's' no longer exists")]
        [record] = [r for r in caplog.records if "stopped" in r.getMessage()]
        assert record.levelname == "ERROR"
        assert record.exc_info is None  # one line: a traceback would explain nothing
        assert record.getMessage().startswith(
            "subscription 's' stopped: subscription 's' no longer exists"
        )
        # Subscribed again (the group is made again), it is no longer reported.
        broker.deleted.clear()
        again = await events.subscribe("s", "t", Flaky(failures=0))
        assert events.stopped() == []
        assert events.subscriptions == (running, again)
