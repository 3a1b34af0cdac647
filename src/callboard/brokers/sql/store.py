"""What a SQL database gives the SQL broker: its statements and its connections, nothing more.

The domain (consumer groups, leases and their renewal, retry bookkeeping, dead letters, retention
and its lost accounting, group commit, wake-ups of this process's consumers) is ``SqlBroker``'s,
the same for every database. A store runs each operation in a transaction of its database and
turns driver errors into callboard's (``BrokerUnavailable``: unreachable, try again later;
``BrokerError``: refused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from callboard.brokers.base import Delivery, EventPage, EventQuery, RetentionPolicy, Start
from callboard.brokers.sql import Expired, StoredEvent
from callboard.brokers.sql.backlog import Span, StoreState, Tally
from callboard.brokers.sql.eventlog import EventFacts
from callboard.brokers.sql.retention import RetentionRange
from callboard.events import Event

#: Wakes this process's consumers reading ``topics`` (``None``: every consumer) or in ``groups``.
Wake = Callable[[Iterable[str] | None, Iterable[str]], None]

#: An event to store and the only group that receives it (``None``: every group reading its
#: topic).
Publish = tuple[StoredEvent, str | None]

#: An acknowledgement: ``(group, consumer, seq)``.
Ack = tuple[str, str, int]


class SqlStore(Protocol):
    """One database behind a ``SqlBroker``."""

    #: Says which store this is in messages: ``the SQLite broker on cb.db``.
    label: str

    #: How long one batch of a retention pass should take (what arrives meanwhile waits for
    #: it: SQLite has one writer, PostgreSQL shares its CPU and WAL); ``None``: batches of
    #: ``RetentionPolicy.batch_size``. Batches never exceed ``batch_size``.
    retention_step: float | None

    async def open(self) -> None:
        """Connect. ``BrokerUnavailable`` when the database cannot be reached."""
        ...

    async def close(self) -> None:
        """Finish what was submitted and disconnect."""
        ...

    async def migrate(self) -> list[str]:
        """Create or upgrade the schema; what was applied. Opens and closes if not open."""
        ...

    async def check(self) -> None:
        """Run a trivial statement: ``BrokerUnavailable``, naming the database, when it does not
        answer within the store's own timeout (``BrokerHealth``). Changes nothing."""
        ...

    async def insert_events(self, batch: list[Publish]) -> list[bool | BaseException]:
        """Store a batch in order, in one transaction; per event, accepted (``False``: a known
        delivery id on its topic, or an earlier one of the batch) or the error refusing it."""
        ...

    async def keep_dead_letter(self, group: str, event: StoredEvent) -> None: ...

    async def deliver_to(self, group: str, event: StoredEvent) -> None:
        """Store an event for one group; ``SubscriptionError`` when there is no such group."""
        ...

    async def join(
        self, group: str, patterns: Sequence[str], start: Start, owner: str | None
    ) -> bool:
        """Create the group at ``start``, or point an existing one at ``patterns``; created?

        ``owner`` is recorded on a new group and on one that has none yet, never replacing one.
        """
        ...

    async def claim(self, group: str, consumer: str, limit: int, lease: float) -> list[Delivery]:
        """Lease up to ``limit`` events to ``consumer``: those handed back or run out first, then
        new ones; oldest first, ``Delivery.token`` the event's seq. ``SubscriptionError`` once
        the group is gone."""
        ...

    async def ack(self, batch: list[Ack]) -> list[bool]:
        """Delete the leases; per item, whether its consumer still held it."""
        ...

    async def release(self, group: str, consumer: str, seqs: Sequence[int] | None) -> bool:
        """Hand leases of ``consumer`` back to the group at once (``None``: all of them), to be
        claimed again before newer events with their attempt grown by one; any handed back?"""
        ...

    async def renew(self, consumers: list[str], lease: float) -> None:
        """Push the deadline of every lease the live ``consumers`` hold to a lease from now."""
        ...

    async def due(self, lease: float) -> dict[str, bool]:
        """Every group, and whether events of it wait to be claimed again (leases handed back
        or run out; a lease ending more than ``lease`` from now counts as run out)."""
        ...

    async def dead_letters(
        self, group: str, ids: Sequence[str] | None, remove: bool, limit: int
    ) -> list[Event]: ...

    async def backlog_state(self) -> StoreState:
        """Every subscription (position, topics, lease counts), then the newest and the oldest
        stored seq; O(subscriptions), off the event loop."""
        ...

    async def tally_events(
        self, counts: Sequence[Span], rows: Sequence[Span], bucket: int
    ) -> Tally:
        """Count the events of the ``counts`` seq ranges by ``(seq - 1) // bucket``, topic and
        target, and list those of the ``rows`` ranges; range reads of the key, off the loop."""
        ...

    async def delete_subscription(self, group: str) -> bool:
        """Forget a group, its leases and its dead letters; was there anything?"""
        ...

    async def expire_range(self, policy: RetentionPolicy) -> RetentionRange | None:
        """Where a retention pass deletes, found without reading what it keeps (an index
        lookup and the count edge); ``None`` when nothing is outside the window."""
        ...

    async def expire(
        self, policy: RetentionPolicy, bounds: RetentionRange, after: int
    ) -> Expired | None:
        """Delete the next batch of the pass: of the ``policy.batch_size`` events after seq
        ``after`` (a window of the primary key, cut at ``bounds.upto``), those the policy no
        longer keeps, each one's age checked again; in a transaction of its own, off the loop.
        ``Expired.resume`` says where the next batch starts; ``None`` when another process is
        at it."""
        ...

    async def find_events(self, query: EventQuery) -> EventPage:
        """``EventLog.find_events``, off the event loop (``sql/eventlog.py``)."""
        ...

    async def event_facts(self, event_id: str) -> EventFacts:
        """What the store holds about an event id, in one read transaction."""
        ...

    async def watch(self, wake: Wake) -> None:
        """Wake consumers on what other processes commit, until cancelled."""
        ...
