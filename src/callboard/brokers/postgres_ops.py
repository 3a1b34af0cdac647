"""The PostgreSQL broker's statements, each run on a connection the broker lends.

Publishing takes a transaction-level advisory lock (one per schema) around the insert, so
transactions that add events commit in the order their seqs were drawn: a reader that sees seq
N also sees every seq below it, and a group's position can move past what it has read without
skipping an event still being committed.

asyncpg runs a statement outside ``connection.transaction()`` as its own transaction
(autocommit). The hot operations (a publish batch, a claim, an acknowledgement batch) are each
ONE statement, a function of ``0002_operations.sql``, and so their own transaction: one round
trip, a statement asyncpg prepares once per connection and keeps (with the plan the server
keeps for it), and the driver's per-statement work paid once per operation instead of once per
statement of a transaction. The rest runs in explicit transactions. Nothing here leaves state in
the session (transactions always end, advisory locks are transaction-level), which is what lets
the pool hand connections back without resetting them.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import asyncpg

from callboard.brokers.base import Delivery, EventPage, EventQuery, RetentionPolicy, Start
from callboard.brokers.base import StoredEvent as LoggedEvent
from callboard.brokers.postgres_listener import notification
from callboard.brokers.sql import (
    Expired,
    StoredEvent,
    decode_event,
    eventlog,
    migration_names,
    queries,
    read_sql,
)
from callboard.brokers.sql.backlog import GroupState, Span, StoreState, Tally
from callboard.brokers.sql.retention import Doomed, RetentionRange, unreceived
from callboard.deadletters import DeadLetter
from callboard.errors import BrokerError, InvalidEventError, SubscriptionError
from callboard.events import Event
from callboard.topics import ONE, REST, SEPARATOR, TopicMatcher

#: An ``asyncpg.Connection`` (or the pool's proxy of one); asyncpg ships no type information.
Connection = Any
#: A row: an ``asyncpg.Record``, read by index or unpacked.
Row = Any

_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")


@dataclass(frozen=True, slots=True)
class Statement:
    """A named query in asyncpg's form: ``$1..$n`` in ``text``, the name of each in ``names``."""

    text: str
    names: tuple[str, ...]

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The parameters in the order of their numbers."""
        return [params[name] for name in self.names]


def numbered(text: str) -> Statement:
    """``%(name)s`` as ``$n``, the same name the same number (and ``%%`` as ``%``).

    ``queries.sql`` keeps named parameters, which read better than numbers; asyncpg takes numbers
    only, so each query is converted once, when the broker is made.
    """
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return Statement(_PLACEHOLDER.sub(number, text), tuple(names))


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Queries:
    """The named queries, bound to one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self._quoted = quote_identifier(schema)
        self._statements = {
            name: numbered(text.replace("{schema}", self._quoted))
            for name, text in queries("postgres").items()
        }
        digest = hashlib.blake2b(schema.encode(), digest_size=8).digest()
        base = int.from_bytes(digest, "big", signed=True) & ~0xFF
        #: Advisory lock keys of this schema: publishing, migrating, cleaning.
        self.publish_lock, self.migrate_lock, self.clean_lock = base, base + 1, base + 2
        self.channel = f"callboard.{schema}"[:63]

    def __getitem__(self, name: str) -> Statement:
        return self._statements[name]

    def migration(self, name: str) -> str:
        """A migration script, run as it is (several statements, ``$$`` bodies, no parameters)."""
        return read_sql("postgres", f"migrations/{name}").replace("{schema}", self._quoted)


async def fetch(
    connection: Connection, statement: Statement, params: Mapping[str, Any] | None = None
) -> list[Row]:
    """The rows of a statement, prepared by asyncpg once per connection and kept."""
    rows: list[Row] = await connection.fetch(statement.text, *statement.args(params or {}))
    return rows


async def fetch_value(
    connection: Connection, statement: Statement, params: Mapping[str, Any] | None = None
) -> Any:
    """The first column of a statement's first row; ``None`` when there is no row."""
    return await connection.fetchval(statement.text, *statement.args(params or {}))


async def execute(
    connection: Connection, statement: Statement, params: Mapping[str, Any] | None = None
) -> int:
    """Run a statement for its effect; the number of rows it touched."""
    status: str = await connection.execute(statement.text, *statement.args(params or {}))
    count = status.rsplit(" ", 1)[-1]
    return int(count) if count.isdigit() else 0


