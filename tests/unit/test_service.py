from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence

import pytest

from callboard import (
    DELIVERY_ID,
    DefaultEventsService,
    Event,
    EventsService,
    InvalidTopicError,
    MemoryBroker,
    RetryPolicy,
    ServiceClosedError,
    Subscriber,
    SubscriptionError,
)
from callboard.brokers.base import Delivery
from callboard.brokers.memory import MemoryConsumer
from callboard.testing import RecordingEventsService


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def payloads(self) -> list[object]:
        return [e.payload for e in self.events]


async def test_a_subscriber_receives_what_is_published_on_its_topics(
    events: RecordingEventsService,
) -> None:
    got = Collector()
    subscription = await events.subscribe("s", ["github.*", "plain"], got)
    assert subscription.id == "s"
    assert subscription.topics == ("github.*", "plain")

    for topic in ["github.push", "gitlab.push", "plain", "github"]:
        assert await events.publish(Event(topic=topic, payload=topic))
    await events.drain()
    assert got.payloads == ["github.push", "plain"]


async def test_one_subscription_receives_events_in_publish_order(
    events: RecordingEventsService,
) -> None:
    got = Collector()
    await events.subscribe("s", "t", got)
    for n in range(200):
        await events.publish(Event(topic="t", payload=n))
    await events.drain()
    assert got.payloads == list(range(200))


async def test_subscribers_with_one_id_share_the_events(events: RecordingEventsService) -> None:
    first, second = Collector(), Collector()
    await events.subscribe("workers", "jobs", first)
    await events.subscribe("workers", "jobs", second)
    await asyncio.sleep(0)  # both members wait for events
    for n in range(20):
        await events.publish(Event(topic="jobs", payload=n))
        await asyncio.sleep(0)
    await events.drain()
    assert sorted([*first.payloads, *second.payloads]) == list(range(20))  # type: ignore[type-var]
    assert first.payloads
    assert second.payloads


async def test_subscribers_with_different_ids_each_get_every_event(
    events: RecordingEventsService,
) -> None:
    one, two = Collector(), Collector()
    await events.subscribe("one", "t", one)
    await events.subscribe("two", "t", two)
    for n in range(5):
        await events.publish(Event(topic="t", payload=n))
    await events.drain()
    assert one.payloads == two.payloads == list(range(5))


async def test_a_concurrent_subscription_handles_events_side_by_side(
    events: RecordingEventsService,
) -> None:
    running = 0
    most = 0
    both_running = asyncio.Event()

    async def handler(event: Event) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 2:
            both_running.set()
        await asyncio.wait_for(both_running.wait(), 5)
        running -= 1

    subscription = await events.subscribe("s", "t", handler, concurrency=2)
    assert len(subscription.workers) == 2
    await asyncio.sleep(0)
    for n in range(2):
        await events.publish(Event(topic="t", payload=n))
        await asyncio.sleep(0)
    await events.drain()
    assert most == 2


async def test_closing_a_subscription_stops_delivery(events: RecordingEventsService) -> None:
    got = Collector()
    subscription = await events.subscribe("s", "t", got)
    await events.publish(Event(topic="t", payload=1))
    await events.drain()
    await subscription.close()
    assert subscription not in events.subscriptions
    await events.publish(Event(topic="t", payload=2))
    await events.drain()
    assert got.payloads == [1]


async def test_closing_a_subscription_twice_is_harmless(events: RecordingEventsService) -> None:
    got = Collector()
    subscription = await events.subscribe("s", "t", got)
    await subscription.close()
    await subscription.close()
    await asyncio.gather(subscription.close(), subscription.close(timeout=0))
    again = await events.subscribe("s", "t", got)
    await events.publish(Event(topic="t", payload=1))
    await events.drain()
    assert got.payloads == [1]
    assert events.subscriptions == (again,)


async def test_a_handler_may_close_its_own_subscription(events: RecordingEventsService) -> None:
    got = Collector()
    closed = asyncio.Event()

    async def once(event: Event) -> None:
        await got(event)
        await subscription.close()
        closed.set()

    subscription = await events.subscribe("s", "t", once)
    await events.publish(Event(topic="t", payload=1))
    await asyncio.wait_for(closed.wait(), 5)
    await events.publish(Event(topic="t", payload=2))
    await events.drain()
    assert got.payloads == [1]
    assert events.subscriptions == ()
    assert await events.dead_letters("s") == []


class PushCounter:
    topics = ("github.push",)

    def __init__(self) -> None:
        self.seen: list[Event] = []

    async def on_event(self, event: Event) -> None:
        self.seen.append(event)


class NamedSubscriber(PushCounter):
    subscriber_id = "catalog.github-provider"


async def test_class_based_subscribers(events: RecordingEventsService) -> None:
    plain, named = PushCounter(), NamedSubscriber()
    assert isinstance(plain, Subscriber)
    first = await events.add_subscriber(plain)
    second = await events.add_subscriber(named)
    third = await events.add_subscriber(PushCounter(), id="explicit")
    assert first.id == f"{__name__}.PushCounter"
    assert second.id == "catalog.github-provider"
    assert third.id == "explicit"
    assert first.topics == ("github.push",)

    await events.publish(Event(topic="github.push", payload=1))
    await events.publish(Event(topic="github.pull", payload=2))
    await events.drain()
    assert [e.payload for e in plain.seen] == [1]
    assert [e.payload for e in named.seen] == [1]


