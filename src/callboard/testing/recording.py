"""A recording events service for users' tests: real delivery, recorded traffic, no sleeps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from callboard.brokers.base import Start
from callboard.brokers.memory import MemoryBroker
from callboard.default_service import DefaultEventsService, RunningSubscription
from callboard.delivery import RetryPolicy
from callboard.events import Event
from callboard.service import DEFAULT, Handler, HandlerTimeout

#: Retries in tests should not wait: the same number of attempts, no delay.
FAST_RETRY = RetryPolicy(attempts=3, initial_delay=0.0, max_delay=0.0, jitter=0.0)


@dataclass(frozen=True, slots=True)
class SubscribeCall:
    id: str
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeadLetterCall:
    """What a module kept as a dead letter (``dead_letter``): its source, event and reason."""

    source: str
    event: Event
    reason: str


class RecordingEventsService(DefaultEventsService):
    """An in-memory events service that records what was published, subscribed and kept as a
    module's dead letter.

    Events are really delivered to subscribers; ``await drain()`` returns once every event
    published so far has been handled (retries and routers included). A module's dead letters
    are kept as the service keeps them (``dead_letters(source)`` reads them back) and recorded.
    """

    def __init__(self, *, retry: RetryPolicy = FAST_RETRY) -> None:
        self.memory = MemoryBroker()
        super().__init__(self.memory, retry=retry)
        self.published: list[Event] = []
        self.subscribed: list[SubscribeCall] = []
        self.dead_lettered: list[DeadLetterCall] = []

    async def publish(self, event: Event) -> bool:
        self.published.append(event)
        return await super().publish(event)

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
    ) -> RunningSubscription:
        subscription = await super().subscribe(
            id,
            topics,
            handler,
            start=start,
            concurrency=concurrency,
            handler_timeout=handler_timeout,
            ordered=ordered,
        )
        self.subscribed.append(SubscribeCall(id, subscription.topics))
        return subscription

    async def dead_letter(self, source: str, event: Event, reason: str) -> None:
        await super().dead_letter(source, event, reason)
        self.dead_lettered.append(DeadLetterCall(source, event, reason))

    def published_on(self, topic: str) -> list[Event]:
        return [event for event in self.published if event.topic == topic]

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every published event has been handled or dead-lettered."""
        await self.memory.drain(timeout)

    def reset(self) -> None:
        self.published.clear()
        self.subscribed.clear()
        self.dead_lettered.clear()
