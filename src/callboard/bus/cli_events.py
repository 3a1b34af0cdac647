"""Events from the command line: ``callboard publish``, ``tail`` and ``events list|show``.

``publish`` goes through the configured broker, or a server's bus (``--url``). ``events`` and
``tail`` read the durable store (``EventLog``): ``tail`` prints the history ``--since`` asks for,
then polls the store for what comes after the newest event seen, so it follows every process
that writes to the store and leaves nothing behind when it exits (no subscription is made). With
``--url`` it reads through a server's bus instead, on a subscription of its own that it deletes
when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from callboard.brokers import event_log, redact_url
from callboard.brokers.base import (
    MAX_PAGE,
    Broker,
    BrokerAdmin,
    EventLog,
    EventQuery,
    Outcome,
    StoredEvent,
)
from callboard.errors import CallboardError, ConfigError, NotFoundError
from callboard.events import Event

#: Prints one line.
Emit = Callable[[str], None]

#: Seconds between two looks at the store while tailing.
TAIL_POLL = 0.5


# -- what the commands read from their arguments ------------------------------------------------


def read_payload(data: str | None, stdin: TextIO | None = None) -> Any:
    """The payload ``--data`` gives: JSON text, ``@file`` (its JSON), ``-`` (standard input's);
    none: ``null``. ``ConfigError`` (``--data``) naming the problem when it is not JSON."""
    if data is None:
        return None
    source = "the text given"
    if data == "-":
        text = (stdin or sys.stdin).read()
        source = "standard input"
    elif data.startswith("@"):
        path = Path(data[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError("--data", f"cannot read {path}: {error.strerror}") from None
        source = f"file {path}"
    else:
        text = data
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            "--data",
            f"not valid JSON ({source}): {error.msg} at line {error.lineno} column {error.colno}",
        ) from None


def read_metadata(items: Sequence[str]) -> dict[str, str | list[str]]:
    """``--metadata k=v`` pairs (a repeated key gathers a list)."""
    metadata: dict[str, str | list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--metadata", f"expected KEY=VALUE, got {item!r}")
        key = key.strip().lower()
        known = metadata.get(key)
        if known is None:
            metadata[key] = value
        else:
            metadata[key] = [*known, value] if isinstance(known, list) else [known, value]
    return metadata


# -- the store ----------------------------------------------------------------------------------


def store_path(url: str) -> Path | None:
    """The file a ``sqlite:///`` URL names (``None`` for another scheme or ``:memory:``)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "sqlite":
        return None
    location = rest.partition("?")[0]
    path = location[1:] if location.startswith("/") else ""
    if not path or path == ":memory:":
        return None
    return Path(path)


def require_store(url: str) -> None:
    """Refuse to open a SQLite store whose file does not exist: opening would make an empty one,
    and every command would then report an empty store instead of the server's."""
    path = store_path(url)
    if path is not None and not path.exists():
        raise NotFoundError(
            f"the store {path.absolute()} does not exist (events.broker is {url}); run from the "
            "server's directory or pass --config with the server's configuration"
        )


def store_line(url: str) -> str:
    """What the operations commands print first (on standard error): the store they opened."""
    path = store_path(url)
    shown = f"sqlite:///{path.absolute()}" if path is not None else redact_url(url)
    return f"store: {shown}"


# -- publish ------------------------------------------------------------------------------------


async def publish(broker: Broker, topic: str, payload: Any, metadata: dict[str, Any]) -> str:
    event = Event(topic=topic, payload=payload, metadata=metadata)
    if await broker.publish(event):
        return f"published {event.id} on {topic}"
    return f"not stored: {topic} already has an event with delivery id {event.delivery_id}"


# -- printing events ----------------------------------------------------------------------------


def compact(value: Any) -> str:
    return orjson.dumps(value).decode()


def event_line(stored: StoredEvent, width: int = 120) -> str:
    """``time  topic  id  payload``: one line, the payload cut to fit ``width``."""
    when = stored.stored_at.astimezone().isoformat(timespec="milliseconds")
    head = f"{when}  {stored.event.topic}  {stored.event.id}"
    if stored.target is not None:
        head += f"  (to {stored.target})"
    payload = compact(stored.event.payload)
    room = max(width - len(head) - 2, 20)
    if len(payload) > room:
        payload = payload[: room - 1] + "…"
    return f"{head}  {payload}"


def event_json(stored: StoredEvent) -> str:
    event = stored.event
    return compact(
        {
            "seq": stored.seq,
            "storedAt": stored.stored_at.isoformat(),
            "id": event.id,
            "topic": event.topic,
            "time": event.time.isoformat(),
            "target": stored.target,
            "metadata": event.metadata,
            "payload": event.payload,
        }
    )


def outcome_line(outcome: Outcome) -> str:
    parts = [f"{outcome.subscription}: {outcome.state.replace('_', ' ')}"]
    if outcome.attempt:
        parts.append(f"attempt {outcome.attempt}")
    if outcome.consumer is not None:
        parts.append(f"consumer {outcome.consumer}")
    if outcome.lease_until is not None:
        parts.append(f"lease until {outcome.lease_until.astimezone().isoformat('T', 'seconds')}")
    if outcome.failed_at is not None:
        parts.append(f"failed {outcome.failed_at.astimezone().isoformat('T', 'seconds')}")
    if outcome.dead_letter_id is not None:
        parts.append(f"dead letter {outcome.dead_letter_id}")
    line = ", ".join(parts)
    return f"{line}\n    {outcome.error}" if outcome.error else line


# -- events list / show -------------------------------------------------------------------------


async def list_events(broker: Broker, query: EventQuery, emit: Emit, *, as_json: bool) -> int:
    """Print the events ``query`` selects, newest first; how many."""
    page = await event_log(broker).find_events(query)
    for stored in page.events:
        emit(event_json(stored) if as_json else event_line(stored))
    if not page.events and not as_json:
        emit("no events")
    elif page.next is not None and not as_json:
        emit(f"… more: the next page is --before {page.next}")
    return len(page.events)


async def show_event(broker: Broker, event_id: str, *, as_json: bool) -> str:
    log = event_log(broker)
    page = await log.find_events(EventQuery(event_id=event_id, limit=MAX_PAGE))
    outcomes = await log.event_outcomes(event_id)
    if not page.events and not outcomes:
        raise NotFoundError(
            f"no event {event_id!r} in the store (unknown, or retention deleted it)"
        )
    if as_json:
        return compact(
            {
                "stored": [orjson.loads(event_json(stored)) for stored in page.events],
                "outcomes": [_outcome_json(outcome) for outcome in outcomes],
            }
        )
    lines = []
    if page.events:
        stored = page.events[-1]  # the first stored: the publish itself
        event = stored.event
        lines += [
            f"id:        {event.id}",
            f"topic:     {event.topic}",
            f"time:      {event.time.isoformat()}",
            f"stored at: {stored.stored_at.isoformat()} (seq {stored.seq})",
        ]
        copies = [s for s in page.events if s.target is not None]
        if copies:
            lines.append(
                "delivered again to: " + ", ".join(sorted({str(s.target) for s in copies}))
            )
        lines.append("metadata:")
        lines += [f"  {key}: {value}" for key, value in sorted(event.metadata.items())] or ["  -"]
        lines.append("payload:")
        lines += ["  " + line for line in json.dumps(event.payload, indent=2).splitlines()]
    else:
        lines.append(f"event {event_id}: no longer stored (retention deleted it)")
    lines.append("subscriptions:")
    lines += ["  " + outcome_line(o) for o in outcomes] or ["  none reads its topic"]
    return "\n".join(lines)


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    def moment(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "subscription": outcome.subscription,
        "state": outcome.state,
        "attempt": outcome.attempt,
        "consumer": outcome.consumer,
        "leaseUntil": moment(outcome.lease_until),
        "error": outcome.error,
        "failedAt": moment(outcome.failed_at),
        "deadLetterId": outcome.dead_letter_id,
    }


# -- tail ---------------------------------------------------------------------------------------


async def newer(log: EventLog, topics: tuple[str, ...], after: int) -> list[StoredEvent]:
    """The stored events of ``topics`` after seq ``after``, oldest first (page by page)."""
    found: list[StoredEvent] = []
    before: int | None = None
    while True:
        page = await log.find_events(
            EventQuery(topics=topics, before=before, after=after, limit=MAX_PAGE)
        )
        found += page.events
        if page.next is None:
            return found[::-1]
        before = page.next


async def head(log: EventLog) -> int:
    """The seq of the newest stored event (0: none)."""
    page = await log.find_events(EventQuery(limit=1))
    return page.events[0].seq if page.events else 0


async def tail(
    broker: Broker,
    topics: tuple[str, ...],
    since: datetime | None,
    emit: Emit,
    *,
    as_json: bool,
    poll: float = TAIL_POLL,
) -> None:
    """Print events as they are stored, from ``since`` when given, until cancelled."""
    log = event_log(broker)
    show: Callable[[StoredEvent], str] = event_json if as_json else event_line
    after = await head(log)
    if since is not None:
        for stored in await history(log, topics, since, after):
            emit(show(stored))
    while True:
        for stored in await newer(log, topics, after):
            emit(show(stored))
            after = stored.seq
        await asyncio.sleep(poll)


async def history(
    log: EventLog, topics: tuple[str, ...], since: datetime, upto: int
) -> list[StoredEvent]:
    """The events of ``topics`` stored since ``since`` up to seq ``upto``, oldest first."""
    found: list[StoredEvent] = []
    before = upto + 1
    while True:
        page = await log.find_events(
            EventQuery(topics=topics, since=since, before=before, limit=MAX_PAGE)
        )
        found += page.events
        if page.next is None:
            return found[::-1]
        before = page.next


async def tail_remote(
    broker: Broker, topics: tuple[str, ...], emit: Emit, *, as_json: bool
) -> None:
    """Print events a server's bus delivers, on a subscription of its own deleted at the end."""
    group = f"tail.{uuid.uuid4().hex[:12]}"
    patterns = topics or (">",)
    consumer = await broker.consume(group, patterns)
    print(f"tailing {', '.join(patterns)} (subscription {group})", file=sys.stderr, flush=True)
    try:
        while True:
            batch = await consumer.fetch(100)
            if not batch:
                return
            for delivery in batch:
                event = delivery.event
                stored = StoredEvent(event, 0, event.time)
                emit(event_json(stored) if as_json else event_line(stored))
            await consumer.ack(batch)
    finally:
        with contextlib.suppress(CallboardError):
            await consumer.close()
        if isinstance(broker, BrokerAdmin):
            with contextlib.suppress(CallboardError):
                await broker.delete_subscription(group)
