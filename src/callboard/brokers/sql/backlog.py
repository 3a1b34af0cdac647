"""Backlog figures whose cost follows new work, not the size of the store.

A subscription's backlog is what waits for it: the stored events after its ``position`` that
it reads (``target`` its name, or no target and a topic its patterns match), plus its leases
handed back or run out. Counting the first part row by row for every subscription costs
subscriptions x stored events; ``BacklogCounter`` keeps instead, per process, a tally of the
stored events by seq bucket (``BUCKET`` consecutive seqs) and by ``(topic, target)``:

- each call reads the head and the oldest stored seq and every subscription's position, topics
  and lease counts (one read, O(subscriptions)), then tallies only the events stored since the
  last call (one ``GROUP BY`` over a seq range of the primary key);
- a subscription's waiting events are the tallies of the buckets wholly after its position, summed
  over the distinct ``(topic, target)`` pairs it reads (topics are few next to events), plus the
  rows of the one bucket its position falls in (at most ``BUCKET`` rows, read once and kept);
- retention deletes the oldest events: buckets below the oldest stored seq are dropped and the
  bucket it falls in is tallied again (at most ``BUCKET`` rows); events a subscription lost are
  therefore no longer counted as waiting (``lost`` counts them);
- the tally starts at the lowest position: the first call (or a subscription created further
  back) reads the events after it once, ``CHUNK`` buckets per read so that other work of the
  store goes between the reads (a server starts this count when it starts, not at its first
  scrape).

Figures are exact as long as events are deleted oldest first (retention's order); positions,
heads and leases come from the store, so every process reports the same figures.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from callboard.brokers.base import SubscriptionInfo
from callboard.topics import TopicMatcher

#: Consecutive seqs tallied together; bucket ``k`` holds seqs ``k*BUCKET+1 .. (k+1)*BUCKET``.
BUCKET = 1024

#: What an event is told apart by, for counting: its topic and its target group (or ``None``).
Key = tuple[str, str | None]

#: Buckets counted in one read of the store.
CHUNK = 64

#: A seq range ``(after, upto]``.
Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class GroupState:
    """One subscription as stored: what ``BacklogCounter`` reads on every call."""

    name: str
    topics: tuple[str, ...]
    position: int
    lost: int
    owner: str | None
    #: Leases held by a live consumer.
    in_flight: int
    #: Leases handed back or run out: waiting to be claimed again.
    returned: int


@dataclass(frozen=True, slots=True)
class StoreState:
    """The store's subscriptions, read in one snapshot with the seqs that bound its events."""

    #: The newest stored seq (0: none stored).
    head: int
    #: The oldest stored seq (``None``: no event stored).
    low: int | None
    groups: list[GroupState]


@dataclass(frozen=True, slots=True)
class Tally:
    """Stored events counted by bucket, and stored events one by one."""

    #: ``(bucket, topic, target, count)``.
    counts: list[tuple[int, str, str | None, int]]
    #: ``(seq, topic, target)``, in seq order.
    rows: list[tuple[int, str, str | None]]


class BacklogSource(Protocol):
    """The two reads a ``BacklogCounter`` needs; stores run them off the event loop."""

    async def backlog_state(self) -> StoreState: ...

    async def tally_events(
        self, counts: Sequence[Span], rows: Sequence[Span], bucket: int
    ) -> Tally:
        """Count the events of the ``counts`` ranges by ``(seq - 1) // bucket``, topic and
        target; list those of the ``rows`` ranges."""
        ...


