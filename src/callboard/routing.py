"""Routers: subscribers that republish each event on a topic computed from it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from callboard.errors import InvalidTopicError
from callboard.events import Event
from callboard.service import EventsService, Subscription
from callboard.topics import join, normalize_patterns

Destination = Callable[[Event], str | None]

logger = logging.getLogger("callboard.routing")


class EventRouter:
    """Subscribes to ``topics`` and republishes each event on ``destination(event)``.

    An event for which ``destination`` returns ``None`` is dropped. The republished event keeps
    payload and metadata (the delivery id included, so a redelivered webhook is routed once).
    """

    def __init__(
        self,
        events: EventsService,
        *,
        id: str,
        topics: str | Sequence[str],
        destination: Destination,
    ) -> None:
        self.events = events
        self.id = id
        self.topics = normalize_patterns(topics)
        self._destination = destination
        self._subscription: Subscription | None = None

    async def subscribe(self) -> Subscription:
        """Start routing; calling it again returns the same subscription."""
        if self._subscription is None:
            self._subscription = await self.events.subscribe(self.id, self.topics, self.on_event)
        return self._subscription

    async def on_event(self, event: Event) -> None:
        topic = self._destination(event)
        if topic is not None:
            await self.events.publish(event.with_topic(topic))


class SubTopicEventRouter(EventRouter):
    """Routes ``<topic>`` to ``<topic>.<sub_topic(event)>`` (``github`` to ``github.push``)."""

    def __init__(
        self,
        events: EventsService,
        *,
        topic: str,
        sub_topic: Callable[[Event], str | None],
        id: str | None = None,
    ) -> None:
        def destination(event: Event) -> str | None:
            sub = sub_topic(event)
            if not sub:
                return None
            try:
                return join(event.topic, sub)
            except InvalidTopicError:
                logger.warning(
                    "router %r dropped event %s: sub-topic %r is not a valid topic segment",
                    self.id,
                    event.id,
                    sub,
                )
                return None

        super().__init__(events, id=id or f"{topic}-router", topics=topic, destination=destination)
