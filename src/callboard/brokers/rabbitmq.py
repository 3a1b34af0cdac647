"""The broker on RabbitMQ: ``amqp://user:password@host:5672/vhost?prefix=callboard.``.

Design
------
Events are published, with publisher confirms, to one durable topic exchange
(``<prefix>events``) under their topic as routing key (``rabbitmq_names``). A consumer group is a
durable quorum queue (``<prefix>group.<id>``) bound by its patterns, so RabbitMQ does the
matching and keeps each group's events until acknowledged; the hubs of ``rabbitmq_group``
consume them (``basic.consume`` with a prefetch window sized by the fetches waiting) and
acknowledge them manually. What a process held comes back when its connection drops (the lease
is the connection, kept alive by AMQP heartbeats).

RabbitMQ has no key-value store and no deduplication: group metadata (patterns, owner, lost
counts) lives in a registry queue (``rabbitmq_store``); delivery ids are remembered by each
broker instance (a bounded window), so a redelivery is refused when it reaches the same server
process, not across processes. Dead letters are a classic queue per group.

A quorum queue forgets what it delivered, so there is no replay unless the URL asks for history
(``?history=true``): then every event is also kept in a stream, from which a new group that
starts at the beginning or at a time is filled before it is bound (``rabbitmq_history``), and
``Capabilities.replay`` is true. Making a group (its queue, then its registry record as
complete) is done by one server at a time, under a lock of the group's; a group never recorded
complete, its making cut off, is made afresh by the next subscribe.

Each event is stored once per group that takes it, and nowhere else: retention trims each
group's queue from its head, counting ``max_count`` per queue (``Hub.trim``), which a server
does for the groups it reads. An event no group takes is confirmed and dropped. Earlier
versions kept a copy of every event in a ``<prefix>ledger`` queue; starting or migrating deletes
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Literal, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pamqp.commands import Basic
from pamqp.common import FieldTable

from callboard.brokers import redact_url
from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
    name_problem,
)
from callboard.brokers.rabbitmq_group import TRANSIENT, Hub, RabbitConsumer, plain_channel
from callboard.brokers.rabbitmq_history import (
    SEGMENT_BYTES,
    Copy,
    Filling,
    HistoryReader,
    PastStart,
    Selection,
    fill,
    stream_arguments,
    stream_offset,
)
from callboard.brokers.rabbitmq_names import (
    MARKER,
    STAMP,
    TARGET,
    RabbitSettings,
    binding_key,
    encode_event,
    history_name,
    making_name,
    parse_url,
    queue_name,
    routing_key,
)
from callboard.brokers.rabbitmq_store import (
    DeliveryWindow,
    dead_letters,
    exclusive,
    forget_group,
    group_fact,
    read_groups,
)
from callboard.brokers.storable import check_storable
from callboard.errors import BrokerError, BrokerUnavailable, SubscriptionError
from callboard.events import Event
from callboard.logs import quiet_aiormq_outages
from callboard.topics import normalize_patterns

logger = logging.getLogger(__name__)

_QUORUM: FieldTable = {"x-queue-type": "quorum"}
#: What ``RabbitBroker._join`` found of a group.
_Found = Literal["joined", "adopt", "left", "none"]
#: Seconds at most between two tries of the lock of a group another server is making (filling
#: a replaying group from the history can take long).
_MAKING_RETRY = 0.5


class RabbitBroker:
    """Events in RabbitMQ: a topic exchange, a quorum queue per consumer group."""

    def __init__(
        self,
        settings: RabbitSettings,
        *,
        lease: float | None = None,
        retention: RetentionPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.retention = retention if retention is not None else RetentionPolicy()
        #: Seconds without a heartbeat after which RabbitMQ takes this process for dead and
        #: requeues what its consumers held (``?heartbeat=``; a plain attribute, read at start).
        self.lease = lease if lease is not None else settings.heartbeat
        prefix = settings.prefix
        self._exchange_name = f"{prefix}events"
        self._registry = f"{prefix}registry"
        #: The queue earlier versions copied every event to, deleted where it remains.
        self._ledger = f"{prefix}ledger"
        #: The stream of every event, with ``?history=true``.
        self._history = history_name(prefix)
        #: The largest segment of that stream, in bytes (a plain attribute, read when the stream
        #: is declared): age retention deletes whole segments.
        self.history_segment = SEGMENT_BYTES
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._hubs: dict[str, Hub] = {}
        self._window = DeliveryWindow(self.retention)
        self._cleaner: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> RabbitBroker:
        """The ``BrokerFactory`` of ``amqp://`` and ``amqps://`` URLs."""
        return cls(parse_url(url), retention=retention)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=True, shared=True, replay=self.settings.history)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _connect(self) -> AbstractRobustConnection:
        # Added once: ``addFilter`` skips a filter it already has.
        quiet_aiormq_outages()
        heartbeat = max(1, round(self.lease))
        url = redact_url(self.settings.url)
        try:
            async with asyncio.timeout(self.settings.timeout):
                return await aio_pika.connect_robust(
                    self.settings.url,
                    heartbeat=heartbeat,
                    timeout=self.settings.timeout,
                    client_properties={"connection_name": "callboard"},
                )
        except (*TRANSIENT, aio_pika.exceptions.AMQPException) as error:
            raise BrokerUnavailable(
                f"cannot connect to RabbitMQ at {url} ({error or type(error).__name__}); "
                "check that it runs and that the URL's host, port, user and vhost are right"
            ) from error

    async def start(self) -> None:
        async with self._lock:
            if self._connection is not None:
                return
            connection = await self._connect()
            try:
                async with asyncio.timeout(self.settings.timeout):
                    channel = await connection.channel(publisher_confirms=True)
                    await self._declare(connection, channel)
            except TRANSIENT as error:
                await connection.close()
                raise BrokerUnavailable(f"RabbitMQ failed while starting: {error}") from error
            self._connection, self._channel = connection, channel
            self._cleaner = asyncio.create_task(self._clean_every_interval())

    async def close(self) -> None:
        for hub in list(self._hubs.values()):
            for member in list(hub.members):
                await member.close()
        self._hubs.clear()
        await self._stop()

    async def abandon(self) -> None:
        """Stop as a killed process would: hand nothing back (RabbitMQ requeues what this
        connection held when it drops)."""
        for hub in self._hubs.values():
            for member in list(hub.members):
                member.abandon()
            await hub.abandon()
        self._hubs.clear()
        await self._stop()

    async def _stop(self) -> None:
        if self._cleaner is not None:
            self._cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._cleaner
            self._cleaner = None
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is not None:
            with contextlib.suppress(*TRANSIENT):
                await connection.close()

    async def check(self) -> None:
        """``BrokerHealth``: the connection is up and RabbitMQ answers on it (a channel opened,
        the events exchange declared passively, the channel closed), within ``timeout``."""
        url = redact_url(self.settings.url)
        connection = self._connection
        if connection is None:
            raise BrokerUnavailable(f"the RabbitMQ broker for {url} is not started")
        async with self._boundary(f"checking the connection to {url}"):
            found = await self._probe(connection, self._exchange_name, exchange=True)
        if found is None:
            raise BrokerUnavailable(
                f"RabbitMQ at {url} answers, but the exchange {self._exchange_name!r} is gone; "
                "run callboard migrate (or restart the server) to declare it again"
            )

    def _live(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise BrokerError("the RabbitMQ broker is not started (call start() first)")
        return self._connection

    @contextlib.asynccontextmanager
    async def _boundary(self, doing: str, *, bounded: bool = True) -> AsyncIterator[None]:
        """Driver errors become callboard's; a wait longer than the timeout is unavailability
        (with ``bounded`` false, only each wait the work bounds itself, not the whole)."""
        try:
            async with asyncio.timeout(self.settings.timeout if bounded else None):
                yield
        except TimeoutError as error:
            raise BrokerUnavailable(
                f"RabbitMQ did not answer within {self.settings.timeout:g}s while {doing}"
            ) from error
        except TRANSIENT as error:
            raise BrokerUnavailable(
                f"RabbitMQ failed while {doing} ({error or type(error).__name__}); retry later"
            ) from error

    # -- schema ------------------------------------------------------------------------------

    async def _declare(
        self, connection: AbstractRobustConnection, channel: AbstractChannel
    ) -> list[str]:
        """Declare the exchange, the registry and (with history on) the history stream, and
        delete the ledger of earlier versions; what was done (nothing when everything was
        already in place)."""
        done = [
            f"declared {name}"
            for name, exchange in ((self._exchange_name, True), (self._registry, False))
            if await self._probe(connection, name, exchange=exchange) is None
        ]
        await channel.declare_exchange(
            self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        await channel.declare_queue(self._registry, durable=True)
        done += await self._declare_history(connection)
        if await self._probe(connection, self._ledger) is not None:
            # Every event's second copy, which no version reads any more and none would trim.
            async with self._plain(connection) as deleting:
                await deleting.queue_delete(self._ledger)
            logger.info("deleted %s, the copy of every event earlier versions kept", self._ledger)
            done.append(f"deleted {self._ledger} (retention now trims each subscription's queue)")
        return done

    async def _declare_history(self, connection: AbstractRobustConnection) -> list[str]:
        """With history on, declare the stream and bind it to every event; what was done.
        With it off, a stream left from when it was on is only reported: it still takes a copy
        of every event, and deleting it is the operator's call (it holds what replays read)."""
        name = self._history
        found = await self._probe(connection, name) is not None
        if not self.settings.history:
            if found:
                logger.warning(
                    "%s exists but ?history is not on: RabbitMQ still copies every event to it. "
                    "Turn history on (?history=true in events.broker) or delete it "
                    "(rabbitmqctl delete_queue %s)",
                    name,
                    name,
                )
            return []
        arguments = stream_arguments(self.retention, self.history_segment)
        async with self._plain(connection) as declaring:
            try:
                await declaring.declare_queue(name, durable=True, arguments=arguments)
            except aio_pika.exceptions.ChannelPreconditionFailed as error:
                # Arguments cannot change once declared: it keeps those it was declared with.
                logger.warning(
                    "%s keeps the arguments it was declared with (%s); to apply events.retention."
                    "maxAge (%s), delete it (rabbitmqctl delete_queue %s: what it held is lost) "
                    "and start a server",
                    name,
                    error,
                    arguments["x-max-age"],
                    name,
                )
        async with self._plain(connection) as binding:
            stream = await binding.get_queue(name, ensure=False)
            await stream.bind(self._exchange_name, "#")
        return [] if found else [f"declared {name} (the history replays read)"]

    @staticmethod
    async def _probe(
        connection: AbstractRobustConnection, name: str, *, exchange: bool = False
    ) -> int | None:
        """The messages ready in queue ``name`` (0 for an exchange), ``None`` when it does not
        exist. A passive declare on a channel of its own: RabbitMQ closes it when not found."""
        transport = connection.transport
        if transport is None:
            raise ConnectionError("the connection to RabbitMQ is down")
        try:
            probe = await transport.connection.channel()
        except RuntimeError as error:  # aiormq: the connection closed meanwhile
            raise ConnectionError(str(error)) from error
        try:
            if exchange:
                await probe.exchange_declare(name, passive=True)
                return 0
            declared = await probe.queue_declare(name, passive=True)
            return int(declared.message_count or 0)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not probe.is_closed:
                await probe.close()

    async def migrate(self) -> list[str]:
        if self._connection is not None and self._channel is not None:
            async with self._boundary("creating the exchange and queues"):
                return await self._declare(self._connection, self._channel)
        connection = await self._connect()
        try:
            async with self._boundary("creating the exchange and queues"):
                channel = await connection.channel()
                return await self._declare(connection, channel)
        finally:
            await connection.close()

    async def _ready(self, name: str) -> int | None:
        """The messages waiting in queue ``name``, or ``None`` when there is no such queue."""
        return await self._probe(self._live(), name)

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, event: Event) -> bool:
        check_storable(event)
        if event.topic.startswith(DEAD_LETTER_PREFIX):
            target = queue_name(
                self.settings.prefix, "dead", event.topic[len(DEAD_LETTER_PREFIX) :]
            )
            key = routing_key(event.topic)
        else:
            target, key = None, routing_key(event.topic)
        delivery = event.delivery_id
        seen = (event.topic, delivery) if delivery is not None else None
        if seen is not None and self._window.seen(seen):
            return False
        try:
            if target is None:
                await self._send(event, key)
            else:
                await self._send_dead_letter(event, target)
        except BaseException:
            if seen is not None:
                self._window.forget(seen)
            raise
        return True

    @staticmethod
    def _properties(event: Event, headers: FieldTable | None = None) -> Basic.Properties:
        return Basic.Properties(
            delivery_mode=2,  # persistent
            message_id=event.id,
            content_type="application/json",
            headers={STAMP: time.time_ns(), **(headers or {})},
        )

    async def _confirmed(
        self,
        exchange: str,
        key: str,
        body: bytes,
        properties: Basic.Properties,
        channel: AbstractChannel | None = None,
    ) -> None:
        """Publish one message; return once RabbitMQ confirmed it, fail on a nack, and on a
        return when it goes to one queue by name (the default exchange).

        The message goes straight to aiormq's channel without waiting for the socket to drain
        (``wait=False``): aio-pika's ``Exchange.publish`` waits for it while holding the
        channel's lock, so concurrent publishes would queue one behind the other for a turn of
        the writer each. Here they only wait for their own confirm, which RabbitMQ sends for
        many at once (``multiple``); the channel's bounded write queue still holds a fast
        publisher back. An event on the events exchange that no group's binding takes is
        dropped (no group asked for it); a message for one queue is ``mandatory``: RabbitMQ
        returns it, instead of dropping it, when that queue is gone. ``channel``: a confirm
        channel of the caller's instead of the publishing one."""
        channel = channel or self._channel
        if channel is None:
            raise BrokerUnavailable("the RabbitMQ broker is closed")
        # aio-pika's channels run on aiormq's; its abstract class does not declare ``wait``.
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        try:
            answer = await underlay.basic_publish(
                body,
                exchange=exchange,
                routing_key=key,
                properties=properties,
                mandatory=not exchange,
                wait=False,
            )
        except aiormq.exceptions.DeliveryError as error:
            raise BrokerUnavailable(
                f"RabbitMQ refused the message for {key!r} (basic.nack): a queue it goes to is "
                "full or RabbitMQ is short of memory or disk; retry later"
            ) from error
        if not isinstance(answer, Basic.Ack):
            raise BrokerError(
                f"RabbitMQ has no queue {key!r} (deleted meanwhile): run callboard migrate "
                "to declare the registry again, or subscribe again to make a subscription's "
                "queue afresh"
            )

    async def _send(self, event: Event, key: str) -> None:
        self._live()
        async with self._boundary(f"publishing an event on {event.topic!r}"):
            body = encode_event(event)
            await self._confirmed(self._exchange_name, key, body, self._properties(event))

    async def _send_dead_letter(self, event: Event, queue: str) -> None:
        self._live()
        async with self._boundary(f"keeping a dead letter on {event.topic!r}"):
            async with self._plain() as declaring:
                await declaring.declare_queue(queue, durable=True)
            await self._confirmed("", queue, encode_event(event), self._properties(event))

    @contextlib.asynccontextmanager
    async def _plain(
        self, connection: AbstractRobustConnection | None = None
    ) -> AsyncIterator[AbstractChannel]:
        """A channel of its own for declaring and deleting queues: aio-pika's robust channel
        declares again, after each reconnection, every queue declared through it, which would
        bring a deleted subscription's queue back."""
        channel = await plain_channel(connection or self._live())
        try:
            yield channel
        finally:
            if not channel.is_closed:
                await channel.close()

    # -- consuming ---------------------------------------------------------------------------

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> RabbitConsumer:
        problem = name_problem(group)
        if problem is not None:
            raise SubscriptionError(problem)
        patterns = normalize_patterns(tuple(topics))
        connection = self._live()
        queue = queue_name(self.settings.prefix, "group", group)
        hub = self._hubs.get(group)
        if hub is not None and hub.gone and not hub.members:
            # Deleted by another process since this one read it: subscribing makes it afresh.
            del self._hubs[group]
            hub = None
        if hub is not None and hub.topics != patterns:
            raise self._other_topics(group, hub.topics)
        async with self._boundary(f"joining subscription {group!r}"):
            found = await self._join(group, queue, patterns, owner)
        if found != "joined":
            await self._make(group, queue, patterns, start, owner)
        hub = self._hubs.get(group)
        if hub is None:
            hub = self._hubs[group] = Hub(connection, group, queue, patterns)
        return RabbitConsumer(hub)

    async def _join(
        self, group: str, queue: str, patterns: tuple[str, ...], owner: str | None
    ) -> _Found:
        """``joined`` when the group is there, made to the end (recorded complete, its queue
        present), ``owner`` then recorded if it has none yet; ``adopt`` for a queue no server of
        this version began making (an earlier version made it, or the registry lost its
        records): it holds events, so it is kept; otherwise whether anything of it is ``left``
        (a queue or records of a making cut off, or records of a vanished queue)."""
        exists = await self._ready(queue) is not None
        record = (await read_groups(self._live(), self._registry)).get(group)
        if record is not None and record.complete:
            if record.topics != patterns:
                raise self._other_topics(group, record.topics)
            if exists:
                if record.owner is None and owner is not None:
                    await self._record(group_fact(group, topics=patterns, owner=owner))
                return "joined"
        if exists and (record is None or not record.making):
            if record is not None and record.topics and record.topics != patterns:
                raise self._other_topics(group, record.topics)
            return "adopt"
        return "left" if exists or record is not None else "none"

    def _check_start(self, group: str, start: Start) -> None:
        if start == "end":
            return
        if not self.settings.history:
            raise SubscriptionError(
                f"subscription {group!r} cannot start at {start!r}: this RabbitMQ broker keeps "
                "no history to replay. Turn history on with ?history=true in events.broker "
                "(every event is then also kept in a stream, for events.retention.maxAge), or "
                "subscribe with start='end'"
            )
        if isinstance(start, datetime):
            if start.utcoffset() is None:
                raise SubscriptionError(
                    f"subscription {group!r}: a start time must be timezone-aware, not {start}"
                )
        elif start != "beginning":
            raise SubscriptionError(
                f"subscription {group!r}: start must be 'end', 'beginning' or a datetime, "
                f"not {start!r}"
            )

    async def _make(
        self,
        group: str,
        queue: str,
        patterns: tuple[str, ...],
        start: Start,
        owner: str | None,
    ) -> None:
        """Make the group, one server at a time: under the group's lock, join it if another
        server made it meanwhile; otherwise forget what a making cut off left, record the
        group as being made, make its queue (filled from the history for a start in the past)
        and only then record it complete. A lock held by a server that died is freed with its
        connection; the wait for a live one is as long as its making takes."""
        lock = making_name(self.settings.prefix, group)
        async with (
            self._boundary(f"making subscription {group!r}", bounded=False),
            exclusive(self._live(), lock, longest_wait=_MAKING_RETRY),
        ):
            async with self._boundary(f"making subscription {group!r}"):
                found = await self._join(group, queue, patterns, owner)
                if found == "joined":
                    return
                if found == "adopt":
                    await self._adopt(group, queue, patterns, owner)
                    return
                self._check_start(group, start)
                if found == "left":
                    await self._forget_unmade(group, queue)
                await self._record(group_fact(group, topics=patterns, owner=owner, making=True))
                async with self._plain() as channel:
                    await channel.declare_queue(queue, durable=True, arguments=_QUORUM)
            try:
                if start == "end":
                    async with self._boundary(f"binding subscription {group!r}"):
                        await self._bind(queue, patterns)
                else:
                    await self._fill(group, queue, patterns, start)
                async with self._boundary(f"recording subscription {group!r}"):
                    await self._record(group_fact(group, topics=patterns, owner=owner))
            except BaseException:
                # Not made: nothing of it should wait for the next subscribe (a replay's
                # reading group would never be subscribed again).
                with contextlib.suppress(Exception):
                    async with self._boundary(f"discarding subscription {group!r}"):
                        await self._forget_unmade(group, queue)
                raise

    async def _adopt(
        self, group: str, queue: str, patterns: tuple[str, ...], owner: str | None
    ) -> None:
        """Keep a queue that has no complete record and was not being made by this version,
        with its events: bind it (again: binding is idempotent) and record it complete."""
        await self._bind(queue, patterns)
        await self._record(group_fact(group, topics=patterns, owner=owner))
        logger.info(
            "subscription %s: its queue had no complete record (made by an earlier version, or "
            "the registry lost it); kept with its events and recorded",
            group,
        )

    async def _forget_unmade(self, group: str, queue: str) -> None:
        """Delete the queue and then the records of a group not made to the end (the queue
        first: a queue left without records would be adopted, records without a queue are
        only made afresh)."""
        connection = self._live()
        forgotten = False
        if await self._ready(queue) is not None:
            async with self._plain() as channel:
                await channel.queue_delete(queue)
            forgotten = True
        forgotten = await forget_group(connection, self._registry, group) or forgotten
        if forgotten:
            logger.info(
                "subscription %s was not made to the end (its making was cut off, or its queue "
                "is gone); making it afresh",
                group,
            )

    async def _bind(self, queue: str, patterns: Sequence[str]) -> None:
        async with self._plain() as channel:
            declared = await channel.get_queue(queue, ensure=False)
            for pattern in patterns:
                await declared.bind(self._exchange_name, binding_key(pattern))

    async def _fill(
        self, group: str, queue: str, patterns: tuple[str, ...], start: PastStart
    ) -> None:
        """Fill the group's queue with the kept events of its patterns since ``start``, then
        bind it (``rabbitmq_history``). Each wait is bounded by the timeout, not the whole."""
        doing = f"filling subscription {group!r} from {self._history}"
        async with self._boundary(doing):
            if await self._ready(self._history) is None:
                raise BrokerError(
                    f"the history stream {self._history!r} is gone, so {group!r} cannot start "
                    f"at {start!r}: run callboard migrate (or restart the server) to declare "
                    "it again; it holds the events published from then on"
                )
        timeout = self.settings.timeout
        connect = functools.partial(
            aio_pika.connect,
            self.settings.url,
            heartbeat=max(1, round(self.lease)),
            timeout=timeout,
            client_properties={"connection_name": "callboard history"},
        )
        reader = HistoryReader(connect, self._history, stream_offset(start), timeout)

        copying: AbstractChannel | None = None

        async def send(copies: Sequence[Copy]) -> None:
            # Started in order, so written in order on the confirm channel; confirmed together.
            # A channel of the fill's own: on the publishing one, a long fill held every live
            # publish behind its copies (their median went from 0.5 to 24 ms).
            async with asyncio.timeout(timeout):
                answers = await asyncio.gather(
                    *(self._confirmed("", queue, c.body, c.properties, copying) for c in copies),
                    return_exceptions=True,
                )
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer

        async def bind() -> None:
            async with asyncio.timeout(timeout):
                await self._bind(queue, patterns)

        async with self._boundary(doing, bounded=False):
            try:
                async with asyncio.timeout(timeout):
                    await reader.open()
                    copying = await self._live().channel(publisher_confirms=True)
                steps = Filling(mark=self._mark, send=send, bind=bind)
                copied = await fill(reader, Selection(patterns, start, self.retention), steps)
            finally:
                with contextlib.suppress(*TRANSIENT):
                    await reader.close()
                if copying is not None and not copying.is_closed:
                    with contextlib.suppress(*TRANSIENT):
                        await copying.close()
        logger.info("subscription %s starts with %d kept events (since %s)", group, copied, start)

    async def _mark(self) -> str:
        """Publish a marker into the history stream; its token."""
        token = uuid.uuid4().hex
        properties = Basic.Properties(delivery_mode=2, headers={MARKER: token})
        async with asyncio.timeout(self.settings.timeout):
            await self._confirmed("", self._history, b"", properties)
        return token

    @staticmethod
    def _other_topics(group: str, topics: Sequence[str]) -> SubscriptionError:
        return SubscriptionError(
            f"subscription {group!r} already reads {list(topics)}; delete it first to change "
            "its topics"
        )

    async def _record(self, fact: bytes) -> None:
        await self._confirmed("", self._registry, fact, Basic.Properties(delivery_mode=2))

    # -- operations --------------------------------------------------------------------------

    async def subscriptions(self) -> list[SubscriptionInfo]:
        connection = self._live()
        found: list[SubscriptionInfo] = []
        async with self._boundary("listing subscriptions"):
            counts: dict[str, int | None] = {}
            for name, reading in list(self._hubs.items()):
                if reading.members:
                    queue = queue_name(self.settings.prefix, "group", name)
                    counts[name] = await reading.settle(functools.partial(self._ready, queue))
            records = await read_groups(connection, self._registry)
            for name in sorted(records):
                hub = self._hubs.get(name)
                if name in counts:
                    ready = counts[name]
                else:
                    ready = await self._ready(queue_name(self.settings.prefix, "group", name))
                if ready is None:
                    continue
                record = records[name]
                in_flight = sum(m.in_flight for m in hub.members) if hub else 0
                local = hub.backlog if hub else 0
                found.append(
                    SubscriptionInfo(
                        name=name,
                        topics=record.topics,
                        in_flight=in_flight,
                        backlog=ready + local,
                        lost=record.lost,
                        owner=record.owner,
                    )
                )
        return found

    async def delete_subscription(self, group: str) -> bool:
        hub = self._hubs.get(group)
        if hub is not None and hub.members:
            raise SubscriptionError(
                f"subscription {group!r} is still read by a consumer of this server; "
                "stop it (close its consumers) before deleting it"
            )
        self._hubs.pop(group, None)
        connection = self._live()
        async with self._boundary(f"deleting subscription {group!r}"):
            # The queues first: a queue left without its records (a server killed in between)
            # would be adopted as a subscription by the next subscribe.
            forgotten = False
            for kind in ("group", "dead"):
                name = queue_name(self.settings.prefix, kind, group)
                if await self._ready(name) is not None:
                    async with self._plain() as channel:
                        await channel.queue_delete(name)
                    forgotten = True
            forgotten = await forget_group(connection, self._registry, group) or forgotten
        return forgotten

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        connection = self._live()
        queue = queue_name(self.settings.prefix, "dead", group)
        async with self._boundary(f"reading the dead letters of {group!r}"):
            if await self._ready(queue) is None:
                return []
            return await dead_letters(connection, queue, ids=ids, remove=remove, limit=limit)

    async def deliver_to(self, group: str, event: Event) -> None:
        check_storable(event)
        self._live()
        queue = queue_name(self.settings.prefix, "group", group)
        async with self._boundary(f"delivering an event to {group!r}"):
            if await self._ready(queue) is None:
                raise SubscriptionError(f"no subscription {group!r} to deliver the event to")
            properties = self._properties(event, {TARGET: group})
            await self._confirmed("", queue, encode_event(event), properties)

    async def clean(self) -> int:
        """Trim the queue of every group this server reads; how many events were deleted (an
        event deleted from two groups' queues counts twice)."""
        self._live()
        deleted = 0
        for hub in list(self._hubs.values()):
            if hub.members:
                deleted += await self._trim(hub)
        return deleted

    async def _trim(self, hub: Hub) -> int:
        """Apply retention to one group's queue, ``batch_size`` events at a time, each batch
        recorded as the group's lost events before the next (one batch within ``timeout``);
        a group that fails (deleted meanwhile) spoils none of the others."""
        queue = queue_name(self.settings.prefix, "group", hub.name)
        ready = functools.partial(self._ready, queue)
        limit = self.retention.batch_size
        deleted = 0
        while True:
            async with self._boundary(f"applying retention to {hub.name!r}"):
                try:
                    lost = await hub.trim(self.retention, ready, limit=limit)
                except TRANSIENT as error:
                    logger.warning("retention skipped subscription %s: %s", hub.name, error)
                    return deleted
                if lost:
                    await self._record(group_fact(hub.name, lost=lost))
            deleted += lost
            if lost < limit:
                return deleted

    async def _clean_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.retention.interval)
            try:
                deleted = await self.clean()
            except Exception as error:
                logger.warning("RabbitMQ retention failed (%s); trying again later", error)
            else:
                if deleted:
                    logger.info("RabbitMQ retention deleted %d events", deleted)
