"""What the SQL-backed brokers share: named queries, the stored form of an event.

Each dialect keeps its SQL in files beside this module (``sqlite/``, ``postgres/``), loaded with
``importlib.resources`` so they ship inside the wheel. ``queries.sql`` holds named queries::

    -- name: ack
    -- One line saying what the query does.
    DELETE FROM ...;

Nothing here imports a database driver: each broker module imports its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import orjson

from callboard.brokers.storable import encode_checked
from callboard.errors import BrokerError
from callboard.events import Event

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def read_sql(dialect: str, name: str) -> str:
    """The text of ``<dialect>/<name>`` (``schema.sql``, ``migrations/0001_init.sql``)."""
    return resources.files(__package__).joinpath(dialect, name).read_text(encoding="utf-8")


def migration_names(dialect: str) -> list[str]:
    """The migration files of a dialect, in the order they apply (``NNNN_*.sql``)."""
    folder = resources.files(__package__).joinpath(dialect, "migrations")
    return sorted(item.name for item in folder.iterdir() if item.name.endswith(".sql"))


@cache
def queries(dialect: str) -> dict[str, str]:
    """The named queries of ``<dialect>/queries.sql``, without their comment lines."""
    text = read_sql(dialect, "queries.sql")
    found: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        body = text[match.end() : following.start() if following else len(text)]
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        found[match.group(1)] = "\n".join(lines).strip()
    return found


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event in the columns the SQL brokers store it in."""

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


@dataclass(frozen=True, slots=True)
class Expired:
    """What one retention batch deleted, and which subscriptions had not received it."""

    deleted: int
    lost: dict[str, int]
    #: The seq the pass's next batch starts after; ``None``: the pass's range is done.
    resume: int | None = None


async def repeat(
    interval: float,
    job: Callable[[], Awaitable[object]],
    failure: str,
    *,
    log: logging.Logger,
    first: float | None = None,
) -> None:
    """Run ``job`` every ``interval`` seconds (the first time after ``first``) until cancelled.

    A ``BrokerError`` is logged as ``<failure>: <error>`` and the next run comes as planned: the
    durable brokers' upkeep (lease renewal, retention) must outlive a store that is down a while.
    """
    await asyncio.sleep(interval if first is None else first)
    while True:
        try:
            await job()
        except BrokerError as error:
            log.warning("%s: %s", failure, error)
        await asyncio.sleep(interval)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel a broker's background tasks and wait until each has ended; empties ``tasks``."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()
