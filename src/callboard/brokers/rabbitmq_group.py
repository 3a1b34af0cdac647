"""The consumers of the RabbitMQ broker: one hub per group and broker instance, its members.

A group is a quorum queue. A hub reads it with ``basic.consume`` on one channel of its own, so
every member's deliveries are acknowledged on the channel that received them and RabbitMQ counts
exactly what this process holds as unacknowledged. RabbitMQ pushes messages into the hub's
buffer; a member's ``fetch`` takes from it, and when it is empty waits for the next push (no
polling).

The consumer is sized by demand: the first fetch that finds nothing to take starts it, with a
prefetch window (QoS) of what the waiting fetches ask for (the delivery worker's batch size), so
a server holds at most that many of a group's events it has not handed out, never the group's
whole backlog while a reader of another server waits; once members acknowledge, RabbitMQ fills
the window again, and those events wait here for this server's next fetch. RabbitMQ counts the
window per consumer: a fetch that finds it full (the members hold all of it) starts a new
consumer rather than wait for them. A consumer is cancelled only then (nothing can be on its way
to it) or when the last member leaves: RabbitMQ 3.x requeues what it was sending a consumer
cancelled meanwhile behind newer messages, out of order, so an idle consumer is not cancelled.

Nothing stops the pushes for a while, so what ``subscriptions`` counts is settled by round
trips on the hub's channel (``settle``): whatever RabbitMQ sent before is then in the buffer.
Retention trims the group's queue from its head (``trim``): the head is the oldest of what the
hub holds back, then of what ``basic.get`` takes on the same channel; RabbitMQ numbers pushes and
gets on one channel in the order it sends them, and the driver buffers a push before it answers
a later get, so the head is never overtaken by an older event on its way.

What a member hands back (``release``, or ``close`` while other members stay) is kept by the
hub, still unacknowledged, and given out again first: a quorum queue puts a requeued message
behind newer ones, which the contract forbids. When the last member leaves, the hub cancels its
consumer, requeues what it holds (``nack``, oldest first) and closes its channel; when the
process dies, RabbitMQ requeues it when the connection drops. The ``attempt`` is RabbitMQ's
``x-delivery-count`` (returns counted by the quorum queue) plus the hand-outs the hub made
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from callboard.brokers.base import Delivery, RetentionPolicy
from callboard.brokers.rabbitmq_names import STAMP, TARGET, decode_event
from callboard.errors import SubscriptionError
from callboard.events import Event
from callboard.topics import TopicMatcher

if TYPE_CHECKING:
    from aio_pika.abc import AbstractConnection
    from aiormq.abc import DeliveredMessage
    from pamqp.commands import Basic

logger = logging.getLogger(__name__)

#: What the driver raises while RabbitMQ cannot be reached or a channel broke.
TRANSIENT = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, TimeoutError)
#: Seconds between two tries to consume again while RabbitMQ is unreachable.
RETRY = 1.0
#: Looks ``Hub.settle`` takes at most for two that agree.
_SETTLE_TRIES = 10
#: The largest prefetch window AMQP carries (``basic.qos`` takes a 16-bit count).
_MAX_WINDOW = 65_535


@dataclass(slots=True, eq=False)
class Held:
    """One message a hub took from its queue and has not settled yet."""

    message: AbstractIncomingMessage
    event: Event
    #: Deliveries RabbitMQ counted before this one (``x-delivery-count``).
    returns: int
    #: The consumer that pushed it, whose window it fills until settled (``None``: taken with
    #: ``basic.get``).
    tag: str | None = None
    #: Times the hub handed it out itself.
    handouts: int = 0

    @property
    def order(self) -> int:
        """Its place on the channel: RabbitMQ numbers what it sends a channel in order."""
        return self.message.delivery_tag or 0

    def alive(self) -> bool:
        """The channel it came on is open, so it can still be acknowledged."""
        try:
            return not self.message.channel.is_closed
        except ChannelInvalidStateError:
            return False

    def delivery(self) -> Delivery:
        self.handouts += 1
        return Delivery(self.event, attempt=self.returns + self.handouts, token=self)

    def expires(self, policy: RetentionPolicy, count: int, now: int) -> bool:
        """Whether ``policy`` deletes this event at the head of a queue of ``count`` events, at
        ``now`` (nanoseconds since the epoch). An event without the publish stamp (not written
        by this broker) counts as the oldest, so it never holds the queue's trimming up."""
        stamp = (self.message.headers or {}).get(STAMP)
        age = (now - stamp) / 1e9 if isinstance(stamp, int) else policy.max_age
        return age >= policy.max_age or (count > policy.max_count and age >= policy.min_age)


