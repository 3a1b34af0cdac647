"""CloudEvents 1.0 over HTTP, through the CloudEvents SDK: read (binary and structured) and written.

The mapping between a callboard ``Event`` and a CloudEvent:

- An event that came in as a CloudEvent keeps every attribute it was sent with (``id``,
  ``source``, ``type``, ``time``, ``subject``, ``datacontenttype``, ``dataschema``, extensions)
  in its metadata as ``ce-<name>``, the names binary mode's headers have, with the values
  decoded (no percent-encoding; ``time`` in RFC 3339). Emitting it again gives the same
  attributes. ``ce-specversion`` marks such an event.
- Any other event becomes ``id`` = ``Event.id``, ``source`` = the emitter's ``source``,
  ``type`` = the topic, ``time`` = ``Event.time``, ``datacontenttype`` = ``application/json``.
- The data is the payload: JSON for a JSON content type (or none), the text itself for another
  content type, and bytes that are not storable text (not UTF-8, or holding NUL) are kept as
  base64 text with ``callboard-data-base64: true`` in the metadata, and emitted as bytes again.

Delivery id: a CloudEvent is identified by its ``source`` and ``id`` (the specification lets a
consumer take two events with both equal as duplicates), so the ingress gives it the delivery id
``["<source>","<id>"]`` (``delivery_id``), a JSON pair so no two pairs collide. A CloudEvent
sent twice is one delivery sent twice, and the broker's redelivery detection keeps one.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http
from cloudevents.core.exceptions import BaseCloudEventException, CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from callboard.errors import MalformedBodyError, PayloadTooLargeError
from callboard.events import Event, MetadataValue
from callboard.ingress.types import Headers

#: The header that makes a request a binary-mode CloudEvent.
SPECVERSION_HEADER: Final = "ce-specversion"
#: Structured mode: one CloudEvent in JSON, and a JSON array of them.
STRUCTURED: Final = "application/cloudevents+json"
#: What the media type of every event format starts with: such a request is in structured mode,
#: whatever ``ce-*`` headers it also has (the HTTP binding decides by the media type alone).
FORMAT_PREFIX: Final = "application/cloudevents"
BATCH: Final = "application/cloudevents-batch+json"
MEDIA_TYPES: Final = frozenset({STRUCTURED, BATCH})
#: Metadata of an event whose payload is the data's bytes in base64.
DATA_BASE64: Final = "callboard-data-base64"
#: Events one batch may hold: each is published on its own before the answer, so the body limit
#: alone (tens of thousands of small events in 5 MiB) would let one request hold the ingress.
MAX_BATCH: Final = 1000

_PREFIX = "ce-"
_FORMAT = JSONFormat()
_JSON = "application/json"
#: Attribute names the specification allows (lower-case letters and digits).
_NAME = re.compile(r"[a-z0-9]+")
_MAX_SHOWN = 3
#: Required by the specification; the SDK would make up an ``id`` and a ``specversion``.
_REQUIRED = ("specversion", "id", "source", "type")


@dataclass(frozen=True, slots=True)
class Received:
    """One CloudEvent as the ingress read it."""

    #: The data, as the event's payload.
    payload: Any
    #: The attributes as ``ce-<name>`` (and ``DATA_BASE64`` when the payload is base64).
    metadata: dict[str, MetadataValue]
    #: ``delivery_id(source, id)``.
    delivery_id: str


def delivery_id(source: str, id: str) -> str:
    """The delivery id of the CloudEvent ``id`` from ``source``: one per pair, never shared."""
    return orjson.dumps([source, id]).decode()


def is_json(content_type: str) -> bool:
    """Whether data of ``content_type`` is JSON, as the SDK reads it (``*/json``, ``*/*+json``)."""
    return _FORMAT.JSON_CONTENT_TYPE_PATTERN.match(content_type) is not None


def read_http(headers: Headers, body: Any) -> list[Received]:
    """The CloudEvents of an HTTP request, validated by the SDK.

    Binary mode when the headers hold ``ce-specversion`` and the media type is not an event
    format's (``binary_mode``): the attributes are the ``ce-*`` headers and ``Content-Type``,
    ``body`` is the data as the ingress parsed it (a JSON value, text, or ``bytes``). Otherwise
    structured mode: ``body`` is the JSON document, one event or, for
    ``application/cloudevents-batch+json``, an array of them (``MAX_BATCH`` at most).

    Raises ``MalformedBodyError`` (400) naming what is wrong, ``PayloadTooLargeError`` (413) for
    a batch over ``MAX_BATCH``.
    """
    content_type = headers.get("content-type")
    media = content_type.partition(";")[0].strip().lower() if isinstance(content_type, str) else ""
    if binary_mode(headers, media):
        return [_read_binary(headers, body)]
    if media == BATCH:
        if not isinstance(body, list):
            raise MalformedBodyError(
                f"a CloudEvents batch ({BATCH}) is a JSON array of events; "
                f"the body is a JSON {_kind(body)}"
            )
        if len(body) > MAX_BATCH:
            raise PayloadTooLargeError(
                f"the CloudEvents batch holds {len(body)} events, over the limit of {MAX_BATCH}; "
                "send it as several batches"
            )
        return [_read_structured(element, f"event {index}") for index, element in enumerate(body)]
    return [_read_structured(body, "the CloudEvent")]


def binary_mode(headers: Headers, media_type: str) -> bool:
    """Whether a request with ``headers`` and ``media_type`` (lower-cased, no parameters) is a
    binary-mode CloudEvent: ``ce-specversion`` is there and the body is no event format."""
    return SPECVERSION_HEADER in headers and not media_type.startswith(FORMAT_PREFIX)


def _read_binary(headers: Headers, data: Any) -> Received:
    sent: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith(_PREFIX) or name == "content-type":
            if isinstance(value, list):
                raise MalformedBodyError(
                    f"the header {name!r} is sent {len(value)} times; send it once"
                )
            sent[name] = value
    given = {name.removeprefix(_PREFIX) for name in sent}
    given.discard("content-type")
    if "content-type" in sent:
        given.add("datacontenttype")
    _require(given, "the CloudEvent", _PREFIX)
    try:
        event = http.from_binary(http.HTTPMessage(sent, b""), _FORMAT, CloudEvent)
    except (BaseCloudEventException, ValueError, TypeError, OverflowError) as error:
        raise _malformed(error) from None
    return _received(event, given, data)


def _read_structured(document: Any, what: str) -> Received:
    if not isinstance(document, dict):
        raise MalformedBodyError(f"{what} is a JSON {_kind(document)}; a JSON object was expected")
    given = {name for name, value in document.items() if value is not None}
    given -= {"data", "data_base64"}
    _require(given, what)
    try:
        event = _FORMAT.read(CloudEvent, orjson.dumps(document))
    except (BaseCloudEventException, ValueError, TypeError, OverflowError) as error:
        raise _malformed(error, what) from None
    return _received(event, given, event.get_data())


def _require(given: set[str], what: str, prefix: str = "") -> None:
    missing = [prefix + name for name in _REQUIRED if name not in given]
    if missing:
        kind = "header" if prefix else "attribute"
        raise MalformedBodyError(
            f"{what} lacks the required {kind}{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; CloudEvents 1.0 requires specversion, id, source and type"
        )


def _received(event: BaseCloudEvent, given: set[str], data: Any) -> Received:
    """The payload and metadata of ``event``, with the attributes its sender gave (the SDK adds
    a ``time`` of its own when there was none)."""
    metadata: dict[str, MetadataValue] = {}
    for name, value in event.get_attributes().items():
        if name in given:
            metadata[_PREFIX + name] = _text(name, value)
    if isinstance(data, bytes | bytearray):
        metadata[DATA_BASE64] = "true"
        data = base64.b64encode(data).decode("ascii")
    return Received(data, metadata, delivery_id(event.get_source(), event.get_id()))


def _text(name: str, value: Any) -> str:
    """An attribute's value as text, in the specification's canonical string form."""
    if isinstance(value, datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    raise MalformedBodyError(
        f"the CloudEvent attribute {name!r} is a JSON {_kind(value)}; an attribute is a string, "
        "an integer or a boolean"
    )


def _malformed(error: Exception, what: str = "the CloudEvent") -> MalformedBodyError:
    """The SDK's refusal as callboard's, naming the attributes at fault."""
    if isinstance(error, CloudEventValidationError):
        problems = [f"{name}: {errors[0]}" for name, errors in error.errors.items() if errors]
        shown = "; ".join(problems[:_MAX_SHOWN])
        more = f" (and {len(problems) - _MAX_SHOWN} more)" if len(problems) > _MAX_SHOWN else ""
        return MalformedBodyError(f"{what} is malformed: {shown}{more}")
    if isinstance(error, binascii.Error):
        return MalformedBodyError(f"{what} has a data_base64 that is not base64: {error}")
    if isinstance(error, BaseCloudEventException):
        return MalformedBodyError(f"{what} is malformed: {error}")
    # What else the SDK raises comes from reading ``time``.
    return MalformedBodyError(f"{what} has a time that is not an RFC 3339 timestamp: {error}")


def _kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def to_structured(event: Event, *, source: str) -> tuple[dict[str, str], bytes]:
    """The headers (``content-type: application/cloudevents+json``) and body of ``event`` as a
    structured-mode CloudEvent; ``source`` is its source unless it came in as a CloudEvent."""
    message = http.to_structured(_cloud_event(event, source, binary=False), _FORMAT)
    return message.headers, message.body


def to_binary(event: Event, *, source: str) -> tuple[dict[str, str], bytes]:
    """The ``ce-*`` headers, ``content-type`` and body (the data) of ``event`` as a binary-mode
    CloudEvent; ``source`` is its source unless it came in as a CloudEvent."""
    message = http.to_binary(_cloud_event(event, source, binary=True), _FORMAT)
    return message.headers, message.body


def to_attributes(event: Event, *, source: str) -> dict[str, Any]:
    """``event`` as the JSON object of a structured-mode CloudEvent, for a message that carries
    JSON (SNS, EventBridge, Kafka, RabbitMQ)."""
    document: dict[str, Any] = orjson.loads(
        _FORMAT.write(_cloud_event(event, source, binary=False))
    )
    return document


def _cloud_event(event: Event, source: str, *, binary: bool) -> CloudEvent:
    attributes: dict[str, Any] = {
        "id": event.id,
        "source": source,
        "type": event.topic,
        "time": event.time,
        "datacontenttype": _JSON,
    }
    if SPECVERSION_HEADER in event.metadata:
        attributes.update(_kept_attributes(event))
    payload = event.payload
    data: Any
    if event.header(DATA_BASE64) == "true" and isinstance(payload, str):
        data = _bytes(payload)
    elif isinstance(payload, str) and not is_json(attributes["datacontenttype"]):
        data = payload
    else:
        if not is_json(attributes["datacontenttype"]):
            # A payload no longer text (a router changed it) is sent as what it is: JSON.
            attributes["datacontenttype"] = _JSON
        data = orjson.dumps(payload) if binary and payload is not None else payload
    return CloudEvent(attributes, data)


def _kept_attributes(event: Event) -> dict[str, Any]:
    """The attributes an event that came in as a CloudEvent keeps in its metadata."""
    kept: dict[str, Any] = {}
    for key, value in event.metadata.items():
        name = key[len(_PREFIX) :]
        if not key.startswith(_PREFIX) or name == "specversion" or not isinstance(value, str):
            continue
        if _NAME.fullmatch(name) and value:
            kept[name] = value
    if "time" in kept:
        kept["time"] = _time(kept["time"], event.time)
    return kept


def _time(text: str, default: datetime) -> datetime:
    """``ce-time`` as a timezone-aware time; the event's own time when it is not one."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return default
    return parsed if parsed.tzinfo is not None else default


def _bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))
