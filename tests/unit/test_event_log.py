"""``EventQuery``'s checks, how outcomes are decided from what a store holds, and the plain
progress lines of the command line."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest

from callboard.brokers.base import MAX_PAGE, EventQuery, StoredEvent
from callboard.brokers.sql.eventlog import EventFacts, Lease, Origin, outcomes
from callboard.deadletters import DeadLetter, dead_letter_event
from callboard.errors import InvalidTopicError
from callboard.events import Event
from callboard.terminal import LINE_EVERY, progress

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_query_checks_what_it_is_given() -> None:
    assert EventQuery(topics=["a.*", "b"]).topics == ("a.*", "b")  # type: ignore[arg-type]
    assert EventQuery().limit == 50
    assert EventQuery(limit=MAX_PAGE).limit == MAX_PAGE
    for limit in (0, MAX_PAGE + 1):
        with pytest.raises(ValueError, match="limit must be 1 to 1000"):
            EventQuery(limit=limit)
    with pytest.raises(InvalidTopicError):
        EventQuery(topics=("a.>.b",))
    with pytest.raises(ValueError, match="sequence of patterns"):
        EventQuery(topics="github")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since must be timezone-aware"):
        EventQuery(since=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="query \\$deadletter"):
        EventQuery(topics=("$deadletter.a", "github.push"))
    assert EventQuery(topics=("$deadletter.>",)).dead_letters
    assert not EventQuery(topics=("github.>",)).dead_letters
    assert not EventQuery().dead_letters


def stored(event: Event, seq: int, at: datetime, target: str | None = None) -> StoredEvent:
    return StoredEvent(event, seq, at, target)


def test_a_dead_letter_tells_until_the_event_is_delivered_again() -> None:
    sent = Event(topic="orders.created", payload=1, time=T0)
    letter = dead_letter_event("billing", sent, ValueError("no"), 3)
    failed = DeadLetter.from_event(letter)
    origins = [
        Origin("billing", ("orders.*",), 10, T0 - timedelta(days=1)),
        Origin("audit", (">",), 0, T0 - timedelta(days=1)),
        Origin("other", ("users.>",), 10, T0 - timedelta(days=1)),
    ]
    first = stored(sent, 5, T0)
    facts = EventFacts([first], origins, [], [failed])
    found = {o.subscription: o for o in outcomes(facts)}
    assert set(found) == {"billing", "audit"}
    assert (found["billing"].state, found["billing"].attempt) == ("dead_lettered", 3)
    assert found["billing"].error == "ValueError: no"
    assert found["audit"].state == "pending"
    # Redriven after it failed: the copy delivered to billing alone tells now.
    again = stored(sent, 12, failed.failed_at + timedelta(seconds=1), target="billing")
    lease = Lease("billing", 12, None, T0, 2, held=False)
    facts = EventFacts([again, first], origins, [lease], [failed])
    found = {o.subscription: o for o in outcomes(facts)}
    assert (found["billing"].state, found["billing"].attempt) == ("pending", 2)


def test_the_plain_progress_lines_come_every_thousand_and_at_the_end() -> None:
    out = io.StringIO()
    with progress("replaying", out) as shown:
        for done in range(1, 2 * LINE_EVERY + 6):
            shown(done, None)
    assert out.getvalue().splitlines() == [
        "replaying: 1000",
        "replaying: 2000",
        "replaying: 2005 done",
    ]
    quiet = io.StringIO()
    with progress("redriving", quiet):
        pass
    assert quiet.getvalue() == ""
