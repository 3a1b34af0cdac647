from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from callboard import DELIVERY_ID, Event, MemoryBroker, ServiceClosedError, SubscriptionError
from callboard.brokers import admin, open_broker
from callboard.brokers.base import BrokerAdmin
from callboard.errors import ConfigError
from callboard.testing import RecordingEventsService


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    broker = MemoryBroker()
    await broker.start()
    yield broker
    await broker.close()


def topics_of(deliveries: object) -> list[str]:
    assert isinstance(deliveries, list | tuple)
    return [d.event.topic for d in deliveries]


async def test_open_broker_by_url() -> None:
    assert isinstance(open_broker("memory://"), MemoryBroker)
    with pytest.raises(ConfigError) as caught:
        open_broker("nosuch://x")
    assert caught.value.path == "events.broker"
    assert "memory://" in str(caught.value)


async def test_a_broker_without_groups_accepts_and_drops(broker: MemoryBroker) -> None:
    assert await broker.publish(Event(topic="nobody.listens"))
    await broker.drain(timeout=1)
    assert not broker.capabilities.durable


async def test_a_group_receives_matching_events_in_publish_order(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["github.*"])
    for topic in ["github.push", "gitlab.push", "github.issues", "github.pull_request"]:
        await broker.publish(Event(topic=topic))
    batch = await consumer.fetch(10)
    assert topics_of(batch) == ["github.push", "github.issues", "github.pull_request"]
    assert all(d.attempt == 1 for d in batch)
    for delivery in batch:
        await consumer.ack((delivery,))
    await broker.drain(timeout=1)


async def test_fetch_returns_at_most_max_count(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["t"])
    for n in range(5):
        await broker.publish(Event(topic="t", payload=n))
    first = await consumer.fetch(2)
    second = await consumer.fetch(10)
    assert [d.event.payload for d in [*first, *second]] == [0, 1, 2, 3, 4]


async def test_drain_waits_for_acknowledgement(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["t"])
    await broker.publish(Event(topic="t"))
    [delivery] = await consumer.fetch(1)
    with pytest.raises(TimeoutError):
        await broker.drain(timeout=0.05)
    await consumer.ack((delivery,))
    await broker.drain(timeout=1)


async def test_every_group_gets_every_event(broker: MemoryBroker) -> None:
    one = await broker.consume("one", ["t"])
    two = await broker.consume("two", [">"])
    await broker.publish(Event(topic="t", payload=1))
    assert [d.event.payload for d in await one.fetch(5)] == [1]
    assert [d.event.payload for d in await two.fetch(5)] == [1]


async def test_members_of_one_group_share_its_events(broker: MemoryBroker) -> None:
    first = await broker.consume("g", ["t"])
    second = await broker.consume("g", ["t"])
    for n in range(4):
        await broker.publish(Event(topic="t", payload=n))
    got_first = [d.event.payload for d in await first.fetch(2)]
    got_second = [d.event.payload for d in await second.fetch(10)]
    assert got_first == [0, 1]
    assert got_second == [2, 3]


async def test_a_waiting_fetch_wakes_on_publish(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["t"])
    fetching = asyncio.create_task(consumer.fetch(5))
    await asyncio.sleep(0)
    assert not fetching.done()
    await broker.publish(Event(topic="t", payload="x"))
    batch = await asyncio.wait_for(fetching, 1)
    assert [d.event.payload for d in batch] == ["x"]


async def test_close_ends_a_waiting_fetch(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["t"])
    fetching = asyncio.create_task(consumer.fetch(5))
    await asyncio.sleep(0)
    await consumer.close()
    assert await asyncio.wait_for(fetching, 1) == ()
    assert await consumer.fetch(5) == ()
    await consumer.close()  # closing twice is harmless


