"""The broker contract: what every transport behind the events service provides.

A broker keeps events per topic and hands them to consumer groups. A group is named by the
subscription id: every consumer in one group shares the group's events (each event to one of
them), and every group gets every event on its topics. A consumer acknowledges an event once
the handler is done with it; an event fetched and never acknowledged (the consumer crashed or
was closed) is delivered again. Retrying and dead-lettering are not the broker's business: the
events service does both the same way for every broker (``callboard.delivery``).

Dead letters are ordinary events on the reserved topic ``$deadletter.<subscription id>``; a
broker keeps them until they are taken, so they can be listed and redriven.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeAlias

from callboard.events import Event

#: Where a new consumer group starts reading: only events published from now on (``"end"``),
#: everything the broker still holds (``"beginning"``), or everything since a moment.
Start: TypeAlias = Literal["end", "beginning"] | datetime

DEAD_LETTER_PREFIX = "$deadletter."


def dead_letter_topic(group: str) -> str:
    """The topic on which a subscription's dead letters are kept."""
    return DEAD_LETTER_PREFIX + group


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a broker can do beyond the contract every broker meets."""

    #: Events survive the process (and, for a server, a restart of the server).
    durable: bool = False
    #: Several processes can share one consumer group.
    shared: bool = False
    #: A new group can start from the beginning or from a time.
    replay: bool = False


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

        Returns an empty sequence once the consumer is closed.
        """
        ...

    async def ack(self, delivery: Delivery) -> None:
        """The event is handled: never deliver it to this group again."""
        ...

    async def close(self) -> None:
        """Leave the group; events fetched and not acknowledged go back to the group."""
        ...


class Broker(Protocol):
    """The transport behind the events service, chosen by URL (``memory://``, ``sqlite:///...``)."""

    @property
    def capabilities(self) -> Capabilities: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, event: Event) -> bool:
        """Store the event (for a durable broker, on disk) and return ``True``.

        Returns ``False`` without storing when an event with the same delivery id
        (``Event.delivery_id``) was already accepted on the same topic within the broker's
        redelivery window. Raises ``BrokerUnavailable`` when the event could not be accepted.
        """
        ...

    async def consume(self, group: str, topics: Sequence[str], *, start: Start = "end") -> Consumer:
        """Join (or create) the consumer group ``group`` reading ``topics`` (patterns)."""
        ...

    async def deliver_to(self, group: str, event: Event) -> None:
        """Hand an event to one group only, whatever its topic (redriving a dead letter)."""
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