async def plain_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel that stays closed once closed: aio-pika's robust channels reopen themselves
    after an outage under new delivery tags, which would make held messages unsettleable
    without saying so; the broker reopens its own channels when it needs them."""
    if connection.transport is None:
        raise ConnectionError("the connection to RabbitMQ is down")
    channel = aio_pika.Channel(connection, publisher_confirms=False)
    try:
        await channel.initialize()
    except RuntimeError as error:  # aiormq: the connection closed meanwhile
        raise ConnectionError(str(error)) from error
    return channel


def _returns(message: AbstractIncomingMessage) -> int:
    count = (message.headers or {}).get("x-delivery-count", 0)
    return int(count) if isinstance(count, int) else 0


class Hub:
    """The group ``name`` as this broker instance reads it."""

    def __init__(
        self,
        connection: AbstractConnection,
        name: str,
        queue: str,
        topics: Sequence[str],
    ) -> None:
        self.name = name
        self.queue = queue
        self.topics = tuple(topics)
        self._matcher = TopicMatcher(self.topics)
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self.members: set[RabbitConsumer] = set()
        #: Handed back, waiting to be given out again before anything else.
        self.returned: deque[Held] = deque()
        #: Pushed by RabbitMQ, not handed out yet, in the order it sent them.
        self.buffer: deque[Held] = deque()
        #: The running consumer, its prefetch window, and per consumer what it pushed and is
        #: not settled yet (what fills its window).
        self._tag: str | None = None
        self._window = 0
        self._unsettled: Counter[str] = Counter()
        #: Events the fetches waiting now ask for.
        self._demand = 0
        self._gone = False
        #: RabbitMQ could not be reached since the last consumer started (said once).
        self._unreachable = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting: asyncio.Task[None] | None = None

    @property
    def gone(self) -> bool:
        """The group's queue was deleted (by another process): this hub can never read it."""
        return self._gone

    @property
    def backlog(self) -> int:
        """Events this process holds for the group and has not handed out."""
        return len(self.returned) + len(self.buffer)

    def take(self, max_count: int) -> list[Held]:
        """Up to ``max_count`` messages to hand out, handed-back ones first; those on a channel
        that broke were requeued by RabbitMQ and come again from the queue."""
        taken: list[Held] = []
        for source in (self.returned, self.buffer):
            while source and len(taken) < max_count:
                held = source.popleft()
                if held.alive():
                    taken.append(held)
        return taken

    def wake(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def hand_back(self, held: Sequence[Held], *, front: bool) -> None:
        if front:
            self.returned.extendleft(reversed(held))
        else:
            self.returned.extend(held)
        self.wake()

    def settled(self, held: Held) -> None:
        """``held`` was acknowledged or requeued: its consumer's window has room again."""
        self._free(held.tag)

    def _free(self, tag: str | None) -> None:
        if tag is not None and tag in self._unsettled:
            self._unsettled[tag] -= 1
            if self._unsettled[tag] <= 0:
                del self._unsettled[tag]

    # -- waiting for pushes --------------------------------------------------------------------

    async def wait(self, max_count: int) -> None:
        """Wait until something may be taken, starting the consumer when none can push."""
        if self._gone:
            raise self._gone_error()
        woken = self._wake
        self._demand += max_count
        try:
            # Once the last member left, nothing may consume: what came would be held here.
            while self._starved() and self.members:
                task = self._starting
                if task is None or task.done():
                    task = self._starting = self._spawn(self._start())
                # Shielded: a cancelled fetch must not leave a consumer half made.
                await asyncio.shield(task)
            if not self.buffer and not self.returned:
                await woken.wait()
        finally:
            self._demand -= max_count

    def _starved(self) -> bool:
        """Nothing to take, and no consumer that may push more."""
        if self.buffer or self.returned:
            return False
        return self._tag is None or self._window <= self._unsettled[self._tag]

    async def _start(self) -> None:
        """Consume with a window of what the waiting fetches ask for (a new consumer when the
        running one's window is full)."""
        async with self._lock:
            window = min(self._demand, _MAX_WINDOW)
            if not window or not self.members or not self._starved():
                return
            channel = await self._open()
            underlay = await channel.get_underlay_channel()
            await self._cancel()
            if self.buffer:
                return  # the cancelled consumer's last pushes
            # The demand when it began: fetches cancelled meanwhile must not make it 0
            # (unbounded).
            await underlay.basic_qos(prefetch_count=window)
            try:
                consumed = await underlay.basic_consume(self.queue, self._on_message)
            except ChannelNotFoundEntity:
                self._gone = True
                raise self._gone_error() from None
            self._tag, self._window = consumed.consumer_tag, window
            if self._unreachable:
                self._unreachable = False
                logger.info("group %s: RabbitMQ reachable again, consuming", self.name)

    def unreachable(self, error: BaseException) -> None:
        """A fetch could not consume: said once per outage, however many fetches retry."""
        if not self._unreachable:
            self._unreachable = True
            logger.warning(
                "group %s: RabbitMQ unreachable (%s); retrying every %gs",
                self.name,
                error or type(error).__name__,
                RETRY,
            )

    async def settle(self, ready: Callable[[], Awaitable[int | None]]) -> int | None:
        """The queue's ready count (``ready()``) once it and what this process holds agree
        twice in a row, a round trip on the channel after each look: RabbitMQ may be pushing
        what acknowledgements just freed."""
        seen: tuple[int | None, int] | None = None
        for _ in range(_SETTLE_TRIES):
            await self._flush()
            count = await ready()
            await self._flush()
            reading = (count, self.backlog)
            if reading == seen:
                break
            seen = reading
        return count

    async def _flush(self) -> None:
        """A round trip on the channel: what RabbitMQ sent it before is then buffered."""
        channel = self._channel
        if self._tag is None or channel is None or channel.is_closed:
            return
        underlay = await channel.get_underlay_channel()
        await underlay.basic_qos(prefetch_count=max(self._window, 1))

    async def _cancel(self) -> None:
        """Cancel the running consumer; its pushes sent before are in the buffer on return
        (those RabbitMQ was sending meanwhile it requeues: see the module's doc)."""
        tag, self._tag = self._tag, None
        channel = self._channel
        if tag is None or channel is None or channel.is_closed:
            return
        underlay = await channel.get_underlay_channel()
        await underlay.basic_cancel(tag)

    async def _open(self) -> AbstractChannel:
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = await plain_channel(self._connection)
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._cancelled)
            channel.close_callbacks.add(self._closed)
            self._channel, self._tag = channel, None
            self._unsettled.clear()
        return channel

    def _cancelled(self, frame: Basic.Cancel) -> None:
        """RabbitMQ cancelled the consumer (the queue was deleted, most likely): the next
        fetch consumes again, and finds out."""
        if frame.consumer_tag == self._tag:
            self._tag = None
            self.wake()

    def _closed(self, *_: object) -> None:
        """The channel closed (RabbitMQ requeued what it held): fetches start afresh."""
        self._tag = None
        self.wake()

    def _gone_error(self) -> SubscriptionError:
        return SubscriptionError(
            f"subscription {self.name!r} no longer exists (deleted by another process); "
            "subscribe again to make it afresh"
        )

    def _spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: whoever awaited it was told

    # -- what RabbitMQ sends -------------------------------------------------------------------

    async def _on_message(self, delivered: DeliveredMessage) -> None:
        message = aio_pika.IncomingMessage(delivered, no_ack=False)
        tag = message.consumer_tag
        if tag is not None:
            self._unsettled[tag] += 1
        # Nothing awaited before it is buffered: pushes are buffered in the order they came.
        held = self._admit(message, tag)
        if isinstance(held, Held):
            self._keep(held)
            self.wake()
            return
        with contextlib.suppress(*TRANSIENT):
            await self._drop(message, held)
        self._free(tag)

    def _keep(self, held: Held) -> None:
        """Buffer ``held`` in the channel's order (a message taken with ``basic.get`` may
        overtake pushes RabbitMQ sent before it)."""
        buffer = self.buffer
        if not buffer or buffer[-1].order < held.order:
            buffer.append(held)
            return
        ordered = sorted([*buffer, held], key=lambda h: h.order)
        buffer.clear()
        buffer.extend(ordered)

    def _admit(self, message: AbstractIncomingMessage, tag: str | None) -> Held | _Refusal:
        try:
            event = decode_event(message.body)
        except (ValueError, KeyError, TypeError) as error:
            # Not written by callboard (someone published to the queue): dropped, not retried.
            logger.error("group %s: dropped a message that is not an event (%s)", self.name, error)
            return "foreign"
        if TARGET not in (message.headers or {}) and not self._matcher(event.topic):
            # AMQP wildcards match ``$`` topics, callboard's do not: settle it unseen.
            return "unmatched"
        return Held(message, event, _returns(message), tag)

    @staticmethod
    async def _drop(message: AbstractIncomingMessage, refusal: _Refusal) -> None:
        if refusal == "foreign":
            await message.reject(requeue=False)
        else:
            await message.ack()

    # -- retention and leaving -----------------------------------------------------------------

    async def trim(
        self,
        policy: RetentionPolicy,
        ready: Callable[[], Awaitable[int | None]],
        *,
        limit: int,
    ) -> int:
        """Delete from the head of the group's queue, up to ``limit`` events, what ``policy``
        no longer keeps; how many events were deleted (the group's lost ones).

        The queue's count is its ready count (``ready()``, settled) plus what this process
        holds of the group, handed out or not; what other processes hold unacknowledged is
        not known over AMQP and not counted. The head is what this process holds back
        (handed back first, then pushed), then what ``basic.get`` takes; trimming stops at
        the first event kept, which stays held here as the newest of the buffer. Events
        handed out to members are counted, never deleted.

        ``basic.get`` is used only while the consumer cannot push: a quorum queue may send a
        push and a get's answer in either order, so a message pushed meanwhile could be
        older than the one got. Once settled, a consumer with room in its window has taken
        everything ready; what is deleted is acknowledged only at the end, so the window
        stays as full as it was."""
        deleted: list[Held] = []
        async with self._lock:
            waiting = await self.settle(ready)
            if waiting is None:
                return 0  # the queue is gone
            count = waiting + self.backlog + sum(m.in_flight for m in self.members)
            now = time.time_ns()
            handed_back = 0  # of ``deleted``, those taken from ``returned`` (the first ones)
            try:
                while len(deleted) < limit:
                    source = self._head()
                    if source is None:
                        if self._pushing():
                            break  # nothing ready when settled: what comes is newer
                        message = await self._get()
                        if message is None and self._head() is None:
                            break
                        if message is not None:
                            got = self._admit(message, None)
                            if isinstance(got, Held):
                                self._keep(got)
                            else:
                                await self._drop(message, got)
                                count -= 1
                        continue
                    if not source[0].expires(policy, count, now):
                        break
                    handed_back += source is self.returned
                    deleted.append(source.popleft())
                    count -= 1
            except BaseException:
                # Put back in place: nothing was acknowledged yet.
                self.buffer.extendleft(reversed(deleted[handed_back:]))
                self.returned.extendleft(reversed(deleted[:handed_back]))
                raise
            for held in deleted:
                await held.message.ack()
                self.settled(held)
        self.wake()
        return len(deleted)

    def _pushing(self) -> bool:
        """The running consumer has room in its window: RabbitMQ may push to it any time."""
        return self._tag is not None and self._window > self._unsettled[self._tag]

    def _head(self) -> deque[Held] | None:
        """Where the oldest event this process holds back is (handed back ones first); those
        on a channel that broke are forgotten (RabbitMQ requeued them)."""
        for source in (self.returned, self.buffer):
            while source and not source[0].alive():
                source.popleft()
            if source:
                return source
        return None

    async def _get(self) -> AbstractIncomingMessage | None:
        """The head of the queue, unacknowledged, on the hub's channel (``None``: empty)."""
        queue = await (await self._open()).get_queue(self.queue, ensure=False)
        return await queue.get(no_ack=False, fail=False)

    async def requeue_all(self, held: Sequence[Held]) -> None:
        """The last member left: everything held goes back to RabbitMQ, oldest first; the
        consumer stops and the channel closes (which requeues whatever it pushed since)."""
        async with self._lock:
            pending = sorted([*held, *self.returned, *self.buffer], key=lambda h: h.order)
            self.returned.clear()
            self.buffer.clear()
            try:
                await self._cancel()
                for item in pending:
                    if item.alive():
                        await item.message.nack(requeue=True)
            except TRANSIENT as error:
                # The channel is gone: RabbitMQ requeued its unacknowledged messages itself.
                logger.info("group %s: channel already closed (%s)", self.name, error)
            channel, self._channel = self._channel, None
            self.buffer.clear()
            self._unsettled.clear()
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*TRANSIENT):
                    await channel.close()

    async def abandon(self) -> None:
        """Forget everything without handing it back, as a killed process would."""
        for task in list(self._tasks):
            task.cancel()
        self.returned.clear()
        self.buffer.clear()
        self._channel = self._tag = None


