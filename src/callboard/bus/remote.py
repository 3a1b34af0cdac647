"""``RemoteBroker``: the broker of a Python service that reaches callboard over the bus API.

``callboard+http://:TOKEN@host:7007`` (or ``callboard+https://``, or ``?token=TOKEN``) in
``events.broker`` makes a service publish and subscribe through a callboard server, with no
database access of its own. Publishing is ``POST events``; a consumer ``PUT``s its subscription
and long-polls ``GET .../deliveries``, whose events are leased to it until acknowledged.

Guarantees: an event is acknowledged to the server only after the handler is done with it; the
leases of events still being handled are renewed; events a closing consumer had not handled are
handed back at once, and those of a consumer that vanished come back when their lease ends.
Acknowledgements go out together (``POST .../acks`` through the group-commit engine); closing a
consumer (or the broker) sends those still queued and waits for their answer, at most
``CLOSE_TIMEOUT`` seconds, before it returns, so leaving a service right after a handler returned
does not deliver that event again. ``release`` hands deliveries back (``POST .../nacks``), which
the server does not count as a failure. While the server cannot be reached the consumer retries with backoff (1 s, doubling, at most
60 s) and subscribes again when the server no longer knows its subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from callboard.brokers.base import (
    Capabilities,
    Delivery,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.brokers.storable import check_storable
from callboard.bus.client import BusClient
from callboard.errors import BrokerError, BrokerUnavailable, ConfigError, SubscriptionError
from callboard.events import Event
from callboard.group_commit import GroupCommit

logger = logging.getLogger("callboard.bus.remote")


DEFAULT_LEASE_MS = 30_000
_SCHEMES = {"callboard+http": "http", "callboard+https": "https"}


#: Acknowledgements sent in one request at most.
MAX_ACKS_PER_REQUEST = 1_000
#: Seconds acknowledgements wait for more before they go out. Delivery is at least once, so an
#: acknowledgement may take its time, and a consumer reading batch after batch then sends one
#: request for several batches (a request costs the server and the client far more than an id).
ACK_LINGER = 0.01
#: Attempts at sending a batch of acknowledgements while the consumer is open.
ACK_ATTEMPTS = 3
#: Seconds a closing consumer gives its last acknowledgements (and lease renewal) to reach the
#: server before it gives up on them with a warning.
CLOSE_TIMEOUT = 5.0


class RemoteConsumer:
    """One member of a subscription held on a callboard server."""

    def __init__(
        self,
        broker: RemoteBroker,
        group: str,
        topics: tuple[str, ...],
        start: Start,
        *,
        subscribed: bool,
    ) -> None:
        self._broker = broker
        self._client = broker.client
        self._group = group
        self._topics = topics
        self._start = start
        self._subscribed = subscribed
        self._lease_ms = broker.lease_ms
        self._buffer: deque[Delivery] = deque()
        self._outstanding: dict[str, Delivery] = {}
        #: Acknowledgements go out through the group-commit engine: every batch queued while a
        #: request is on its way rides the next request.
        self._acks: GroupCommit[str, None] = GroupCommit(self._send_acks, MAX_ACKS_PER_REQUEST)
        #: Acknowledged and not handed to ``_acks`` yet; they go together after ``ACK_LINGER``.
        self._unsent: list[str] = []
        self._lingering: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[list[None]]] = set()
        #: While a batch of acknowledgements is being sent: its time limit, which ``close``
        #: shortens to its own.
        self._cutoff: asyncio.Timeout | None = None
        self._deadline: float | None = None
        self._closed = asyncio.Event()
        self._done = asyncio.Event()
        self._renewer: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[bool] | None = None

    @property
    def group(self) -> str:
        """The subscription id this consumer reads."""
        return self._group

    # -- fetch ---------------------------------------------------------------------------------

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        if self._renewer is None and not self._closed.is_set():
            self._renewer = asyncio.create_task(
                self._renew_leases(), name=f"callboard-leases-{self._group}"
            )
        backoff = self._broker.backoff_start
        while not self._buffer:
            if self._closed.is_set():
                return ()
            if self._polling is None:
                # Runs to its end even if this fetch is cancelled: what it brings waits in the
                # buffer for the next fetch instead of being lost until its lease ends.
                self._polling = asyncio.create_task(
                    self._poll(max_count), name=f"callboard-poll-{self._group}"
                )
            polling = self._polling
            closed = asyncio.create_task(self._closed.wait())
            try:
                await asyncio.wait({polling, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if not polling.done() or polling.cancelled():
                return ()  # closed: ``close`` ends the poll
            self._polling = None
            try:
                just_subscribed = polling.result()
            except BrokerError as error:
                logger.warning(
                    "poll failed for subscription %r, retrying in %.0fs: %s",
                    self._group,
                    backoff,
                    error,
                )
            else:
                if self._buffer or not just_subscribed or self._subscribed:
                    backoff = self._broker.backoff_start
                    continue
                # Unknown straight after subscribing: do not spin, wait like after a failure.
            if await self._sleep(backoff):
                return ()
            backoff = min(backoff * 2, self._broker.backoff_max)
        count = min(max_count, len(self._buffer))
        batch = [self._buffer.popleft() for _ in range(count)]
        for delivery in batch:
            self._outstanding[str(delivery.token)] = delivery
        return batch

    async def _poll(self, max_count: int) -> bool:
        """One round: subscribe if needed, then one long-poll. True if it had to subscribe."""
        subscribed_now = False
        if not self._subscribed:
            await self._client.put_subscription(self._group, self._topics, self._start)
            self._subscribed = subscribed_now = True
        polled = await self._client.poll(self._group, self._lease_ms, max_count)
        if polled.missing:
            logger.info("subscription %r is unknown to the server, subscribing again", self._group)
            self._subscribed = False
        for item in polled.deliveries:
            self._buffer.append(Delivery(item.event, item.attempt, item.ack_id))
        return subscribed_now

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; ``True`` if the consumer was closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)
        return self._closed.is_set()

    # -- settling ------------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Start acknowledging; ``close`` waits until the server has them (or gives up).

        The events service awaits each acknowledgement of a broker that is not durable before
        it handles the next event: a request per event would set the pace, so acknowledgements
        are only queued here, for ``ACK_LINGER`` seconds, and sent by the group-commit engine.
        """
        outstanding = self._outstanding
        unsent = self._unsent
        was_empty = not unsent
        for delivery in deliveries:
            ack_id = str(delivery.token)
            if outstanding.pop(ack_id, None) is not None:
                unsent.append(ack_id)
        if was_empty and unsent:
            self._lingering = asyncio.get_running_loop().call_later(ACK_LINGER, self._submit)

    def _submit(self) -> None:
        """Hand the acknowledgements queued so far to the engine, together."""
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if not self._unsent:
            return
        ids, self._unsent = self._unsent, []
        task = asyncio.ensure_future(self._acks.submit_many(ids))
        self._sending.add(task)
        task.add_done_callback(self._sent)

    async def settled(self) -> None:
        """Wait until every acknowledgement made so far has had its answer (or been given up)."""
        self._submit()
        if self._sending:
            await asyncio.wait(list(self._sending))
        await self._acks.wait_idle()

    def _sent(self, task: asyncio.Task[list[None]]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "subscription %r: acknowledgements failed, the events will be delivered again: %s",
                self._group,
                task.exception(),
            )

    async def _send_acks(self, ids: list[str]) -> list[None]:
        """The engine's flush: one ``POST .../acks`` for the batch, retried with backoff.

        Never raises for a request that failed: the events come back when their lease ends,
        which at-least-once delivery allows, so a warning says so and the batch is done.
        """
        backoff = self._broker.backoff_start
        try:
            async with asyncio.timeout_at(self._deadline) as cutoff:
                self._cutoff = cutoff
                for attempt in range(1, ACK_ATTEMPTS + 1):
                    try:
                        result = await self._client.ack(self._group, ids)
                    except BrokerError as error:
                        if attempt == ACK_ATTEMPTS or not error.retriable:
                            self._lost(ids, error)
                            break
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, self._broker.backoff_max)
                        continue
                    if result.unknown:
                        logger.info(
                            "subscription %r: the server no longer held %d deliveries (lease "
                            "expired or server restarted); they will be delivered again",
                            self._group,
                            len(result.unknown),
                        )
                    break
        except TimeoutError:
            self._lost(ids, f"not answered within {CLOSE_TIMEOUT:.0f}s of closing")
        finally:
            self._cutoff = None
        return [None] * len(ids)

    def _lost(self, ids: Sequence[str], why: object) -> None:
        logger.warning(
            "subscription %r: %d acknowledgements could not be sent, the events will be "
            "delivered again: %s",
            self._group,
            len(ids),
            why,
        )

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back to the server (``POST .../nacks``), not counted as failures."""
        outstanding = self._outstanding
        ids = [
            ack_id
            for ack_id in (str(d.token) for d in deliveries)
            if outstanding.pop(ack_id, None) is not None
        ]
        if ids:
            await self._hand_back(ids)

    async def _hand_back(self, ids: list[str]) -> None:
        try:
            await self._client.nack(self._group, ids)
        except BrokerError as error:
            logger.info(
                "subscription %r: %d unhandled events come back when their lease ends: %s",
                self._group,
                len(ids),
                error,
            )

    async def _renew_leases(self) -> None:
        period = self._lease_ms / 3000
        while not await self._sleep(period):
            held = [str(d.token) for d in (*self._buffer, *self._outstanding.values())]
            if not held:
                continue
            try:
                await self._client.renew(self._group, held, self._lease_ms)
            except BrokerError as error:
                logger.warning("subscription %r: leases not renewed: %s", self._group, error)

    # -- closing -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Leave: send the acknowledgements still queued, hand the unhandled events back.

        Returns once no request of this consumer is on its way, so the broker may close its
        HTTP client next. Acknowledgements the server has not answered within
        ``CLOSE_TIMEOUT`` seconds are given up with a warning (their events come back).
        """
        if self._closed.is_set():
            await self._done.wait()  # a second caller returns when the first is done
            return
        self._closed.set()
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + CLOSE_TIMEOUT
        try:
            if self._polling is not None:
                # A long poll has nothing to finish: what it would bring comes back to the
                # group when its lease ends.
                self._polling.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._polling
            if self._cutoff is not None:
                self._cutoff.reschedule(self._deadline)
            await self.settled()
            if self._renewer is not None:
                # Asleep, it ends at once; renewing, it is let finish within the time left.
                _, late = await asyncio.wait(
                    [self._renewer], timeout=max(0.0, self._deadline - loop.time())
                )
                for task in late:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            unhandled = [str(d.token) for d in (*self._buffer, *self._outstanding.values())]
            self._buffer.clear()
            self._outstanding.clear()
            if unhandled:
                await self._hand_back(unhandled)
        finally:
            self._broker._forget(self)
            self._done.set()


