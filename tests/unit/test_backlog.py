"""BacklogCounter against a count of every stored event, on random stores."""

from __future__ import annotations

import random
from collections.abc import Sequence

from callboard.brokers.sql.backlog import BacklogCounter, GroupState, Span, StoreState, Tally
from callboard.topics import TopicMatcher

TOPICS = ["a.x", "a.y", "b.x", "c"]
PATTERNS = [("a.*",), ("b.x", "c"), ("#",), ("a.y",), ("*.x",)]


class Store:
    """Events as (seq, topic, target); reads counted to prove the counter reads only new rows."""

    def __init__(self) -> None:
        self.events: dict[int, tuple[str, str | None]] = {}
        self.head = 0
        self.groups: dict[str, tuple[tuple[str, ...], int]] = {}
        self.read = 0

    def publish(self, topic: str, target: str | None = None) -> None:
        self.head += 1
        self.events[self.head] = (topic, target)

    def expire_oldest(self, count: int) -> None:
        for seq in sorted(self.events)[:count]:
            del self.events[seq]

    def exact(self, name: str) -> int:
        topics, position = self.groups[name]
        matcher = TopicMatcher(topics)
        return sum(
            1
            for seq, (topic, target) in self.events.items()
            if seq > position and (target == name or (target is None and matcher(topic)))
        )

    async def backlog_state(self) -> StoreState:
        groups = [
            GroupState(name, topics, position, 0, None, 0, 0)
            for name, (topics, position) in sorted(self.groups.items())
        ]
        return StoreState(self.head, min(self.events, default=None), groups)

    async def tally_events(
        self, counts: Sequence[Span], rows: Sequence[Span], bucket: int
    ) -> Tally:
        tallied: dict[tuple[int, str, str | None], int] = {}
        for after, upto in counts:
            for seq in range(after + 1, upto + 1):
                if seq in self.events:
                    self.read += 1
                    key = ((seq - 1) // bucket, *self.events[seq])
                    tallied[key] = tallied.get(key, 0) + 1
        listed = []
        for after, upto in rows:
            for seq in range(after + 1, upto + 1):
                if seq in self.events:
                    self.read += 1
                    listed.append((seq, *self.events[seq]))
        return Tally([(*k, n) for k, n in tallied.items()], listed)


async def test_backlog_matches_a_full_count_on_random_work() -> None:
    for trial in range(30):
        rng = random.Random(trial)
        store = Store()
        counter = BacklogCounter(store, bucket=rng.choice([1, 4, 16]))
        for _ in range(60):
            action = rng.random()
            if action < 0.4:
                for _ in range(rng.randint(1, 20)):
                    store.publish(rng.choice(TOPICS))
            elif action < 0.5 and store.groups:
                store.publish(rng.choice(TOPICS), rng.choice(sorted(store.groups)))
            elif action < 0.65:
                name = f"g{rng.randint(0, 5)}"
                store.groups[name] = (rng.choice(PATTERNS), rng.randint(0, store.head))
            elif action < 0.8 and store.groups:
                name = rng.choice(sorted(store.groups))
                topics, position = store.groups[name]
                store.groups[name] = (topics, rng.randint(position, store.head))
            elif action < 0.9:
                store.expire_oldest(rng.randint(0, 30))
            else:
                store.groups.pop(rng.choice(sorted(store.groups)), None) if store.groups else None
            got = {s.name: s.backlog for s in await counter.subscriptions()}
            assert got == {name: store.exact(name) for name in store.groups}, trial


async def test_a_second_call_reads_only_what_was_stored_since() -> None:
    store = Store()
    for i in range(10_000):
        store.publish(TOPICS[i % 4])
    store.groups = {f"g{i}": (PATTERNS[i % 5], 0) for i in range(100)}
    counter = BacklogCounter(store, bucket=1024)
    await counter.subscriptions()
    assert store.read == 10_000  # the first call reads after the lowest position, once
    store.read = 0
    for _ in range(50):
        store.publish("c")
    listed = await counter.subscriptions()
    assert store.read == 50
    assert {s.name: s.backlog for s in listed} == {n: store.exact(n) for n in store.groups}