@pytest.mark.parametrize(
    ("id", "topics", "concurrency", "error"),
    [
        ("", "t", 1, SubscriptionError),
        ("s", "t", 0, SubscriptionError),
        ("s", [], 1, InvalidTopicError),
        ("s", "bad topic", 1, InvalidTopicError),
        ("s", "a.>.b", 1, InvalidTopicError),
    ],
)
async def test_bad_subscriptions_are_refused(
    events: RecordingEventsService,
    id: str,
    topics: str | Sequence[str],
    concurrency: int,
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        await events.subscribe(id, topics, Collector(), concurrency=concurrency)


@pytest.mark.parametrize("topic", ["", "github.*", "github.>", "a..b", "has space"])
async def test_publishing_on_an_invalid_topic_is_refused(
    events: RecordingEventsService, topic: str
) -> None:
    got = Collector()
    await events.subscribe("s", ">", got)
    with pytest.raises(InvalidTopicError):
        await events.publish(Event(topic=topic))
    await events.drain()
    assert got.events == []


async def test_a_redelivery_is_published_once(events: RecordingEventsService) -> None:
    got = Collector()
    await events.subscribe("s", "t", got)
    assert await events.publish(Event(topic="t", metadata={DELIVERY_ID: "abc"}))
    assert not await events.publish(Event(topic="t", metadata={DELIVERY_ID: "abc"}))
    await events.drain()
    assert len(got.events) == 1
    registry = events.metrics.registry
    assert registry.get_sample_value("callboard_events_published_total", {"topic": "t"}) == 1
    assert registry.get_sample_value("callboard_events_duplicate_total", {"topic": "t"}) == 1


async def test_the_service_starts_itself_and_refuses_work_once_closed() -> None:
    service = DefaultEventsService()
    assert isinstance(service.broker, MemoryBroker)
    assert await service.publish(Event(topic="t"))
    await service.close()
    await service.close()
    with pytest.raises(ServiceClosedError):
        await service.publish(Event(topic="t"))
    with pytest.raises(ServiceClosedError):
        await service.subscribe("s", "t", Collector())
    with pytest.raises(ServiceClosedError):
        await service.start()


@pytest.mark.parametrize("implementation", [DefaultEventsService, RecordingEventsService])
def test_an_events_service_takes_what_the_protocol_declares(implementation: type) -> None:
    members = [
        name
        for name, value in vars(EventsService).items()
        if inspect.isfunction(value) and not name.startswith("_")
    ]
    assert {"publish", "subscribe", "add_subscriber"} <= set(members)
    for name in members:
        declared, offered = getattr(EventsService, name), getattr(implementation, name)
        assert inspect.iscoroutinefunction(offered) == inspect.iscoroutinefunction(declared)
        assert [
            (p.name, p.kind, p.default) for p in inspect.signature(offered).parameters.values()
        ] == [(p.name, p.kind, p.default) for p in inspect.signature(declared).parameters.values()]


async def test_close_finishes_a_delivery_in_progress_and_acknowledges_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    acked: list[object] = []
    original_ack = MemoryConsumer.ack

    async def ack(self: MemoryConsumer, deliveries: Sequence[Delivery]) -> None:
        acked.extend(delivery.event.payload for delivery in deliveries)
        await original_ack(self, deliveries)

    monkeypatch.setattr(MemoryConsumer, "ack", ack)
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[object] = []

    async def handler(event: Event) -> None:
        started.set()
        await release.wait()
        finished.append(event.payload)

    service = DefaultEventsService(MemoryBroker())
    await service.subscribe("s", "t", handler)
    await service.publish(Event(topic="t", payload="in flight"))
    await service.publish(Event(topic="t", payload="queued"))
    await asyncio.wait_for(started.wait(), 5)

    closing = asyncio.create_task(service.close(timeout=5))
    await asyncio.sleep(0)
    assert not closing.done()
    with pytest.raises(ServiceClosedError):
        await service.publish(Event(topic="t"))
    release.set()
    await asyncio.wait_for(closing, 5)
    assert finished == ["in flight"]
    assert acked == ["in flight"]
    assert service.subscriptions == ()


async def test_close_cancels_a_delivery_that_outlasts_the_timeout() -> None:
    started = asyncio.Event()
    outcome: list[str] = []

    async def handler(event: Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise

    broker = MemoryBroker()
    service = DefaultEventsService(broker, retry=RetryPolicy(attempts=1))
    await service.subscribe("s", "t", handler)
    await service.publish(Event(topic="t"))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(service.close(timeout=0.05), 5)
    assert outcome == ["cancelled"]
    assert service.metrics.registry.get_sample_value(
        "callboard_events_delivered_total", {"subscription": "s", "topic": "t"}
    ) in (None, 0)
    await broker.drain(timeout=1)


async def test_an_idle_service_closes_at_once() -> None:
    service = DefaultEventsService(shutdown_timeout=30)
    await service.subscribe("s", "t", Collector())
    await asyncio.wait_for(service.close(), 1)


async def test_publishing_on_a_reserved_topic_is_refused() -> None:
    from callboard import DefaultEventsService, Event, InvalidTopicError

    async with DefaultEventsService() as events:
        with pytest.raises(InvalidTopicError, match="reserved"):
            await events.publish(Event(topic="$deadletter.someone", payload={}))
