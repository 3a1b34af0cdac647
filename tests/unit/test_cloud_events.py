"""CloudEvents 1.0: events written in both HTTP modes, read back by the SDK and by callboard."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_http as from_http_v1

from callboard.cloud_events import (
    BATCH,
    DATA_BASE64,
    MAX_BATCH,
    STRUCTURED,
    delivery_id,
    read_http,
    to_attributes,
    to_binary,
    to_structured,
)
from callboard.errors import MalformedBodyError, PayloadTooLargeError
from callboard.events import Event
from callboard.ingress.parsers import parse_cloud_data
from callboard.ingress.types import Headers, MediaType

SOURCE = "https://callboard.example/api/events"
WHEN = datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
BINARY = {
    "ce-specversion": "1.0",
    "ce-id": "A234-1234-1234",
    "ce-source": "/mycontext/sub%20context",
    "ce-type": "com.example.someevent",
    "ce-time": "2018-04-05T17:31:00Z",
    "ce-subject": "larger-context",
    "ce-dataschema": "https://example.com/schema",
    "ce-traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "ce-comexampleextension1": "value",
    "content-type": "application/json",
}
STRUCTURED_EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "B234-1234-1234",
    "source": "/mycontext",
    "type": "com.example.someevent",
    "time": "2018-04-05T17:31:00Z",
    "subject": "larger-context",
    "datacontenttype": "application/json",
    "dataschema": "https://example.com/schema",
    "comexampleextension1": "value",
    "data": {"appinfoA": "abc", "appinfoB": 123, "appinfoC": True},
}


def plain_event() -> Event:
    return Event(
        topic="github.push", payload={"ref": "main", "n": [1, 2]}, metadata={"x": "y"}, time=WHEN
    )


def received_event(headers: Headers, body: Any, topic: str = "cloud") -> Event:
    [received] = read_http(headers, body)
    return Event(topic=topic, payload=received.payload, metadata=received.metadata)


def sdk_read(headers: dict[str, str], body: bytes) -> Any:
    return from_http(HTTPMessage(headers, body), JSONFormat())


def test_an_event_written_in_structured_mode_is_read_by_the_sdk() -> None:
    event = plain_event()
    headers, body = to_structured(event, source=SOURCE)
    assert headers == {"content-type": STRUCTURED}
    read = sdk_read(headers, body)
    assert read.get_id() == event.id
    assert read.get_source() == SOURCE
    assert read.get_type() == "github.push"
    assert read.get_time() == WHEN
    assert read.get_datacontenttype() == "application/json"
    assert read.get_data() == {"ref": "main", "n": [1, 2]}
    legacy = from_http_v1(headers, body)
    assert legacy["id"] == event.id
    assert legacy.data == {"ref": "main", "n": [1, 2]}


def test_an_event_written_in_binary_mode_is_read_by_the_sdk() -> None:
    event = plain_event()
    headers, body = to_binary(event, source=SOURCE)
    assert headers["content-type"] == "application/json"
    assert headers["ce-specversion"] == "1.0"
    assert headers["ce-id"] == event.id
    assert headers["ce-type"] == "github.push"
    assert orjson.loads(body) == event.payload
    read = sdk_read(headers, body)
    assert (read.get_id(), read.get_source(), read.get_time()) == (event.id, SOURCE, WHEN)
    assert read.get_data() == event.payload
    assert from_http_v1(headers, body).data == event.payload


def test_metadata_of_an_event_that_did_not_come_as_a_cloud_event_is_not_an_attribute() -> None:
    event = Event(topic="plain", payload=1, metadata={"ce-foo": "bar", "x": "y"}, time=WHEN)
    headers, _ = to_binary(event, source=SOURCE)
    assert "ce-foo" not in headers
    assert "ce-x" not in headers


def test_to_attributes_is_the_structured_document() -> None:
    event = plain_event()
    _, body = to_structured(event, source=SOURCE)
    document = to_attributes(event, source=SOURCE)
    assert document == orjson.loads(body)
    assert document["time"] == "2025-03-04T05:06:07.890000Z"
    assert document["data"] == event.payload
    assert orjson.loads(orjson.dumps(document)) == document


@pytest.mark.parametrize("payload", ["text", 0, False, None, [1, "a"], {"a": {"b": None}}])
def test_every_json_payload_survives_both_modes(payload: Any) -> None:
    event = Event(topic="t", payload=payload, time=WHEN)
    for write in (to_binary, to_structured):
        headers, body = write(event, source=SOURCE)
        read = sdk_read(headers, body)
        assert read.get_data() == payload
        again = received_event(headers, _data(headers, body))
        assert again.payload == payload


def _data(headers: dict[str, str], body: bytes) -> Any:
    """The body as the ingress hands it to read_http."""
    if "ce-specversion" in headers:
        return parse_cloud_data(body, MediaType.parse(headers["content-type"]), "cloud")
    return orjson.loads(body)


def test_a_binary_cloud_event_keeps_its_attributes_and_emits_them_again() -> None:
    event = received_event(BINARY, {"a": 1})
    assert event.payload == {"a": 1}
    assert event.metadata["ce-source"] == "/mycontext/sub context"  # decoded
    assert event.metadata["ce-traceparent"] == BINARY["ce-traceparent"]
    assert event.metadata["ce-datacontenttype"] == "application/json"
    assert event.metadata["ce-time"] == "2018-04-05T17:31:00Z"
    headers, body = to_binary(event, source=SOURCE)
    assert headers == BINARY
    assert orjson.loads(body) == {"a": 1}
    read = sdk_read(headers, body)
    assert read.get_source() == "/mycontext/sub context"
    assert read.get_extension("comexampleextension1") == "value"


def test_a_structured_cloud_event_keeps_its_attributes_and_emits_them_again() -> None:
    event = received_event({"content-type": STRUCTURED}, STRUCTURED_EVENT)
    assert event.payload == STRUCTURED_EVENT["data"]
    assert event.metadata["ce-id"] == "B234-1234-1234"
    assert event.metadata["ce-comexampleextension1"] == "value"
    _, body = to_structured(event, source=SOURCE)
    assert orjson.loads(body) == STRUCTURED_EVENT
    assert to_attributes(event, source=SOURCE) == STRUCTURED_EVENT
    # And across modes: structured in, binary out, read by the SDK.
    read = sdk_read(*to_binary(event, source=SOURCE))
    assert read.get_id() == "B234-1234-1234"
    assert read.get_subject() == "larger-context"
    assert read.get_dataschema() == "https://example.com/schema"


def test_extension_values_are_kept_as_their_canonical_text() -> None:
    document = {**STRUCTURED_EVENT, "count": 3, "flag": True, "none": None}
    event = received_event({"content-type": STRUCTURED}, document)
    assert event.metadata["ce-count"] == "3"
    assert event.metadata["ce-flag"] == "true"
    assert "ce-none" not in event.metadata
    assert to_attributes(event, source=SOURCE)["count"] == "3"


def test_a_cloud_event_without_time_gets_the_time_of_the_event() -> None:
    headers = {k: v for k, v in BINARY.items() if k != "ce-time"}
    [received] = read_http(headers, None)
    assert "ce-time" not in received.metadata
    assert received.payload is None
    event = Event(topic="cloud", payload=None, metadata=received.metadata, time=WHEN)
    written, body = to_binary(event, source=SOURCE)
    assert written["ce-time"] == "2025-03-04T05:06:07.890000Z"
    assert body == b""


def test_text_data_stays_text() -> None:
    headers = {**BINARY, "content-type": "text/plain"}
    data = parse_cloud_data(b"hello\nworld", MediaType("text/plain"), "cloud")
    event = received_event(headers, data)
    assert event.payload == "hello\nworld"
    written, body = to_binary(event, source=SOURCE)
    assert (written["content-type"], body) == ("text/plain", b"hello\nworld")
    assert orjson.loads(to_structured(event, source=SOURCE)[1])["data"] == "hello\nworld"


def test_bytes_that_are_not_text_are_kept_as_base64_and_emitted_as_bytes() -> None:
    raw = b"\x00\x01\xfe\xff"
    data = parse_cloud_data(raw, MediaType("application/octet-stream"), "cloud")
    assert data == raw
    event = received_event({**BINARY, "content-type": "application/octet-stream"}, data)
    assert event.payload == base64.b64encode(raw).decode()
    assert event.metadata[DATA_BASE64] == "true"
    assert to_binary(event, source=SOURCE)[1] == raw
    document = orjson.loads(to_structured(event, source=SOURCE)[1])
    assert base64.b64decode(document["data_base64"]) == raw
    assert "data" not in document
    # Structured mode's data_base64, read back, is the same event.
    again = received_event({"content-type": STRUCTURED}, document)
    assert (again.payload, again.metadata[DATA_BASE64]) == (event.payload, "true")


def test_a_payload_no_longer_text_is_emitted_as_json() -> None:
    event = Event(
        topic="t",
        payload={"changed": True},
        metadata={**received_event({**BINARY, "content-type": "text/plain"}, "x").metadata},
    )
    headers, body = to_binary(event, source=SOURCE)
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body) == {"changed": True}


@pytest.mark.parametrize(
    ("raw", "media_type", "expected"),
    [
        (b"", "application/json", None),
        (b'{"a": 1}', "", {"a": 1}),
        (b'{"a": 1}', "application/vnd.example+json", {"a": 1}),
        (b"<a/>", "application/xml", "<a/>"),
        (b"caf\xc3\xa9", "text/plain; charset=utf-8", "café"),
        (b"caf\xe9", "text/plain; charset=iso-8859-1", b"caf\xe9"),
        (b"a\x00b", "text/plain", b"a\x00b"),
    ],
)
def test_binary_mode_data_is_read_by_its_media_type(
    raw: bytes, media_type: str, expected: Any
) -> None:
    assert parse_cloud_data(raw, MediaType.parse(media_type), "cloud") == expected


def test_binary_mode_json_data_must_be_json() -> None:
    with pytest.raises(MalformedBodyError, match="not valid JSON"):
        parse_cloud_data(b"{nope", MediaType("application/json"), "cloud")


def test_a_batch_is_read_in_order() -> None:
    second = {**STRUCTURED_EVENT, "id": "second", "data": [2]}
    received = read_http({"content-type": BATCH}, [STRUCTURED_EVENT, second])
    assert [r.metadata["ce-id"] for r in received] == ["B234-1234-1234", "second"]
    assert received[1].payload == [2]
    assert read_http({"content-type": f"{BATCH}; charset=utf-8"}, []) == []


def test_the_delivery_id_is_the_source_and_id_pair() -> None:
    [received] = read_http({"content-type": STRUCTURED}, STRUCTURED_EVENT)
    assert received.delivery_id == delivery_id("/mycontext", "B234-1234-1234")
    assert orjson.loads(received.delivery_id) == ["/mycontext", "B234-1234-1234"]
    assert delivery_id("a b", "c") != delivery_id("a", "b c")
    [binary] = read_http(BINARY, None)
    assert binary.delivery_id == delivery_id("/mycontext/sub context", "A234-1234-1234")


def malformed(headers: Headers, body: Any) -> str:
    with pytest.raises(MalformedBodyError) as caught:
        read_http(headers, body)
    assert caught.value.status_code == 400
    return caught.value.message


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in STRUCTURED_EVENT.items() if k != name}


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion"])
def test_a_missing_required_attribute_is_named(name: str) -> None:
    message = malformed({"content-type": STRUCTURED}, without(name))
    assert f"required attribute {name};" in message
    headers = {k: v for k, v in BINARY.items() if k != f"ce-{name}"}
    if name != "specversion":  # without it, a request is not a binary-mode CloudEvent
        assert f"required header ce-{name};" in malformed(headers, None)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"specversion": "0.3"}, "specversion: Attribute 'specversion' must be '1.0'"),
        ({"id": ""}, "id: Attribute 'id' must not be None or empty"),
        ({"id": 5}, "id: Attribute 'id' must be"),
        ({"time": "yesterday"}, "time that is not an RFC 3339 timestamp"),
        ({"Upper": "x"}, "Upper"),
        ({"nested": {"a": 1}}, "attribute 'nested' is a JSON object"),
        ({"data_base64": "a"}, "data_base64 that is not base64"),
    ],
)
def test_a_malformed_attribute_is_named(change: dict[str, Any], named: str) -> None:
    document = {**without("data"), **change}
    assert named in malformed({"content-type": STRUCTURED}, document)


def test_malformed_shapes_are_named() -> None:
    assert "is a JSON array; a JSON object" in malformed({"content-type": STRUCTURED}, [])
    assert "a JSON array of events" in malformed({"content-type": BATCH}, STRUCTURED_EVENT)
    assert "event 1 is a JSON string" in malformed({"content-type": BATCH}, [STRUCTURED_EVENT, "x"])
    assert "sent 2 times" in malformed({**BINARY, "ce-id": ["a", "b"]}, None)
    assert "specversion" in malformed({**BINARY, "ce-specversion": "0.3"}, None)
    assert "time" in malformed({**BINARY, "ce-time": "soon"}, None)
    assert "bad-name" in malformed({**BINARY, "ce-bad-name": "x"}, None)


def test_a_batch_over_the_bound_is_refused_with_413() -> None:
    events = [{**STRUCTURED_EVENT, "id": str(n)} for n in range(MAX_BATCH + 1)]
    assert len(read_http({"content-type": BATCH}, events[:MAX_BATCH])) == MAX_BATCH
    with pytest.raises(PayloadTooLargeError, match=f"{MAX_BATCH + 1} events") as caught:
        read_http({"content-type": BATCH}, events)
    assert caught.value.status_code == 413


def test_the_media_type_decides_the_mode_whatever_ce_headers_come_along() -> None:
    # The HTTP binding: an event format's media type is structured mode, ce-* headers or not.
    stray = {"content-type": STRUCTURED, "ce-specversion": "1.0", "ce-id": "from-a-header"}
    [received] = read_http(stray, STRUCTURED_EVENT)
    assert received.metadata["ce-id"] == "B234-1234-1234"
    assert received.payload == STRUCTURED_EVENT["data"]
    batch = read_http({**stray, "content-type": BATCH}, [STRUCTURED_EVENT])
    assert [r.metadata["ce-id"] for r in batch] == ["B234-1234-1234"]
