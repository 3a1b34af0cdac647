"""Reading the SQL store: the plan of a search and what became of an event, for every dialect.

A search walks the primary key backwards from the cursor with a LIMIT, so its first page costs
what it returns (plus the events of other topics it passes over), whatever the store's size: a
time bound becomes a seq bound by one step down the ``stored_at`` index, an event id is looked up
by its own index. ``stored_at`` only nearly grows with ``seq`` (commits of several processes
interleave), so the seq bounds are taken ``SLACK`` seconds wide and every event's own time is
checked too.

What became of an event for a subscription is read from the store in one transaction (the event's
rows by id, the subscriptions, their leases of it, the dead letters naming it) and decided here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from callboard.brokers.base import EventQuery, Outcome, StoredEvent
from callboard.deadletters import DeadLetter
from callboard.topics import TopicMatcher, TopicPattern

#: Seconds by which the seq bounds of a time range are widened (see the module's text).
SLACK = 5.0

#: Beyond every seq a store hands out: the cursor of a first page.
NO_CURSOR = 2**62


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A query's patterns in the form the SQL takes them: exact topics apart from wildcards."""

    #: No pattern: every topic.
    every: bool
    #: The exact patterns, as a JSON array.
    literals: str
    #: Whether wildcard patterns are left to the store's matcher.
    wildcards: bool
    #: Every pattern, as a JSON array (SQLite's matcher function reads it).
    topics: str
    #: The wildcard patterns alone.
    wild: tuple[str, ...]
    exact: tuple[str, ...]

    @classmethod
    def of(cls, patterns: Sequence[str]) -> TopicFilter:
        parsed = [TopicPattern.parse(p) for p in patterns]
        exact = tuple(p.pattern for p in parsed if p.is_exact)
        wild = tuple(p.pattern for p in parsed if not p.is_exact)
        return cls(
            every=not parsed,
            literals=json.dumps(list(exact)),
            wildcards=bool(wild),
            topics=json.dumps(list(patterns)),
            wild=wild,
            exact=exact,
        )


def cursor(query: EventQuery) -> int:
    """The seq the page starts below."""
    return NO_CURSOR if query.before is None else query.before


def floor(query: EventQuery) -> int:
    """The least seq the page may hold."""
    return 0 if query.after is None else query.after + 1


def page_of(rows: list[StoredEvent], limit: int) -> tuple[tuple[StoredEvent, ...], int | None]:
    """The page of ``limit`` events out of ``limit + 1`` read, and its ``next`` cursor."""
    if len(rows) > limit:
        kept = rows[:limit]
        return tuple(kept), kept[-1].seq
    return tuple(rows), None


def selected(query: EventQuery, event: StoredEvent) -> bool:
    """Whether a stored event found by its id also meets the query's other conditions."""
    if query.before is not None and event.seq >= query.before:
        return False
    if query.after is not None and event.seq <= query.after:
        return False
    if query.since is not None and event.stored_at < query.since:
        return False
    if query.until is not None and event.stored_at >= query.until:
        return False
    return not query.topics or TopicMatcher(query.topics)(event.event.topic)


@dataclass(frozen=True, slots=True)
class Origin:
    """A subscription as event outcomes need it."""

    name: str
    patterns: tuple[str, ...]
    position: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease of an event to a subscription."""

    group: str
    seq: int
    consumer: str | None
    until: datetime
    attempt: int
    #: A live consumer holds it (not handed back, not run out).
    held: bool


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What the store holds about one event id, read in one transaction."""

    #: The stored rows with that id, newest first (a redriven or replayed copy has a target).
    events: list[StoredEvent]
    origins: list[Origin]
    leases: list[Lease]
    #: The dead letters naming the id, oldest first.
    letters: list[DeadLetter]


def readers(events: Sequence[StoredEvent], origins: Sequence[Origin]) -> dict[int, list[str]]:
    """Per stored row of an event, the subscriptions that receive it."""
    matchers = {origin.name: TopicMatcher(origin.patterns) for origin in origins}
    found: dict[int, list[str]] = {}
    for stored in events:
        if stored.target is not None:
            found[stored.seq] = [stored.target] if stored.target in matchers else []
        else:
            topic = stored.event.topic
            found[stored.seq] = [name for name, match in matchers.items() if match(topic)]
    return found


def outcomes(facts: EventFacts) -> list[Outcome]:
    """Per subscription concerned, by name, what became of the event."""
    letters = {letter.subscription: letter for letter in facts.letters}
    leases = {(lease.group, lease.seq): lease for lease in facts.leases}
    by_name = {origin.name: origin for origin in facts.origins}
    rows = readers(facts.events, facts.origins)
    # Per subscription, the row that tells: its newest copy delivered to it alone, else the
    # newest row of the event it reads by topic.
    telling: dict[str, StoredEvent] = {}
    for stored in facts.events:  # newest first
        for name in rows[stored.seq]:
            current = telling.get(name)
            if current is None or (current.target is None and stored.target is not None):
                telling[name] = stored
    names = sorted(set(telling) | set(letters))
    return [
        _outcome(name, telling.get(name), by_name.get(name), letters.get(name), leases)
        for name in names
    ]


def _outcome(
    name: str,
    stored: StoredEvent | None,
    origin: Origin | None,
    letter: DeadLetter | None,
    leases: dict[tuple[str, int], Lease],
) -> Outcome:
    if letter is not None and (stored is None or stored.stored_at <= letter.failed_at):
        return Outcome(
            name,
            "dead_lettered",
            attempt=letter.attempts,
            error=letter.error,
            failed_at=letter.failed_at,
            dead_letter_id=letter.id,
        )
    if stored is None or origin is None:
        # A dead letter older than the copy delivered since: that copy is what tells.
        return Outcome(name, "pending")
    lease = leases.get((name, stored.seq))
    if lease is not None:
        if lease.held:
            return Outcome(
                name,
                "in_flight",
                attempt=lease.attempt,
                consumer=lease.consumer,
                lease_until=lease.until,
            )
        return Outcome(name, "pending", attempt=lease.attempt)
    if stored.target is None and origin.created_at > stored.stored_at:
        return Outcome(name, "not_subscribed")
    if origin.position >= stored.seq:
        return Outcome(name, "delivered")
    return Outcome(name, "pending")


def from_unix(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
