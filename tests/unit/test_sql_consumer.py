"""The SQL brokers' consumer over a stand-in store (no database): refusals, handing back."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import pytest

from callboard.brokers.base import Delivery
from callboard.brokers.sql.consumer import ConsumerRegistry, LeasedConsumer
from callboard.errors import BrokerError, SubscriptionError
from callboard.events import Event
from callboard.topics import TopicMatcher


class RefusingStore:
    """Refuses the first ``claims`` claims and the first ``acks`` acknowledgements."""

    def __init__(
        self,
        *,
        claims: int = 0,
        acks: int = 0,
        releases: int = 0,
        error: Exception | None = None,
    ) -> None:
        self.refuse_claims = claims
        self.refuse_acks = acks
        self.refuse_releases = releases
        self.error = error or BrokerError(
            "PostgreSQL refused a broker statement: deadlock detected"
        )
        self.claims = 0
        self.acked: list[tuple[str, int]] = []
        #: ``(consumer, seqs)`` of each release, ``seqs`` ``None`` for all the consumer holds.
        self.released: list[tuple[str, list[int] | None]] = []

    async def claim(self, group: str, consumer: str, limit: int) -> list[Delivery]:
        self.claims += 1
        if self.refuse_claims:
            self.refuse_claims -= 1
            raise self.error
        return [Delivery(Event(topic="jobs", payload=self.claims), 1, self.claims)]

    async def ack(self, group: str, leases: Sequence[tuple[str, int]]) -> list[bool]:
        if self.refuse_acks:
            self.refuse_acks -= 1
            raise self.error
        self.acked.extend(leases)
        return [True] * len(leases)

    async def release(self, group: str, consumer: str, seqs: Sequence[int] | None) -> None:
        if self.refuse_releases:
            self.refuse_releases -= 1
            raise self.error
        self.released.append((consumer, None if seqs is None else list(seqs)))


def consumer(store: RefusingStore, ack_patience: float = 1.0) -> LeasedConsumer:
    return LeasedConsumer(
        store,
        ConsumerRegistry(),
        "workers",
        ("jobs",),
        poll_interval=0.01,
        ack_patience=ack_patience,
    )


async def test_a_refused_claim_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    store = RefusingStore(claims=2)
    reader = consumer(store)
    (delivery,) = await asyncio.wait_for(reader.fetch(10), 2)
    assert (delivery.event.payload, store.claims) == (3, 3)
    assert caplog.text.count("the broker refused a claim; retrying") == 2
    assert "deadlock detected" in caplog.text
    await reader.close()


async def test_wake_ups_do_not_hurry_a_refused_claim_again() -> None:
    store = RefusingStore(claims=1)
    reader = consumer(store)
    fetching = asyncio.ensure_future(reader.fetch(10))
    await asyncio.sleep(0)
    for _ in range(20):
        reader.wake()
        await asyncio.sleep(0)
    assert store.claims == 1
    await asyncio.wait_for(fetching, 2)
    await reader.close()


async def test_closing_ends_the_pause_after_a_refused_claim() -> None:
    store = RefusingStore(claims=100)
    reader = LeasedConsumer(
        store, ConsumerRegistry(), "workers", ("jobs",), poll_interval=5.0, ack_patience=1.0
    )
    fetching = asyncio.ensure_future(reader.fetch(10))
    await asyncio.sleep(0.01)
    await reader.close()
    assert await asyncio.wait_for(fetching, 1) == ()


async def test_a_deleted_subscription_still_ends_its_reader() -> None:
    reader = consumer(RefusingStore(claims=1, error=SubscriptionError("no longer exists")))
    with pytest.raises(SubscriptionError):
        await reader.fetch(10)


async def test_a_refused_acknowledgement_is_tried_again() -> None:
    store = RefusingStore(acks=2)
    reader = consumer(store)
    batch = await reader.fetch(10)
    await reader.ack(batch)
    assert store.acked == [(reader.id, 1)]
    await reader.close()


async def test_an_acknowledgement_refused_for_good_lets_its_leases_run_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RefusingStore(acks=1_000)
    reader = consumer(store, ack_patience=0.2)
    batch = await reader.fetch(10)
    claimer = reader.id
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(reader.ack(batch), 2)
    assert store.acked == []
    # Claiming under a new id: the old one is renewed no more, so its lease runs out.
    assert reader.id != claimer
    assert "could not acknowledge 1 events" in caplog.text
    await reader.close()


async def test_released_deliveries_go_back_by_their_lease() -> None:
    store = RefusingStore()
    reader = consumer(store)
    first = await reader.fetch(10)
    second = await reader.fetch(10)
    await reader.release([*first, *second])
    assert store.released == [(reader.id, [1, 2])]
    await reader.close()
    assert store.released[-1] == (reader.id, None)  # closing hands back everything left


async def test_what_the_consumer_does_not_hold_is_neither_released_nor_acknowledged() -> None:
    store = RefusingStore()
    reader, other = consumer(store), consumer(store)
    (theirs,) = await other.fetch(10)
    for foreign in (Delivery(Event(topic="jobs", payload=0)), theirs):  # no lease; another's
        await reader.release([foreign])
        await reader.ack([foreign])
    assert (store.released, store.acked) == ([], [])
    await reader.close()
    await other.close()


async def test_a_release_that_fails_lets_its_leases_run_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RefusingStore(releases=1)
    reader = consumer(store)
    batch = await reader.fetch(10)
    claimer = reader.id
    with caplog.at_level(logging.WARNING):
        await reader.release(batch)
    assert store.released == []
    # Claiming under a new id: the old one is renewed no more, so its leases run out.
    assert reader.id != claimer
    assert "could not hand 1 events back" in caplog.text
    await reader.close()


# -- the registry: whom a commit wakes ----------------------------------------------------------


class Noting(LeasedConsumer):
    """A consumer that counts its wake-ups."""

    def __init__(
        self,
        registry: ConsumerRegistry,
        group: str,
        patterns: tuple[str, ...],
        store: RefusingStore | None = None,
    ) -> None:
        self.woken = 0
        super().__init__(
            store or RefusingStore(),
            registry,
            group,
            patterns,
            poll_interval=60.0,
            ack_patience=1.0,
        )

    def wake(self) -> None:
        self.woken += 1
        super().wake()


def woken(consumers: Sequence[Noting]) -> set[Noting]:
    found = {c for c in consumers if c.woken}
    for c in consumers:
        c.woken = 0
    return found


async def test_a_wake_up_reaches_exactly_the_consumers_of_its_topics_or_groups() -> None:
    rng = random.Random(18)
    segments = ["github", "gitlab", "push", "pr", "$x", "repo:push"]

    def pattern() -> str:
        parts = [rng.choice([*segments, "*"]) for _ in range(rng.randint(1, 3))]
        return ".".join([*parts, ">"] if rng.random() < 0.3 else parts)

    registry = ConsumerRegistry()
    consumers = [
        Noting(registry, f"g{n % 40}", tuple(pattern() for _ in range(rng.randint(1, 3))))
        for n in range(300)
    ]
    for _ in range(200):
        topics = {".".join(rng.choices(segments, k=rng.randint(1, 4))) for _ in range(3)}
        groups = {f"g{rng.randrange(60)}"}
        registry.wake(topics, groups)
        expected = {
            c
            for c in consumers
            if c.group in groups or any(TopicMatcher(c.patterns)(t) for t in topics)
        }
        assert woken(consumers) == expected
    registry.wake(None)
    assert woken(consumers) == set(consumers)


async def test_of_a_thousand_consumers_a_commit_wakes_only_its_readers() -> None:
    registry = ConsumerRegistry()
    others = [
        Noting(registry, f"g{n}", (f"tenant{n}.github.push", f"app{n}.*", f"svc{n}.>"))
        for n in range(1_000)
    ]
    reader = Noting(registry, "reader", ("github.>",))
    registry.wake({"github.push"}, ())
    assert woken([*others, reader]) == {reader}
    registry.wake({"tenant7.github.push", "app9.x"}, ())
    assert woken([*others, reader]) == {others[7], others[9]}


async def test_a_consumer_claiming_under_a_new_id_is_still_woken_and_renewed() -> None:
    registry = ConsumerRegistry()
    reader = Noting(registry, "workers", ("jobs",), RefusingStore(releases=1))
    before = reader.id
    await reader.release(await reader.fetch(10))  # refused: the consumer rejoins
    assert reader.id != before
    assert registry.live_ids() == [reader.id]
    assert registry.group_patterns("workers") == {("jobs",)}
    registry.wake({"jobs"}, ())
    assert woken([reader]) == {reader}
    registry.wake((), ("workers",))
    assert woken([reader]) == {reader}
    await reader.close()
    assert registry.live_ids() == []
    registry.wake({"jobs"}, ("workers",))
    assert woken([reader]) == set()


async def test_consumers_that_end_are_forgotten() -> None:
    registry = ConsumerRegistry()
    first, second = Noting(registry, "g", ("a.*",)), Noting(registry, "g", ("a.*",))
    with pytest.raises(SubscriptionError, match="still read by 2 consumer"):
        registry.check_unread("g")
    await first.close()
    registry.wake({"a.b"}, ("g",))
    assert woken([first, second]) == {second}
    with pytest.raises(SubscriptionError, match="still read by 1 consumer"):
        registry.check_unread("g")
    second.detach()
    registry.wake({"a.b"}, ("g",))
    assert woken([first, second]) == set()
    registry.check_unread("g")
    assert (registry.live_ids(), registry.group_patterns("g")) == ([], set())


async def test_ending_all_consumers_empties_the_registry() -> None:
    registry = ConsumerRegistry()
    consumers = [Noting(registry, f"g{n}", ("a",)) for n in range(3)]
    await registry.end_all(release=True)
    registry.wake({"a"}, ("g0",))
    assert woken(consumers) == set()
    registry.check_unread("g0")
    assert registry.live_ids() == []


class EmptyStore(RefusingStore):
    """Has nothing to lease."""

    async def claim(self, group: str, consumer: str, limit: int) -> list[Delivery]:
        self.claims += 1
        return []


async def claimed(store: RefusingStore, claims: int) -> None:
    for _ in range(5000):
        if store.claims >= claims:
            break
        await asyncio.sleep(0.001)
    assert store.claims == claims


async def test_an_idle_consumer_claims_again_only_when_woken() -> None:
    store = EmptyStore()
    registry = ConsumerRegistry()
    reader = LeasedConsumer(
        store, registry, "workers", ("jobs",), poll_interval=0.01, ack_patience=1.0
    )
    fetching = asyncio.ensure_future(reader.fetch(10))
    await asyncio.sleep(0.1)  # ten poll intervals: an idle consumer waits for a wake-up
    assert store.claims == 1
    registry.wake(["jobs.other"])  # not its topic
    await asyncio.sleep(0.02)
    assert store.claims == 1
    registry.wake(["jobs"])
    await claimed(store, 2)
    registry.wake((), ["workers"])  # its group (leases to claim again, found by the sweep)
    await claimed(store, 3)
    await reader.close()
    assert await fetching == ()
