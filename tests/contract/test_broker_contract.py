"""The broker contract, run against every broker (``conftest.kit``).

What only some brokers do is asked of ``broker.capabilities``: ``durable`` (events and leases
survive the process), ``shared`` (several broker instances share one store), ``replay`` (a new
group may start from the beginning or from a time). The operations (``BrokerAdmin``) are reached
through ``kit.admin(broker)``; what only a kit knows (stopping a broker as a killed process would)
through the kit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import pytest

from callboard.brokers.base import (
    IN_PROCESS,
    Broker,
    BrokerAdmin,
    Consumer,
    Delivery,
    EventQuery,
    RetentionPolicy,
    dead_letter_topic,
)
from callboard.deadletters import dead_letter_event
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.errors import InvalidEventError, SubscriptionError
from callboard.events import DELIVERY_ID, Event
from callboard.topics import TopicMatcher
from tests.contract.kit import (
    CALL_ORDER,
    DELETED_GROUP,
    LEASE,
    OWNER,
    RETENTION_COUNT,
    BrokerKit,
)


def event(topic: str = "github.push", n: int = 0, **metadata: str) -> Event:
    return Event(topic=topic, payload={"n": n}, metadata=metadata)


async def fetch(consumer: Consumer, count: int = 1, timeout: float = 3.0) -> list[Delivery]:
    """Exactly ``count`` deliveries, fetched in as many calls as it takes."""
    found: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            found.extend(await consumer.fetch(count - len(found)))
    return found


async def nothing(consumer: Consumer, wait: float = 0.2) -> None:
    """Assert that no delivery arrives within ``wait`` seconds."""
    try:
        got: Sequence[Delivery] = await asyncio.wait_for(consumer.fetch(10), wait)
    except TimeoutError:
        return
    pytest.fail(f"expected nothing, got {[d.event for d in got]}")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds, polling."""
    for _ in range(int(timeout / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail("the condition did not hold in time")


def numbers(deliveries: Sequence[Delivery]) -> list[int]:
    return [d.event.payload["n"] for d in deliveries]


async def ack_all(consumer: Consumer, deliveries: Sequence[Delivery]) -> None:
    for delivery in deliveries:
        await consumer.ack((delivery,))


@pytest.fixture
def ops(kit: BrokerKit, broker: Broker) -> BrokerAdmin:
    """The operations on the test's broker."""
    return kit.admin(broker)


async def test_every_broker_offers_the_operations(kit: BrokerKit, broker: Broker) -> None:
    assert isinstance(broker, BrokerAdmin)
    assert kit.admin(broker) is broker


# -- publish and consume ------------------------------------------------------------------------


async def test_a_group_receives_what_is_published(broker: Broker) -> None:
    consumer = await broker.consume("indexer", ["github.*"])
    sent = event("github.push", 1, **{"x-github-event": "push"})
    assert await broker.publish(sent) is True
    (delivery,) = await fetch(consumer)
    assert delivery.event == sent
    assert delivery.attempt == 1
    await consumer.ack((delivery,))
    await nothing(consumer)


async def test_a_group_receives_only_its_topics(broker: Broker) -> None:
    consumer = await broker.consume("indexer", ["github.push", "gitlab.>"])
    for topic in ("github.issues", "github.push", "gitlab", "gitlab.merge_request.open"):
        await broker.publish(event(topic))
    got = await fetch(consumer, 2)
    assert [d.event.topic for d in got] == ["github.push", "gitlab.merge_request.open"]
    await nothing(consumer)


async def test_every_group_receives_every_event(broker: Broker) -> None:
    first = await broker.consume("first", ["github.push"])
    second = await broker.consume("second", ["github.>"])
    for n in range(3):
        await broker.publish(event(n=n))
    assert numbers(await fetch(first, 3)) == [0, 1, 2]
    assert numbers(await fetch(second, 3)) == [0, 1, 2]


async def test_consumers_of_one_group_share_its_events(broker: Broker) -> None:
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    for n in range(6):
        await broker.publish(event(n=n))
    got_one = await fetch(one, 1)
    got_two = await fetch(two, 1)
    got_one += await fetch(one, 2)
    got_two += await fetch(two, 2)
    assert sorted(numbers(got_one) + numbers(got_two)) == list(range(6))
    assert not set(numbers(got_one)) & set(numbers(got_two))
    await nothing(one)
    await nothing(two)


async def test_each_consumer_receives_in_publish_order(broker: Broker) -> None:
    witness = await broker.consume("witness", ["github.push"])
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    await asyncio.gather(*(broker.publish(event(n=n)) for n in range(40)))
    # The order the broker stored them in, which concurrent publishes need not have chosen.
    stored = {n: position for position, n in enumerate(numbers(await fetch(witness, 40)))}
    got_one: list[Delivery] = []
    got_two: list[Delivery] = []
    while len(got_one) + len(got_two) < 40:
        got_one += await fetch(one, min(3, 40 - len(got_one) - len(got_two)))
        if len(got_one) + len(got_two) < 40:
            got_two += await fetch(two, min(5, 40 - len(got_one) - len(got_two)))
    assert numbers(got_one) == sorted(numbers(got_one), key=stored.__getitem__)
    assert numbers(got_two) == sorted(numbers(got_two), key=stored.__getitem__)
    assert sorted(numbers(got_one) + numbers(got_two)) == list(range(40))


async def test_concurrent_publishes_are_all_stored_in_order(kit: BrokerKit, broker: Broker) -> None:
    kit.require(CALL_ORDER)
    consumer = await broker.consume("all", ["github.push"])
    accepted = await asyncio.gather(*(broker.publish(event(n=n)) for n in range(200)))
    assert all(accepted)
    assert numbers(await fetch(consumer, 200)) == list(range(200))


# -- acknowledgement and redelivery -------------------------------------------------------------


async def test_acknowledged_events_are_not_delivered_again(broker: Broker) -> None:
    first = await broker.consume("workers", ["github.push"])
    for n in range(3):
        await broker.publish(event(n=n))
    await ack_all(first, await fetch(first, 3))
    second = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=3))
    assert numbers(await fetch(second, 1)) == [3]
    await nothing(first)


