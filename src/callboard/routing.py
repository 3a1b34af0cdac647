"""Routers: subscribers that republish each event on a topic computed from it."""

from __future__ import annotations

from collections.abc import Sequence

from callboard.events import Event
from callboard.extensions import Destination, SubTopic, sub_topic_destination
from callboard.service import EventsService, Subscription
from callboard.topics import normalize_patterns

__all__ = ["Destination", "EventRouter", "SubTopicEventRouter"]


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
    """Routes ``<topic>`` to ``<topic>.<sub_topic(event)>`` (``github`` to ``github.push``).

    The rule is ``extensions.sub_topic_destination``, the one provider modules' routers use.
    """

    def __init__(
        self,
        events: EventsService,
        *,
        topic: str,
        sub_topic: SubTopic,
        id: str | None = None,
    ) -> None:
        router_id = id or f"{topic}-router"
        super().__init__(
            events,
            id=router_id,
            topics=topic,
            destination=sub_topic_destination(router_id, sub_topic),
        )
