"""Reading the Kafka broker's events (``EventLog``) from its in-memory copy of the namespace.

A record's offset in the log is its ``seq`` and Kafka's record timestamp its ``stored_at``; a dead
letter's ``seq`` is its offset in the dead-letter topic. ``EventIndex`` keeps, beside the copy,
the log in offset order with the running maximum of the timestamps, and the records by event id,
so a search bisects to its cursor (or its time bound) and walks back from there: a page costs what
it returns plus the events of other topics it passes over. What is indexed is the copy, that is
the log from the retention floor on: its size is bounded by the ``RetentionPolicy``, not by what
Kafka keeps on disk.

What became of an event for a group is decided from a ``GroupView``: the group as this process
holds it, or, for a group another process holds, as that process last wrote it to the group topic
(every 50 ms while it changes). The written position says what was acknowledged, what was leased
and by whom; a lease counts as held while the holder's hold on the group runs (``lease_until``),
and as handed back once it ran out (the holder died).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    EventPage,
    EventQuery,
    Outcome,
    StoredEvent,
)
from callboard.brokers.kafka_groups import GroupState
from callboard.brokers.kafka_log import Hold, Stored
from callboard.deadletters import DEAD_LETTER_EVENT_ID, DeadLetter
from callboard.topics import TopicMatcher

#: Milliseconds by which the upper time bound of a search is widened: record timestamps are set
#: by the producers, so they only nearly grow with the offset; every record's own time is checked.
SLACK_MS = 5_000


def stored_at(stored: Stored) -> datetime:
    return datetime.fromtimestamp(stored.stored_ms / 1000, UTC)


def _ms(moment: datetime) -> int:
    """The least whole millisecond at or after ``moment``: ``t >= moment`` iff ``t >= _ms``."""
    return math.ceil(moment.timestamp() * 1000)


def _page(found: list[StoredEvent], limit: int) -> EventPage:
    """The page of ``limit`` events out of up to ``limit + 1`` found, with its cursor."""
    if len(found) > limit:
        return EventPage(tuple(found[:limit]), found[limit - 1].seq)
    return EventPage(tuple(found), None)


def _bounds(records: list[Stored], query: EventQuery) -> tuple[int, int]:
    """The slice of ``records`` (in offset order) between the query's ``after`` and ``before``."""
    low = 0 if query.after is None else bisect_left(records, query.after + 1, key=_offset)
    high = len(records) if query.before is None else bisect_left(records, query.before, key=_offset)
    return low, high


def _offset(stored: Stored) -> int:
    return stored.offset


@dataclass(frozen=True, slots=True)
class GroupView:
    """One group as the process asking knows it, for the outcomes of an event."""

    name: str
    #: Live where this process holds the group, else restored from its written position.
    state: GroupState
    #: The first log offset the group reads: what was stored before is not for it.
    start: int
    #: The events leased now, by offset: the consumer holding each.
    leases: Mapping[int, str]
    #: When the holder's hold on the group runs out unless renewed (the longest a lease lasts).
    lease_until: datetime | None

    @classmethod
    def of(
        cls,
        name: str,
        meta: Mapping[str, Any],
        state: GroupState,
        *,
        live: bool,
        hold: Hold | None,
        position: Mapping[str, Any],
        now_ms: int,
    ) -> GroupView:
        """The view of a group from its record (``meta``), its state (``live``: held here), its
        hold and its written ``position``: leases count only while the hold runs; those of a
        group held elsewhere are read from its written position."""
        if hold is None or hold.until <= now_ms:
            leases: Mapping[int, int] = {}
        elif live:
            leases = state.in_flight
        else:
            written = position.get("leased", {})
            leases = {int(offset): int(consumer) for offset, consumer in written.items()}
        return cls(
            name,
            state,
            # Groups made before their start was recorded count as reading the whole log.
            int(meta.get("start", 0)),
            {offset: f"{hold.instance}:{n}" for offset, n in leases.items()} if hold else {},
            None if hold is None else datetime.fromtimestamp(hold.until / 1000, UTC),
        )