async def test_a_durable_group_keeps_its_position_while_nobody_reads(
    kit: BrokerKit, broker: Broker
) -> None:
    if not broker.capabilities.durable:
        pytest.skip("only a durable group outlives its consumers")
    first = await broker.consume("workers", ["github.push"])
    for n in range(3):
        await broker.publish(event(n=n))
    await ack_all(first, (await fetch(first, 3))[:2])
    await first.close()
    await broker.publish(event(n=3))
    await broker.close()
    reopened = await kit.open()
    second = await reopened.consume("workers", ["github.push"], start="beginning")
    got = await fetch(second, 2)
    assert numbers(got) == [2, 3]
    assert [d.attempt for d in got] == [2, 1]


async def test_unacknowledged_events_go_to_another_consumer_on_close(broker: Broker) -> None:
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    await broker.publish(event(n=2))
    (first,) = await fetch(one, 1)
    await one.close()
    got = await fetch(two, 2)
    assert sorted(numbers(got)) == [1, 2]
    assert {d.event.payload["n"]: d.attempt for d in got}[first.event.payload["n"]] == 2


async def test_deliveries_acknowledged_together_are_all_settled(broker: Broker) -> None:
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    for n in range(5):
        await broker.publish(event(n=n))
    held = await fetch(one, 5)
    await one.ack(held[::2])
    await one.ack(held[:1])  # already acknowledged: ignored
    await one.ack(())
    await one.close()
    again = await fetch(two, 2)
    assert numbers(again) == [1, 3]
    assert [d.attempt for d in again] == [2, 2]
    await nothing(two)


async def test_released_deliveries_come_back_at_once_before_newer_events(
    broker: Broker, ops: BrokerAdmin
) -> None:
    consumer = await broker.consume("workers", ["github.push"])
    for n in range(3):
        await broker.publish(event(n=n))
    held = await fetch(consumer, 3)
    await broker.publish(event(n=3))
    await consumer.release(held[:2])
    listed = {s.name: s for s in await ops.subscriptions()}
    # Handed back, not failed: waiting for the group again, no longer in flight.
    assert (listed["workers"].in_flight, listed["workers"].backlog) == (1, 3)
    # Well before the lease would have run out.
    again = await fetch(consumer, 3, timeout=LEASE / 2)
    assert numbers(again) == [0, 1, 3]
    assert [d.attempt for d in again] == [2, 2, 1]
    await consumer.ack([*again, held[2]])
    await nothing(consumer)
    assert await ops.take_dead_letters("workers") == []


async def test_a_released_delivery_goes_to_a_waiting_member(broker: Broker) -> None:
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    (held,) = await fetch(one, 1)
    waiting = asyncio.create_task(fetch(two, 1, timeout=LEASE / 2))
    await asyncio.sleep(0)  # the other member waits in its fetch
    await one.release((held,))
    (again,) = await waiting
    assert (again.event, again.attempt) == (held.event, 2)
    await two.ack((again,))
    await nothing(one)


