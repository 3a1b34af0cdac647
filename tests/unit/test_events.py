from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest

from callboard import DELIVERY_ID, Event


def test_an_event_gets_a_unique_id_and_a_utc_time() -> None:
    before = datetime.now(UTC)
    first = Event(topic="github", payload={"a": 1})
    second = Event(topic="github", payload={"a": 1})

    assert first.id
    assert first.id != second.id
    assert first.time.tzinfo is not None
    assert first.time.utcoffset() == timedelta(0)
    assert before <= first.time <= datetime.now(UTC)


def test_a_given_id_and_time_are_kept() -> None:
    at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    event = Event(topic="github", id="abc", time=at)
    assert event.id == "abc"
    assert event.time == at


def test_an_event_is_frozen() -> None:
    event = Event(topic="github")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.topic = "gitlab"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Event("github")  # type: ignore[call-arg]  # keyword-only


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"X-GitHub-Event": "push"}, {"x-github-event": "push"}),
        ({"x-Github-event": "push"}, {"x-github-event": "push"}),
        ({"CONTENT-TYPE": "a"}, {"content-type": "a"}),
        ({"x-already-lower": "v"}, {"x-already-lower": "v"}),
        ({"X-1": ["a", "b"]}, {"x-1": ["a", "b"]}),
        ({"ÄBC": "v"}, {"äbc": "v"}),
    ],
)
def test_metadata_names_are_lower_cased(
    given: dict[str, str | list[str]], expected: dict[str, str | list[str]]
) -> None:
    assert dict(Event(topic="t", metadata=given).metadata) == expected


def test_metadata_is_a_copy_the_caller_cannot_change_afterwards() -> None:
    headers: dict[str, str | list[str]] = {"x-a": "1", "x-list": ["a"]}
    event = Event(topic="t", metadata=headers)
    headers["x-a"] = "2"
    headers["x-b"] = "3"
    value = headers["x-list"]
    assert isinstance(value, list)
    value.append("b")
    assert dict(event.metadata) == {"x-a": "1", "x-list": ["a"]}


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Event(topic="t", time=datetime(2024, 1, 1))


def test_an_aware_time_in_another_zone_is_stored_in_utc() -> None:
    at = datetime(2024, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    event = Event(topic="t", time=at)
    assert event.time == at
    assert event.time.utcoffset() == timedelta(0)
    assert event.time.hour == 12


def test_header_gives_the_first_value_of_any_case() -> None:
    event = Event(topic="t", metadata={"x-one": "1", "x-many": ["a", "b"], "x-none": []})
    assert event.header("X-One") == "1"
    assert event.header("x-many") == "a"
    assert event.header("x-none") is None
    assert event.header("x-missing") is None


def test_delivery_id_is_read_from_metadata() -> None:
    assert Event(topic="t").delivery_id is None
    assert Event(topic="t", metadata={DELIVERY_ID: "d-1"}).delivery_id == "d-1"


def test_ids_are_unique_and_shaped_like_uuids() -> None:
    ids = {Event(topic="t").id for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_with_topic_keeps_payload_metadata_and_time_with_a_new_id() -> None:
    event = Event(topic="github", payload={"ref": "main"}, metadata={"X-GitHub-Event": "push"})
    routed = event.with_topic("github.push")
    assert routed.topic == "github.push"
    assert routed.id != event.id
    assert (routed.payload, routed.metadata, routed.time) == (
        event.payload,
        event.metadata,
        event.time,
    )
    assert routed.header("x-github-event") == "push"
    assert event.topic == "github"


def test_from_owned_takes_the_metadata_as_given() -> None:
    metadata: dict[str, str | list[str]] = {"content-type": "application/json"}
    event = Event.from_owned("plain", {"n": 1}, metadata)
    assert event.metadata is metadata
    assert event.time.tzinfo is not None
    assert event.id
