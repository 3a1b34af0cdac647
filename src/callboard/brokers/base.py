"""The broker contract: what every transport behind the events service provides.

A broker keeps events per topic and hands them to consumer groups. A group is named by the
subscription id: every consumer in one group shares the group's events (each event to one of
them), and every group gets every event on its topics. A consumer acknowledges an event once
the handler is done with it; an event fetched and never acknowledged (the consumer crashed or
was closed) is delivered again. Retrying and dead-lettering are not the broker's business: the
events service does both the same way for every broker (``callboard.delivery``).

Dead letters are ordinary events on the reserved topic ``$deadletter.<subscription id>``; a
broker keeps them until they are taken, so they can be listed and redriven.

A durable broker keeps published events for a bounded window (``RetentionPolicy``); the delivery
ids it uses to recognise redeliveries are kept for the same window. A subscription that had not
yet received events the window dropped is reported (``SubscriptionInfo.behind``), never silently
moved on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from callboard.events import Event
from callboard.topics import normalize_patterns

#: Where a new consumer group starts reading: only events published from now on (``"end"``),
#: everything the broker still holds (``"beginning"``), or everything since a moment.
Start: TypeAlias = Literal["end", "beginning"] | datetime

DEAD_LETTER_PREFIX = "$deadletter."

#: The owner of the consumer groups the events service runs in its own process (modules'
#: subscriptions). Bus callers are recorded as ``<type>=<subject>``, which never equals it.
IN_PROCESS = "in-process"

#: The longest subscription id, event id or topic accepted (Backstage keeps them in
#: ``varchar(255)`` columns).
MAX_NAME_LENGTH = 255


def name_problem(name: str, what: str = "a subscription id") -> str | None:
    """Why ``name`` cannot name a subscription (or an event), or ``None`` when it can.

    A name is 1 to ``MAX_NAME_LENGTH`` printable characters. NUL and other control characters
    are refused everywhere alike: PostgreSQL cannot store a NUL in ``text`` while SQLite can, so
    letting one through would make a name valid on one broker and broken on another.
    """
    if not name:
        return f"{what} must not be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"{what} must be at most {MAX_NAME_LENGTH} characters, not {len(name)}"
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return f"{what} must hold only printable characters, not {bad!a}"
    return None


def dead_letter_topic(group: str) -> str:
    """The topic on which a subscription's dead letters are kept."""
    return DEAD_LETTER_PREFIX + group


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a broker can do beyond the contract every broker meets."""

    #: Events survive the process (and, for a server, a restart of the server).
    durable: bool = False
    #: Several processes can share one consumer group. What a consumer fetched is leased to it
    #: while it lives and comes back to the group when its process dies; a group deleted by
    #: another process is noticed at the next fetch.
    shared: bool = False
    #: A new group can start from the beginning or from a time.
    replay: bool = False


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long a durable broker keeps published events (Backstage's defaults).

    An event younger than ``min_age`` is never deleted; beyond the newest ``max_count`` events
    older ones are deleted; anything older than ``max_age`` is deleted whatever the count. Dead
    letters are not events of the window: they are kept until taken.
    """

    #: Seconds an event is kept whatever the count.
    min_age: float = 600.0
    #: Seconds after which an event is deleted whatever the count.
    max_age: float = 86_400.0
    #: Events kept beyond ``min_age``, the newest first.
    max_count: int = 10_000
    #: Seconds between two cleanups.
    interval: float = 60.0
    #: Events deleted per transaction, so a cleanup never holds up publishing for long.
    batch_size: int = 1_000

    def __post_init__(self) -> None:
        if self.min_age < 0 or self.max_age <= 0 or self.max_count < 0:
            raise ValueError("RetentionPolicy ages must be positive and max_count not negative")
        if self.interval <= 0 or self.batch_size < 1:
            raise ValueError("RetentionPolicy.interval and batch_size must be positive")


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    """A consumer group as the broker sees it, for operations."""

    name: str
    topics: tuple[str, ...]
    #: Events handed to a consumer and not acknowledged yet.
    in_flight: int
    #: Events waiting for the group, not handed out yet.
    backlog: int
    #: Events the retention window deleted before the group received them (0 for a
    #: group that has kept up).
    lost: int = 0
    #: Who may read the group over the bus: ``IN_PROCESS`` for the events service's own
    #: subscriptions, the bus caller that made it (``service=<subject>``), or ``None`` when no
    #: owner was recorded (made before owners were, or by a tool).
    owner: str | None = None

    @property
    def behind(self) -> bool:
        """The group fell behind the retained window and missed events."""
        return self.lost > 0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event handed to one consumer, to be acknowledged when handled."""

    event: Event
    #: How many times the broker has handed this event to the group, this time included.
    attempt: int = 1
    #: The broker's own handle for acknowledging; opaque to everyone else.
    token: object = None


class Consumer(Protocol):
    """One member of a consumer group."""

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        """Wait until at least one event is available and return up to ``max_count`` of them.

        Returns an empty sequence once the consumer is closed. While the broker's store is
        unreachable it keeps waiting (and logging) rather than raising, so a subscription rides
        out an outage. Cancelling a fetch loses nothing: events it had already taken are returned
        by the next fetch.
        """
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """The events are handled: never deliver them to this group again.

        Deliveries acknowledged together are recorded together where the broker can. An
        acknowledgement that cannot be recorded (the store stayed unreachable, or the lease
        expired and another consumer took the event) is dropped with a warning; the event is
        then delivered again, which at-least-once delivery allows. Deliveries this consumer does
        not hold (already acknowledged or released) are ignored.
        """
        ...

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back to the group unhandled, without counting a failure.

        They are delivered again (to this consumer or another member), as soon as possible and
        before newer events where the broker keeps an order; their ``attempt`` still grows by
        one. Deliveries this consumer does not hold (already acknowledged or released, or held by
        another member) are ignored.
        """
        ...

    async def close(self) -> None:
        """Leave the group; events fetched and not acknowledged go back to the group."""
        ...