async def test_release_ignores_deliveries_not_held(broker: Broker) -> None:
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    await broker.publish(event(n=2))
    (first,) = await fetch(one, 1)
    (second,) = await fetch(two, 1)
    await one.ack((first,))
    await one.release((first,))  # acknowledged already
    await one.release((second,))  # held by the other member
    await nothing(one)
    await nothing(two)
    await two.ack((second,))
    await two.release((second,))
    await nothing(two)


async def test_a_crashed_consumers_events_go_to_another_after_its_lease(kit: BrokerKit) -> None:
    crashing = await kit.open(lease=0.4)
    if not crashing.capabilities.shared:
        pytest.skip("only a broker shared between processes outlives a crashed one")
    surviving = await kit.open(lease=0.4)
    doomed = await crashing.consume("workers", ["github.push"])
    await crashing.publish(event(n=1))
    (held,) = await fetch(doomed, 1)
    other = await surviving.consume("workers", ["github.push"])
    await kit.crash(crashing)
    (again,) = await fetch(other, 1, timeout=5.0)
    assert again.event == held.event
    assert again.attempt == 2


async def test_a_live_consumer_keeps_its_lease_while_handling(kit: BrokerKit) -> None:
    broker = await kit.open(lease=0.3)
    one = await broker.consume("workers", ["github.push"])
    two = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    (held,) = await fetch(one, 1)
    await nothing(two, 1.0)  # more than three leases long: renewed, not handed on
    await one.ack((held,))
    await nothing(two, 0.1)


async def test_a_cancelled_fetch_loses_nothing(broker: Broker) -> None:
    consumer = await broker.consume("workers", ["github.push"])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consumer.fetch(10), 0.05)

    async def publish_all() -> None:
        for n in range(30):
            await broker.publish(event(n=n))
            await asyncio.sleep(0)

    publisher = asyncio.create_task(publish_all())
    got: list[Delivery] = []
    while not publisher.done():
        with contextlib.suppress(TimeoutError):
            got += await asyncio.wait_for(consumer.fetch(4), 0.001)
    await publisher
    got += await fetch(consumer, 30 - len(got))
    assert numbers(got) == list(range(30))
    assert {d.attempt for d in got} == {1}


# -- redeliveries from the sender ---------------------------------------------------------------


async def test_a_delivery_id_is_accepted_once_per_topic(broker: Broker) -> None:
    consumer = await broker.consume("workers", ["github.>"])
    assert await broker.publish(event(n=1, **{DELIVERY_ID: "d-1"})) is True
    assert await broker.publish(event(n=2, **{DELIVERY_ID: "d-1"})) is False
    assert await broker.publish(event("github.issues", 3, **{DELIVERY_ID: "d-1"})) is True
    assert await broker.publish(event(n=4, **{DELIVERY_ID: "d-2"})) is True
    assert numbers(await fetch(consumer, 3)) == [1, 3, 4]
    await nothing(consumer)


async def test_concurrent_redeliveries_are_accepted_once(broker: Broker) -> None:
    consumer = await broker.consume("workers", ["github.push"])
    results = await asyncio.gather(
        *(broker.publish(event(n=n, **{DELIVERY_ID: "same"})) for n in range(10))
    )
    assert results.count(True) == 1
    (delivery,) = await fetch(consumer)
    assert numbers([delivery]) == [results.index(True)]
    await nothing(consumer)


# -- dead letters and redrive -------------------------------------------------------------------


async def test_dead_letters_are_kept_until_taken(broker: Broker, ops: BrokerAdmin) -> None:
    await broker.consume("indexer", ["github.push"])
    failed = [event(n=n) for n in range(3)]
    letters = [dead_letter_event("indexer", e, RuntimeError("boom"), 5) for e in failed]
    for letter in letters:
        assert letter.topic == dead_letter_topic("indexer")
        assert await broker.publish(letter) is True
    listed = await ops.take_dead_letters("indexer")
    assert [e.id for e in listed] == [e.id for e in letters]
    assert listed[0] == letters[0]
    assert await ops.take_dead_letters("other") == []
    assert len(await ops.take_dead_letters("indexer", limit=2)) == 2
    taken = await ops.take_dead_letters("indexer", ids=[letters[1].id], remove=True)
    assert [e.id for e in taken] == [letters[1].id]
    remaining = await ops.take_dead_letters("indexer")
    assert [e.id for e in remaining] == [letters[0].id, letters[2].id]


