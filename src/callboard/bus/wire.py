"""The bus API's JSON shapes, shared by the server routes and the client.

Backstage's own client reads ``{"topic", "payload"}`` from each event and ignores the rest, so
callboard adds what it keeps (``id``, ``time``, ``metadata``) as further optional fields and stays
compatible in both directions: a Backstage event without them gets a fresh id and time here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from callboard.brokers import storable
from callboard.brokers.base import Start, name_problem
from callboard.errors import InvalidEventError, MalformedBodyError
from callboard.events import Event, MetadataValue

#: Where the routes live, relative to the server root (Backstage's events plugin base + bus).
BUS_PATH = "/api/events/bus/v1"
#: How long a ``202`` is held open, in milliseconds (Backstage's header name).
NOTIFY_TIMEOUT_HEADER = "backstage-events-notify-timeout"
#: Why a ``POST events`` answered ``204``: ``duplicate`` or ``no-readers`` (callboard's header).
PUBLISH_RESULT_HEADER = "callboard-publish-result"
#: Metadata key holding the subscriptions a publisher already notified in its own process.
NOTIFIED = "callboard-notified-subscribers"
#: Events in one Backstage batch (``MAX_BATCH_SIZE`` of Backstage's stores).
BATCH_SIZE = 10
#: The most dead letters one request lists or takes.
MAX_DEAD_LETTERS = 10_000


def _fail(message: str) -> MalformedBodyError:
    return MalformedBodyError(message)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(f"{what} must be a JSON object")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(f"{what} must be a list of strings")
    return tuple(value)


def _metadata(value: Any) -> dict[str, MetadataValue]:
    meta = _object(value, "event.metadata")
    result: dict[str, MetadataValue] = {}
    for key, item in meta.items():
        if isinstance(item, str):
            result[key] = item
        elif isinstance(item, list) and all(isinstance(v, str) for v in item):
            result[key] = list(item)
        else:
            raise _fail(f"event.metadata.{key} must be a string or a list of strings")
    return result


def event_from_wire(value: Any, what: str = "event") -> Event:
    """An ``Event`` from its JSON object; raises ``MalformedBodyError`` naming the bad field."""
    data = _object(value, what)
    topic = data.get("topic")
    if not isinstance(topic, str) or not topic:
        raise _fail(f"{what}.topic must be a non-empty string")
    if "payload" not in data:
        raise _fail(f"{what}.payload is required")
    fields: dict[str, Any] = {"topic": topic, "payload": data["payload"]}
    if data.get("metadata") is not None:
        fields["metadata"] = _metadata(data["metadata"])
    if data.get("id") is not None:
        if not isinstance(data["id"], str) or not data["id"]:
            raise _fail(f"{what}.id must be a non-empty string")
        fields["id"] = data["id"]
    if data.get("time") is not None:
        try:
            time = datetime.fromisoformat(str(data["time"]))
        except ValueError:
            raise _fail(f"{what}.time must be an ISO 8601 time") from None
        if time.tzinfo is None:
            raise _fail(f"{what}.time must name its time zone")
        fields["time"] = time
    return Event(**fields)


def event_to_wire(event: Event) -> dict[str, Any]:
    """The JSON object of an event: Backstage's two fields first, then callboard's."""
    return {
        "topic": event.topic,
        "payload": event.payload,
        "id": event.id,
        "time": event.time.isoformat(),
        "metadata": {k: v for k, v in event.metadata.items() if k != NOTIFIED},
    }


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """``POST events``: the event and the subscriptions its publisher already notified."""

    event: Event
    notified: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, value: Any) -> PublishRequest:
        body = _object(value, "the body")
        # ``subscriptionIds`` is what Backstage's first bus client sent.
        notified = body.get("notifiedSubscribers", body.get("subscriptionIds"))
        return cls(
            event_from_wire(body.get("event")),
            () if notified is None else _strings(notified, "notifiedSubscribers"),
        )

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"event": event_to_wire(self.event)}
        if self.notified:
            body["notifiedSubscribers"] = list(self.notified)
        return body


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """``PUT subscriptions/{id}``: the topics, and where a new subscription starts."""

    topics: tuple[str, ...]
    #: ``"end"``, ``"beginning"`` or an ISO 8601 time; used only when the subscription is new.
    start: Start = "end"

    @classmethod
    def from_wire(cls, value: Any) -> SubscriptionRequest:
        body = _object(value, "the body")
        topics = _strings(body.get("topics"), "topics")
        if not topics:
            raise _fail("topics must not be empty")
        start = body.get("start", "end")
        if start == "end" or start == "beginning":
            return cls(topics, start)
        try:
            when = datetime.fromisoformat(str(start))
        except ValueError:
            raise _fail("start must be 'end', 'beginning' or an ISO 8601 time") from None
        if when.tzinfo is None:
            raise _fail("start must name its time zone")
        return cls(topics, when)

    def to_wire(self) -> dict[str, Any]:
        start = self.start if isinstance(self.start, str) else self.start.isoformat()
        return {"topics": list(self.topics), "start": start}


@dataclass(frozen=True, slots=True)
class WireDelivery:
    """One leased delivery of ``GET subscriptions/{id}/deliveries``."""

    ack_id: str
    attempt: int
    event: Event

    @classmethod
    def from_wire(cls, value: Any) -> WireDelivery:
        data = _object(value, "delivery")
        ack_id, attempt = data.get("ackId"), data.get("attempt", 1)
        if not isinstance(ack_id, str) or not isinstance(attempt, int):
            raise _fail("delivery.ackId must be a string and delivery.attempt an integer")
        return cls(ack_id, attempt, event_from_wire(data.get("event"), "delivery.event"))

    def to_wire(self) -> dict[str, Any]:
        return {"ackId": self.ack_id, "attempt": self.attempt, "event": event_to_wire(self.event)}


@dataclass(frozen=True, slots=True)
class AckRequest:
    """``POST .../acks``, ``.../nacks`` and ``.../leases``: ack ids, and a lease for renewals."""

    ack_ids: tuple[str, ...]
    lease_ms: int | None = None

    @classmethod
    def from_wire(cls, value: Any) -> AckRequest:
        body = _object(value, "the body")
        lease = body.get("leaseMs")
        if lease is not None and (not isinstance(lease, int) or lease < 1):
            raise _fail("leaseMs must be a positive integer")
        return cls(_strings(body.get("ackIds"), "ackIds"), lease)

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ackIds": list(self.ack_ids)}
        if self.lease_ms is not None:
            body["leaseMs"] = self.lease_ms
        return body


@dataclass(frozen=True, slots=True)
class AckResult:
    """The answer to an ack, nack or renewal: ids settled, ids the server does not hold."""

    done: tuple[str, ...]
    unknown: tuple[str, ...]

    @classmethod
    def from_wire(cls, value: Any) -> AckResult:
        body = _object(value, "the body")
        return cls(
            _strings(body.get("done", []), "done"), _strings(body.get("unknown", []), "unknown")
        )

    def to_wire(self) -> dict[str, Any]:
        return {"done": list(self.done), "unknown": list(self.unknown)}


def events_from_wire(value: Any, key: str) -> list[Event]:
    """The list of events under ``key`` of a response body."""
    items = _object(value, "the body").get(key)
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise _fail(f"{key} must be a list")
    return [event_from_wire(item, key) for item in items]


def check_storable(event: Event) -> Event:
    """Return ``event`` if every broker can keep it, else raise ``InvalidEventError``.

    Its id and topic must be names (``name_problem``: printable, bounded), and its payload and
    metadata what the brokers' own check at publish accepts (``brokers.storable``), so a
    ``deliver_to`` is refused alike on every broker.
    """
    for what, name in (("event.id", event.id), ("event.topic", event.topic)):
        problem = name_problem(name, what)
        if problem is not None:
            raise InvalidEventError(problem)
    storable.check_storable(event)
    return event
