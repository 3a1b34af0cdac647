"""The live view's tap: events as the broker hands them out, fanned out to the watching browsers.

While at least one browser watches, the serving process's events service runs one subscription
of its own on every topic (``>``), starting at the end, under an id unique to the process
(``callboard.console.live.<random>``). Its handler only offers each event to the watchers'
queues, each bounded: a watcher that cannot keep up loses events (and is told how many), and
never holds up the subscription, let alone the ingress. When the last watcher leaves, the
subscription is closed and its group deleted from the broker: the tap keeps nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

from callboard.brokers.base import Broker, BrokerAdmin
from callboard.errors import CallboardError
from callboard.events import Event
from callboard.service import EventsService, Subscription
from callboard.topics import TopicMatcher

logger = logging.getLogger("callboard.console")

#: Events kept for one watcher before newer ones are dropped.
QUEUE_SIZE = 256
TAP_PREFIX = "callboard.console.live."


@dataclass(frozen=True, slots=True)
class Dropped:
    """Events a watcher lost because it did not keep up."""

    count: int


class Watcher:
    """One browser watching: the events of its patterns, in a bounded queue."""

    def __init__(self, patterns: tuple[str, ...], size: int = QUEUE_SIZE) -> None:
        self.patterns = patterns
        self._matches = TopicMatcher(patterns) if patterns else None
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(size)
        self._dropped = 0
        self._ended = False

    def offer(self, event: Event) -> None:
        """Queue the event if it is watched; drop it (counting) when the queue is full."""
        if self._matches is not None and not self._matches(event.topic):
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._dropped += 1

    def end(self) -> None:
        """Wake the reader for good (the server is stopping)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)
        self._ended = True

    async def next(self) -> Event | Dropped | None:
        """The next event, news of events lost first, or ``None`` once the watch has ended."""
        if self._ended and self._queue.empty():
            return None
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            return Dropped(dropped)
        return await self._queue.get()


class LiveTap:
    """Runs the tap's subscription while anyone watches, and hands events to the watchers."""

    def __init__(self, events: EventsService, broker: Broker, *, queue_size: int = QUEUE_SIZE):
        self._events = events
        self._broker = broker
        self._queue_size = queue_size
        self._watchers: set[Watcher] = set()
        self._subscription: Subscription | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        #: The subscription id of this process's tap.
        self.id = TAP_PREFIX + uuid.uuid4().hex[:12]

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def watch(self, patterns: tuple[str, ...]) -> Watcher:
        """A new watcher of ``patterns`` (every topic when empty); the tap starts if needed."""
        watcher = Watcher(patterns, self._queue_size)
        async with self._lock:
            if self._closed:
                watcher.end()
                return watcher
            self._watchers.add(watcher)
            if self._subscription is None:
                self._subscription = await self._events.subscribe(
                    self.id, ">", self._fan_out, start="end", handler_timeout=None
                )
                logger.info("console live view: tap %r started", self.id)
        return watcher

    async def leave(self, watcher: Watcher) -> None:
        """The watcher is gone; the tap stops with the last one."""
        async with self._lock:
            self._watchers.discard(watcher)
            if not self._watchers:
                await self._stop()

    def end_watches(self) -> None:
        """End every watch now (the server is stopping): the streams close, nothing waits."""
        self._closed = True
        for watcher in self._watchers:
            watcher.end()

    async def close(self) -> None:
        self.end_watches()
        async with self._lock:
            self._watchers.clear()
            await self._stop()

    async def _fan_out(self, event: Event) -> None:
        for watcher in tuple(self._watchers):
            watcher.offer(event)

    async def _stop(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        await subscription.close()
        if isinstance(self._broker, BrokerAdmin):
            try:
                await self._broker.delete_subscription(self.id)
            except CallboardError as error:
                logger.warning("console live view: the tap's group %r is left: %s", self.id, error)
        logger.info("console live view: tap %r stopped", self.id)
