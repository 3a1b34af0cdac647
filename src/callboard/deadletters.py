"""Dead letters: events a subscription gave up on, kept with the reason.

A broker keeps them as events on ``$deadletter.<subscription>``; ``read_dead_letters`` and
``redrive`` are the two things done with them, over any broker's operations (``BrokerAdmin``):
the events service, the bus and the ``callboard dead-letters`` command all use these.

A module that takes messages in from outside (an inbound bridge) keeps those it can never publish
through a ``DeadLetterSink``, which the events service is: the module names the source the dead
letters are listed under, and never reaches the broker itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from callboard.brokers.base import BrokerAdmin, dead_letter_topic
from callboard.errors import ModuleError
from callboard.events import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_SUBSCRIPTION,
    DEAD_LETTER_TOPIC,
    Event,
    utc_now,
)

logger = logging.getLogger("callboard.events")

DEAD_LETTER_EVENT_ID = "callboard-event-id"
DEAD_LETTER_EVENT_TIME = "callboard-event-time"
_DEAD_LETTER_KEYS = frozenset(
    {
        DEAD_LETTER_ATTEMPTS,
        DEAD_LETTER_ERROR,
        DEAD_LETTER_SUBSCRIPTION,
        DEAD_LETTER_TOPIC,
        DEAD_LETTER_EVENT_ID,
        DEAD_LETTER_EVENT_TIME,
    }
)


def _parse_time(value: object, default: datetime) -> datetime:
    try:
        return datetime.fromisoformat(str(value)) if value else default
    except ValueError:
        return default


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that ``subscription`` failed to handle ``attempts`` times; ``error`` says why."""

    id: str
    subscription: str
    event: Event
    error: str
    attempts: int
    failed_at: datetime

    @classmethod
    def from_event(cls, letter: Event) -> DeadLetter:
        meta = letter.metadata
        original = Event(
            topic=str(meta.get(DEAD_LETTER_TOPIC, "")),
            payload=letter.payload,
            metadata={k: v for k, v in meta.items() if k not in _DEAD_LETTER_KEYS},
            id=str(meta.get(DEAD_LETTER_EVENT_ID, letter.id)),
            time=_parse_time(meta.get(DEAD_LETTER_EVENT_TIME), letter.time),
        )
        return cls(
            id=letter.id,
            subscription=str(meta.get(DEAD_LETTER_SUBSCRIPTION, "")),
            event=original,
            error=str(meta.get(DEAD_LETTER_ERROR, "")),
            attempts=int(str(meta.get(DEAD_LETTER_ATTEMPTS, "0"))),
            failed_at=letter.time,
        )


@runtime_checkable
class DeadLetterSink(Protocol):
    """Where a module keeps what it can never publish (``DefaultEventsService`` is one).

    The events service refuses the reserved ``$deadletter.`` topics on ``publish``; this is the
    one way in for a module. ``source`` names the dead letters (``awsSqs.orders``): they are
    listed and counted under that name as a subscription's are.
    """

    async def dead_letter(self, source: str, event: Event, reason: str) -> None: ...


def require_sink(events: object, module: str) -> DeadLetterSink:
    """``events`` as a ``DeadLetterSink``; a ``ModuleError`` naming ``module`` if it is not one."""
    if not isinstance(events, DeadLetterSink):
        raise ModuleError(
            module,
            f"keeps the messages it cannot publish as dead letters, and the events service it "
            f"was started with ({type(events).__name__}) cannot keep them: run it on "
            "callboard's events service (DefaultEventsService, or RecordingEventsService in "
            "tests)",
        )
    return events


def reason_of(error: BaseException) -> str:
    """How a dead letter states the failure: the exception's type and message."""
    return f"{type(error).__name__}: {error}"


def dead_letter_event(
    subscription: str, event: Event, error: BaseException | str, attempts: int
) -> Event:
    """The event to publish on the subscription's dead-letter topic; ``error`` is the failure,
    or the reason already stated."""
    reason = error if isinstance(error, str) else reason_of(error)
    return Event(
        topic=dead_letter_topic(subscription),
        payload=event.payload,
        metadata={
            **event.metadata,
            DEAD_LETTER_ERROR: reason[:2000],
            DEAD_LETTER_ATTEMPTS: str(attempts),
            DEAD_LETTER_SUBSCRIPTION: subscription,
            DEAD_LETTER_TOPIC: event.topic,
            DEAD_LETTER_EVENT_ID: event.id,
            DEAD_LETTER_EVENT_TIME: event.time.isoformat(),
        },
        time=utc_now(),
    )


async def read_dead_letters(
    admin: BrokerAdmin, subscription: str, *, limit: int = 100
) -> list[DeadLetter]:
    """The dead letters of a subscription, oldest first."""
    letters = await admin.take_dead_letters(subscription, limit=limit)
    return [DeadLetter.from_event(letter) for letter in letters]


async def redrive(
    admin: BrokerAdmin,
    subscription: str,
    ids: Sequence[str] | None = None,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> int:
    """Deliver dead letters (all, or those with the given ids) to the subscription again;
    ``progress(done, total)`` is told after each one."""
    letters = await admin.take_dead_letters(subscription, ids=ids, limit=1_000_000)
    for done, letter in enumerate(letters, 1):
        await admin.deliver_to(subscription, DeadLetter.from_event(letter).event)
        if progress is not None:
            progress(done, len(letters))
    # Taken only once delivered again, so a failed redrive loses nothing.
    await admin.take_dead_letters(
        subscription, ids=[letter.id for letter in letters], remove=True, limit=len(letters)
    )
    if letters:
        logger.info("redrove %d dead letters of subscription %r", len(letters), subscription)
    return len(letters)
