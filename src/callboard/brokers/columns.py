"""An event in columns: the form the SQL brokers and the Redis broker store it in.

The payload and metadata are JSON text, checked to be storable by every broker
(``storable.encode_checked``); the time is microseconds since the epoch, exact and cheap to read
back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from callboard.brokers.storable import encode_checked
from callboard.events import Event

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event in the columns the SQL brokers (and the Redis broker's stream entries) hold."""

    id: str
    topic: str
    #: The provider's delivery id, kept to recognise a redelivery on the same topic.
    delivery_id: str | None
    #: ``Event.time`` as microseconds since the epoch: exact, and cheap to read back.
    time_us: int
    payload: str
    metadata: str


def encode_event(event: Event) -> StoredEvent:
    """The event in its stored columns; ``InvalidEventError`` for what no broker can keep."""
    payload_json, metadata_json = encode_checked(event)
    payload, metadata = payload_json.decode(), metadata_json.decode()
    delta = event.time - _EPOCH
    time_us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return StoredEvent(event.id, event.topic, event.delivery_id, time_us, payload, metadata)


def decode_event(id: str, topic: str, time_us: int, payload: str | bytes, metadata: Any) -> Event:
    meta = orjson.loads(metadata) if isinstance(metadata, str | bytes) else metadata
    time = _EPOCH + timedelta(microseconds=time_us)
    return Event.restore(topic, orjson.loads(payload), meta, id, time)