class Broker(Protocol):
    """The transport behind the events service, chosen by URL (``memory://``, ``sqlite:///...``).

    This is all the events service needs. What operators do (list and delete subscriptions,
    dead letters, retention, migrations) is ``BrokerAdmin``, which the brokers of callboard also
    implement.
    """

    @property
    def capabilities(self) -> Capabilities: ...

    async def start(self) -> None:
        """Connect, create or check the schema, start background work. Idempotent."""
        ...

    async def close(self) -> None:
        """Stop; consumers still open hand their events back. Idempotent."""
        ...

    async def publish(self, event: Event) -> bool:
        """Store the event (for a durable broker, on disk) and return ``True``.

        Returns ``False`` without storing when an event with the same delivery id
        (``Event.delivery_id``) was already accepted on the same topic within the broker's
        redelivery window. Raises ``InvalidEventError`` for an event no broker can keep (it is
        never retried) and ``BrokerUnavailable`` when the event could not be accepted now. An
        event on ``$deadletter.<group>`` is kept as a dead letter of that group.
        """
        ...

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> Consumer:
        """Join (or create) the consumer group ``group`` reading ``topics`` (patterns).

        ``start`` applies when the group is created; a durable group that already exists resumes
        where it was, whatever ``start`` says. ``owner`` is recorded when the group is created or
        has no owner yet; an owner once recorded is kept (``SubscriptionInfo.owner``) until the
        group is deleted, so every server sharing the broker sees the same one.
        """
        ...


@runtime_checkable
class BrokerAdmin(Protocol):
    """The operations on a broker: what ``callboard subscriptions``, ``dead-letters``,
    ``replay`` and ``migrate``, the bus's subscription routes and retention use."""

    async def subscriptions(self) -> list[SubscriptionInfo]:
        """Every consumer group the broker holds, by name."""
        ...

    async def delete_subscription(self, group: str) -> bool:
        """Forget the consumer group ``group``: its position, its leases and its dead letters.

        Events stay (other groups read them). Raises ``SubscriptionError`` while a consumer of
        this broker still reads the group (close it first); consumers in other processes find
        the group gone at their next fetch. Returns whether there was anything to forget.
        """
        ...

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        """The dead letters of ``group``, oldest first; with ``remove`` they are taken away."""
        ...

    async def deliver_to(self, group: str, event: Event) -> None:
        """Hand an event to one group only, whatever its topic (redriving, replaying)."""
        ...

    async def clean(self) -> int:
        """Apply the retention policy now; the number of events deleted (0 without one)."""
        ...

    async def migrate(self) -> list[str]:
        """Create or upgrade the broker's schema; what was applied (``[]``: up to date or none).

        May be called on a broker that was not started.
        """
        ...


@runtime_checkable
class BrokerHealth(Protocol):
    """Whether the broker's engine answers now: what ``/readyz`` asks a started broker.

    Apart from ``Broker``, so a broker without an engine to lose (memory) need not implement
    it: a broker that does not is taken as always healthy.
    """

    async def check(self) -> None:
        """Return when the engine answers; raise ``BrokerUnavailable`` otherwise.

        Cheap (a ping, a trivial statement), never waiting longer than the broker's own
        timeout, and it changes nothing. The error names the engine and what failed (``Redis at
        redis://cache:6379/0 did not answer PING: ...``); once the engine answers again, the
        next check passes without the broker being restarted. A broker that is not started (or
        was closed) fails the check.
        """
        ...


