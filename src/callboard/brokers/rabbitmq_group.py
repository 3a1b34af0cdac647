"""The consumers of the RabbitMQ broker: one hub per group and broker instance, its members.

A group is a quorum queue. A hub takes messages from it with ``basic.get`` on one channel of its
own, so every member's deliveries can be acknowledged on the channel that received them, and
RabbitMQ counts exactly what this process holds as unacknowledged. What a member hands back
(``release``, or ``close`` while other members stay) is kept by the hub, still unacknowledged,
and given out again first: a quorum queue puts a requeued message behind newer ones, which the
contract forbids. When the last member leaves, the hub requeues what it holds (``nack``) and
closes its channel; when the process dies, RabbitMQ requeues it when the connection drops.
The ``attempt`` is RabbitMQ's ``x-delivery-count`` (returns counted by the quorum queue) plus the
hand-outs the hub made itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity

from callboard.brokers.base import Delivery
from callboard.brokers.rabbitmq_names import TARGET, decode_event
from callboard.errors import SubscriptionError
from callboard.events import Event
from callboard.topics import TopicMatcher

if TYPE_CHECKING:
    from aio_pika.abc import AbstractConnection

logger = logging.getLogger(__name__)

#: What the driver raises while RabbitMQ cannot be reached or a channel broke.
TRANSIENT = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, TimeoutError)


@dataclass(slots=True, eq=False)
class Held:
    """One message a hub took from its queue and has not settled yet."""

    message: AbstractIncomingMessage
    event: Event
    #: Deliveries RabbitMQ counted before this one (``x-delivery-count``).
    returns: int
    #: Times the hub handed it out itself.
    handouts: int = 0

    def alive(self) -> bool:
        """The channel it came on is open, so it can still be acknowledged."""
        try:
            return not self.message.channel.is_closed
        except ChannelInvalidStateError:
            return False

    def delivery(self) -> Delivery:
        self.handouts += 1
        return Delivery(self.event, attempt=self.returns + self.handouts, token=self)


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


class Hub:
    """The group ``name`` as this broker instance reads it."""

    def __init__(
        self, connection: AbstractConnection, name: str, queue: str, topics: Sequence[str]
    ) -> None:
        self.name = name
        self.queue = queue
        self.topics = tuple(topics)
        self._matcher = TopicMatcher(self.topics)
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self.members: set[RabbitConsumer] = set()
        #: Handed back, waiting to be given out again before anything from the queue.
        self.returned: deque[Held] = deque()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    async def _open(self) -> AbstractChannel:
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = self._channel = await plain_channel(self._connection)
        return channel

    def next_returned(self) -> Held | None:
        """The first handed-back message still on a live channel; those on a channel that
        broke were requeued by RabbitMQ and come again from the queue."""
        while self.returned:
            held = self.returned.popleft()
            if held.alive():
                return held
        return None

    def wake(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    async def wait(self, poll: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), poll)

    def hand_back(self, held: Sequence[Held], *, front: bool) -> None:
        if front:
            self.returned.extendleft(reversed(held))
        else:
            self.returned.extend(held)
        self.wake()

    async def pull(self, into: list[Held], max_count: int) -> None:
        """Take up to ``max_count`` messages from the queue into ``into`` (what a cancelled
        fetch leaves there, the next one returns)."""
        async with self._lock:
            channel = await self._open()
            queue = await channel.get_queue(self.queue, ensure=False)
            while len(into) < max_count:
                try:
                    message = await queue.get(no_ack=False, fail=False)
                except ChannelNotFoundEntity:
                    raise SubscriptionError(
                        f"subscription {self.name!r} no longer exists (deleted by another "
                        "process); subscribe again to make it afresh"
                    ) from None
                if message is None:
                    return
                held = await self._accept(message)
                if held is not None:
                    into.append(held)

    async def _accept(self, message: AbstractIncomingMessage) -> Held | None:
        try:
            event = decode_event(message.body)
        except (ValueError, KeyError, TypeError) as error:
            # Not written by callboard (someone published to the queue): dropped, not retried.
            logger.error("group %s: dropped a message that is not an event (%s)", self.name, error)
            await message.reject(requeue=False)
            return None
        headers = message.headers or {}
        if TARGET not in headers and not self._matcher(event.topic):
            # AMQP wildcards match ``$`` topics, callboard's do not: settle it unseen.
            await message.ack()
            return None
        count = headers.get("x-delivery-count", 0)
        return Held(message, event, int(count) if isinstance(count, int) else 0)

    async def trim(self, deleted: set[str]) -> int:
        """Drop the deleted events from the head of the queue and from what was handed back;
        how many were dropped (the group's lost events)."""
        lost = 0
        kept: deque[Held] = deque()
        for held in self.returned:
            if held.event.id in deleted:
                await held.message.ack()
                lost += 1
            else:
                kept.append(held)
        self.returned = kept
        async with self._lock:
            queue = await (await self._open()).get_queue(self.queue, ensure=False)
            while True:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                kept_one = await self._accept(message)
                if kept_one is None:
                    continue
                if kept_one.event.id not in deleted:
                    # The first event kept: it stays here, first in line, not requeued behind.
                    self.returned.append(kept_one)
                    break
                await message.ack()
                lost += 1
        return lost

    async def requeue_all(self, held: Sequence[Held]) -> None:
        """The last member left: everything held goes back to RabbitMQ, the channel closes."""
        pending = [*held, *self.returned]
        self.returned.clear()
        channel = self._channel
        self._channel = None
        try:
            for item in pending:
                await item.message.nack(requeue=True)
            if channel is not None and not channel.is_closed:
                await channel.close()
        except TRANSIENT as error:
            # The channel is gone: RabbitMQ requeued its unacknowledged messages itself.
            logger.info("group %s: channel already closed (%s)", self.name, error)

    async def abandon(self) -> None:
        """Forget everything without handing it back, as a killed process would."""
        self.returned.clear()
        self._channel = None


class RabbitConsumer:
    """One member of a group: hands out what its hub takes, settles it on the hub's channel."""

    def __init__(self, hub: Hub, poll: float) -> None:
        self._hub = hub
        self._poll = poll
        self._held: dict[int, Held] = {}
        self._pending: list[Held] = []
        self._pull: asyncio.Task[None] | None = None
        self.closed = False
        hub.members.add(self)

    @property
    def in_flight(self) -> int:
        return len(self._held)

    @property
    def buffered(self) -> int:
        return len(self._pending)

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        hub = self._hub
        while not self.closed:
            while len(self._pending) < max_count and (held := hub.next_returned()) is not None:
                self._pending.append(held)
            if not self._pending:
                await self._pull_some(max_count)
            if self.closed:
                break
            if self._pending:
                batch = self._pending[:max_count]
                del self._pending[:max_count]
                deliveries = [held.delivery() for held in batch]
                for held in batch:
                    self._held[id(held)] = held
                return deliveries
            await hub.wait(self._poll)
        return ()

    async def _pull_some(self, max_count: int) -> None:
        task = self._pull
        if task is None or task.done():
            task = asyncio.ensure_future(self._hub.pull(self._pending, max_count))
            self._pull = task
        try:
            # Shielded: a cancelled fetch leaves what the pull took in ``_pending``.
            await asyncio.shield(task)
        except SubscriptionError:
            raise
        except TRANSIENT as error:
            logger.warning(
                "group %s: RabbitMQ unreachable (%s); retrying",
                self._hub.name,
                error or type(error),
            )
            await asyncio.sleep(self._poll * 5)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            held = self._take(delivery)
            if held is None:
                continue
            try:
                await held.message.ack()
            except TRANSIENT as error:
                logger.warning(
                    "group %s: acknowledgement dropped (%s); the event comes again",
                    self._hub.name,
                    error or type(error),
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
        if self._pull is not None and not self._pull.done():
            # Let it finish rather than cancel it: what it takes must be handed back too.
            with contextlib.suppress(Exception):
                await self._pull
        held = [*self._pending, *self._held.values()]
        self._pending.clear()
        self._held.clear()
        if hub.members:
            hub.hand_back(held, front=True)
        else:
            await hub.requeue_all(held)

    def abandon(self) -> None:
        """Stop without handing anything back (the connection drop will)."""
        self.closed = True
        self._hub.members.discard(self)
        self._pending.clear()
        self._held.clear()
        if self._pull is not None and not self._pull.done():
            self._pull.cancel()