async def test_deliver_to_reaches_one_group_only(broker: Broker, ops: BrokerAdmin) -> None:
    target = await broker.consume("target", ["github.push"])
    bystander = await broker.consume("bystander", ["github.>"])
    redriven = event("gitlab.push", 7)  # a topic the target does not even read
    await ops.deliver_to("target", redriven)
    (delivery,) = await fetch(target, 1)
    assert delivery.event == redriven
    await nothing(bystander)


async def test_deliver_to_an_unknown_group_fails(ops: BrokerAdmin) -> None:
    with pytest.raises(SubscriptionError):
        await ops.deliver_to("nobody", event())


# -- where a new group starts -------------------------------------------------------------------


async def test_a_new_group_starts_at_the_end(broker: Broker) -> None:
    await broker.publish(event(n=1))
    consumer = await broker.consume("late", ["github.push"])
    await broker.publish(event(n=2))
    assert numbers(await fetch(consumer, 1)) == [2]
    await nothing(consumer)


async def test_a_new_group_can_start_at_the_beginning(broker: Broker) -> None:
    await broker.publish(event(n=1))
    await broker.publish(event("other", 9))
    if not broker.capabilities.replay:
        with pytest.raises(SubscriptionError):
            await broker.consume("late", ["github.push"], start="beginning")
        return
    consumer = await broker.consume("late", ["github.push"], start="beginning")
    await broker.publish(event(n=2))
    assert numbers(await fetch(consumer, 2)) == [1, 2]


async def test_a_new_group_can_start_at_a_time(broker: Broker) -> None:
    await broker.publish(event(n=1))
    await asyncio.sleep(0.02)
    since = datetime.now(UTC)
    await asyncio.sleep(0.02)
    await broker.publish(event(n=2))
    if not broker.capabilities.replay:
        with pytest.raises(SubscriptionError):
            await broker.consume("late", ["github.push"], start=since)
        return
    consumer = await broker.consume("late", ["github.push"], start=since)
    assert numbers(await fetch(consumer, 1)) == [2]
    await nothing(consumer)


# -- several broker instances on one store ------------------------------------------------------


async def test_instances_on_one_store_share_a_group(kit: BrokerKit, broker: Broker) -> None:
    if not broker.capabilities.shared:
        pytest.skip("the broker is not shared between processes")
    other = await kit.open()
    here = await broker.consume("workers", ["github.push"])
    there = await other.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    (first,) = await fetch(here, 1)
    await other.publish(event(n=2))
    (second,) = await fetch(there, 1)
    assert numbers([first, second]) == [1, 2]
    broadcast = await other.consume("elsewhere", ["github.push"])
    await broker.publish(event(n=3))
    assert numbers(await fetch(broadcast, 1)) == [3]


# -- operations ---------------------------------------------------------------------------------


async def test_subscriptions_are_listed_with_their_progress(
    broker: Broker, ops: BrokerAdmin
) -> None:
    consumer = await broker.consume("indexer", ["github.push"])
    await broker.consume("auditor", ["github.>"])
    for n in range(3):
        await broker.publish(event(n=n))
    held = await fetch(consumer, 2)
    await consumer.ack((held[0],))
    listed = {s.name: s for s in await ops.subscriptions()}
    assert set(listed) >= {"indexer", "auditor"}
    indexer = listed["indexer"]
    assert indexer.topics == ("github.push",)
    assert (indexer.in_flight, indexer.backlog, indexer.behind) == (1, 1, False)
    assert listed["auditor"].backlog == 3


async def test_a_deleted_group_is_forgotten_with_its_dead_letters(
    broker: Broker, ops: BrokerAdmin
) -> None:
    consumer = await broker.consume("retired", ["github.push"])
    await broker.publish(event(n=1))
    await fetch(consumer, 1)  # leased, never acknowledged
    await broker.publish(dead_letter_event("retired", event(n=0), RuntimeError("boom"), 5))
    await consumer.close()
    assert await ops.delete_subscription("retired") is True
    assert "retired" not in {s.name for s in await ops.subscriptions()}
    assert await ops.take_dead_letters("retired") == []
    assert await ops.delete_subscription("retired") is False
    # Made again, the group starts afresh: at the end, nothing of the old one handed back.
    again = await broker.consume("retired", ["github.push"])
    await broker.publish(event(n=2))
    assert numbers(await fetch(again, 1)) == [2]
    await nothing(again)


