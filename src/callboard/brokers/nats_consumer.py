"""One member of a consumer group on NATS JetStream: pull requests, leases, handing back.

A group is two durable pull consumers on the events stream: its topics (one filter, see
``Layout.filter_subject``) and the events delivered to it alone (``deliver_to``). A member sends
its own pull requests (``CONSUMER.MSG.NEXT``) to an inbox of its own, so whatever arrives lands in
a local buffer, ordered by stream sequence, and a cancelled ``fetch`` loses nothing: the next one
takes it. Before handing anything out, a fetch asks both consumers for what they hold now
(``no_wait``), so events of the two come out in the order the stream stored them.

Everything a member holds (handed out or buffered) is leased to it by the consumer's ``AckWait``
and renewed (``+WPI``) while the member lives; ``release`` and ``close`` hand events back at once
(``-NAK``, which JetStream redelivers before newer events); a killed process renews nothing and
its events come back when ``AckWait`` runs out.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from callboard.brokers.base import Delivery
from callboard.brokers.nats_names import ack_position, decode_event
from callboard.errors import SubscriptionError
from callboard.topics import TopicMatcher

logger = logging.getLogger(__name__)

#: How long a waiting pull request lasts: also how soon a lost one (an outage) is noticed.
PULL_EXPIRES = 1.0
#: How long an immediate (``no_wait``) pull may take to be answered before asking why.
NO_WAIT_ANSWER = 0.5
#: Sources of a group: its topics, and what was delivered to it alone.
TOPICS, TARGETED = 0, 1

#: Where a handed-back event is, as (source, stream sequence): for the group's figures.
Released = set[tuple[int, int]]


@dataclass(slots=True, eq=False)
class Held:
    """A message leased to this member: the ``Delivery.token``."""

    msg: Msg
    seq: int
    source: int
    #: How many times JetStream has delivered it to the group, this time included.
    delivered: int = 1


@dataclass(slots=True, eq=False)
class _Source:
    """One durable consumer of the group and this member's pull request to it."""

    consumer: str
    inbox: str = ""
    sub: Subscription | None = None
    #: Messages the current request may still bring; 0: no request outstanding.
    wanted: int = 0
    deadline: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def waiting(self) -> bool:
        return self.wanted > 0 and time.monotonic() < self.deadline


@dataclass(frozen=True, slots=True)
class GroupHandle:
    """What a member needs of its broker, without importing it."""

    nc: Client
    js: JetStreamContext
    stream: str
    group: str
    key: str
    patterns: tuple[str, ...]
    lease: float
    timeout: float
    released: Released
    on_close: Callable[[NatsConsumer], None]


