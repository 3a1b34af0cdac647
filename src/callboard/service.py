"""The events service contract: what application code publishes to and subscribes with."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, Protocol, TypeAlias, runtime_checkable

from callboard.brokers.base import Start
from callboard.events import Event

Handler = Callable[[Event], Awaitable[None]]


class UseDefault(enum.Enum):
    """Marks an option left to the service's configuration (where ``None`` means something)."""

    DEFAULT = "default"


#: ``handler_timeout=DEFAULT``: the time limit of ``events.delivery.handlerTimeoutMs``.
DEFAULT: Final = UseDefault.DEFAULT

#: A handler's time limit in seconds; ``None`` (or 0) for none at all, ``DEFAULT`` for the
#: configured one.
HandlerTimeout: TypeAlias = float | Literal[UseDefault.DEFAULT] | None


@runtime_checkable
class Subscriber(Protocol):
    """A class-based subscriber: the topics it reads and what it does with each event."""

    @property
    def topics(self) -> Sequence[str]: ...

    async def on_event(self, event: Event) -> None: ...


class Subscription(Protocol):
    """A handle on a running subscription."""

    @property
    def id(self) -> str: ...

    @property
    def topics(self) -> tuple[str, ...]: ...

    async def close(self) -> None:
        """Stop receiving; a delivery in progress is finished first."""
        ...


class EventsService(Protocol):
    """Publish events and subscribe handlers to topic patterns.

    The subscription id names a consumer group: subscribers with one id share its events, each
    event going to one of them; subscribers with different ids each get every event.
    """

    async def publish(self, event: Event) -> bool:
        """Hand the event to the broker; returns ``False`` if it was a known redelivery."""
        ...

    async def subscribe(
        self,
        id: str,
        topics: str | Sequence[str],
        handler: Handler,
        *,
        start: Start = "end",
        concurrency: int = 1,
        handler_timeout: HandlerTimeout = DEFAULT,
        ordered: bool | None = None,
    ) -> Subscription:
        """Run ``handler`` for each event on ``topics`` in the group ``id``.

        ``handler_timeout`` bounds each handler call (a call past it is cancelled and counts as a
        failed attempt); ``ordered=False`` lets later events go ahead while a failed one waits for
        its retry. Both default to ``events.delivery``.
        """
        ...

    async def add_subscriber(
        self, subscriber: Subscriber, *, id: str | None = None
    ) -> Subscription: ...