class BacklogCounter:
    """Per-subscription backlog from tallies kept up to date with what was stored since."""

    def __init__(self, source: BacklogSource, *, bucket: int = BUCKET) -> None:
        self._source = source
        self._size = bucket
        #: Stored events after ``_floor`` and up to ``_counted``, per bucket and key.
        self._buckets: dict[int, Counter[Key]] = {}
        self._floor: int | None = None
        self._counted = 0
        #: The oldest stored seq at the last call.
        self._low = 0
        #: Rows of the buckets positions fall in: bucket -> (read up to seq, rows in seq order).
        self._rows: dict[int, tuple[int, list[tuple[int, Key]]]] = {}
        self._matchers: dict[tuple[str, ...], TopicMatcher] = {}
        self._lock = asyncio.Lock()

    async def subscriptions(self) -> list[SubscriptionInfo]:
        """Every subscription, with its backlog: waiting events plus leases handed back."""
        async with self._lock:
            state = await self._source.backlog_state()
            waiting = await self._waiting(state)
        return [
            SubscriptionInfo(
                name=g.name,
                topics=g.topics,
                in_flight=g.in_flight,
                backlog=waiting[g.name] + g.returned,
                lost=g.lost,
                owner=g.owner,
            )
            for g in state.groups
        ]

    # -- internals ---------------------------------------------------------------------------

    async def _waiting(self, state: StoreState) -> dict[str, int]:
        """The stored events after each subscription's position that it reads."""
        size = self._size
        head = max(state.head, self._counted)
        low = state.low if state.low is not None else head + 1
        # Nothing at or below low - 1 is stored: a position further back counts from there.
        starts = {g.name: max(g.position, low - 1) for g in state.groups}
        if not starts:
            return {}
        floor = (min(starts.values()) // size) * size
        counts: list[Span] = []
        recount: int | None = None
        if self._floor is not None and low - 1 >= self._counted:
            self._reset()  # everything tallied was deleted
        if self._floor is not None and low != self._low:
            recount = self._deleted_below(low, counts)
        if self._floor is None:
            self._floor = self._counted = floor
        elif floor < self._floor:
            counts.append((floor, self._floor))
            self._floor = floor
        elif floor > self._floor:
            self._forget_below(floor)
        if head > self._counted:
            counts.append((max(self._counted, self._floor), head))
        self._counted = head
        self._low = low
        partial = {s // size for s in starts.values() if s % size and s < head}
        rows = self._missing_rows(partial, head)
        try:
            tally = await self._tally(counts, rows)
        except BaseException:
            self._reset()  # what was planned is not known to be tallied: start again
            raise
        if recount is not None:
            self._buckets.pop(recount, None)
        for bucket, topic, target, count in tally.counts:
            self._buckets.setdefault(bucket, Counter())[(topic, target)] += count
        for seq, topic, target in tally.rows:
            self._rows[(seq - 1) // size][1].append((seq, (topic, target)))
        after = self._after(starts)
        return {
            g.name: self._matching(after[starts[g.name]], g.name, g.topics) for g in state.groups
        }

    async def _tally(self, counts: list[Span], rows: list[Span]) -> Tally:
        """The reads of ``tally_events``, ``CHUNK`` seqs at a time: a long first count (a
        large store) never holds the store for long, publishes go between its reads."""
        chunk = self._size * CHUNK
        pieces = [
            (start, min(start + chunk, upto))
            for after, upto in counts
            for start in range(after, upto, chunk)
        ]
        tally = await self._source.tally_events(pieces[:1], rows, self._size)
        for piece in pieces[1:]:
            more = await self._source.tally_events([piece], (), self._size)
            tally.counts.extend(more.counts)
        return tally

    def _reset(self) -> None:
        self._buckets.clear()
        self._rows.clear()
        self._floor = None

    def _deleted_below(self, low: int, counts: list[Span]) -> int | None:
        """Forget what retention deleted (every seq below ``low``); the bucket to tally again."""
        assert self._floor is not None
        size = self._size
        edge = (low - 1) // size
        for bucket in [b for b in self._buckets if b < edge]:
            del self._buckets[bucket]
        for bucket in [b for b in self._rows if b < edge]:
            del self._rows[bucket]
        if edge in self._rows:
            upto, kept = self._rows[edge]
            self._rows[edge] = (upto, [row for row in kept if row[0] >= low])
        self._floor = max(self._floor, edge * size)
        if edge not in self._buckets:
            return None
        counts.append((edge * size, min((edge + 1) * size, self._counted)))
        return edge

    def _forget_below(self, floor: int) -> None:
        """No position is before ``floor`` any more: its tallies are not needed."""
        size = self._size
        for bucket in [b for b in self._buckets if b * size < floor]:
            del self._buckets[bucket]
        for bucket in [b for b in self._rows if b * size < floor]:
            del self._rows[bucket]
        self._floor = floor

    def _missing_rows(self, partial: set[int], head: int) -> list[Span]:
        """The rows to read for the buckets positions fall in (what was not read before)."""
        size = self._size
        spans: list[Span] = []
        for bucket in list(self._rows):
            if bucket not in partial:
                del self._rows[bucket]
        for bucket in partial:
            upto = min((bucket + 1) * size, head)
            read, kept = self._rows.get(bucket, (bucket * size, []))
            if read < upto:
                spans.append((read, upto))
            self._rows[bucket] = (max(read, upto), kept)
        return spans

    def _after(self, starts: dict[str, int]) -> dict[int, Counter[Key]]:
        """Per distinct start, the stored events after it by key."""
        size = self._size
        positions = sorted(set(starts.values()), reverse=True)
        needed = {-(-p // size) for p in positions}
        suffix: dict[int, Counter[Key]] = {}
        running: Counter[Key] = Counter()
        for bucket in sorted(needed | set(self._buckets), reverse=True):
            if bucket in self._buckets:
                running.update(self._buckets[bucket])
            if bucket in needed:
                suffix[bucket] = running.copy()
        after: dict[int, Counter[Key]] = {}
        by_bucket: dict[int, list[int]] = {}
        for p in positions:
            if p % size:
                by_bucket.setdefault(p // size, []).append(p)
            else:
                after[p] = suffix.get(p // size, Counter())
        for bucket, found in by_bucket.items():
            # found is in descending order: sweep the bucket's rows from its end.
            rows = self._rows.get(bucket, (0, []))[1]
            tail: Counter[Key] = Counter()
            index = len(rows)
            for p in found:
                while index and rows[index - 1][0] > p:
                    index -= 1
                    tail[rows[index][1]] += 1
                total = suffix.get(bucket + 1, Counter()).copy()
                total.update(tail)
                after[p] = total
        return after

    def _matching(self, events: Counter[Key], name: str, topics: tuple[str, ...]) -> int:
        matcher = self._matchers.get(topics)
        if matcher is None:
            matcher = self._matchers[topics] = TopicMatcher(topics)
        return sum(
            count
            for (topic, target), count in events.items()
            if target == name or (target is None and matcher(topic))
        )