class NatsConsumer:
    """One member of a consumer group (``Consumer``)."""

    def __init__(self, handle: GroupHandle) -> None:
        self._h = handle
        self._matcher = TopicMatcher(handle.patterns)
        self._sources = (_Source(handle.key), _Source(handle.key + "_to"))
        self._buffer: list[Held] = []
        self._held: dict[int, Held] = {}
        self._wake = asyncio.Event()
        self._closed = False
        self._gone = False
        self._abandoned = False
        self._renewer: asyncio.Task[None] | None = None
        self._linger_task: asyncio.Future[None] | None = None
        #: Hand-backs of what arrived after closing, kept until done.
        self._late: set[asyncio.Future[None]] = set()

    @property
    def group(self) -> str:
        return self._h.group

    @property
    def buffered(self) -> int:
        """Messages leased to this member and not handed out yet (the group's backlog)."""
        return len(self._buffer)

    async def open(self) -> None:
        for index, source in enumerate(self._sources):
            source.inbox = self._h.nc.new_inbox()
            source.done.set()
            source.sub = await self._h.nc.subscribe(source.inbox, cb=self._receiver(index))
        self._renewer = asyncio.create_task(self._renew(), name=f"nats-lease-{self._h.key}")

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        if self._closed:
            return ()
        self._check_gone()
        await self._top_up(max_count, no_wait=True)
        while True:
            self._wake.clear()
            if self._closed:
                return ()
            taken = await self._take(max_count)
            if taken:
                return taken
            self._check_gone()
            await self._top_up(max_count, no_wait=False)
            try:
                await asyncio.wait_for(self._wake.wait(), PULL_EXPIRES + NO_WAIT_ANSWER)
            except TimeoutError:
                await self._check_lost_requests()

    def _check_gone(self) -> None:
        if self._gone:
            raise SubscriptionError(
                f"subscription {self._h.group!r} no longer exists: it was deleted on the NATS "
                "server; subscribe again to make it afresh"
            )

    async def _top_up(self, max_count: int, *, no_wait: bool) -> None:
        """Ask each consumer for what this member lacks, unless a request is out already."""
        asked: list[_Source] = []
        for index, source in enumerate(self._sources):
            need = max_count - sum(1 for held in self._buffer if held.source == index)
            if need <= 0 or source.waiting:
                continue
            if await self._request(source, need, no_wait=no_wait):
                asked.append(source)
        if no_wait and asked:
            # One after the other under one timeout: no task per answer awaited.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NO_WAIT_ANSWER):
                    for source in asked:
                        await source.done.wait()
            for source in asked:
                if not source.done.is_set():
                    # No answer at all: its consumer is gone (or the server is): find out.
                    source.wanted = 0
                    source.done.set()
                    await self._check_consumer(source)

    async def _request(self, source: _Source, batch: int, *, no_wait: bool) -> bool:
        body: dict[str, object] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
        else:
            body["expires"] = int(PULL_EXPIRES * 1e9)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self._h.stream}.{source.consumer}"
        source.wanted = batch
        source.deadline = time.monotonic() + PULL_EXPIRES + NO_WAIT_ANSWER
        source.done.clear()
        try:
            await self._h.nc.publish(subject, json.dumps(body).encode(), reply=source.inbox)
        except nats.errors.Error as error:
            source.wanted = 0
            source.done.set()
            logger.warning("subscription %r: cannot ask NATS for events (%s)", self.group, error)
            await asyncio.sleep(PULL_EXPIRES / 2)
            return False
        return True

    async def _check_lost_requests(self) -> None:
        """A request that neither delivered nor expired was lost (an outage) or its consumer was
        deleted: find out which, so that the next round asks again or stops."""
        for source in self._sources:
            if source.wanted > 0 and time.monotonic() >= source.deadline:
                source.wanted = 0
                source.done.set()
                await self._check_consumer(source)

    async def _check_consumer(self, source: _Source) -> None:
        try:
            await self._h.js.consumer_info(self._h.stream, source.consumer, timeout=self._h.timeout)
        except nats.js.errors.NotFoundError:
            self._gone = True
        except (nats.errors.Error, TimeoutError) as error:
            logger.warning(
                "subscription %r: NATS does not answer (%s); still waiting for events",
                self.group,
                error,
            )

    def _receiver(self, index: int) -> Callable[[Msg], Awaitable[None]]:
        async def receive(msg: Msg) -> None:
            self._receive(index, msg)

        return receive

    def _receive(self, index: int, msg: Msg) -> None:
        source = self._sources[index]
        if not msg.reply:
            self._status(source, msg)
            return
        if self._abandoned:
            return  # a killed process receives nothing and hands nothing back
        if self._closed:
            # Asked for before the member closed: straight back to the group.
            late = asyncio.ensure_future(self._settle([Held(msg, 0, index)], b"-NAK"))
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            return
        seq, delivered = ack_position(msg.reply)
        source.wanted -= 1
        if source.wanted <= 0:
            source.wanted = 0
            source.done.set()
        released = self._h.released
        if released:
            released.discard((index, seq))
        held = Held(msg, seq, index, delivered)
        buffer = self._buffer
        if buffer and buffer[-1].seq > seq:
            bisect.insort(buffer, held, key=lambda held: held.seq)
        else:
            buffer.append(held)  # the usual case: a pull's messages come in stream order
        self._wake.set()

    def _status(self, source: _Source, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        source.wanted = 0
        source.done.set()
        if status == "409":
            text = " ".join(str(value) for value in headers.values()).lower()
            if "deleted" in text:
                self._gone = True
        elif status not in ("404", "408", "100"):
            logger.warning("subscription %r: NATS answered a pull with %s", self.group, headers)
        self._wake.set()

    async def _take(self, max_count: int) -> list[Delivery]:
        taken: list[Delivery] = []
        dropped: list[Held] = []
        buffer = self._buffer
        while buffer and len(taken) < max_count:
            # Taken off the front a batch at a time, not one ``pop(0)`` per message.
            batch = buffer[: max_count - len(taken)]
            del buffer[: len(batch)]
            for held in batch:
                self._hand_out(held, taken, dropped)
        if dropped:
            await self._settle(dropped, b"+ACK")
        return taken

    def _hand_out(self, held: Held, taken: list[Delivery], dropped: list[Held]) -> None:
        """Add ``held`` to ``taken`` as a delivery, or to ``dropped`` when it is not one."""
        try:
            event = decode_event(held.msg.data)
        except (ValueError, KeyError, TypeError):
            logger.warning("subscription %r: dropped a message that is no event", self.group)
            dropped.append(held)
            return
        if held.source == TOPICS and not self._matcher(event.topic):
            dropped.append(held)  # under the group's filter, outside its patterns
            return
        self._held[id(held)] = held
        taken.append(Delivery(event, held.delivered, held))

    # -- settling -------------------------------------------------------------------------------

    def _mine(self, deliveries: Sequence[Delivery]) -> list[Held]:
        wanted = {id(d.token) for d in deliveries if isinstance(d.token, Held)}
        # In the order they were fetched, whatever the order they are handed back in.
        return [self._held.pop(key) for key in list(self._held) if key in wanted]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._settle(self._mine(deliveries), b"+ACK")

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        back = self._mine(deliveries)
        self._h.released.update((held.source, held.seq) for held in back)
        await self._settle(back, b"-NAK")

    async def _settle(self, held: Sequence[Held], verb: bytes) -> None:
        """Acknowledge or hand back, confirmed by the server (so figures read next see it).

        Only the last message of each consumer asks for a reply: JetStream handles the acks of
        one consumer in the order one connection sent them, so its reply to the last says that
        every one before it was handled too. A reply per message (each a message in, parsed and
        called back) cost as much as receiving the events themselves.
        """
        if not held:
            return
        nc = self._h.nc
        last = {h.source: h for h in held}  # per consumer, its last one (a dict keeps the last)
        failure: Exception | None = None
        try:
            for h in held:
                if last[h.source] is not h:
                    await nc.publish(h.msg.reply, verb)
        except nats.errors.Error as error:
            failure = error
        unconfirmed = set(last) if failure else set()
        # In turn rather than gathered: almost always one, then sent with the others at once.
        for source, h in last.items() if failure is None else ():
            try:
                await nc.request(h.msg.reply, verb, timeout=self._h.timeout)
            except (nats.errors.Error, TimeoutError) as error:
                failure = error  # no responders (its consumer is gone), a timeout, an outage
                unconfirmed.add(source)
        failed = sum(1 for h in held if h.source in unconfirmed)
        if failed:
            logger.warning(
                "subscription %r: %d of %d %s not confirmed by NATS (%s); those events come "
                "again after their lease",
                self.group,
                failed,
                len(held),
                verb.decode(),
                failure,
            )

    async def _renew(self) -> None:
        """Keep the leases of what this member holds while it lives."""
        interval = max(self._h.lease / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            for held in [*self._held.values(), *self._buffer]:
                with contextlib.suppress(nats.errors.Error):
                    await self._h.nc.publish(held.msg.reply, b"+WPI")

    # -- leaving --------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._stop_renewing()
        back = [*self._held.values(), *self._buffer]
        self._held.clear()
        self._buffer.clear()
        back.sort(key=lambda held: held.seq)
        self._h.released.update((held.source, held.seq) for held in back)
        try:
            await self._settle(back, b"-NAK")
        finally:
            self._h.on_close(self)
            self._linger()

    def abandon(self) -> None:
        """Stop as a killed process would: renew nothing, hand nothing back."""
        self._abandoned = True
        self._closed = True
        self._wake.set()
        self._stop_renewing()
        self._held.clear()
        self._buffer.clear()

    def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    def _linger(self) -> None:
        """Keep the inboxes until requests still out have expired, handing back what they bring
        (a pull request cannot be withdrawn), then leave."""
        until = max((s.deadline for s in self._sources if s.waiting), default=0.0)
        delay = max(0.0, until - time.monotonic())

        async def leave() -> None:
            await asyncio.sleep(delay)
            for source in self._sources:
                if source.sub is not None:
                    with contextlib.suppress(nats.errors.Error):
                        await source.sub.unsubscribe()

        self._linger_task = asyncio.ensure_future(leave())
