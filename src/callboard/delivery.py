"""The delivery policy every broker shares: call the handler, retry with backoff, dead-letter.

One ``SubscriptionWorker`` is one consumer of a subscription's group. It fetches a batch, hands
each event to the handler in order, and acknowledges it once the handler returned. A handler that
raises is called again after an exponentially growing delay; when the last attempt fails, the event
is published on the subscription's dead-letter topic with the error, and then acknowledged.

Acknowledgements are pipelined: the worker starts an event's acknowledgement and goes on to the
next event without waiting for it; those of events handled in one turn of the event loop go to
the broker together (``Consumer.ack_many``), which records them in one statement and one commit
instead of one round trip per event. Before the next fetch, and before
the consumer is closed, the worker waits until every acknowledgement it started is recorded: at
most one batch is ever unacknowledged, and an event is never delivered again because its
acknowledgement was still on its way when the worker stopped. A crash loses at most those
acknowledgements, and the broker delivers their events again (at least once).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from time import time as wall_time

from callboard.brokers.base import Broker, Consumer, Delivery
from callboard.deadletters import dead_letter_event
from callboard.metrics import Metrics
from callboard.service import Handler

logger = logging.getLogger("callboard.delivery")

#: A handled delivery: when its handler finished, and whether it counts as delivered (not a
#: dead letter).
_Handled = tuple[Delivery, float, bool]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing handler is tried."""

    #: Calls of the handler per event, the first one included.
    attempts: int = 5
    #: Delay before the second call, in seconds.
    initial_delay: float = 0.2
    #: Upper bound of any one delay, in seconds.
    max_delay: float = 30.0
    #: Factor by which the delay grows after each failure.
    multiplier: float = 2.0
    #: Random spread of each delay, as a fraction of it (0.1 = up to 10% shorter).
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must not be negative")
        if self.multiplier < 1:
            raise ValueError("RetryPolicy.multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter must be between 0 and 1")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failure before the next call."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (failed_attempts - 1))
        return base * (1 - self.jitter * random.random())


class SubscriptionWorker:
    """Runs one consumer of a subscription: fetch, handle with retries, acknowledge."""

    def __init__(
        self,
        subscription: str,
        consumer: Consumer,
        handler: Handler,
        *,
        broker: Broker,
        policy: RetryPolicy,
        metrics: Metrics,
        batch_size: int = 32,
    ) -> None:
        self.subscription = subscription
        self._consumer = consumer
        self._handler = handler
        self._broker = broker
        self._policy = policy
        self._metrics = metrics
        self._batch_size = batch_size
        self._stop = asyncio.Event()
        self._fetching = False
        # A durable broker records an acknowledgement in its store: those are pipelined. A
        # broker in memory records it at once, cheaper than starting a task for it.
        self._pipeline = broker.capabilities.durable
        #: Acknowledgements started and not yet recorded (at most one batch).
        self._acks: list[asyncio.Future[None]] = []
        #: Handled in this turn of the loop, acknowledged together at its end.
        self._unsent: list[_Handled] = []

    async def run(self) -> None:
        consumer = self._consumer
        try:
            while True:
                await self._settle()
                if self._stop.is_set():
                    return
                self._fetching = True
                batch = await consumer.fetch(self._batch_size)
                self._fetching = False
                if not batch:
                    return
                for delivery in batch:
                    if self._stop.is_set():
                        return
                    await self._deliver(delivery)
        except Exception:
            # Nobody awaits a worker's task until close: say so now, not when it is collected.
            logger.exception("subscription %r stopped: its consumer failed", self.subscription)
        finally:
            try:
                await self._settle()
            except Exception:
                logger.exception(
                    "subscription %r could not acknowledge its last events", self.subscription
                )
            await consumer.close()

    async def stop(self) -> None:
        """Finish the delivery in progress, then stop; an idle worker stops at once."""
        self._stop.set()
        if self._fetching:
            await self._consumer.close()

    async def _deliver(self, delivery: Delivery) -> None:
        event = delivery.event
        policy = self._policy
        metrics = self._metrics
        attempt = 1
        metrics.in_flight.inc()
        try:
            while True:
                try:
                    await self._handler(event)
                except Exception as error:
                    metrics.failures.labels(self.subscription, event.topic).inc()
                    if attempt >= policy.attempts:
                        await self._dead_letter(delivery, error, attempt)
                        return
                    delay = policy.delay(attempt)
                    logger.warning(
                        "subscription %r failed on event %s (topic %r), attempt %d of %d; "
                        "retrying in %.2fs: %s",
                        self.subscription,
                        event.id,
                        event.topic,
                        attempt,
                        policy.attempts,
                        delay,
                        error,
                    )
                    metrics.retries.labels(self.subscription).inc()
                    attempt += 1
                    if await self._stopped_within(delay):
                        return  # left unacknowledged: delivered again later
                    continue
                await self._ack(delivery, delivered=True)
                return
        finally:
            metrics.in_flight.dec()

    async def _dead_letter(self, delivery: Delivery, error: Exception, attempts: int) -> None:
        event = delivery.event
        letter = dead_letter_event(self.subscription, event, error, attempts)
        try:
            await self._broker.publish(letter)
        except Exception as failure:
            # Never acknowledge an event that was not kept somewhere: left unacknowledged, the
            # broker delivers it again, and the worker goes on with the next one.
            logger.error(
                "subscription %r gave up on event %s (topic %r) after %d attempts, and it could "
                "not be moved to its dead letters (%s); it will be delivered again: %s",
                self.subscription,
                event.id,
                event.topic,
                attempts,
                failure,
                error,
                exc_info=error,
            )
            return
        logger.error(
            "subscription %r gave up on event %s (topic %r) after %d attempts; "
            "moved to its dead letters: %s",
            self.subscription,
            event.id,
            event.topic,
            attempts,
            error,
            exc_info=error,
        )
        self._metrics.dead_letters.labels(self.subscription).inc()
        await self._ack(delivery, delivered=False)

    async def _ack(self, delivery: Delivery, *, delivered: bool) -> None:
        """Acknowledge ``delivery``: at once, or (pipelined) started now, awaited by ``_settle``."""
        if not self._pipeline:
            await self._consumer.ack(delivery)
            self._count(((delivery, wall_time(), delivered),))
            return
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._unsent.append((delivery, wall_time(), delivered))

    def _send_acks(self) -> None:
        """Send the acknowledgements gathered in this turn of the loop, together."""
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            self._acks.append(asyncio.ensure_future(self._acknowledge(unsent)))

    async def _acknowledge(self, acks: list[_Handled]) -> None:
        await self._consumer.ack_many([delivery for delivery, _, _ in acks])
        self._count(acks)

    def _count(self, acks: Sequence[_Handled]) -> None:
        for delivery, handled_at, delivered in acks:
            if delivered:
                event = delivery.event
                self._metrics.count_delivered(
                    self.subscription, event.topic, max(0.0, handled_at - event.time.timestamp())
                )

    async def _settle(self) -> None:
        """Wait until every acknowledgement started is recorded; raise the first failure."""
        self._send_acks()
        if not self._acks:
            return
        acks, self._acks = self._acks, []
        results = await asyncio.gather(*acks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            return False
        return True
