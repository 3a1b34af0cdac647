"""The history of the RabbitMQ broker: a stream of every event, and new groups filled from it.

With ``?history=true`` the broker declares a stream queue, ``<prefix>history``, bound to the
events exchange by ``#``: RabbitMQ appends every event published there to it, under the same
publisher confirm as the groups' queues. Dead letters and ``deliver_to`` go through the default
exchange to one queue each, so they stay out of it. RabbitMQ deletes the stream's oldest events
by age (``x-max-age``, the retention policy's ``max_age``) a segment at a time, when it starts a
new segment; the segments are kept small (``SEGMENT_BYTES``) so that age retention bites on a
small installation too, not after hundreds of megabytes.

A new group that starts at the beginning or at a time is a quorum queue like any other, filled
from the stream before the exchange routes anything to it:

1. its queue is declared, not bound;
2. a marker (a message with the ``MARKER`` header, which every reader skips) is published
   straight into the stream, and the stream is read from the start up to it: the events of the
   group's patterns (callboard's own matching) stamped at or after the start are published into
   the queue, in the stream's order;
3. what was published while that was read is read the same way, up to a new marker, a few
   rounds while there is much of it, so that step 4 follows the last round closely;
4. the queue is bound by its patterns; a last marker is published, and the events between the
   previous marker and it are copied too.

Why bind last: binding first would put every live event ahead of the history copied after it.
The rounds of step 3 are this module's addition to a single marker before the binding: the
events published while the whole history was copied would otherwise all come after the live
events routed once the queue is bound.

The window of step 4: an event published between the previous marker and the binding reaches
the queue only as a copy, after live events published after the binding (out of order); one
published between the binding and the last marker is routed to the queue and copied as well
(twice: at-least-once allows a duplicate, never a loss). None is lost: an event the exchange
routed before the binding existed was handed to the stream before the binding was made, so it
precedes the last marker (on one node an Erlang process's messages are in the stream's mailbox
as soon as sent; in a cluster this rests on the binding's round trips outlasting the hand-over).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, TypeAlias

from aio_pika.exceptions import AMQPError
from pamqp.commands import Basic

from callboard.brokers.base import RetentionPolicy
from callboard.brokers.rabbitmq_group import plain_channel
from callboard.brokers.rabbitmq_names import MARKER, STAMP, decode_event
from callboard.topics import TopicMatcher

if TYPE_CHECKING:
    from aio_pika.abc import AbstractConnection
    from aiormq.abc import DeliveredMessage
    from pamqp.common import FieldTable

#: The largest segment of the stream, in bytes: RabbitMQ deletes by age whole segments, once a
#: newer one was started, so an event older than ``max_age`` stays until about this much more
#: was written after it.
#: 16 MiB: small enough for age retention to bite on a small installation, large enough that a
#: day of a busy one is hundreds of segment files, not tens of thousands.
SEGMENT_BYTES = 16 << 20
#: Seconds read before a start time: the stream is read from the chunk RabbitMQ stamped with its
#: own clock, events are taken by the publisher's stamp, and the two clocks may differ.
CLOCK_SLACK = 60.0
#: Stream messages RabbitMQ sends the reader before it acknowledges any, and the most events
#: copied at once (their publishes pipelined, their confirms awaited together).
PREFETCH = 512
#: Rounds read after the history, each up to a new marker, before the binding: the history's
#: reading may take long, and events published meanwhile would come after live ones.
CATCH_UP_ROUNDS = 3
#: Tries to start reading the stream (see ``HistoryReader``).
_OPEN_TRIES = 3

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Where a replaying group starts.
PastStart: TypeAlias = Literal["beginning"] | datetime


def stream_arguments(retention: RetentionPolicy, segment_bytes: int = SEGMENT_BYTES) -> FieldTable:
    """How the history stream is declared."""
    return {
        "x-queue-type": "stream",
        "x-max-age": f"{max(1, math.ceil(retention.max_age))}s",
        "x-stream-max-segment-size-bytes": segment_bytes,
    }


def stream_offset(start: PastStart) -> str | datetime:
    """Where reading the stream begins for ``start`` (``x-stream-offset``)."""
    if isinstance(start, datetime):
        # An AMQP timestamp cannot be before the epoch: nothing was stored before it anyway.
        if start - _EPOCH <= timedelta(seconds=CLOCK_SLACK):
            return "first"
        return start - timedelta(seconds=CLOCK_SLACK)
    return "first"


def _nanoseconds(moment: datetime) -> int:
    """``moment`` in nanoseconds since the epoch, exactly (a float would round it)."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class Copy:
    """An event of the stream to publish into the group's queue, with its publish stamp."""

    body: bytes
    properties: Basic.Properties


class Selection:
    """Which events of the stream a new group takes: those of its patterns stamped at or after
    its start, and not older than the retention policy keeps anything."""

    def __init__(
        self, patterns: Sequence[str], start: PastStart, retention: RetentionPolicy
    ) -> None:
        self._matcher = TopicMatcher(patterns)
        oldest = time.time_ns() - int(retention.max_age * 1e9)
        since = _nanoseconds(start) if isinstance(start, datetime) else 0
        #: Nanoseconds since the epoch; an event stamped before is not taken.
        self.since = max(oldest, since)

    def take(self, message: DeliveredMessage) -> Copy | None:
        """The copy of the stream message ``message`` for the group, or ``None``."""
        properties = message.header.properties
        headers = properties.headers or {}
        if MARKER in headers:
            return None
        try:
            event = decode_event(message.body)
        except (ValueError, KeyError, TypeError):
            return None  # not written by callboard: no group's reader would take it either
        if not self._matcher(event.topic):
            return None
        stamp = headers.get(STAMP)
        if not isinstance(stamp, int):
            stamp = None
        moment = stamp if stamp is not None else _nanoseconds(event.time)
        if moment < self.since:
            return None
        copied = Basic.Properties(
            delivery_mode=2,
            message_id=properties.message_id,
            content_type=properties.content_type,
            # The stream's own headers (``x-stream-offset``) stay behind; the stamp goes along,
            # so the group's retention ages the copy by its first publish.
            headers={STAMP: stamp} if stamp is not None else {},
        )
        return Copy(message.body, copied)


