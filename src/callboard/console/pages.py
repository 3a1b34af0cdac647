"""What the console's pages show, read from the broker's operations and its event log.

Plain data for the templates: no HTTP here. A broker that offers no operations
(``BrokerAdmin``) or cannot search its events (``EventLog``) gives views that say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import urlencode

from callboard.brokers.base import (
    BrokerAdmin,
    EventLog,
    EventQuery,
    Outcome,
    StoredEvent,
    SubscriptionInfo,
)
from callboard.deadletters import DeadLetter, read_dead_letters
from callboard.deadletters import redrive as redrive_letters
from callboard.errors import InvalidTopicError

NO_OPERATIONS = (
    "this broker offers no operations (it does not implement BrokerAdmin): it lists no "
    "subscriptions and keeps no dead letters; use sqlite:///... or postgresql://... in "
    "events.broker"
)
NO_LOG = (
    "this broker keeps no searchable history (it does not implement EventLog): use "
    "sqlite:///... or postgresql://... in events.broker to search stored events"
)
PAGE_SIZE = 50
#: Dead letters shown for one subscription.
DEAD_LETTER_LIMIT = 500
#: Events counted before a replay, at most.
COUNT_LIMIT = 1000


class Refused(Exception):
    """A request the console answers with a page naming the problem, and ``status``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


def parse_moment(text: str, name: str) -> datetime | None:
    """A time from a form (``2026-12-05T10:30``, UTC unless it says otherwise), or ``None``."""
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Refused(400, f"{name}: {text!r} is not a time such as 2026-12-05T10:30") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclass(frozen=True, slots=True)
class Search:
    """The events page: the query as typed, and what it found (or why it could not search)."""

    topic: str = ""
    since: str = ""
    until: str = ""
    id: str = ""
    events: tuple[StoredEvent, ...] = ()
    next: int | None = None
    paged: bool = False
    problem: str | None = None
    unavailable: str | None = None

    def first_query(self) -> str:
        """The query string of this search's first page."""
        fields = {"topic": self.topic, "since": self.since, "until": self.until, "id": self.id}
        return urlencode({k: v for k, v in fields.items() if v})

    def next_query(self) -> str:
        """The query string of the page after this one."""
        return urlencode({"before": self.next}) + "&" + self.first_query()


async def search_events(broker: object, params: Mapping[str, str]) -> Search:
    def typed(name: str) -> str:
        return params.get(name, "").strip()

    form = Search(typed("topic"), typed("since"), typed("until"), typed("id"))
    if not isinstance(broker, EventLog):
        return replace(form, unavailable=NO_LOG)
    before = params.get("before", "")
    try:
        query = EventQuery(
            topics=tuple(form.topic.replace(",", " ").split()),
            since=parse_moment(form.since, "since"),
            until=parse_moment(form.until, "until"),
            event_id=form.id or None,
            before=int(before) if before.isdigit() else None,
            limit=PAGE_SIZE,
        )
    except Refused as refusal:
        return replace(form, problem=refusal.message)
    except (InvalidTopicError, ValueError) as error:
        return replace(form, problem=str(error))
    page = await broker.find_events(query)
    return replace(form, events=page.events, next=page.next, paged=query.before is not None)


@dataclass(frozen=True, slots=True)
class EventDetail:
    """An event's page: the stored event and each subscription's outcome."""

    id: str
    log: bool
    stored: StoredEvent | None = None
    outcomes: tuple[Outcome, ...] = ()


async def event_detail(broker: object, event_id: str) -> EventDetail:
    if not isinstance(broker, EventLog):
        return EventDetail(event_id, log=False)
    page = await broker.find_events(EventQuery(event_id=event_id, limit=1))
    stored = page.events[0] if page.events else None
    outcomes = tuple(await broker.event_outcomes(event_id)) if stored is not None else ()
    return EventDetail(event_id, log=True, stored=stored, outcomes=outcomes)


@dataclass(frozen=True, slots=True)
class SubscriptionRow:
    info: SubscriptionInfo
    #: Consumers of it running in this server (its events service's workers, a bus reader).
    consumers: int


async def subscription_rows(
    admin: BrokerAdmin | None, consumers: Mapping[str, int]
) -> list[SubscriptionRow]:
    if admin is None:
        raise Refused(501, NO_OPERATIONS)
    infos = sorted(await admin.subscriptions(), key=lambda info: info.name)
    return [SubscriptionRow(info, consumers.get(info.name, 0)) for info in infos]


async def count_since(broker: object, topics: Sequence[str], since: datetime) -> str | None:
    """How many kept events a replay since ``since`` would deliver, as far as the log says."""
    if not isinstance(broker, EventLog) or not topics:
        return None
    page = await broker.find_events(
        EventQuery(topics=tuple(topics), since=since, limit=COUNT_LIMIT)
    )
    count = len(page.events)
    return f"{count}+" if page.next is not None else str(count)


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """The dead-letters page: every subscription, and the letters of the chosen one."""

    subscriptions: tuple[str, ...] = ()
    chosen: str | None = None
    letters: tuple[DeadLetter, ...] = ()
    unavailable: str | None = None
    counts: dict[str, int] = field(default_factory=dict)


async def dead_letter_view(admin: BrokerAdmin | None, chosen: str | None) -> DeadLetterView:
    if admin is None:
        return DeadLetterView(unavailable=NO_OPERATIONS)
    names = tuple(sorted(info.name for info in await admin.subscriptions()))
    counts = {}
    for name in names:
        counts[name] = len(await admin.take_dead_letters(name, limit=DEAD_LETTER_LIMIT))
    if chosen is None:
        chosen = next((name for name in names if counts[name]), None)
    letters: tuple[DeadLetter, ...] = ()
    if chosen is not None:
        found = await read_dead_letters(admin, chosen, limit=DEAD_LETTER_LIMIT)
        letters = tuple(sorted(found, key=lambda letter: letter.failed_at, reverse=True))
    return DeadLetterView(names, chosen, letters, counts=counts)


async def redrive(admin: BrokerAdmin, subscription: str, ids: Sequence[str] | None) -> int:
    """Deliver dead letters of ``subscription`` again: those of ``ids``, or all."""
    names = {info.name for info in await admin.subscriptions()}
    if subscription not in names:
        raise Refused(404, f"no subscription {subscription!r}")
    return await redrive_letters(admin, subscription, ids)