async def owners(ops: BrokerAdmin) -> dict[str, str | None]:
    return {s.name: s.owner for s in await ops.subscriptions()}


async def test_a_group_keeps_the_owner_it_was_made_with(
    kit: BrokerKit, broker: Broker, ops: BrokerAdmin
) -> None:
    kit.require(OWNER)
    first = await broker.consume("owned", ["github.push"], owner="service=one")
    # Joining, with another owner or none, never replaces the owner.
    second = await broker.consume("owned", ["github.push"], owner="service=two")
    third = await broker.consume("owned", ["github.push"])
    await broker.consume("anyone", ["github.push"])
    assert (await owners(ops))["owned"] == "service=one"
    assert (await owners(ops))["anyone"] is None
    for consumer in (first, second, third):
        await consumer.close()


async def test_a_group_without_an_owner_is_claimed_by_the_next_owner(
    kit: BrokerKit, broker: Broker, ops: BrokerAdmin
) -> None:
    kit.require(OWNER)
    unowned = await broker.consume("legacy", ["github.push"])
    await broker.publish(event(n=1))
    claimed = await broker.consume("legacy", ["github.push"], owner=IN_PROCESS)
    assert (await owners(ops))["legacy"] == IN_PROCESS
    # Claiming moves nothing: the group still has its event.
    assert numbers(await fetch(unowned, 1)) == [1]
    await claimed.close()
    await unowned.close()


async def test_a_deleted_group_forgets_its_owner(
    kit: BrokerKit, broker: Broker, ops: BrokerAdmin
) -> None:
    kit.require(OWNER)
    consumer = await broker.consume("passed-on", ["github.push"], owner="service=one")
    await consumer.close()
    await ops.delete_subscription("passed-on")
    again = await broker.consume("passed-on", ["github.push"], owner="service=two")
    assert (await owners(ops))["passed-on"] == "service=two"
    if broker.capabilities.shared:
        other = await kit.open()  # another server on the same store sees the same owner
        assert (await owners(kit.admin(other)))["passed-on"] == "service=two"
    await again.close()


async def test_a_group_read_here_is_not_deleted(broker: Broker, ops: BrokerAdmin) -> None:
    consumer = await broker.consume("busy", ["github.push"])
    with pytest.raises(SubscriptionError, match="still read"):
        await ops.delete_subscription("busy")
    await broker.publish(event(n=1))
    assert numbers(await fetch(consumer, 1)) == [1]


async def test_a_group_deleted_elsewhere_stops_its_readers(
    kit: BrokerKit, broker: Broker, ops: BrokerAdmin
) -> None:
    kit.require(DELETED_GROUP)
    if not broker.capabilities.shared:
        pytest.skip("the broker is not shared between processes")
    other = await kit.open()
    reader = await other.consume("moved", ["github.push"])
    assert await ops.delete_subscription("moved") is True
    await broker.publish(event(n=1))
    with pytest.raises(SubscriptionError, match="no longer exists"):
        await fetch(reader, 1)


async def test_retention_reports_a_group_that_fell_behind(kit: BrokerKit) -> None:
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=2, batch_size=2)
    broker = await kit.open(retention=policy)
    if not broker.capabilities.durable:
        pytest.skip("only a durable broker keeps a retention window")
    slow = await broker.consume("slow", ["github.push"])
    fast = await broker.consume("fast", ["github.push"])
    for n in range(5):
        await broker.publish(event(n=n, **{DELIVERY_ID: f"d-{n}"}))
    await ack_all(fast, await fetch(fast, 5))
    assert await kit.clean(broker) == 3
    listed = {s.name: s for s in await kit.admin(broker).subscriptions()}
    assert (listed["slow"].lost, listed["slow"].behind) == (3, True)
    assert listed["fast"].behind is False
    assert numbers(await fetch(slow, 2)) == [3, 4]
    # Delivery ids of retained events are still recognised; those of deleted ones are not.
    assert await broker.publish(event(n=9, **{DELIVERY_ID: "d-4"})) is False
    assert await broker.publish(event(n=9, **{DELIVERY_ID: "d-0"})) is True


