"""The event value and the metadata keys callboard itself writes."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

JSON: TypeAlias = dict[str, "JSON"] | list["JSON"] | str | int | float | bool | None
MetadataValue: TypeAlias = str | list[str]
Metadata: TypeAlias = Mapping[str, MetadataValue]

#: The provider's own id for one delivery (``X-GitHub-Delivery``, ``webhook-id``, ...). Two
#: events on one topic with the same delivery id are one delivery sent twice.
DELIVERY_ID = "callboard-delivery-id"
#: Written on dead letters: why the last attempt failed, how many attempts were made, and
#: which subscription and topic the event came from.
DEAD_LETTER_ERROR = "callboard-error"
DEAD_LETTER_ATTEMPTS = "callboard-attempts"
DEAD_LETTER_SUBSCRIPTION = "callboard-subscription"
DEAD_LETTER_TOPIC = "callboard-topic"


class _EventIds:
    """Unique ids without a system call each: 64 random bits per process, then a counter.

    An id is 32 hex digits, like a UUID's. The random part is drawn again in a forked child,
    so parent and child never hand out the same id.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(int.from_bytes(os.urandom(4)))

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_ids = _EventIds()
os.register_at_fork(after_in_child=_ids.reseed)


def new_event_id() -> str:
    return _ids.next()


def utc_now() -> datetime:
    return datetime.now(UTC)


def _lower_keys(metadata: Metadata) -> dict[str, MetadataValue]:
    # A fresh dict (and fresh lists): the caller's mapping must not change a frozen event.
    return {
        key.lower(): list(value) if isinstance(value, list) else value
        for key, value in metadata.items()
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One event: a JSON-compatible ``payload`` published on a ``topic``.

    ``metadata`` holds header-like values under lower-cased names. ``id`` is unique and is
    assigned when not given; ``time`` is when the event was created, in UTC.
    """

    topic: str
    payload: Any = None
    metadata: Metadata = field(default_factory=dict)
    id: str = field(default_factory=new_event_id)
    time: datetime = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", _lower_keys(self.metadata))
        offset = self.time.utcoffset()
        if offset is None:
            raise ValueError("Event.time must be timezone-aware (UTC)")
        if offset or self.time.tzinfo is not UTC:
            object.__setattr__(self, "time", self.time.astimezone(UTC))

    def with_topic(self, topic: str) -> Event:
        """The same event republished on another topic: a new id, the same payload and metadata."""
        # Both events are immutable, so the derived one shares the metadata mapping.
        return _assemble(topic, self.payload, self.metadata, new_event_id(), self.time)

    @classmethod
    def from_owned(cls, topic: str, payload: Any, metadata: dict[str, MetadataValue]) -> Event:
        """An event that takes ``metadata`` as it is, without a defensive copy.

        For callers that built the dict themselves with lower-cased keys and keep no
        reference to it (the HTTP ingress, on every request).
        """
        return _assemble(topic, payload, metadata, new_event_id(), utc_now())

    @classmethod
    def restore(
        cls, topic: str, payload: Any, metadata: dict[str, MetadataValue], id: str, time: datetime
    ) -> Event:
        """An event read back from a store that callboard itself wrote, taken as it is.

        What was stored came from an ``Event``: its metadata keys are lower-cased already and
        ``time`` is UTC, so the checks and the copy of ``__post_init__`` are skipped.
        """
        return _assemble(topic, payload, metadata, id, time)

    def header(self, name: str) -> str | None:
        """The first value of a metadata entry, or ``None``."""
        value = self.metadata.get(name.lower())
        if isinstance(value, list):
            return value[0] if value else None
        return value

    @property
    def delivery_id(self) -> str | None:
        return self.header(DELIVERY_ID)


def _assemble(topic: str, payload: Any, metadata: Metadata, id: str, time: datetime) -> Event:
    event = object.__new__(Event)
    setattr_ = object.__setattr__
    setattr_(event, "topic", topic)
    setattr_(event, "payload", payload)
    setattr_(event, "metadata", metadata)
    setattr_(event, "id", id)
    setattr_(event, "time", time)
    return event