async def test_unacknowledged_events_go_back_to_the_group_first_in_order(
    broker: MemoryBroker,
) -> None:
    leaving = await broker.consume("g", ["t"])
    staying = await broker.consume("g", ["t"])
    for n in range(3):
        await broker.publish(Event(topic="t", payload=n))
    batch = await leaving.fetch(10)
    await leaving.ack((batch[0],))
    await broker.publish(Event(topic="t", payload=3))
    await leaving.close()

    again = await staying.fetch(10)
    assert [d.event.payload for d in again] == [1, 2, 3]
    assert [d.attempt for d in again] == [2, 2, 1]
    assert again[0].event is batch[1].event
    for delivery in again:
        await staying.ack((delivery,))
    await broker.drain(timeout=1)


async def test_released_events_go_back_first_in_fetch_order(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["t"])
    for n in range(4):
        await broker.publish(Event(topic="t", payload=n))
    batch = await consumer.fetch(3)
    await consumer.release([batch[2], batch[0]])  # handed back in another order
    (info,) = await broker.subscriptions()
    assert (info.in_flight, info.backlog) == (1, 3)
    again = await consumer.fetch(10)
    assert [d.event.payload for d in again] == [0, 2, 3]
    assert [d.attempt for d in again] == [2, 2, 1]
    # Still to be acknowledged: released is not settled.
    with pytest.raises(TimeoutError):
        await broker.drain(timeout=0.01)
    await consumer.ack([*again, batch[1]])
    await broker.drain(timeout=1)


async def test_a_release_wakes_a_waiting_member(broker: MemoryBroker) -> None:
    holding = await broker.consume("g", ["t"])
    waiting = await broker.consume("g", ["t"])
    await broker.publish(Event(topic="t", payload="x"))
    (held,) = await holding.fetch(5)
    fetching = asyncio.create_task(waiting.fetch(5))
    await asyncio.sleep(0)
    assert not fetching.done()
    await holding.release((held,))
    (again,) = await asyncio.wait_for(fetching, 1)
    assert (again.event, again.attempt) == (held.event, 2)


async def test_release_ignores_what_the_consumer_does_not_hold(broker: MemoryBroker) -> None:
    one = await broker.consume("g", ["t"])
    two = await broker.consume("g", ["t"])
    await broker.publish(Event(topic="t", payload=1))
    await broker.publish(Event(topic="t", payload=2))
    (first,) = await one.fetch(1)
    (second,) = await two.fetch(1)
    await one.ack((first,))
    await one.release((first, second))  # acknowledged already; held by the other member
    (info,) = await broker.subscriptions()
    assert (info.in_flight, info.backlog) == (1, 0)
    await one.close()
    await one.release((first,))  # closed: nothing to hand back
    await two.ack((second,))
    await broker.drain(timeout=1)


async def test_the_memory_broker_offers_the_operations(broker: MemoryBroker) -> None:
    assert isinstance(broker, BrokerAdmin)
    assert admin(broker) is broker
    assert await broker.clean() == 0
    assert await broker.migrate() == []


async def test_a_member_leaving_after_being_woken_passes_the_event_on(
    broker: MemoryBroker,
) -> None:
    first = await broker.consume("g", ["t"])
    second = await broker.consume("g", ["t"])
    first_fetch = asyncio.create_task(first.fetch(5))
    await asyncio.sleep(0)
    second_fetch = asyncio.create_task(second.fetch(5))
    await asyncio.sleep(0)

    await broker.publish(Event(topic="t", payload="x"))  # wakes the first waiter
    await first.close()  # ... which leaves before it could take the event

    assert await asyncio.wait_for(first_fetch, 1) == ()
    batch = await asyncio.wait_for(second_fetch, 1)
    assert [d.event.payload for d in batch] == ["x"]