#: Why a message that reached a group's queue is no event for the group.
_Refusal = Literal["foreign", "unmatched"]


class RabbitConsumer:
    """One member of a group: hands out what its hub takes, settles it on the hub's channel."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._held: dict[int, Held] = {}
        self.closed = False
        hub.members.add(self)

    @property
    def in_flight(self) -> int:
        return len(self._held)

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        hub = self._hub
        while not self.closed:
            batch = hub.take(max_count)
            if batch:
                # Nothing awaited from the take to the return: a cancelled fetch loses nothing.
                for held in batch:
                    self._held[id(held)] = held
                return [held.delivery() for held in batch]
            try:
                await hub.wait(max_count)
            except SubscriptionError:
                raise
            except TRANSIENT as error:
                hub.unreachable(error)
                await asyncio.sleep(RETRY)
        return ()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        taken = [held for delivery in deliveries if (held := self._take(delivery)) is not None]
        for held in taken:
            self._hub.settled(held)
        # Those on a channel that closed were requeued by RabbitMQ; skipping them, not stopping
        # at them, acknowledges the others of the batch (fetched on the channel open now).
        live = [held for held in taken if held.alive()]
        dropped, reason = len(taken) - len(live), "the channel closed"
        for index, held in enumerate(live):
            message = held.message
            try:
                # Written without waiting for the socket but the last: AMQP confirms no ack.
                await message.channel.basic_ack(
                    message.delivery_tag or 0, wait=index == len(live) - 1
                )
            except TRANSIENT as error:
                dropped, reason = dropped + len(live) - index, str(error) or type(error).__name__
                break
        if dropped:
            logger.warning(
                "group %s: %d acknowledgement(s) dropped (%s); those events come again",
                self._hub.name,
                dropped,
                reason,
            )

    def _take(self, delivery: Delivery) -> Held | None:
        token = delivery.token
        if not isinstance(token, Held):
            return None
        return self._held.pop(id(token), None)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        wanted = {id(d.token) for d in deliveries}
        # In the order they were fetched, whatever the order they are handed back in.
        released = [self._held.pop(key) for key in list(self._held) if key in wanted]
        if released:
            self._hub.hand_back(released, front=True)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        hub = self._hub
        hub.members.discard(self)
        hub.wake()
        held = list(self._held.values())
        self._held.clear()
        if hub.members:
            hub.hand_back(held, front=True)
        else:
            await hub.requeue_all(held)

    def abandon(self) -> None:
        """Stop without handing anything back (the connection drop will)."""
        self.closed = True
        self._hub.members.discard(self)
        self._held.clear()
