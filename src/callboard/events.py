"""The event value and the metadata keys callboard itself writes."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
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


def new_event_id() -> str:
    return uuid.uuid4().hex


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
        return replace(self, topic=topic, id=new_event_id())

    def header(self, name: str) -> str | None:
        """The first value of a metadata entry, or ``None``."""
        value = self.metadata.get(name.lower())
        if isinstance(value, list):
            return value[0] if value else None
        return value

    @property
    def delivery_id(self) -> str | None:
        return self.header(DELIVERY_ID)
