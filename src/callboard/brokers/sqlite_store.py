"""The SQLite broker's operations: plain functions run on the broker's database thread.

Each function takes the connection first, so the thread can run many of them in one transaction;
they check what may fail before they write.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache

import orjson

from callboard.brokers.base import Delivery, EventPage, EventQuery, RetentionPolicy, Start
from callboard.brokers.base import StoredEvent as LoggedEvent
from callboard.brokers.sql import Expired, StoredEvent, decode_event, eventlog, queries, read_sql
from callboard.brokers.sql.backlog import GroupState, Span, StoreState, Tally
from callboard.brokers.sql.retention import Doomed, RetentionRange, unreceived
from callboard.brokers.sql.store import Ack, Publish
from callboard.deadletters import DeadLetter
from callboard.errors import BrokerError, SubscriptionError
from callboard.events import Event
from callboard.topics import TopicMatcher, TopicPattern

Q = queries("sqlite")
SCHEMA_VERSION = 3

_EVENT_COLUMNS = "seq, id, topic, time_us, payload, metadata"


@lru_cache(maxsize=1024)
def _matcher(topics: str) -> TopicMatcher:
    return TopicMatcher(json.loads(topics))


def _match(topics: str, topic: str) -> bool:
    return _matcher(topics)(topic)


@lru_cache(maxsize=1024)
def _literals(topics: str) -> tuple[str, bool]:
    """A group's exact patterns (a JSON array) and whether it has wildcard patterns too."""
    patterns = [TopicPattern.parse(p) for p in json.loads(topics)]
    exact = [p.pattern for p in patterns if p.is_exact]
    return json.dumps(exact), len(exact) < len(patterns)


def connect(path: str, *, synchronous: str, busy_timeout: float) -> sqlite3.Connection:
    """Open the store, in WAL mode, with the functions its queries use."""
    # Used by the broker's thread and by the event loop, never by both at once (sqlite_thread).
    connection = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    # WAL: readers never block the writer, and a commit is one append (fsynced at checkpoints
    # with synchronous=NORMAL, which survives a killed process; FULL also survives power loss).
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        # Checkpoints run on a connection of their own (sqlite_checkpoint), not in a commit.
        connection.execute("PRAGMA wal_autocheckpoint = 0")
    except sqlite3.Error:
        connection.close()
        raise
    connection.create_function("callboard_match", 2, _match, deterministic=True)
    return connection