class RemoteBroker:
    """A broker that is a callboard server, reached over the bus API."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        lease_ms: int = DEFAULT_LEASE_MS,
        backoff: tuple[float, float] = (1.0, 60.0),
        transport: Any = None,
    ) -> None:
        self.server = server
        self.lease_ms = lease_ms
        self.backoff_start, self.backoff_max = backoff
        self._token = token
        self._transport = transport
        self._client: BusClient | None = None
        self._consumers: set[RemoteConsumer] = set()

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> RemoteBroker:
        """``callboard+http://:TOKEN@host:port[/prefix][?token=TOKEN&leaseMs=30000]``.

        ``retention`` is the server's business and is ignored here.
        """
        parts = urlsplit(url)
        scheme = _SCHEMES.get(parts.scheme.lower())
        if scheme is None or not parts.hostname:
            raise ConfigError("events.broker", "expected callboard+http(s)://[:TOKEN@]host[:port]")
        query = parse_qs(parts.query)
        unknown = set(query) - {"token", "leaseMs"}
        if unknown:
            raise ConfigError(
                "events.broker", f"unknown parameters {sorted(unknown)}; use token and leaseMs"
            )
        token = parts.password or next(iter(query.get("token", [])), None)
        lease = (query.get("leaseMs") or [str(DEFAULT_LEASE_MS)])[0]
        if not lease.isdigit() or int(lease) < 1:
            raise ConfigError("events.broker", "leaseMs must be a positive whole number")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        port = f":{parts.port}" if parts.port else ""
        return cls(f"{scheme}://{host}{port}{parts.path.rstrip('/')}", token, lease_ms=int(lease))

    def __repr__(self) -> str:  # the token stays out of logs
        return f"RemoteBroker({self.server!r})"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(shared=True)

    @property
    def client(self) -> BusClient:
        if self._client is None:
            self._client = BusClient(self.server, self._token, transport=self._transport)
        return self._client

    async def start(self) -> None:
        _ = self.client

    async def check(self) -> None:
        """``BrokerHealth``: the server answers on the bus path."""
        if self._client is None:
            raise BrokerUnavailable(f"the remote broker for {self.server} is not started")
        await self._client.ping()

    async def close(self) -> None:
        """Close the consumers (they send their last acknowledgements), then the client."""
        await asyncio.gather(*(consumer.close() for consumer in list(self._consumers)))
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def publish(self, event: Event) -> bool:
        # Refused here as every broker refuses it, before a request the server would refuse.
        check_storable(event)
        return await self.client.publish(event)

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> RemoteConsumer:
        if start != "end":
            # The server keeps only the events some subscription reads (Backstage's bus answers
            # "no readers" otherwise), so what a new group would replay is incomplete.
            raise SubscriptionError(
                f"subscription {group!r}: the remote broker cannot start a new group at "
                f"{start!r}, since the server keeps only events that some subscription reads; "
                "start at 'end', or replay on the server (`callboard replay`)"
            )
        # ``owner`` is not sent: the server records the caller its token names as the owner.
        try:
            await self.client.put_subscription(group, topics, start)
            subscribed = True
        except BrokerError as error:
            if not error.retriable:
                raise
            # The server is not up yet: the consumer subscribes once it is (Backstage #27207).
            logger.warning(
                "subscription %r: will subscribe when the server is back: %s", group, error
            )
            subscribed = False
        consumer = RemoteConsumer(self, group, tuple(topics), start, subscribed=subscribed)
        self._consumers.add(consumer)
        return consumer

    async def deliver_to(self, group: str, event: Event) -> None:
        await self.client.deliver_to(group, event)

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        return await self.client.dead_letters(group, ids=ids, limit=limit, remove=remove)

    async def subscriptions(self) -> list[SubscriptionInfo]:
        # What this process acknowledged is counted as acknowledged.
        await asyncio.gather(*(consumer.settled() for consumer in self._consumers))
        return await self.client.subscriptions()

    async def delete_subscription(self, group: str) -> bool:
        """Forget the subscription on the server, as ``DELETE .../subscriptions/{id}`` does.

        Refused while a consumer of this broker still reads the group: it would subscribe again
        at its next poll, making the subscription anew. Consumers of other processes do just
        that too, so stop them first.
        """
        if any(consumer.group == group for consumer in self._consumers):
            raise SubscriptionError(
                f"subscription {group!r} is still read by a consumer of this RemoteBroker "
                f"({self.server}); close it before deleting the subscription"
            )
        return await self.client.delete_subscription(group)

    async def clean(self) -> int:
        """Retention is the server's business: nothing is kept here to clean."""
        return 0

    async def migrate(self) -> list[str]:
        """The server keeps the store and its schema: nothing to migrate here."""
        return []

    def _forget(self, consumer: RemoteConsumer) -> None:
        self._consumers.discard(consumer)