async def test_backlog_figures_stay_exact_as_events_come_go_and_expire(kit: BrokerKit) -> None:
    """Checked against a model through several rounds: groups made at different positions,
    over bucket edges of the incremental count, events for one group only, and retention."""
    kit.require(RETENTION_COUNT)
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=1500, batch_size=400)
    broker = await kit.open(retention=policy)
    ops = kit.admin(broker)
    rng = random.Random(19)
    topics = ("github.push", "github.issues", "gitlab.push", "gerrit.change-merged")
    patterns = {"pushes": ["*.push"], "github": ["github.>"], "all": [">"], "gerrit": ["gerrit.*"]}
    matchers = {name: TopicMatcher(p) for name, p in patterns.items()}
    consumers: dict[str, Consumer] = {}
    waiting: dict[str, list[int]] = {}  # per group, what it has not received, in order
    lost = dict.fromkeys(patterns, 0)
    stored: list[int] = []
    n = 0
    for round_ in range(6):
        if round_ < len(patterns):
            name = list(patterns)[round_]
            consumers[name] = await broker.consume(name, patterns[name])
            waiting[name] = []
        for _ in range(rng.randint(300, 700)):
            topic = rng.choice(topics)
            await broker.publish(event(topic, n))
            stored.append(n)
            for name in consumers:
                if matchers[name](topic):
                    waiting[name].append(n)
            n += 1
        for name in consumers:
            await ops.deliver_to(name, event("github.issues", n))  # for that group only
            stored.append(n)
            waiting[name].append(n)
            n += 1
        for name in rng.sample(sorted(consumers), k=min(2, len(consumers))):
            took = await fetch(consumers[name], rng.randint(0, min(300, len(waiting[name]))))
            await consumers[name].ack(took)
            assert numbers(took) == waiting[name][: len(took)]
            del waiting[name][: len(took)]
        if broker.capabilities.durable and round_ in (2, 4, 5):
            expired = stored[: max(0, len(stored) - policy.max_count)]
            assert await kit.clean(broker) == len(expired)
            del stored[: len(expired)]
            for name in waiting:
                gone = [m for m in waiting[name] if m <= expired[-1]] if expired else []
                lost[name] += len(gone)
                del waiting[name][: len(gone)]
        listed = {s.name: s for s in await ops.subscriptions()}
        figures = {name: (listed[name].backlog, listed[name].in_flight) for name in consumers}
        assert figures == {name: (len(waiting[name]), 0) for name in consumers}, round_
        assert {name: listed[name].lost for name in consumers} == {
            name: lost[name] for name in consumers
        }


# -- events no broker can keep ------------------------------------------------------------------


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


UNSTORABLE = {
    "nul-in-payload": (Event(topic="github.push", payload={"text": "a\x00b"}), "payload"),
    "nul-in-payload-key": (Event(topic="github.push", payload={"a\x00": 1}), "payload"),
    "nul-in-metadata": (Event(topic="github.push", metadata={"x-note": "a\x00b"}), "metadata"),
    "nul-in-delivery-id": (
        Event(topic="github.push", metadata={DELIVERY_ID: "d\x00"}),
        "metadata",
    ),
    "nul-in-id": (Event(topic="github.push", id="ev\x00t"), "id"),
    "nul-in-topic": (Event(topic="github.pu\x00sh"), "topic"),
    "payload-too-deep": (Event(topic="github.push", payload=_nested(300)), "payload"),
    "integer-too-large": (Event(topic="github.push", payload={"n": 2**70}), "payload"),
}


@pytest.mark.parametrize("case", list(UNSTORABLE))
async def test_an_event_no_broker_can_keep_is_refused_as_invalid(broker: Broker, case: str) -> None:
    unstorable, field = UNSTORABLE[case]
    consumer = await broker.consume("indexer", ["github.*", "github.>"])
    with pytest.raises(InvalidEventError, match=f"its {field} "):
        await broker.publish(unstorable)
    await broker.publish(event(n=1))
    (delivery,) = await fetch(consumer)
    assert numbers([delivery]) == [1]  # nothing of the refused event was stored


async def test_a_dead_letter_no_broker_can_keep_is_refused_as_invalid(
    broker: Broker, ops: BrokerAdmin
) -> None:
    letter = Event(topic=dead_letter_topic("indexer"), payload={"text": "\x00"})
    with pytest.raises(InvalidEventError, match="its payload "):
        await broker.publish(letter)
    assert await ops.take_dead_letters("indexer") == []