def migrate(connection: sqlite3.Connection) -> int:
    """Create the schema if it is missing; the schema version found before."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise BrokerError(
            f"the SQLite store has schema version {version}, newer than this callboard "
            f"understands ({SCHEMA_VERSION}); upgrade callboard"
        )
    if version == 1:
        # The tables exist (CREATE TABLE IF NOT EXISTS would leave them as they are): add
        # what version 2 added to them. The write lock is held, so only one process does it.
        connection.execute(Q["add_owner"])
    if version < SCHEMA_VERSION:
        # Statement by statement: executescript() would commit the surrounding transaction.
        statement = ""
        for line in read_sql("sqlite", "schema.sql").splitlines(keepends=True):
            statement += line
            if sqlite3.complete_statement(statement):
                connection.execute(statement)
                statement = ""
    return int(version)


def ping(connection: sqlite3.Connection) -> None:
    """A trivial read of the file (its header, under a read lock): the store answers."""
    connection.execute("PRAGMA schema_version").fetchone()


def data_version(connection: sqlite3.Connection) -> int:
    """Changes whenever another connection (another process) commits."""
    (version,) = connection.execute("PRAGMA data_version").fetchone()
    return int(version)


def stored_since(connection: sqlite3.Connection, after: int) -> tuple[int, set[str], set[str]]:
    """The newest seq, and the topics and targets of the events stored after ``after``."""
    head = _head(connection)
    topics: set[str] = set()
    targets: set[str] = set()
    if head > after:
        for topic, target in connection.execute(Q["stored_topics"], {"after": after, "upto": head}):
            if target is None:
                topics.add(topic)
            else:
                targets.add(target)
    return head, topics, targets


def due(connection: sqlite3.Connection, now: float, lease: float) -> dict[str, bool]:
    """Every subscription, and whether leases of it wait to be claimed again."""
    rows = connection.execute(Q["due"], {"now": now, "latest": now + lease})
    return {name: bool(waiting) for name, waiting in rows}


def publish(connection: sqlite3.Connection, event: StoredEvent, target: str | None) -> bool:
    cursor = connection.execute(
        Q["insert_event"],
        {
            "id": event.id,
            "topic": event.topic,
            "target": target,
            "delivery_id": event.delivery_id if target is None else None,
            "time_us": event.time_us,
            "stored_at": time.time(),
            "payload": event.payload,
            "metadata": event.metadata,
        },
    )
    return cursor.rowcount == 1


def publish_many(connection: sqlite3.Connection, batch: list[Publish]) -> list[bool]:
    """Store a batch of events in order; accepted per event.

    An event is not accepted when its (topic, delivery id) is already stored (a redelivery), or
    an earlier event of the batch carries the same pair.
    """
    if len(batch) == 1 or any(target is not None for _, target in batch):
        return [publish(connection, event, target) for event, target in batch]
    events = [event for event, _ in batch]
    keyed = any(event.delivery_id for event in events)
    after = _head(connection) if keyed else 0
    now = time.time()
    connection.executemany(
        Q["insert_events"],
        [(e.id, e.topic, e.delivery_id, e.time_us, now, e.payload, e.metadata) for e in events],
    )
    if not keyed:
        return [True] * len(events)
    (found,) = connection.execute(Q["stored_deliveries"], {"after": after}).fetchone()
    stored = {(topic, delivery) for topic, delivery in orjson.loads(found)}
    accepted = []
    for event in events:
        if event.delivery_id:
            key = (event.topic, event.delivery_id)
            accepted.append(key in stored)
            stored.discard(key)
        else:
            accepted.append(True)
    return accepted


def deliver_to(connection: sqlite3.Connection, group: str, event: StoredEvent) -> None:
    if connection.execute(Q["subscription"], {"name": group}).fetchone() is None:
        raise SubscriptionError(f"no subscription {group!r} to deliver to")
    publish(connection, event, group)


def keep_dead_letter(connection: sqlite3.Connection, group: str, event: StoredEvent) -> bool:
    connection.execute(
        Q["insert_dead_letter"],
        {
            "subscription": group,
            "id": event.id,
            "topic": event.topic,
            "time_us": event.time_us,
            "payload": event.payload,
            "metadata": event.metadata,
        },
    )
    return True


def _head(connection: sqlite3.Connection) -> int:
    (head,) = connection.execute(Q["head"]).fetchone()
    return int(head)


def _start_position(connection: sqlite3.Connection, start: Start) -> int:
    if start == "beginning":
        return 0
    if isinstance(start, datetime):
        (first,) = connection.execute(Q["first_since"], {"since": start.timestamp()}).fetchone()
        if first is not None:
            return int(first) - 1
    return _head(connection)


def join(
    connection: sqlite3.Connection,
    group: str,
    topics: Sequence[str],
    start: Start,
    owner: str | None = None,
) -> bool:
    """``SqlStore.join``: looked up, then created or updated (the write lock is held)."""
    now = time.time()
    encoded = json.dumps(sorted(set(topics)))
    row = connection.execute(Q["subscription"], {"name": group}).fetchone()
    if row is None:
        position = _start_position(connection, start)
        connection.execute(
            Q["insert_subscription"],
            {"name": group, "topics": encoded, "position": position, "now": now, "owner": owner},
        )
        return True
    if owner is not None:
        connection.execute(Q["claim_owner"], {"name": group, "owner": owner})
    if row[0] != encoded:
        connection.execute(Q["update_topics"], {"name": group, "topics": encoded, "now": now})
    return False


def claim(
    connection: sqlite3.Connection,
    group: str,
    consumer: str,
    limit: int,
    lease: float,
    clock: Callable[[], float] = time.time,
) -> list[Delivery]:
    """Lease up to ``limit`` events of the group: those handed back first, then new ones.

    Leases are times of ``clock`` (the wall clock, which every process on the machine shares).
    One that ends more than ``lease`` from now was written before the clock moved back (by a
    process restarted with its clock behind, say) and is taken as run out: trusted, it would
    hold its event for as long as the clock was off.
    """
    row = connection.execute(Q["subscription"], {"name": group}).fetchone()
    if row is None:
        raise SubscriptionError(f"subscription {group!r} no longer exists")
    topics, position = row
    now = clock()
    expires_at = now + lease
    attempts: dict[int, int] = dict(
        connection.execute(
            Q["reclaim"],
            {
                "group": group,
                "consumer": consumer,
                "expires_at": expires_at,
                "now": now,
                "limit": limit,
            },
        ).fetchall()
    )
    room = limit - len(attempts)
    if room > 0:
        literals, wildcards = _literals(topics)
        (found,) = connection.execute(
            Q["fresh"],
            {
                "position": position,
                "group": group,
                "topics": topics,
                "literals": literals,
                "wildcards": wildcards,
                "limit": room,
            },
        ).fetchone()
        fresh: list[int] = orjson.loads(found)
        if fresh:
            connection.execute(
                Q["insert_leases"],
                {"group": group, "seqs": found, "consumer": consumer, "expires_at": expires_at},
            )
            for seq in fresh:
                attempts[seq] = 1
        # With fewer than asked for, everything up to the head was looked at: moving there
        # spares the next claim from reading the same non-matching events again.
        moved = fresh[-1] if len(fresh) == room else _head(connection)
        if moved > position:
            connection.execute(Q["move_position"], {"group": group, "position": moved})
    if not attempts:
        return []
    (found,) = connection.execute(
        Q["events_by_seq"], {"seqs": json.dumps(list(attempts))}
    ).fetchone()
    rows = sorted(orjson.loads(found))
    return [
        Delivery(decode_event(id, topic, time_us, payload, metadata), attempts[seq], seq)
        for seq, id, topic, time_us, payload, metadata in rows
    ]


def ack(connection: sqlite3.Connection, group: str, consumer: str, seq: int) -> bool:
    cursor = connection.execute(Q["ack"], {"group": group, "seq": seq, "consumer": consumer})
    return cursor.rowcount == 1


def ack_many(connection: sqlite3.Connection, acks: list[Ack]) -> list[bool]:
    """Delete a batch of leases ``(group, consumer, seq)``; whether each one was still held."""
    if len(acks) == 1 or len(set(acks)) != len(acks):
        return [ack(connection, group, consumer, seq) for group, consumer, seq in acks]
    encoded = orjson.dumps([(group, seq, consumer) for group, consumer, seq in acks]).decode()
    (held,) = connection.execute(Q["held_leases"], {"acks": encoded}).fetchone()
    if held != len(acks):
        # Some lease ran out or moved on: find out which, one by one.
        return [ack(connection, group, consumer, seq) for group, consumer, seq in acks]
    connection.execute(Q["ack_many"], {"acks": encoded})
    return [True] * len(acks)


def release(
    connection: sqlite3.Connection, group: str, consumer: str, seqs: Sequence[int] | None
) -> bool:
    """Hand leases of a consumer (``None``: all of them) back to the group; any?"""
    if seqs is None:
        cursor = connection.execute(Q["release"], {"group": group, "consumer": consumer})
    else:
        cursor = connection.execute(
            Q["release_some"], {"group": group, "consumer": consumer, "seqs": json.dumps(seqs)}
        )
    return cursor.rowcount > 0


def renew(
    connection: sqlite3.Connection,
    consumers: list[str],
    lease: float,
    clock: Callable[[], float] = time.time,
) -> None:
    connection.execute(
        Q["renew"], {"consumers": json.dumps(consumers), "expires_at": clock() + lease}
    )


def dead_letters(
    connection: sqlite3.Connection,
    group: str,
    ids: Sequence[str] | None,
    remove: bool,
    limit: int,
) -> list[Event]:
    rows = connection.execute(
        Q["dead_letters"],
        {
            "subscription": group,
            "ids": None if ids is None else json.dumps(list(ids)),
            "limit": limit,
        },
    ).fetchall()
    if remove and rows:
        connection.execute(Q["delete_dead_letters"], {"seqs": json.dumps([r[0] for r in rows])})
    return [decode_event(*row[1:]) for row in rows]


def delete_subscription(connection: sqlite3.Connection, group: str) -> bool:
    """Forget a subscription, its leases and its dead letters; was there anything?"""
    args = {"name": group}
    connection.execute(Q["delete_leases_of"], args)
    letters = connection.execute(Q["delete_dead_letters_of"], args).rowcount
    return bool(connection.execute(Q["delete_subscription"], args).rowcount + letters)


def backlog_state(connection: sqlite3.Connection, now: float) -> StoreState:
    """Every subscription and the seqs bounding the stored events, in one read transaction."""
    began = not connection.in_transaction
    if began:
        connection.execute("BEGIN")
    try:
        groups = [
            GroupState(
                name=name,
                topics=tuple(json.loads(topics)),
                position=position,
                lost=lost,
                owner=owner,
                in_flight=in_flight,
                returned=returned,
            )
            for name, topics, position, lost, owner, in_flight, returned in connection.execute(
                Q["subscriptions"], {"now": now}
            ).fetchall()
        ]
        head, low = connection.execute(Q["seq_bounds"]).fetchone()
    finally:
        if began:
            connection.execute("COMMIT")
    return StoreState(head=head, low=low, groups=groups)


def tally_events(
    connection: sqlite3.Connection, counts: Sequence[Span], rows: Sequence[Span], bucket: int
) -> Tally:
    """Events of seq ranges counted by bucket, topic and target; events of others one by one."""
    tallied: list[tuple[int, str, str | None, int]] = []
    for after, upto in counts:
        tallied += connection.execute(
            Q["tally_events"], {"after": after, "upto": upto, "bucket": bucket}
        ).fetchall()
    listed: list[tuple[int, str, str | None]] = []
    for after, upto in rows:
        listed += connection.execute(Q["events_between"], {"after": after, "upto": upto}).fetchall()
    return Tally(counts=tallied, rows=listed)


def expire_range(connection: sqlite3.Connection, policy: RetentionPolicy) -> RetentionRange | None:
    """Where a retention pass deletes (``SqlStore.expire_range``): index lookups only."""
    now = time.time()
    old, young, count = connection.execute(
        Q["expire_range"],
        {"old": now - policy.max_age, "young": now - policy.min_age, "max_count": policy.max_count},
    ).fetchone()
    return RetentionRange.bound(old, young, count)


def expire(
    connection: sqlite3.Connection, policy: RetentionPolicy, bounds: RetentionRange, after: int
) -> Expired:
    """Delete the next batch of a retention pass (``SqlStore.expire``).

    It reads a window of ``batch_size`` events of the primary key after ``after``, the
    subscriptions behind it and their leases in it: nothing of the events it keeps.
    """
    now = time.time()
    (end,) = connection.execute(
        Q["expire_window"], {"after": after, "skip": policy.batch_size - 1}
    ).fetchone() or (None,)
    upto = bounds.upto if end is None else min(end, bounds.upto)
    rows: list[Doomed] = sorted(
        connection.execute(
            Q["expire"],
            {
                "after": after,
                "upto": upto,
                "edge": bounds.edge,
                "old": now - policy.max_age,
                "young": now - policy.min_age,
            },
        ).fetchall()
    )
    resume = upto if upto < bounds.upto else None
    if not rows:
        return Expired(0, {}, resume)
    behind = connection.execute(Q["behind_positions"], {"last": upto}).fetchall()
    lost = unreceived(
        rows, [(name, _matcher(topics), position) for name, topics, position in behind]
    )
    seqs = json.dumps([seq for seq, _, _ in rows])
    dropped = connection.execute(Q["drop_leases"], {"after": after, "last": upto, "seqs": seqs})
    lost.update(name for (name,) in dropped)
    for name, count in lost.items():
        connection.execute(Q["add_lost"], {"name": name, "lost": count, "now": now})
    return Expired(len(rows), dict(lost), resume)


# -- reading the store (``EventLog``) ---------------------------------------------------------

_FAR = 1e18


def _stored(row: Sequence[object]) -> LoggedEvent:
    seq, id, topic, target, time_us, stored_at, payload, metadata = row
    return LoggedEvent(
        decode_event(str(id), str(topic), int(str(time_us)), str(payload), metadata),
        int(str(seq)),
        eventlog.from_unix(float(str(stored_at))),
        None if target is None else str(target),
    )


def find_events(connection: sqlite3.Connection, query: EventQuery) -> EventPage:
    """``EventLog.find_events``: a backward walk of the primary key from the cursor."""
    if query.dead_letters:
        return _find_dead_letters(connection, query)
    if query.event_id is not None:
        rows = connection.execute(Q["events_with_id"], {"id": query.event_id}).fetchall()
        found = [e for e in map(_stored, rows) if eventlog.selected(query, e)]
        events, after = eventlog.page_of(found, query.limit)
        return EventPage(events, after)
    before, low = eventlog.cursor(query), eventlog.floor(query)
    since = -_FAR if query.since is None else query.since.timestamp()
    until = _FAR if query.until is None else query.until.timestamp()
    if query.since is not None:
        first = connection.execute(
            Q["first_stored_since"], {"since": since - eventlog.SLACK}
        ).fetchone()
        if first is None:
            return EventPage((), None)
        low = max(low, first[0])
    if query.until is not None:
        last = connection.execute(
            Q["last_stored_before"], {"until": until + eventlog.SLACK}
        ).fetchone()
        if last is None:
            return EventPage((), None)
        before = min(before, last[0] + 1)
    topics = eventlog.TopicFilter.of(query.topics)
    rows = connection.execute(
        Q["find_events"],
        {
            "before": before,
            "low": low,
            "since": since,
            "until": until,
            "every": topics.every,
            "literals": topics.literals,
            "wildcards": topics.wildcards,
            "topics": topics.topics,
            "limit": query.limit + 1,
        },
    ).fetchall()
    events, after = eventlog.page_of([_stored(row) for row in rows], query.limit)
    return EventPage(events, after)


def _find_dead_letters(connection: sqlite3.Connection, query: EventQuery) -> EventPage:
    topics = eventlog.TopicFilter.of(query.topics)
    rows = connection.execute(
        Q["find_dead_letters"],
        {
            "before": eventlog.cursor(query),
            "after": eventlog.floor(query),
            "since_us": -(2**62) if query.since is None else _micros(query.since),
            "until_us": 2**62 if query.until is None else _micros(query.until),
            "id": query.event_id,
            "literals": topics.literals,
            "wildcards": topics.wildcards,
            "topics": topics.topics,
            "limit": query.limit + 1,
        },
    ).fetchall()
    found = []
    for seq, subscription, *columns in rows:
        letter = decode_event(*columns)
        found.append(LoggedEvent(letter, seq, letter.time, subscription))
    events, after = eventlog.page_of(found, query.limit)
    return EventPage(events, after)


def _micros(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000)


def event_facts(connection: sqlite3.Connection, event_id: str, now: float) -> eventlog.EventFacts:
    """What the store holds about an event id, in one read transaction."""
    began = not connection.in_transaction
    if began:
        connection.execute("BEGIN")
    try:
        events = [_stored(r) for r in connection.execute(Q["events_with_id"], {"id": event_id})]
        origins = [
            eventlog.Origin(name, tuple(json.loads(topics)), position, eventlog.from_unix(made))
            for name, topics, position, made in connection.execute(Q["subscription_origins"])
        ]
        leases: list[eventlog.Lease] = []
        for seq, groups in eventlog.readers(events, origins).items():
            if not groups:
                continue
            for group, consumer, expires_at, attempt in connection.execute(
                Q["leases_of"], {"groups": json.dumps(groups), "seq": seq}
            ):
                held = consumer is not None and expires_at > now
                leases.append(
                    eventlog.Lease(
                        group, seq, consumer, eventlog.from_unix(expires_at), attempt, held
                    )
                )
        letters = [
            DeadLetter.from_event(decode_event(*row[1:]))
            for row in connection.execute(Q["dead_letters_naming"], {"id": event_id})
        ]
    finally:
        if began:
            connection.execute("COMMIT")
    return eventlog.EventFacts(events, origins, leases, letters)
