"""The Kafka broker's ``EventLog``: what the contract suite cannot say.

What a process that does not hold a group tells of it (the position its holder wrote), what
retention removes from the index, and where a group's reading starts.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest

from callboard.brokers.base import EventQuery, Outcome, RetentionPolicy
from callboard.deadletters import dead_letter_event
from callboard.events import Event

pytest.importorskip("aiokafka")

from callboard.brokers.kafka import KafkaBroker
from tests.contract.kits_kafka import delete_topics, tansu_address

#: Starts one more broker instance on the test's namespace.
Opener = Callable[..., Awaitable[KafkaBroker]]


def event(topic: str = "github.push", n: int = 0) -> Event:
    return Event(topic=topic, payload={"n": n})


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"cb_it_{uuid.uuid4().hex[:12]}."
    yield name
    await delete_topics(tansu_address(), name)


@pytest.fixture
async def opened(prefix: str) -> AsyncIterator[Opener]:
    """Starts broker instances on one namespace, as separate processes would; closes them."""
    brokers: list[KafkaBroker] = []

    async def start(
        *, lease: float = 30.0, retention: RetentionPolicy | None = None
    ) -> KafkaBroker:
        broker = KafkaBroker(
            tansu_address(), prefix=prefix, fetch_wait_ms=10, lease=lease, retention=retention
        )
        brokers.append(broker)
        await broker.start()
        return broker

    yield start
    for broker in reversed(brokers):
        await broker.close()


async def outcome_of(broker: KafkaBroker, group: str, event_id: str) -> Outcome:
    (found,) = [o for o in await broker.event_outcomes(event_id) if o.subscription == group]
    return found


async def until_state(broker: KafkaBroker, group: str, event_id: str, state: str) -> Outcome:
    """The outcome once it is ``state`` (another process's position is written every 50 ms)."""
    found = await outcome_of(broker, group, event_id)
    for _ in range(200):
        if found.state == state:
            return found
        await asyncio.sleep(0.05)
        found = await outcome_of(broker, group, event_id)
    pytest.fail(f"{group} stayed {found.state}, not {state}")


@pytest.mark.slow
async def test_another_process_tells_the_holders_leases_until_its_hold_runs_out(
    opened: Opener,
) -> None:
    holder = await opened(lease=1.5)
    other = await opened()
    consumer = await holder.consume("indexer", ["github.push"])
    first, second = event(n=1), event(n=2)
    await holder.publish(first)
    await holder.publish(second)
    assert (await until_state(other, "indexer", first.id, "pending")).attempt == 0

    (delivery,) = await consumer.fetch(1)
    leased = await until_state(other, "indexer", first.id, "in_flight")
    assert leased.attempt == 1
    assert leased.consumer is not None
    assert leased.consumer.startswith(holder._instance)
    assert leased.lease_until is not None
    assert leased.lease_until > datetime.now(UTC)
    await consumer.ack((delivery,))
    await until_state(other, "indexer", first.id, "delivered")

    await consumer.fetch(1)
    await until_state(other, "indexer", second.id, "in_flight")
    await holder.abandon()  # crashed: its lease holds until its hold on the group runs out
    handed_back = await until_state(other, "indexer", second.id, "pending")
    assert handed_back.attempt == 1


async def test_events_retention_deleted_are_no_longer_found(
    opened: Opener,
) -> None:
    broker = await opened(retention=RetentionPolicy(min_age=0, max_count=1))
    await broker.consume("indexer", ["github.push"])
    old, new = event(n=1), event(n=2)
    await broker.publish(old)
    await broker.publish(new)
    assert await broker.clean() == 1
    page = await broker.find_events(EventQuery())
    assert [stored.event.id for stored in page.events] == [new.id]
    assert (await broker.find_events(EventQuery(event_id=old.id))).events == ()
    assert await broker.event_outcomes(old.id) == []
    # Another process reading the namespace from the start finds the same.
    again = await opened()
    assert [s.event.id for s in (await again.find_events(EventQuery())).events] == [new.id]


async def test_a_group_reads_from_where_it_started_not_from_when_it_was_made(
    opened: Opener,
) -> None:
    broker = await opened()
    sent = event()
    await broker.publish(sent)
    await broker.consume("replayer", ["github.push"], start="beginning")
    await broker.consume("latecomer", ["github.push"])
    states = {o.subscription: o.state for o in await broker.event_outcomes(sent.id)}
    assert states == {"replayer": "pending", "latecomer": "not_subscribed"}


async def test_taken_dead_letters_are_no_longer_found(
    opened: Opener,
) -> None:
    broker = await opened()
    await broker.consume("mailer", ["github.push"])
    sent = event()
    await broker.publish(sent)
    letter = dead_letter_event("mailer", sent, "smtp down", 3)
    await broker.publish(letter)
    letters = EventQuery(topics=("$deadletter.>",))
    (found,) = (await broker.find_events(letters)).events
    assert (found.event, found.target) == (letter, "mailer")
    assert (await outcome_of(broker, "mailer", sent.id)).state == "dead_lettered"
    await broker.take_dead_letters("mailer", remove=True)
    assert (await broker.find_events(letters)).events == ()
    # Taken (redriven or dropped): the event itself tells again, never fetched by the group.
    assert (await outcome_of(broker, "mailer", sent.id)).state == "pending"


async def test_retention_of_an_event_stored_twice_keeps_the_log_read(
    opened: Opener,
) -> None:
    broker = await opened(retention=RetentionPolicy(min_age=0, max_count=1))
    await broker.consume("indexer", ["github.push"])
    twice = event(n=1)
    await broker.publish(twice)
    await broker.deliver_to("indexer", twice)  # one event id, two records
    await broker.publish(event(n=2))
    assert await broker.clean() == 2
    assert (await broker.find_events(EventQuery(event_id=twice.id))).events == ()
    # The copy is still read after the floor passed both records of the one id.
    later = event(n=3)
    await broker.publish(later)
    (found,) = (await broker.find_events(EventQuery(event_id=later.id))).events
    assert found.event == later