def pattern_regex(pattern: str) -> str:
    """A topic pattern as a PostgreSQL regular expression (``github.*`` -> ``^github\\.[^.]+$``)."""
    parts = []
    for index, segment in enumerate(pattern.split(SEPARATOR)):
        # Wildcards never match a reserved first segment ($deadletter...).
        if segment == ONE:
            parts.append("[^.$][^.]*" if index == 0 else "[^.]+")
        elif segment == REST:
            parts.append("[^$].*" if index == 0 else ".+")
        else:
            parts.append(re.escape(segment))
    return "^" + r"\.".join(parts) + "$"


async def migrate(connection: Connection, q: Queries) -> list[str]:
    """Apply the migrations not applied yet, in order, under a lock; their names."""
    applied: list[str] = []
    async with connection.transaction():
        await execute(connection, q["lock"], {"key": q.migrate_lock})
        await execute(connection, q["create_schema"])
        done = {name for (name,) in await fetch(connection, q["applied_migrations"])}
        known = migration_names("postgres")
        unknown = sorted(done - set(known))
        if unknown:
            raise BrokerError(
                f"the PostgreSQL schema {q.schema!r} has migrations this callboard does not "
                f"know ({', '.join(unknown)}): a newer callboard migrated it; run that version "
                "on every instance"
            )
        for name in known:
            if name not in done:
                # No parameters: the simple query protocol, which runs a script of statements.
                await connection.execute(q.migration(name))
                await execute(connection, q["record_migration"], {"name": name})
                applied.append(name)
    return applied


async def insert_events(
    connection: Connection,
    q: Queries,
    batch: list[tuple[StoredEvent, str | None]],
    origin: str | None = None,
) -> list[bool]:
    """Store a batch in one transaction and notify; accepted (not a known delivery) per event.

    ``origin`` marks the notification as the publishing broker's own (see ``notification``).
    """
    accepted = [True] * len(batch)
    rows: list[tuple[StoredEvent, str | None]] = []
    seen: set[tuple[str, str]] = set()
    for index, (event, target) in enumerate(batch):
        key = (event.topic, event.delivery_id) if event.delivery_id and target is None else None
        if key is not None:
            if key in seen:
                accepted[index] = False
                continue
            seen.add(key)
        rows.append((event, target))
    topics = {e.topic for e, t in rows if t is None}
    groups = {t for _, t in rows if t is not None}
    # One statement (the ``publish`` function): lock, insert and notification commit together.
    with refused_data(batch):
        found = await fetch(
            connection,
            q["publish"],
            {
                "key": q.publish_lock,
                "channel": q.channel,
                "message": notification(topics, groups, origin),
                "ids": [e.id for e, _ in rows],
                "topics": [e.topic for e, _ in rows],
                # None rather than a list of Nones: asyncpg checks each element of an array.
                "targets": [t for _, t in rows] if groups else None,
                # None: no row can conflict, the function stores them with a plain INSERT.
                "delivery_ids": [e.delivery_id if t is None else None for e, t in rows]
                if seen
                else None,
                "times": [e.time_us for e, _ in rows],
                "payloads": [e.payload for e, _ in rows],
                "metadatas": [e.metadata for e, _ in rows],
            },
        )
    if not seen:
        return accepted  # no delivery id to look for
    stored = {(topic, delivery_id) for topic, delivery_id in found}
    for index, (event, target) in enumerate(batch):
        if accepted[index] and target is None and event.delivery_id:
            accepted[index] = (event.topic, event.delivery_id) in stored
            stored.discard((event.topic, event.delivery_id))
    return accepted


@contextlib.contextmanager
def refused_data(batch: Sequence[tuple[StoredEvent, str | None]]) -> Iterator[None]:
    """PostgreSQL refusing an event's data (class 22: a NUL in text) as ``InvalidEventError``.

    Storing the same event again can never succeed, so it must not read as the store being
    unavailable (``503``, retried forever). The brokers refuse such events before they get
    here (``storable``); this is the boundary's translation of whatever the checks miss. For a
    batch the event at fault is not known: the broker stores the batch's events one by one.
    """
    try:
        yield
    except asyncpg.DataError as error:
        if len(batch) == 1:
            event, target = batch[0]
            fields = [
                name
                for name, value in (("id", event.id), ("topic", event.topic), ("target", target))
                if value is not None and "\x00" in value
            ] or ["payload or metadata"]
            raise InvalidEventError(
                f"event {event.id!r} on {event.topic!r}: PostgreSQL cannot store its "
                f"{fields[0]} ({type(error).__name__}: {error})"
            ) from error
        raise InvalidEventError(
            f"PostgreSQL refused an event of a batch of {len(batch)} "
            f"({type(error).__name__}: {error})"
        ) from error