async def test_a_refused_event_fails_only_its_own_publish(broker: Broker) -> None:
    """Concurrent publishes share a commit on the durable brokers; one bad event spoils none."""
    consumer = await broker.consume("indexer", ["github.push"])
    sent = [event(n=n) for n in range(20)]
    bad = Event(topic="github.push", payload={"text": "\x00"})
    outcomes = await asyncio.gather(
        *(broker.publish(e) for e in [*sent[:10], bad, *sent[10:]]), return_exceptions=True
    )
    assert isinstance(outcomes[10], InvalidEventError)
    assert outcomes[:10] + outcomes[11:] == [True] * 20
    got = await fetch(consumer, 20)
    assert sorted(numbers(got)) == list(range(20))
    await nothing(consumer)


async def test_text_that_only_looks_like_a_nul_escape_is_kept(broker: Broker) -> None:
    consumer = await broker.consume("indexer", ["github.push"])
    kept = Event(topic="github.push", payload={"text": "\\u0000"})  # a backslash, then u0000
    assert await broker.publish(kept) is True
    (delivery,) = await fetch(consumer)
    assert delivery.event.payload == {"text": "\\u0000"}


# -- the events service on top ------------------------------------------------------------------


async def test_the_events_service_retries_dead_letters_and_redrives(broker: Broker) -> None:
    failing = {"n": 2}
    handled: list[int] = []
    calls: list[int] = []

    async def handler(received: Event) -> None:
        calls.append(received.payload["n"])
        if received.payload["n"] == failing["n"]:
            raise RuntimeError("not today")
        handled.append(received.payload["n"])

    service = DefaultEventsService(
        broker, retry=RetryPolicy(attempts=3, initial_delay=0.01, max_delay=0.02)
    )
    async with service:
        await service.subscribe("indexer", "github.push", handler)
        for n in range(4):
            await service.publish(event(n=n))

        async def dead_lettered() -> bool:
            return len(handled) == 3 and bool(await service.dead_letters("indexer"))

        await eventually(dead_lettered)
        assert handled == [0, 1, 3]
        assert calls.count(2) == 3
        (letter,) = await service.dead_letters("indexer")
        assert letter.event.payload == {"n": 2}
        assert letter.event.topic == "github.push"
        assert letter.attempts == 3
        assert "not today" in letter.error

        failing["n"] = -1
        assert await service.redrive("indexer") == 1

        async def redriven() -> bool:
            return handled == [0, 1, 3, 2]

        await eventually(redriven)
        assert await service.dead_letters("indexer") == []


async def test_a_stopped_subscription_leaves_nothing_it_handled_unacknowledged(
    broker: Broker, ops: BrokerAdmin
) -> None:
    handled: list[int] = []

    async def handler(received: Event) -> None:
        handled.append(received.payload["n"])

    # Several batches: the worker starts each acknowledgement and records a batch's together.
    service = DefaultEventsService(broker, batch_size=8)
    await service.start()
    holder = await broker.consume("indexer", ["github.push"])  # keeps a memory group alive
    subscription = await service.subscribe("indexer", "github.push", handler)
    await asyncio.gather(*(broker.publish(event(n=n)) for n in range(50)))

    async def all_handled() -> bool:
        return len(handled) == 50

    await eventually(all_handled)
    await subscription.close()
    assert sorted(handled) == list(range(50))
    listed = {s.name: s for s in await ops.subscriptions()}
    assert (listed["indexer"].in_flight, listed["indexer"].backlog) == (0, 0)
    await nothing(holder)


# -- reading the stored events (EventLog) -------------------------------------------------------


async def test_stored_events_are_found_newest_first_page_by_page(
    kit: BrokerKit, broker: Broker
) -> None:
    log = kit.event_log(broker)
    published = [event("github.push" if n % 2 else "gitlab.push", n) for n in range(7)]
    for item in published:
        await broker.publish(item)
    seen: list[str] = []
    before: int | None = None
    pages = 0
    while True:
        page = await log.find_events(EventQuery(limit=3, before=before))
        pages += 1
        seqs = [stored.seq for stored in page.events]
        assert seqs == sorted(seqs, reverse=True)
        seen += [stored.event.id for stored in page.events]
        if page.next is None:
            break
        before = page.next
    assert seen == [e.id for e in reversed(published)]
    assert pages == 3
    first = (await log.find_events(EventQuery(limit=1))).events[0]
    assert first.event == published[-1]
    third = (await log.find_events(EventQuery(event_id=published[2].id))).events[0]
    newer = await log.find_events(EventQuery(after=third.seq, limit=3))
    assert [s.event.id for s in newer.events] == [e.id for e in reversed(published[4:])]
    assert newer.next is not None
    rest = await log.find_events(EventQuery(after=third.seq, before=newer.next))
    assert [s.event.id for s in rest.events] == [published[3].id]
    assert rest.next is None
    assert first.target is None
    assert first.stored_at.tzinfo is not None


