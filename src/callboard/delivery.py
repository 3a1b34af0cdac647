"""The delivery policy every broker shares: call the handler, retry with backoff, dead-letter.

One ``SubscriptionWorker`` is one consumer of a subscription's group. It fetches a batch, hands
each event to the handler in order, and acknowledges it once the handler returned. A handler that
raises is called again after an exponentially growing delay (or, when it raised ``RetryLater``,
after the delay it names, if that is longer); when the last attempt fails, the event
is published on the subscription's dead-letter topic with the error, and then acknowledged.

A handler call has a time limit (``events.delivery.handlerTimeoutMs``). It is kept by one timer
per worker rather than one per call (``asyncio.wait_for`` or ``asyncio.timeout`` around every call
would cost a good part of a delivery on the memory broker): the worker notes when its current call
began, and the timer, when it fires, either finds that call past its deadline and cancels it, or
sets itself again for the deadline of the call now running. A call cancelled so is a failed
attempt, like one that raised. Without a limit the timer only reports a call that runs that long.

An ordered subscription (the default) waits out a failed event's retry delays before it goes on,
so its events are handled in order. An unordered one (``ordered=False``) sets the failed event
aside and goes on with the next ones; the event is tried again when its delay has passed, between
two others, and acknowledged only once it succeeded or became a dead letter. Until then the
broker keeps it leased to this consumer (the SQL brokers renew the leases of every live consumer,
whatever it holds), so no other consumer gets it meanwhile. At most ``batch_size`` events wait so
per worker; with that many waiting, the worker fetches nothing new until one is settled.

A worker fetches ``batch_size`` events at once, and more while its handler is quick: after a
full batch handled in less than ``QUICK_BATCH`` seconds, every event of it at the first attempt,
the next fetch asks for twice as many, up to ``GROWTH`` times ``batch_size``; after a batch that
took longer or had a failure it asks for ``batch_size`` again. A fast handler so pays a broker's
round trip for many events instead of a few, and a slow one keeps to ``batch_size``, so it does
not sit on events a competing member could take (a handler that turns slow holds one grown batch
before its worker goes back to ``batch_size``). Only an ordered subscription on a durable broker
grows its batch: the broker in memory has no round trip to save, and out of line every event of
a grown batch could be set aside.

Acknowledgements are pipelined: the worker starts an event's acknowledgement and goes on to the
next event without waiting for it; those of events handled in one turn of the event loop go to
the broker together (``Consumer.ack``), which records them in one statement and one commit
instead of one round trip per event. The next fetch goes out while the batch's acknowledgements
are on their way, so a broker across the network spends one round trip per batch instead of two,
and the worker waits for them to be recorded before it handles anything fetched: at most two
batches (the one being acknowledged and the one fetched meanwhile, besides the retries waiting
out of line) are ever unacknowledged. The next fetch is asked for only once a batch is handled.
An acknowledgement that fails cuts the fetch short and stops the worker at once. Stopping cuts
the fetch short too (a fetch cut short loses nothing); the worker then waits, within its
subscription's closing time, until every acknowledgement it started is recorded before it closes
the consumer, so an event is never delivered again because its acknowledgement was still on its
way when the worker stopped. A crash loses at most those acknowledgements, and the broker
delivers their events again (at least once).

A worker stops by itself only when its consumer cannot go on: the broker no longer has the
subscription's group (an operator deleted it while this process consumed it: a
``SubscriptionError``), or the consumer failed. It then says why (``failure``), once in the log
and for as long as it is not subscribed again in ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic
from time import time as wall_time

from callboard.brokers.base import Broker, Consumer, Delivery
from callboard.deadletters import dead_letter_event
from callboard.errors import HandlerTimeoutError, RetryLater, SubscriptionError
from callboard.metrics import Metrics
from callboard.service import Handler

logger = logging.getLogger("callboard.delivery")

#: A handled delivery: when its handler finished, and whether it counts as delivered (not a
#: dead letter).
_Handled = tuple[Delivery, float, bool]
#: A retry waiting out of line: when it is due, a tie-breaker, the delivery, the attempt it will
#: be, and when the event's first attempt began (``monotonic``).
_Waiting = tuple[float, int, Delivery, int, float]

#: The configuration key that sets the handlers' time limit, named in what is logged.
TIMEOUT_KEY = "events.delivery.handlerTimeoutMs"

#: A full batch handled in less than this many seconds doubles the next fetch (see ``GROWTH``):
#: then a round trip to the broker (a fraction of a millisecond) is a good share of a batch.
QUICK_BATCH = 0.01
#: How many times ``batch_size`` a worker with a quick handler fetches at most.
GROWTH = 8


#: What a call ended by the time limit raised, before it is told as a ``HandlerTimeoutError``.
_CANCELLED = Exception("cancelled by the time limit")


@dataclass(frozen=True, slots=True)
class Stall:
    """A handler call running longer than its subscription allows, for ``/readyz``."""

    subscription: str
    event_id: str
    topic: str
    #: Seconds the call has been running.
    seconds: float
    #: The call's time limit, or ``None`` when the subscription has none (then it is only
    #: reported, past ``report_after``).
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Stopped:
    """A subscription whose consumer stopped by itself, for ``/readyz``."""

    subscription: str
    #: Why: the broker's words (``subscription 'x' no longer exists``).
    reason: str


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
        handler_timeout: float | None = None,
        report_after: float | None = None,
        ordered: bool = True,
    ) -> None:
        self.subscription = subscription
        self._label = metrics.subscription_label(subscription)
        self._consumer = consumer
        self._handler = handler
        self._broker = broker
        self._policy = policy
        self._metrics = metrics
        self._batch_size = batch_size
        #: What the next fetch asks for: ``batch_size``, more while the handler is quick.
        self._take = batch_size
        #: The batch grows only on a durable broker (one with a round trip to save) and for an
        #: ordered subscription: out of line, every event of a grown batch could be set aside.
        self._grows = broker.capabilities.durable and ordered
        self._stop = asyncio.Event()
        #: The time limit of the fetch under way (none, or a waiting retry's due time), which
        #: ``_interrupt`` moves to now.
        self._fetch_limit: asyncio.Timeout | None = None
        #: Failed handler calls so far: a batch with one does not grow the next.
        self._failures = 0
        # A durable broker records an acknowledgement in its store: those are pipelined. A
        # broker in memory records it at once, cheaper than starting a task for it.
        self._pipeline = broker.capabilities.durable
        #: Acknowledgements started and not yet recorded (at most one batch).
        self._acks: list[asyncio.Future[None]] = []
        #: Handled in this turn of the loop, acknowledged together at its end.
        self._unsent: list[_Handled] = []
        self._ordered = ordered
        #: Retries waiting out of line, the next due first (a heap).
        self._waiting: list[_Waiting] = []
        self._tie = itertools.count()
        #: The time limit of a handler call, and after how long a call is reported as stalled.
        self.handler_timeout = handler_timeout or None
        self._deadline = self.handler_timeout or report_after or None
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._expired = False
        self._reported: float | None = None
        #: The delivery being handled, when it began, and when the running call began.
        self._current: Delivery | None = None
        self._since = 0.0
        self._call_began: float | None = None
        #: Why the worker stopped by itself; ``None`` while it runs or when it was stopped.
        self.failure: str | None = None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        consumer = self._consumer
        waiting = self._waiting
        try:
            while True:
                if waiting:
                    await self._settle()
                    await self._retry_due()
                if self._stop.is_set():
                    return
                # The batch's acknowledgements go out now and are recorded while the next batch
                # is fetched: one round trip for both where the broker is across the network.
                self._send_acks()
                batch = await self._fetch()
                await self._settle()
                if batch is None:
                    continue  # a retry fell due before new events came
                if not batch or not await self._handle(batch):
                    return
        except Exception as error:
            self._stopped_by(error)
        finally:
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            try:
                await self._settle()
            except Exception:
                logger.exception(
                    "subscription %r could not acknowledge its last events", self.subscription
                )
            # Retries still waiting are left unacknowledged: the group gets them again.
            waiting.clear()
            await consumer.close()

    def _stopped_by(self, error: Exception) -> None:
        """Say why the worker stops by itself: nobody awaits its task until close, so now."""
        if isinstance(error, SubscriptionError):
            # The group is gone (deleted while this process consumed it): nothing is left to
            # consume, and a traceback would explain nothing.
            self.failure = str(error)
            logger.error(
                "subscription %r stopped: %s (it was deleted while this process consumed it); "
                "it is reported as stopped in /readyz and /metrics until it is subscribed again "
                "(a restart subscribes the modules' subscriptions again, from the newest events)",
                self.subscription,
                error,
            )
            return
        self.failure = f"its consumer failed: {error}"
        logger.error(
            "subscription %r stopped: its consumer failed", self.subscription, exc_info=error
        )

    async def stop(self) -> None:
        """Finish the delivery in progress, then stop; an idle worker stops at once."""
        self._stop.set()
        self._interrupt()

    def _interrupt(self) -> None:
        """End the fetch under way, if any (``stop``, or an acknowledgement that failed): a
        fetch cut short loses nothing (``Consumer.fetch``), what it took comes with the next
        one or goes back to the group when the consumer closes."""
        if self._fetch_limit is not None:
            self._fetch_limit.reschedule(asyncio.get_running_loop().time())

    async def _handle(self, batch: Sequence[Delivery]) -> bool:
        """Deliver a batch (and the retries falling due meanwhile); ``False`` when stopped."""
        waiting = self._waiting
        failures = self._failures
        began = monotonic()
        for delivery in batch:
            if self._stop.is_set():
                return False
            await self._deliver(delivery)
            if waiting and waiting[0][0] <= monotonic():
                await self._retry_due()
        if self._grows:
            quick = self._failures == failures and monotonic() - began < QUICK_BATCH
            self._size_next(full=len(batch) >= self._take, quick=quick)
        return True

    def _size_next(self, *, full: bool, quick: bool) -> None:
        """Set what the next fetch asks for: twice as much after a full quick batch (up to
        ``GROWTH`` times ``batch_size``), ``batch_size`` after one that was not quick."""
        if not quick:
            self._take = self._batch_size
        elif full:
            self._take = min(self._take * 2, self._batch_size * GROWTH)

    async def _fetch(self) -> Sequence[Delivery] | None:
        """The next batch; ``[]`` once stopped, ``None`` when a waiting retry fell due (or room
        for one is needed) or an acknowledgement failed."""
        waiting = self._waiting
        loop = asyncio.get_running_loop()
        deadline = None
        if waiting:
            wait = max(0.0, waiting[0][0] - monotonic())
            if len(waiting) >= self._batch_size:
                # As many events set aside as a batch holds: take no more until one is settled.
                await self._stopped_within(wait)
                return None
            deadline = loop.time() + wait
        if self._stop.is_set():
            return []
        try:
            async with asyncio.timeout_at(deadline) as self._fetch_limit:
                return await self._consumer.fetch(self._take)
        except TimeoutError:
            return [] if self._stop.is_set() else None
        finally:
            self._fetch_limit = None

    async def _retry_due(self) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0] <= monotonic() and not self._stop.is_set():
            _, _, delivery, attempt, since = heapq.heappop(waiting)
            self._since = since  # tried before: its age counts from the first attempt
            await self._deliver(delivery, attempt)

    async def _deliver(self, delivery: Delivery, attempt: int = 1) -> None:
        """Handle one event until it is settled, set aside, or left to the group."""
        event = delivery.event
        metrics = self._metrics
        metrics.in_flight.inc()
        self._current = delivery
        try:
            while True:
                # Kept to a few stores on the way of a handler that succeeds: on the memory
                # broker a delivery costs about two microseconds in all.
                self._call_began = began = monotonic()
                if self._watch is None and self._deadline is not None:
                    self._arm(self._deadline)
                try:
                    await self._handler(event)
                except Exception as failure:
                    error: Exception | None = failure
                except asyncio.CancelledError:
                    if not self._expired:
                        raise
                    error = _CANCELLED
                else:
                    self._call_began = None
                    if not self._expired:
                        await self._ack(delivery, delivered=True)
                        return
                    error = None
                self._call_began = None
                if self._expired:
                    error = self._timed_out(error)
                if error is None:
                    await self._ack(delivery, delivered=True)
                    return
                if not self._since:
                    self._since = began  # unsettled from its first attempt on
                if await self._failed(delivery, error, attempt):
                    return
                attempt += 1
        finally:
            self._current = None
            self._since = 0.0
            metrics.in_flight.dec()

    async def _failed(self, delivery: Delivery, error: Exception, attempt: int) -> bool:
        """Count a failed attempt and wait for the next one; ``True`` when none comes now.

        That is when the event became a dead letter, was set aside to be retried out of line,
        or the worker is stopping (the event is left unacknowledged, delivered again later).
        """
        self._failures += 1
        event = delivery.event
        policy = self._policy
        metrics = self._metrics
        metrics.failures.labels(self._label, metrics.topic_label(event.topic)).inc()
        if attempt >= policy.attempts:
            await self._dead_letter(delivery, error, attempt)
            return True
        delay = policy.delay(attempt)
        if isinstance(error, RetryLater):
            delay = max(delay, error.delay)  # the handler knows better: a Retry-After
        logger.warning(
            "subscription %r failed on event %s (topic %r), attempt %d of %d; "
            "retrying in %.2fs%s: %s",
            self.subscription,
            event.id,
            event.topic,
            attempt,
            policy.attempts,
            delay,
            "" if self._ordered else ", out of line",
            error,
        )
        metrics.retries.labels(self._label).inc()
        if not self._ordered:
            due = monotonic() + delay
            heapq.heappush(
                self._waiting, (due, next(self._tie), delivery, attempt + 1, self._since)
            )
            return True
        return await self._stopped_within(delay)

    def _timed_out(self, error: Exception | None) -> Exception | None:
        """Take back the watchdog's cancellation; what the call it ended counts as."""
        self._expired = False
        task = self._task
        if task is not None and task.uncancel() > 0:
            raise asyncio.CancelledError  # cancelled from outside too (a shutdown): let it end
        if error is None:
            return None  # the handler swallowed the cancellation and finished: it succeeded
        # Whatever the handler turned the cancellation into, the attempt failed by running out
        # of time, and the dead letter says so.
        timeout = HandlerTimeoutError(self.handler_timeout or 0.0)
        timeout.__cause__ = None if error is _CANCELLED else error
        return timeout

    def _arm(self, delay: float) -> None:
        self._watch = asyncio.get_running_loop().call_later(delay, self._watchdog)

    def _watchdog(self) -> None:
        """Cancel (or, with no time limit, report) a call past its deadline; else set again."""
        self._watch = None
        began, deadline = self._call_began, self._deadline
        if began is None or deadline is None or self._expired:
            return  # idle: the next call sets the timer again
        left = began + deadline - monotonic()
        if left > 0.001:
            self._arm(left)
            return
        delivery = self._current
        event_id = delivery.event.id if delivery is not None else "?"
        if self.handler_timeout is None:
            if self._reported != began:
                self._reported = began
                logger.warning(
                    "subscription %r has been handling event %s for more than %gs; it has no "
                    "handler time limit, so it waits for the handler (set %s, or "
                    "handler_timeout= of the subscription)",
                    self.subscription,
                    event_id,
                    deadline,
                    TIMEOUT_KEY,
                )
            return
        task = self._task
        if task is None or task.done():
            return
        logger.warning(
            "subscription %r: the handler did not finish event %s within %gs (%s); cancelled, "
            "the attempt counts as failed",
            self.subscription,
            event_id,
            deadline,
            TIMEOUT_KEY,
        )
        self._expired = True
        task.cancel()

    def oldest_unacked(self, now: float | None = None) -> float:
        """Seconds since the oldest event this worker holds unsettled began; 0 when idle."""
        now = monotonic() if now is None else now
        begins = [since for _, _, _, _, since in self._waiting]
        current = self._since or self._call_began
        if self._current is not None and current is not None:
            begins.append(current)
        return max(0.0, now - min(begins)) if begins else 0.0

    def stalled(self, now: float | None = None) -> Stall | None:
        """The running handler call, if it has run longer than the subscription allows."""
        began, delivery, deadline = self._call_began, self._current, self._deadline
        if began is None or delivery is None or deadline is None:
            return None
        seconds = (monotonic() if now is None else now) - began
        if seconds < deadline:
            return None
        event = delivery.event
        return Stall(self.subscription, event.id, event.topic, seconds, self.handler_timeout)

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
        self._metrics.dead_letters.labels(self._label).inc()
        await self._ack(delivery, delivered=False)

    async def _ack(self, delivery: Delivery, *, delivered: bool) -> None:
        """Acknowledge ``delivery``: at once, or (pipelined) started now, awaited by ``_settle``."""
        if not self._pipeline:
            await self._consumer.ack((delivery,))
            self._count(((delivery, wall_time(), delivered),))
            return
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._unsent.append((delivery, wall_time(), delivered))

    def _send_acks(self) -> None:
        """Send the acknowledgements gathered in this turn of the loop, together."""
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            acknowledging = asyncio.ensure_future(self._acknowledge(unsent))
            acknowledging.add_done_callback(self._acknowledged)
            self._acks.append(acknowledging)

    def _acknowledged(self, acknowledging: asyncio.Future[None]) -> None:
        """An acknowledgement that failed stops the worker now, not when events next come:
        the fetch under way is cut short, and ``_settle`` raises the failure."""
        if not acknowledging.cancelled() and acknowledging.exception() is not None:
            self._interrupt()

    async def _acknowledge(self, acks: list[_Handled]) -> None:
        await self._consumer.ack([delivery for delivery, _, _ in acks])
        self._count(acks)

    def _count(self, acks: Sequence[_Handled]) -> None:
        for delivery, handled_at, delivered in acks:
            if delivered:
                event = delivery.event
                self._metrics.count_delivered(
                    self._label, event.topic, max(0.0, handled_at - event.time.timestamp())
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