async def test_the_last_member_leaving_ends_the_group(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["t"])
    await broker.publish(Event(topic="t", payload=1))
    await broker.publish(Event(topic="t", payload=2))
    await consumer.fetch(1)
    await consumer.close()
    # Nothing is left waiting for an acknowledgement ...
    await broker.drain(timeout=1)
    # ... and a new group of the same name starts afresh, from the end.
    again = await broker.consume("g", ["other"])
    await broker.publish(Event(topic="other", payload=3))
    assert [d.event.payload for d in await again.fetch(5)] == [3]


async def test_routes_follow_groups_joining_and_leaving(broker: MemoryBroker) -> None:
    first = await broker.consume("first", ["github.*"])
    await broker.publish(Event(topic="github.push", payload=1))  # its route is remembered
    second = await broker.consume("second", [">"])
    await broker.publish(Event(topic="github.push", payload=2))
    await first.close()
    await broker.publish(Event(topic="github.push", payload=3))
    again = await broker.consume("first", ["github.push"])
    await broker.publish(Event(topic="github.push", payload=4))
    assert [d.event.payload for d in await second.fetch(10)] == [2, 3, 4]
    assert [d.event.payload for d in await again.fetch(10)] == [4]


async def test_of_a_thousand_groups_a_publish_reaches_only_its_readers(
    broker: MemoryBroker,
) -> None:
    others = [
        await broker.consume(f"g{n}", [f"tenant{n}.github.push", f"app{n}.*", f"svc{n}.>"])
        for n in range(1_000)
    ]
    reader = await broker.consume("reader", ["github.>"])
    for topic in ["github.push", "tenant7.github.push", "app9.x", "svc3.a.b", "$x.push"]:
        await broker.publish(Event(topic=topic))
    assert topics_of(await reader.fetch(10)) == ["github.push"]
    got = {n: topics_of(await others[n].fetch(10)) for n in (3, 7, 9)}
    assert got == {3: ["svc3.a.b"], 7: ["tenant7.github.push"], 9: ["app9.x"]}
    assert sum(info.backlog for info in await broker.subscriptions()) == 0


async def test_joining_a_group_with_other_topics_is_refused(broker: MemoryBroker) -> None:
    await broker.consume("g", ["a", "b"])
    await broker.consume("g", ["b", "a"])  # same set, other order: fine
    with pytest.raises(SubscriptionError, match="another subscription id"):
        await broker.consume("g", ["a"])


async def test_replay_is_refused_with_a_hint(broker: MemoryBroker) -> None:
    with pytest.raises(SubscriptionError, match="durable broker"):
        await broker.consume("g", ["t"], start="beginning")


async def test_a_redelivery_with_a_known_delivery_id_is_dropped(broker: MemoryBroker) -> None:
    consumer = await broker.consume("g", ["a", "b"])
    assert await broker.publish(Event(topic="a", metadata={DELIVERY_ID: "d1"}))
    assert not await broker.publish(Event(topic="a", metadata={DELIVERY_ID: "d1"}))
    assert await broker.publish(Event(topic="b", metadata={DELIVERY_ID: "d1"}))
    assert topics_of(await consumer.fetch(10)) == ["a", "b"]


async def test_the_delivery_id_window_is_bounded() -> None:
    broker = MemoryBroker(dedupe_window_ids=2)
    for n in range(3):
        assert await broker.publish(Event(topic="a", metadata={DELIVERY_ID: f"d{n}"}))
    # d0 fell out of the window of two ids.
    assert await broker.publish(Event(topic="a", metadata={DELIVERY_ID: "d0"}))
    assert not await broker.publish(Event(topic="a", metadata={DELIVERY_ID: "d2"}))


async def test_a_closed_broker_refuses_events(broker: MemoryBroker) -> None:
    await broker.close()
    with pytest.raises(ServiceClosedError):
        await broker.publish(Event(topic="t"))
    await broker.start()
    assert await broker.publish(Event(topic="t"))