#: The most events one ``EventPage`` holds.
MAX_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Which stored events ``EventLog.find_events`` returns, newest first.

    Dead letters are not events of the log: they are returned only when every pattern names
    the reserved prefix (``$deadletter.orders``, ``$deadletter.>``), and then nothing else is.
    """

    #: Topic patterns (``github.*``, ``gitlab.>``, ``plain``); empty: every topic.
    topics: tuple[str, ...] = ()
    #: Stored at or after this moment.
    since: datetime | None = None
    #: Stored before this moment.
    until: datetime | None = None
    #: Exactly this event id.
    event_id: str | None = None
    #: Only events with a smaller sequence number: the ``next`` of the previous page.
    before: int | None = None
    #: Only events with a greater sequence number: what came after the newest one seen.
    after: int | None = None
    #: The most events returned, 1 to ``MAX_PAGE``.
    limit: int = 50

    def __post_init__(self) -> None:
        if isinstance(self.topics, str):
            raise ValueError("EventQuery.topics is a sequence of patterns, not one string")
        patterns = normalize_patterns(tuple(self.topics)) if self.topics else ()
        object.__setattr__(self, "topics", patterns)
        if not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"EventQuery.limit must be 1 to {MAX_PAGE}, not {self.limit}")
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"EventQuery.{name} must be timezone-aware")
        letters = [p.startswith(DEAD_LETTER_PREFIX) for p in patterns]
        if any(letters) and not all(letters):
            raise ValueError(
                "dead letters are kept apart from events: query $deadletter.* patterns alone"
            )

    @property
    def dead_letters(self) -> bool:
        """The query reads dead letters: every pattern names ``$deadletter.``."""
        return bool(self.topics) and self.topics[0].startswith(DEAD_LETTER_PREFIX)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as a store keeps it: its number in publish order and when it was stored."""

    event: Event
    #: The store's sequence number; a later publish has a greater one.
    seq: int
    stored_at: datetime
    #: The only subscription that receives it (a redriven dead letter, a replayed event).
    target: str | None = None


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of stored events, newest first."""

    events: tuple[StoredEvent, ...]
    #: ``EventQuery.before`` for the next page; ``None`` when there is none.
    next: int | None


#: Where an event stands for one subscription.
OutcomeState: TypeAlias = Literal[
    "delivered", "in_flight", "pending", "dead_lettered", "not_subscribed"
]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of a stored event for one subscription (consumer group).

    ``delivered``: its position is past the event and no lease of it is left. ``in_flight``:
    leased to ``consumer`` until ``lease_until``. ``pending``: not reached yet, or handed back
    and waiting to be delivered again (``attempt`` deliveries so far). ``dead_lettered``: given
    up on (``error``, ``attempt`` attempts; ``dead_letter_id`` redrives it).
    ``not_subscribed``: the subscription was made after the event was stored.
    """

    subscription: str
    state: OutcomeState
    #: Deliveries made so far, or the attempts made before dead-lettering; 0: none known.
    attempt: int = 0
    consumer: str | None = None
    lease_until: datetime | None = None
    error: str | None = None
    failed_at: datetime | None = None
    dead_letter_id: str | None = None


@runtime_checkable
class EventLog(Protocol):
    """Reading a durable broker's stored events: what ``callboard events`` and ``tail`` use.

    Apart from ``BrokerAdmin``, so a broker that cannot search its events meets the rest.
    """

    async def find_events(self, query: EventQuery) -> EventPage:
        """The stored events ``query`` selects, newest first; indexed, whatever the store's size."""
        ...

    async def event_outcomes(self, event_id: str) -> list[Outcome]:
        """Per subscription reading the event's topic (and any it was delivered to alone), by
        name, what became of it; ``[]`` when nothing of it is stored any more."""
        ...


class BrokerFactory(Protocol):
    """Builds a broker from its URL: what the ``callboard.brokers`` entry points name.

    A package adds a broker for the scheme ``foo://`` by declaring, in its ``pyproject.toml``::

        [project.entry-points."callboard.brokers"]
        foo = "foo_broker:FooBroker.from_url [foo]"

    (the extra in brackets, optional, is named in the error when the driver is missing). Raise
    ``ConfigError`` (key ``events.broker``) for a URL the broker cannot use. ``docs/brokers.md``
    says what a broker must do and how to run the contract suite against it.
    """

    def __call__(self, url: str, *, retention: RetentionPolicy | None = None) -> Broker: ...