async def keep_dead_letter(
    connection: Connection, q: Queries, group: str, event: StoredEvent
) -> None:
    with refused_data([(event, group)]):
        await execute(
            connection,
            q["insert_dead_letter"],
            {
                "subscription": group,
                "id": event.id,
                "topic": event.topic,
                "time_us": event.time_us,
                "payload": event.payload,
                "metadata": event.metadata,
            },
        )


async def exists(connection: Connection, q: Queries, group: str) -> bool:
    return bool(await fetch(connection, q["subscription_exists"], {"name": group}))


async def join(
    connection: Connection,
    q: Queries,
    group: str,
    patterns: Sequence[str],
    start: Start,
    owner: str | None = None,
) -> bool:
    """``SqlStore.join``: one statement (the ``join`` query), an upsert."""
    topics = sorted(set(patterns))
    since = start if isinstance(start, datetime) else None
    async with connection.transaction():
        created = await fetch_value(
            connection,
            q["join"],
            {
                "name": group,
                "topics": topics,
                "regexes": [pattern_regex(p) for p in topics],
                "start": start if isinstance(start, str) else "time",
                "since": since,
                "owner": owner,
            },
        )
    return bool(created)


async def claim(
    connection: Connection, q: Queries, group: str, consumer: str, limit: int, lease: float
) -> list[Delivery]:
    """Lease up to ``limit`` events of the group: those handed back first, then new ones."""
    args = {"group": group, "consumer": consumer, "limit": limit, "lease": lease}
    try:
        rows = await fetch(connection, q["claim"], args)
    except asyncpg.exceptions.NoDataFoundError as error:
        raise SubscriptionError(f"subscription {group!r} no longer exists") from error
    deliveries = [
        Delivery(decode_event(id, topic, time_us, payload, metadata), attempt, seq)
        for seq, attempt, id, topic, time_us, payload, metadata in rows
    ]
    deliveries.sort(key=_seq)
    return deliveries


def _seq(delivery: Delivery) -> int:
    return delivery.token if isinstance(delivery.token, int) else 0


async def ack(connection: Connection, q: Queries, batch: list[tuple[str, str, int]]) -> list[bool]:
    """Delete the leases still held by their acknowledging consumers; held, per item.

    One statement (the ``ack`` function), so its own transaction, which commits without waiting
    for the disk.
    """
    rows = await fetch(
        connection,
        q["ack"],
        {
            "groups": [g for g, _, _ in batch],
            "consumers": [c for _, c, _ in batch],
            "seqs": [s for _, _, s in batch],
        },
    )
    missed = {n - 1 for (n,) in rows}
    return [n not in missed for n in range(len(batch))]


async def release(
    connection: Connection, q: Queries, group: str, consumer: str, seqs: Sequence[int] | None
) -> bool:
    """Hand leases of a consumer (``None``: all of them) back to the group and notify; any?"""
    async with connection.transaction():
        if seqs is None:
            count = await fetch_value(
                connection, q["release"], {"group": group, "consumer": consumer}
            )
        else:
            count = await fetch_value(
                connection,
                q["release_some"],
                {"group": group, "consumer": consumer, "seqs": list(seqs)},
            )
        if count:
            await execute(
                connection,
                q["notify"],
                {"channel": q.channel, "message": notification(set(), {group})},
            )
    return bool(count)


async def renew(connection: Connection, q: Queries, consumers: list[str], lease: float) -> None:
    async with connection.transaction():
        await execute(connection, q["renew"], {"consumers": consumers, "lease": lease})


