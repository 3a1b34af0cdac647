"""What a replaying RabbitMQ group takes from the history stream, and how the stream is declared
and read: no RabbitMQ needed."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("aio_pika")

from pamqp.commands import Basic

from callboard.brokers.base import RetentionPolicy
from callboard.brokers.rabbitmq_history import (
    CLOCK_SLACK,
    Selection,
    stream_arguments,
    stream_offset,
)
from callboard.brokers.rabbitmq_names import MARKER, STAMP, encode_event
from callboard.events import Event

#: Now, to the microsecond (what a ``datetime`` holds).
NOW = time.time_ns() // 1000 * 1000


def pushed(body: bytes, headers: dict[str, Any], message_id: str | None = "m") -> Any:
    """A message as the stream consumer receives it (what ``Selection.take`` reads of it)."""
    properties = Basic.Properties(
        message_id=message_id, content_type="application/json", headers=headers
    )
    return SimpleNamespace(body=body, header=SimpleNamespace(properties=properties))


def stored(topic: str = "github.push", stamp: int | None = NOW, offset: int = 7) -> Any:
    headers: dict[str, Any] = {"x-stream-offset": offset}
    if stamp is not None:
        headers[STAMP] = stamp
    return pushed(encode_event(Event(topic=topic, payload={"n": 1})), headers)


def test_the_stream_keeps_events_for_the_retention_age_in_small_segments() -> None:
    arguments = stream_arguments(RetentionPolicy(max_age=3600.2), segment_bytes=4096)
    assert arguments == {
        "x-queue-type": "stream",
        "x-max-age": "3601s",
        "x-stream-max-segment-size-bytes": 4096,
    }
    assert stream_arguments(RetentionPolicy(max_age=0.01))["x-max-age"] == "1s"


def test_the_stream_is_read_from_its_first_event_or_before_a_start_time() -> None:
    assert stream_offset("beginning") == "first"
    since = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert stream_offset(since) == since - timedelta(seconds=CLOCK_SLACK)


def test_a_group_takes_its_topics_by_callboards_matching() -> None:
    selection = Selection(["github.*"], "beginning", RetentionPolicy())
    assert selection.take(stored("github.push")) is not None
    assert selection.take(stored("gitlab.push")) is None
    assert selection.take(stored("github.push.deep")) is None
    # AMQP's ``#`` would take a ``$`` topic; callboard's ``>`` does not.
    assert Selection([">"], "beginning", RetentionPolicy()).take(stored("$sys.x")) is None


def test_markers_and_messages_that_are_not_events_are_skipped() -> None:
    selection = Selection([">"], "beginning", RetentionPolicy())
    assert selection.take(pushed(b"", {MARKER: "abc"})) is None
    assert selection.take(pushed(b"not json", {STAMP: NOW})) is None
    assert selection.take(pushed(b'{"topic": "a"}', {STAMP: NOW})) is None


def test_a_start_time_takes_the_events_stamped_from_then_on() -> None:
    since = datetime.fromtimestamp(NOW / 1e9, UTC)
    selection = Selection(["github.push"], since, RetentionPolicy())
    assert selection.take(stored(stamp=NOW)) is not None
    assert selection.take(stored(stamp=NOW + 1)) is not None
    assert selection.take(stored(stamp=NOW - 2_000)) is None


def test_an_event_without_a_stamp_is_timed_by_its_own_time() -> None:
    late = Selection([">"], datetime.now(UTC) + timedelta(hours=1), RetentionPolicy())
    assert late.take(stored(stamp=None)) is None
    early = Selection([">"], datetime.now(UTC) - timedelta(hours=1), RetentionPolicy())
    assert early.take(stored(stamp=None)) is not None


def test_events_older_than_the_retention_age_are_not_taken() -> None:
    # Now, not when the module was imported: a long test run can be past a minute by then.
    now = time.time_ns()
    selection = Selection([">"], "beginning", RetentionPolicy(min_age=0, max_age=60))
    assert selection.take(stored(stamp=now - 61 * 10**9)) is None
    assert selection.take(stored(stamp=now - 30 * 10**9)) is not None


def test_a_copy_keeps_the_body_id_and_stamp_and_leaves_the_streams_headers() -> None:
    message = stored(stamp=NOW)
    copy = Selection([">"], "beginning", RetentionPolicy()).take(message)
    assert copy is not None
    assert copy.body == message.body
    assert copy.properties.headers == {STAMP: NOW}
    assert copy.properties.message_id == "m"
    assert copy.properties.delivery_mode == 2


@pytest.mark.parametrize(
    "start",
    [
        datetime.min.replace(tzinfo=UTC),
        datetime(1960, 1, 1, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
)
def test_a_start_before_the_epoch_reads_the_stream_from_its_first_event(start: datetime) -> None:
    assert stream_offset(start) == "first"
    assert Selection([">"], start, RetentionPolicy()).take(stored(stamp=NOW)) is not None