class EventIndex:
    """The log and the dead letters of the copy, ordered and by event id."""

    def __init__(self) -> None:
        self._log: list[Stored] = []
        #: The greatest timestamp up to each record of ``_log``: non-decreasing, so bisectable.
        self._latest: list[int] = []
        self._ids: dict[str, list[Stored]] = {}
        self._letters: list[Stored] = []
        #: Dead letters by the id of the event they gave up on.
        self._letters_of: dict[str, list[Stored]] = {}

    def add(self, stored: Stored) -> None:
        """A log record read (the copy reads in offset order)."""
        latest = self._latest[-1] if self._latest else stored.stored_ms
        self._log.append(stored)
        self._latest.append(max(latest, stored.stored_ms))
        self._ids.setdefault(stored.event.id, []).append(stored)

    def add_letter(self, stored: Stored) -> None:
        self._letters.append(stored)
        original = stored.event.metadata.get(DEAD_LETTER_EVENT_ID)
        if isinstance(original, str):
            self._letters_of.setdefault(original, []).append(stored)

    def trim(self, floor: int) -> None:
        """Retention moved the log's floor up: forget the records below it."""
        cut = bisect_left(self._log, floor, key=_offset)
        # One id may have several records below the floor (``deliver_to`` copies, republishes).
        for event_id in {stored.event.id for stored in self._log[:cut]}:
            kept = [s for s in self._ids[event_id] if s.offset >= floor]
            if kept:
                self._ids[event_id] = kept
            else:
                del self._ids[event_id]
        del self._log[:cut], self._latest[:cut]

    def rows(self, event_id: str) -> list[Stored]:
        """The log records of one event id, oldest first."""
        return list(self._ids.get(event_id, ()))

    def letters_naming(self, event_id: str) -> list[Stored]:
        """The dead letters of one event id, oldest first (taken ones included)."""
        return list(self._letters_of.get(event_id, ()))

    def find(self, query: EventQuery) -> EventPage:
        """``EventLog.find_events`` over the log (not the dead letters)."""
        match = TopicMatcher(query.topics) if query.topics else None
        since = None if query.since is None else _ms(query.since)
        until = None if query.until is None else _ms(query.until)
        if query.event_id is not None:
            records = self.rows(query.event_id)
            low, high = _bounds(records, query)
        else:
            records = self._log
            low, high = _bounds(records, query)
            if since is not None:
                low = max(low, bisect_left(self._latest, since))
            if until is not None:
                high = min(high, bisect_left(self._latest, until + SLACK_MS))
        found: list[StoredEvent] = []
        for index in range(high - 1, low - 1, -1):
            stored = records[index]
            if since is not None and stored.stored_ms < since:
                continue
            if until is not None and stored.stored_ms >= until:
                continue
            if match is None or match(stored.event.topic):
                found.append(
                    StoredEvent(stored.event, stored.offset, stored_at(stored), stored.target)
                )
                if len(found) > query.limit:
                    break
        return _page(found, query.limit)

    def find_letters(self, query: EventQuery, kept: Callable[[Stored], bool]) -> EventPage:
        """``EventLog.find_events`` over the dead letters ``kept`` says are not taken yet; each
        one's ``target`` is the subscription whose dead letter it is."""
        match = TopicMatcher(query.topics)
        since = None if query.since is None else _ms(query.since)
        until = None if query.until is None else _ms(query.until)
        low, high = _bounds(self._letters, query)
        found: list[StoredEvent] = []
        for index in range(high - 1, low - 1, -1):
            stored = self._letters[index]
            letter = stored.event
            if (
                match(letter.topic)
                and (query.event_id is None or letter.id == query.event_id)
                and (since is None or stored.stored_ms >= since)
                and (until is None or stored.stored_ms < until)
                and kept(stored)
            ):
                group = letter.topic.removeprefix(DEAD_LETTER_PREFIX)
                found.append(StoredEvent(letter, stored.offset, stored_at(stored), group))
                if len(found) > query.limit:
                    break
        return _page(found, query.limit)


def kept_letters(meta: Mapping[str, Any]) -> Callable[[Stored], bool]:
    """Tells, from the group topic's records (``meta``), a dead letter not taken yet (nor dropped
    with its group) from one that was."""
    taken: dict[str, tuple[int, set[str]]] = {}

    def kept(stored: Stored) -> bool:
        group = stored.event.topic.removeprefix(DEAD_LETTER_PREFIX)
        if group not in taken:
            record = meta.get("letters:" + group) or {"from": 0, "taken": []}
            taken[group] = (int(record["from"]), set(record["taken"]))
        start, ids = taken[group]
        return stored.offset >= start and stored.event.id not in ids

    return kept


def outcomes(rows: list[Stored], letters: list[Stored], groups: list[GroupView]) -> list[Outcome]:
    """Per group concerned, by name, what became of the event stored as ``rows`` (oldest first),
    given the dead letters naming it that are not taken yet (oldest first)."""
    by_name = {view.name: view for view in groups}
    # Per group, the newest dead letter naming the event.
    letter_of = {s.event.topic.removeprefix(DEAD_LETTER_PREFIX): s for s in letters}
    # Per group, the row that tells: its newest copy delivered to it alone, else the newest row
    # of the event it reads by topic.
    telling: dict[str, Stored] = {}
    for stored in rows:
        if stored.target is not None:
            if stored.target in by_name:
                telling[stored.target] = stored
            continue
        for view in groups:
            current = telling.get(view.name)
            if view.state.matches(stored) and (current is None or current.target is None):
                telling[view.name] = stored
    names = sorted(set(telling) | set(letter_of))
    return [
        _outcome(name, telling.get(name), by_name.get(name), letter_of.get(name)) for name in names
    ]


def _outcome(
    name: str, stored: Stored | None, view: GroupView | None, letter: Stored | None
) -> Outcome:
    if letter is not None and (stored is None or stored.stored_ms <= letter.stored_ms):
        dead = DeadLetter.from_event(letter.event)
        return Outcome(
            name,
            "dead_lettered",
            attempt=dead.attempts,
            error=dead.error,
            failed_at=dead.failed_at,
            dead_letter_id=dead.id,
        )
    if stored is None or view is None:
        # A dead letter older than the copy delivered since: that copy is what tells.
        return Outcome(name, "pending")
    offset, state = stored.offset, view.state
    attempt = state.attempts.get(offset, 0)
    consumer = view.leases.get(offset)
    if consumer is not None:
        return Outcome(
            name, "in_flight", attempt=attempt, consumer=consumer, lease_until=view.lease_until
        )
    if stored.target is None and offset < view.start:
        return Outcome(name, "not_subscribed")
    if offset >= state.next or offset in state.pending:
        return Outcome(name, "pending", attempt=attempt)
    return Outcome(name, "delivered")