class HistoryReader:
    """One reading of the history stream, on a connection of its own, from an offset on.

    A connection of its own: RabbitMQ 3.10 may fail a stream consumer that starts while
    retention is deleting the stream's first segment by closing its whole connection
    (``INTERNAL_ERROR``), which must not take the broker's consumers, publishes and locks with
    it; starting is tried again (``_OPEN_TRIES``). RabbitMQ pushes up to ``PREFETCH`` messages
    before the reader acknowledges any: a stream consumer needs a prefetch window, and
    acknowledgements for flow control (they delete nothing). A wait longer than ``timeout`` for
    the next message, while a marker already published is not reached, raises
    ``TimeoutError``; a channel that closed, ``ConnectionError``.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[AbstractConnection]],
        stream: str,
        offset: str | datetime,
        timeout: float,
    ) -> None:
        self._connect = connect
        self._stream = stream
        self._offset = offset
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._pushed: deque[DeliveredMessage] = deque()
        self._arrived = asyncio.Event()
        self._broken: str | None = None

    async def open(self) -> None:
        for attempt in range(1, _OPEN_TRIES + 1):
            self._broken = None
            self._connection = await self._connect()
            try:
                channel = await plain_channel(self._connection)
                channel.close_callbacks.add(self._closed)
                underlay = await channel.get_underlay_channel()
                await underlay.basic_qos(prefetch_count=PREFETCH)
                await underlay.basic_consume(
                    self._stream, self._on_message, arguments={"x-stream-offset": self._offset}
                )
                return
            except (AMQPError, ConnectionError):
                await self.close()
                if attempt == _OPEN_TRIES:
                    raise

    async def close(self) -> None:
        """Close the connection: the consumer goes with it (nothing is to be handed back)."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(AMQPError, ConnectionError, OSError):
                await connection.close()

    async def _on_message(self, message: DeliveredMessage) -> None:
        # Nothing awaited before: messages are kept in the order RabbitMQ pushed them.
        self._pushed.append(message)
        self._arrived.set()

    def _closed(self, _: object, error: BaseException | None = None) -> None:
        self._broken = str(error) if error else "closed"
        self._arrived.set()

    async def upto(
        self,
        token: str,
        take: Callable[[DeliveredMessage], Copy | None],
        send: Callable[[Sequence[Copy]], Awaitable[None]],
    ) -> tuple[int, int]:
        """Read up to the marker ``token``, sending, batch after batch, the copies ``take``
        makes; how many stream messages were read, and how many copies sent."""
        read = sent = 0
        while True:
            batch, reached = await self._batch(token)
            copies = [copy for message in batch if (copy := take(message)) is not None]
            if copies:
                await send(copies)
            # Acknowledged once copied: RabbitMQ sends more (a stream keeps what is read).
            await batch[-1].channel.basic_ack(batch[-1].delivery_tag or 0, multiple=True)
            read, sent = read + len(batch), sent + len(copies)
            if reached:
                return read, sent

    async def _batch(self, token: str) -> tuple[list[DeliveredMessage], bool]:
        """What was pushed, up to ``PREFETCH`` messages, ending at the marker ``token`` if it is
        among them (what follows it stays for the next reading); whether it was."""
        while not self._pushed:
            if self._broken is not None:
                raise ConnectionError(f"the channel reading {self._stream} {self._broken}")
            self._arrived.clear()
            async with asyncio.timeout(self._timeout):
                await self._arrived.wait()
        batch: list[DeliveredMessage] = []
        while self._pushed and len(batch) < PREFETCH:
            message = self._pushed.popleft()
            batch.append(message)
            headers = message.header.properties.headers or {}
            if _text(headers.get(MARKER)) == token:
                return batch, True
        return batch, False


@dataclass(frozen=True, slots=True)
class Filling:
    """What filling a new group asks of the broker."""

    #: Publish a new marker into the stream, confirmed; its token.
    mark: Callable[[], Awaitable[str]]
    #: Publish copies into the group's queue, in order, confirmed.
    send: Callable[[Sequence[Copy]], Awaitable[None]]
    #: Bind the group's queue by its patterns.
    bind: Callable[[], Awaitable[None]]


async def fill(reader: HistoryReader, selection: Selection, steps: Filling) -> int:
    """Fill a new group's queue from the stream and bind it (the module's steps 2 to 4); how
    many events were copied into it."""
    read, copied = await reader.upto(await steps.mark(), selection.take, steps.send)
    for _ in range(CATCH_UP_ROUNDS):
        if read <= PREFETCH:
            break
        read, more = await reader.upto(await steps.mark(), selection.take, steps.send)
        copied += more
    await steps.bind()
    _, more = await reader.upto(await steps.mark(), selection.take, steps.send)
    return copied + more