async def dead_letters(
    connection: Connection,
    q: Queries,
    group: str,
    ids: Sequence[str] | None,
    remove: bool,
    limit: int,
) -> list[Event]:
    async with connection.transaction():
        rows = await fetch(
            connection,
            q["dead_letters"],
            {"subscription": group, "ids": None if ids is None else list(ids), "limit": limit},
        )
        if remove and rows:
            await execute(connection, q["delete_dead_letters"], {"seqs": [r[0] for r in rows]})
    return [decode_event(*row[1:]) for row in rows]


async def delete_subscription(connection: Connection, q: Queries, group: str) -> bool:
    """Forget a subscription, its leases and its dead letters; was there anything?

    Two statements: the second one's snapshot comes after any claim of the group that the
    first one waited for, so nothing that claim leased is left behind.
    """
    args = {"name": group}
    async with connection.transaction():
        gone = await execute(connection, q["delete_subscription"], args)
        letters = await fetch_value(connection, q["delete_subscription_state"], args)
    return bool(gone or letters)


async def due(connection: Connection, q: Queries) -> dict[str, bool]:
    """Every subscription, and whether events of it wait to be claimed again."""
    return {name: bool(waiting) for name, waiting in await fetch(connection, q["due"])}


async def backlog_state(connection: Connection, q: Queries) -> StoreState:
    """Every subscription, then the seqs bounding the stored events (read after the positions,
    so no position is past the head)."""
    async with connection.transaction():
        rows = await fetch(connection, q["subscriptions"])
        head, low = (await fetch(connection, q["seq_bounds"]))[0]
    groups = [
        GroupState(
            name=name,
            topics=tuple(topics),
            position=position,
            lost=lost,
            owner=owner,
            in_flight=in_flight,
            returned=returned,
        )
        for name, topics, position, lost, owner, in_flight, returned in rows
    ]
    return StoreState(head=head, low=low, groups=groups)


async def tally_events(
    connection: Connection, q: Queries, counts: Sequence[Span], rows: Sequence[Span], bucket: int
) -> Tally:
    """Events of seq ranges counted by bucket, topic and target; events of others one by one."""
    tallied: list[tuple[int, str, str | None, int]] = []
    listed: list[tuple[int, str, str | None]] = []
    async with connection.transaction():
        # The first tally reads every event after the lowest position, once.
        await connection.execute("SET LOCAL statement_timeout = '30s'")
        for after, upto in counts:
            found = await fetch(
                connection, q["tally_events"], {"after": after, "upto": upto, "bucket": bucket}
            )
            tallied += [(r[0], r[1], r[2], r[3]) for r in found]
        for after, upto in rows:
            found = await fetch(connection, q["events_between"], {"after": after, "upto": upto})
            listed += [(r[0], r[1], r[2]) for r in found]
    return Tally(counts=tallied, rows=listed)


async def expire_range(
    connection: Connection, q: Queries, policy: RetentionPolicy
) -> RetentionRange | None:
    """Where a retention pass deletes (``SqlStore.expire_range``): index lookups only."""
    args = {"max_age": policy.max_age, "min_age": policy.min_age, "max_count": policy.max_count}
    old, young, count = (await fetch(connection, q["expire_range"], args))[0]
    return RetentionRange.bound(old, young, count)


async def expire(
    connection: Connection, q: Queries, policy: RetentionPolicy, bounds: RetentionRange, after: int
) -> Expired | None:
    """Delete the next batch of a retention pass (``SqlStore.expire``); ``None`` if another
    instance is at it.

    It reads a window of ``batch_size`` events of the primary key after ``after``, the
    subscriptions behind it, the leased batches and the leases up to it: nothing of the events
    it keeps.
    """
    async with connection.transaction():
        await connection.execute("SET LOCAL statement_timeout = '20s'")
        if not await fetch_value(connection, q["try_lock"], {"key": q.clean_lock}):
            return None
        window = {"after": after, "skip": policy.batch_size - 1}
        end = await fetch_value(connection, q["expire_window"], window)
        upto = bounds.upto if end is None else min(end, bounds.upto)
        found = await fetch(
            connection,
            q["expire"],
            {
                "after": after,
                "upto": upto,
                "edge": bounds.edge,
                "max_age": policy.max_age,
                "min_age": policy.min_age,
            },
        )
        resume = upto if upto < bounds.upto else None
        if not found:
            return Expired(0, {}, resume)
        rows: list[Doomed] = sorted((seq, topic, target) for seq, topic, target in found)
        behind = await fetch(connection, q["behind_positions"], {"last": upto})
        lost = unreceived(
            rows, [(name, _matcher(tuple(topics)), pos) for name, topics, pos in behind]
        )
        await execute(connection, q["split_batches"], {"upto": upto})
        dropped = await fetch(connection, q["drop_leases"], {"upto": upto})
        lost.update(name for (name,) in dropped)
        for name, count in lost.items():
            await execute(connection, q["add_lost"], {"name": name, "lost": count})
    return Expired(len(rows), dict(lost), resume)