async def test_stored_events_are_found_by_topic_pattern(kit: BrokerKit, broker: Broker) -> None:
    log = kit.event_log(broker)
    for topic in ("github.push", "github.issues", "gitlab.push", "github.pull_request.opened"):
        await broker.publish(event(topic))
    await broker.publish(dead_letter_event("indexer", event(), RuntimeError("boom"), 3))

    async def topics(*patterns: str) -> list[str]:
        page = await log.find_events(EventQuery(topics=patterns))
        return [stored.event.topic for stored in page.events]

    assert await topics("github.*") == ["github.issues", "github.push"]
    assert await topics("github.>") == [
        "github.pull_request.opened",
        "github.issues",
        "github.push",
    ]
    assert await topics("gitlab.push", "github.issues") == ["gitlab.push", "github.issues"]
    assert await topics("*.push") == ["gitlab.push", "github.push"]
    assert "$deadletter.indexer" not in await topics()
    assert len(await topics()) == 4
    assert await topics("$deadletter.>") == ["$deadletter.indexer"]
    assert await topics("$deadletter.other") == []


async def test_stored_events_are_found_by_time_and_id(kit: BrokerKit, broker: Broker) -> None:
    log = kit.event_log(broker)
    early = event(n=1)
    await broker.publish(early)
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    late = event(n=2)
    await broker.publish(late)
    since = await log.find_events(EventQuery(since=middle))
    assert [stored.event.id for stored in since.events] == [late.id]
    until = await log.find_events(EventQuery(until=middle))
    assert [stored.event.id for stored in until.events] == [early.id]
    by_id = await log.find_events(EventQuery(event_id=early.id))
    assert [stored.event for stored in by_id.events] == [early]
    assert (await log.find_events(EventQuery(event_id="no-such-event"))).events == ()
    assert (await log.find_events(EventQuery(event_id=early.id, topics=("other",)))).events == ()


async def test_an_events_outcome_follows_it_through_each_subscription(
    kit: BrokerKit, broker: Broker, ops: BrokerAdmin
) -> None:
    log = kit.event_log(broker)
    indexer = await broker.consume("indexer", ["github.>"])
    await broker.consume("mailer", ["github.push"])
    await broker.consume("unrelated", ["gitlab.push"])
    sent = event(n=1)
    await broker.publish(sent)
    await broker.consume("latecomer", ["github.push"])

    async def states() -> dict[str, str]:
        return {o.subscription: o.state for o in await log.event_outcomes(sent.id)}

    assert await states() == {
        "indexer": "pending",
        "mailer": "pending",
        "latecomer": "not_subscribed",
    }
    (delivery,) = await fetch(indexer, 1)
    (outcome,) = [o for o in await log.event_outcomes(sent.id) if o.subscription == "indexer"]
    assert (outcome.state, outcome.attempt) == ("in_flight", 1)
    assert outcome.consumer is not None
    assert outcome.lease_until is not None
    await indexer.ack((delivery,))

    async def delivered() -> bool:
        return (await states())["indexer"] == "delivered"

    await eventually(delivered)
    letter = dead_letter_event("mailer", sent, RuntimeError("smtp down"), 4)
    await broker.publish(letter)
    (outcome,) = [o for o in await log.event_outcomes(sent.id) if o.subscription == "mailer"]
    assert (outcome.state, outcome.attempt) == ("dead_lettered", 4)
    assert outcome.error == "RuntimeError: smtp down"
    assert outcome.dead_letter_id == letter.id
    assert await log.event_outcomes("no-such-event") == []
    assert [o.subscription for o in await log.event_outcomes(sent.id)] == [
        "indexer",
        "latecomer",
        "mailer",
    ]
    assert await ops.take_dead_letters("mailer") == [letter]


async def test_an_event_delivered_to_one_group_again_is_told_apart(
    kit: BrokerKit, broker: Broker, ops: BrokerAdmin
) -> None:
    log = kit.event_log(broker)
    await broker.consume("indexer", ["github.push"])
    sent = event(n=1)
    await ops.deliver_to("indexer", sent)
    (stored,) = (await log.find_events(EventQuery(event_id=sent.id))).events
    assert stored.target == "indexer"
    (outcome,) = await log.event_outcomes(sent.id)
    assert (outcome.subscription, outcome.state) == ("indexer", "pending")