async def test_dead_letters_are_kept_until_taken(broker: MemoryBroker) -> None:
    first = Event(topic="$deadletter.g", payload=1)
    second = Event(topic="$deadletter.g", payload=2)
    await broker.publish(first)
    await broker.publish(second)
    assert await broker.take_dead_letters("other") == []
    assert [e.payload for e in await broker.take_dead_letters("g")] == [1, 2]
    assert [e.payload for e in await broker.take_dead_letters("g", limit=1)] == [1]
    taken = await broker.take_dead_letters("g", ids=[second.id], remove=True)
    assert [e.payload for e in taken] == [2]
    assert [e.payload for e in await broker.take_dead_letters("g")] == [1]


async def test_deliver_to_reaches_one_group_only(broker: MemoryBroker) -> None:
    one = await broker.consume("one", ["t"])
    two = await broker.consume("two", ["t"])
    await broker.deliver_to("one", Event(topic="elsewhere", payload="x"))
    [delivery] = await one.fetch(5)
    assert delivery.event.payload == "x"
    await one.ack((delivery,))
    await broker.drain(timeout=1)
    await two.close()
    with pytest.raises(SubscriptionError):
        await broker.deliver_to("two", Event(topic="t"))


async def test_a_slow_subscriber_holds_up_neither_publisher_nor_others(
    events: RecordingEventsService,
) -> None:
    release = asyncio.Event()
    fast_got: list[object] = []
    fast_done = asyncio.Event()

    async def slow(event: Event) -> None:
        await release.wait()

    async def fast(event: Event) -> None:
        fast_got.append(event.payload)
        if len(fast_got) == 3:
            fast_done.set()

    await events.subscribe("slow", "t", slow)
    await events.subscribe("fast", "t", fast)
    for n in range(3):
        await asyncio.wait_for(events.publish(Event(topic="t", payload=n)), 1)
    await asyncio.wait_for(fast_done.wait(), 5)
    assert fast_got == [0, 1, 2]
    release.set()
    await events.drain()


async def test_a_raising_subscriber_holds_up_no_other(events: RecordingEventsService) -> None:
    got: list[object] = []

    async def broken(event: Event) -> None:
        raise RuntimeError("boom")

    async def fine(event: Event) -> None:
        got.append(event.payload)

    await events.subscribe("broken", "t", broken)
    await events.subscribe("fine", "t", fine)
    for n in range(3):
        await events.publish(Event(topic="t", payload=n))
    await events.drain()
    assert got == [0, 1, 2]
    assert len(await events.dead_letters("broken")) == 3


async def test_delivery_ids_older_than_the_window_are_forgotten() -> None:
    broker = MemoryBroker(dedupe_window_seconds=0)
    assert await broker.publish(Event(topic="a", metadata={DELIVERY_ID: "d"}))
    assert await broker.publish(Event(topic="a", metadata={DELIVERY_ID: "d"}))


async def test_a_fetch_cancelled_after_its_wake_up_passes_it_on() -> None:
    broker = MemoryBroker()
    first = await broker.consume("group", ["t"])
    second = await broker.consume("group", ["t"])
    cancelled = asyncio.create_task(first.fetch(10))
    waiting = asyncio.create_task(second.fetch(10))
    await asyncio.sleep(0)  # both members are now waiting
    await broker.publish(Event(topic="t", payload=1))  # wakes the first in line
    cancelled.cancel()
    batch = await asyncio.wait_for(waiting, 1)
    assert [d.event.payload for d in batch] == [1]


def test_broker_urls_are_logged_without_secrets() -> None:
    from callboard.brokers import redact_url

    assert redact_url("postgresql://app:hunter2@db:5432/events?sslmode=require") == (
        "postgresql://app:***@db:5432/events?sslmode=require"
    )
    assert redact_url("callboard+https://:s3cret@bus.example/api?token=t0k&leaseMs=5") == (
        "callboard+https://:***@bus.example/api?token=***&leaseMs=5"
    )
    assert redact_url("sqlite:///var/lib/callboard.db") == "sqlite:///var/lib/callboard.db"