@lru_cache(maxsize=1024)
def _matcher(topics: tuple[str, ...]) -> TopicMatcher:
    return TopicMatcher(topics)


# -- reading the store (``EventLog``) ---------------------------------------------------------


def _stored(row: Row) -> LoggedEvent:
    seq, id, topic, target, time_us, stored_at, payload, metadata = row
    return LoggedEvent(decode_event(id, topic, time_us, payload, metadata), seq, stored_at, target)


def _topic_args(patterns: Sequence[str]) -> dict[str, Any]:
    topics = eventlog.TopicFilter.of(patterns)
    return {
        "every": topics.every,
        "exact": list(topics.exact),
        "regexes": [pattern_regex(p) for p in topics.wild],
    }


async def find_events(connection: Connection, q: Queries, query: EventQuery) -> EventPage:
    """``EventLog.find_events``: a backward walk of the primary key from the cursor."""
    if query.dead_letters:
        return await _find_dead_letters(connection, query, q)
    if query.event_id is not None:
        rows = await fetch(connection, q["events_with_id"], {"id": query.event_id})
        found = [e for e in map(_stored, rows) if eventlog.selected(query, e)]
        return EventPage(*eventlog.page_of(found, query.limit))
    before, low = eventlog.cursor(query), eventlog.floor(query)
    slack = timedelta(seconds=eventlog.SLACK)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        if query.since is not None:
            first = await fetch_value(
                connection, q["first_stored_since"], {"since": query.since - slack}
            )
            if first is None:
                return EventPage((), None)
            low = max(low, first)
        if query.until is not None:
            last = await fetch_value(
                connection, q["last_stored_before"], {"until": query.until + slack}
            )
            if last is None:
                return EventPage((), None)
            before = min(before, last + 1)
        rows = await fetch(
            connection,
            q["find_events"],
            {
                "before": before,
                "low": low,
                "since": query.since,
                "until": query.until,
                "limit": query.limit + 1,
                **_topic_args(query.topics),
            },
        )
    return EventPage(*eventlog.page_of([_stored(row) for row in rows], query.limit))


async def _find_dead_letters(connection: Connection, query: EventQuery, q: Queries) -> EventPage:
    rows = await fetch(
        connection,
        q["find_dead_letters"],
        {
            "before": eventlog.cursor(query),
            "after": eventlog.floor(query),
            "since_us": -(2**62) if query.since is None else _micros(query.since),
            "until_us": 2**62 if query.until is None else _micros(query.until),
            "id": query.event_id,
            "limit": query.limit + 1,
            **_topic_args(query.topics),
        },
    )
    found = []
    for seq, subscription, *columns in rows:
        letter = decode_event(*columns)
        found.append(LoggedEvent(letter, seq, letter.time, subscription))
    return EventPage(*eventlog.page_of(found, query.limit))


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


async def event_facts(connection: Connection, q: Queries, event_id: str) -> eventlog.EventFacts:
    """What the store holds about an event id, in one read-only snapshot."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        events = [
            _stored(row) for row in await fetch(connection, q["events_with_id"], {"id": event_id})
        ]
        origins = [
            eventlog.Origin(name, tuple(topics), position, made)
            for name, topics, position, made in await fetch(connection, q["subscription_origins"])
        ]
        leases: list[eventlog.Lease] = []
        for seq, groups in eventlog.readers(events, origins).items():
            if not groups:
                continue
            for group, consumer, until, attempt, held in await fetch(
                connection, q["leases_of"], {"groups": groups, "seq": seq}
            ):
                leases.append(eventlog.Lease(group, seq, consumer, until, attempt, held))
        letters = [
            DeadLetter.from_event(decode_event(*row[1:]))
            for row in await fetch(connection, q["dead_letters_naming"], {"id": event_id})
        ]
    return eventlog.EventFacts(events, origins, leases, letters)
