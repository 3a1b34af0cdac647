"""The events service over any broker, with the shared delivery policy."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from callboard.brokers import admin, open_broker
from callboard.brokers.base import IN_PROCESS, Broker, Start, dead_letter_topic, name_problem
from callboard.deadletters import DeadLetter, dead_letter_event, read_dead_letters
from callboard.deadletters import redrive as redrive_dead_letters
from callboard.delivery import RetryPolicy, Stall, Stopped, SubscriptionWorker
from callboard.errors import (
    BrokerUnavailable,
    CallboardError,
    InvalidTopicError,
    ServiceClosedError,
    SubscriptionError,
)
from callboard.events import Event
from callboard.metrics import Metrics
from callboard.service import DEFAULT, Handler, HandlerTimeout, Subscriber
from callboard.spans import Tracer
from callboard.topics import normalize_patterns, validate_topic

logger = logging.getLogger("callboard.events")


class RunningSubscription:
    """A subscription's workers in this process; ``close()`` stops them gracefully."""

    def __init__(self, service: DefaultEventsService, id: str, topics: tuple[str, ...]) -> None:
        self._service = service
        self._id = id
        self._topics = topics
        self.workers: list[SubscriptionWorker] = []
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def id(self) -> str:
        return self._id

    @property
    def topics(self) -> tuple[str, ...]:
        return self._topics

    async def close(self, timeout: float | None = None) -> None:
        for worker in self.workers:
            await worker.stop()
        # A handler may close its own subscription: its worker cannot wait for itself.
        current = asyncio.current_task()
        tasks = [task for task in self.tasks if task is not current and not task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._service._forget(self)

    def oldest_unacked(self) -> float:
        """Seconds since the oldest event its workers hold unsettled began; 0 when idle."""
        return max((worker.oldest_unacked() for worker in self.workers), default=0.0)

    @property
    def ended(self) -> bool:
        """Every worker has stopped (closed, or by itself)."""
        return all(task.done() for task in self.tasks)

    @property
    def failure(self) -> str | None:
        """Why its consumers stopped by themselves (its group was deleted); ``None`` if they run."""
        return next((w.failure for w in self.workers if w.failure is not None), None)

    def __repr__(self) -> str:
        return f"<Subscription {self._id!r} topics={list(self._topics)}>"


class DefaultEventsService:
    """Publishes through a broker and runs subscriptions with retries and dead letters.

    Use it as an async context manager, or call ``start()`` and ``close()``; it starts itself on
    first use. With no broker it runs on an in-process one (``memory://``).
    """

    def __init__(
        self,
        broker: Broker | None = None,
        *,
        retry: RetryPolicy | None = None,
        metrics: Metrics | None = None,
        batch_size: int = 32,
        shutdown_timeout: float = 10.0,
        handler_timeout: float | None = 30.0,
        ordered: bool = True,
        tracer: Tracer | None = None,
    ) -> None:
        self.broker: Broker = broker if broker is not None else open_broker("memory://")
        #: Spans around publishes and handler calls; ``None``: no tracing, and no cost.
        self.tracer = tracer
        if tracer is not None:
            # An attribute of the instance: the class's publish stays free of any check.
            setattr(self, "publish", self._traced_publish)  # noqa: B010
        self.retry = retry if retry is not None else RetryPolicy()
        self.metrics = metrics if metrics is not None else Metrics()
        self.shutdown_timeout = shutdown_timeout
        #: Defaults of ``subscribe``: the handlers' time limit, and in-line (ordered) retries.
        self.handler_timeout = handler_timeout or None
        self.ordered = ordered
        self._batch_size = batch_size
        self._subscriptions: list[RunningSubscription] = []
        self._started = False
        self._closed = False
        self._start_lock = asyncio.Lock()
        self._checked_topics: set[str] = set()
        #: Sources of dead letters (``dead_letter``) whose group this process made sure of.
        self._letter_groups: set[str] = set()

    async def start(self) -> None:
        if self._closed:
            raise ServiceClosedError("the events service is closed")
        if self._started:
            return
        async with self._start_lock:
            if self._closed:
                raise ServiceClosedError("the events service is closed")
            if not self._started:
                await self.broker.start()
                self._started = True

    async def close(self, timeout: float | None = None) -> None:
        """Stop every subscription (finishing in-flight deliveries up to the timeout)."""
        if self._closed:
            return
        self._closed = True
        limit = self.shutdown_timeout if timeout is None else timeout
        subscriptions = list(self._subscriptions)
        if subscriptions:
            await asyncio.gather(*(s.close(limit) for s in subscriptions))
        if self._started:
            await self.broker.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(self, event: Event) -> bool:
        if event.topic not in self._checked_topics:
            self._check_topic(event.topic)
        if not self._started:
            await self.start()
        if self._closed:
            raise ServiceClosedError("the events service is shutting down; publish refused")
        accepted = await self.broker.publish(event)
        if accepted:
            self.metrics.count_published(event.topic)
        else:
            self.metrics.duplicates.labels(self.metrics.topic_label(event.topic)).inc()
        return accepted

    async def _traced_publish(self, event: Event) -> bool:
        assert self.tracer is not None
        with self.tracer.publish(event) as traced:
            return await DefaultEventsService.publish(self, traced)

    def _check_topic(self, topic: str) -> None:
        validate_topic(topic)
        if topic.startswith("$"):
            raise InvalidTopicError(
                topic,
                "topics starting with '$' are reserved for callboard itself (dead letters); "
                "use redrive() to deliver a dead letter again",
            )
        if len(self._checked_topics) < 10_000:
            self._checked_topics.add(topic)

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
        problem = name_problem(id)
        if problem is not None:
            raise SubscriptionError(f"subscription {id!r}: {problem}")
        if concurrency < 1:
            raise SubscriptionError(f"subscription {id!r}: concurrency must be at least 1")
        timeout = self.handler_timeout if handler_timeout is DEFAULT else handler_timeout
        if timeout is not None and timeout < 0:
            raise SubscriptionError(
                f"subscription {id!r}: handler_timeout must be positive (seconds), 0 or None for "
                "no time limit"
            )
        patterns = normalize_patterns(topics)
        if self.tracer is not None:
            handler = self.tracer.handler(id, handler)
        await self.start()
        if self._closed:
            raise ServiceClosedError("the events service is shutting down; subscribe refused")
        subscription = RunningSubscription(self, id, patterns)
        for _ in range(concurrency):
            # Marked as the server's own: the bus API never hands its events to a caller.
            consumer = await self.broker.consume(id, patterns, start=start, owner=IN_PROCESS)
            worker = SubscriptionWorker(
                id,
                consumer,
                handler,
                broker=self.broker,
                policy=self.retry,
                metrics=self.metrics,
                batch_size=self._batch_size,
                handler_timeout=timeout,
                # Without a limit of its own, a call this long is still reported as stalled.
                report_after=self.handler_timeout,
                ordered=self.ordered if ordered is None else ordered,
            )
            subscription.workers.append(worker)
            subscription.tasks.append(
                asyncio.create_task(worker.run(), name=f"callboard-subscription-{id}")
            )
        # Subscribed again: what stopped under this id before is no longer news.
        for old in [s for s in self._subscriptions if s.id == id and s.ended]:
            self._forget(old)
        self._subscriptions.append(subscription)
        logger.debug("subscribed %r to %s", id, list(patterns))
        return subscription

    async def add_subscriber(
        self, subscriber: Subscriber, *, id: str | None = None
    ) -> RunningSubscription:
        kind = type(subscriber)
        name = (
            id
            or getattr(subscriber, "subscriber_id", None)
            or f"{kind.__module__}.{kind.__qualname__}"
        )
        return await self.subscribe(name, tuple(subscriber.topics), subscriber.on_event)

    async def dead_letters(self, subscription: str, *, limit: int = 100) -> list[DeadLetter]:
        """The dead letters of a subscription, oldest first."""
        await self.start()
        return await read_dead_letters(admin(self.broker), subscription, limit=limit)

    async def dead_letter(self, source: str, event: Event, reason: str) -> None:
        """Keep ``event`` as a dead letter of ``source``: what a module (an inbound bridge)
        received and can never publish (``deadletters.DeadLetterSink``).

        Operators find dead letters by subscription (``callboard dead-letters list``, the
        console), so the first one of a source makes a group of that name, owned by this
        service, that reads only the source's dead-letter topic: no event is ever published
        there, so the group never has a backlog. It is counted in ``callboard_dead_letters``.
        """
        await self.start()
        if source not in self._letter_groups:
            await self._make_letter_group(source)
        await self.broker.publish(dead_letter_event(source, event, reason, 1))
        self.metrics.dead_letters.labels(self.metrics.subscription_label(source)).inc()

    async def _make_letter_group(self, source: str) -> None:
        problem = name_problem(source)
        if problem is not None:
            raise SubscriptionError(f"dead letters of {source!r}: {problem}")
        try:
            consumer = await self.broker.consume(
                source, (dead_letter_topic(source),), owner=IN_PROCESS
            )
        except BrokerUnavailable:
            raise  # the letter could not be kept either: the caller tries again
        except CallboardError as error:
            # A broker that takes no group on a dead-letter topic (the bus of another server):
            # the letters are still kept, and read by name (``dead_letters(source)``).
            logger.warning(
                "dead letters of %r are kept but not listed among the subscriptions: %s",
                source,
                error,
            )
        else:
            await consumer.close()
        self._letter_groups.add(source)

    async def redrive(self, subscription: str, ids: Sequence[str] | None = None) -> int:
        """Deliver dead letters (all, or those with the given ids) to the subscription again."""
        await self.start()
        return await redrive_dead_letters(admin(self.broker), subscription, ids)

    @property
    def subscriptions(self) -> tuple[RunningSubscription, ...]:
        return tuple(self._subscriptions)

    def oldest_unacked(self) -> dict[str, float]:
        """Per subscription of this process: seconds its oldest unsettled event has waited."""
        ages: dict[str, float] = {}
        for subscription in self._subscriptions:
            age = subscription.oldest_unacked()
            ages[subscription.id] = max(age, ages.get(subscription.id, 0.0))
        return ages

    def stalled(self) -> list[Stall]:
        """Handler calls running longer than their subscription's time limit (or report age)."""
        found = (w.stalled() for s in self._subscriptions for w in s.workers)
        return [stall for stall in found if stall is not None]

    def stopped(self) -> list[Stopped]:
        """Subscriptions of this process whose consumers stopped by themselves, and why.

        That happens when the broker no longer has the subscription's group (deleted with
        ``callboard subscriptions --delete`` while this process consumed it). It stays listed
        until the subscription is closed or subscribed again.
        """
        found = ((s.id, s.failure) for s in self._subscriptions)
        return [Stopped(id, failure) for id, failure in found if failure is not None]

    def _forget(self, subscription: RunningSubscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
