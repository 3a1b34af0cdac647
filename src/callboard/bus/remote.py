"""``RemoteBroker``: the broker of a Python service that reaches callboard over the bus API.

``callboard+http://:TOKEN@host:7007`` (or ``callboard+https://``, or ``?token=TOKEN``) in
``events.broker`` makes a service publish and subscribe through a callboard server, with no
database access of its own. Publishing is ``POST events``; a consumer ``PUT``s its subscription
and long-polls ``GET .../deliveries``, whose events are leased to it until acknowledged.

Guarantees: an event is acknowledged to the server only after the handler is done with it; the
leases of events still being handled are renewed; events a closing consumer had not handled are
handed back at once, and those of a consumer that vanished come back when their lease ends.
While the server cannot be reached the consumer retries with backoff (1 s, doubling, at most
60 s) and subscribes again when the server no longer knows its subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from callboard.brokers.base import (
    Capabilities,
    Delivery,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.bus.client import BusClient
from callboard.errors import BrokerError, ConfigError, SubscriptionError
from callboard.events import Event

logger = logging.getLogger("callboard.bus.remote")

T = TypeVar("T")

DEFAULT_LEASE_MS = 30_000
_SCHEMES = {"callboard+http": "http", "callboard+https": "https"}


class _Closed(Exception):
    pass


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
        self._acks: list[str] = []
        self._ack_signal = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def group(self) -> str:
        """The subscription id this consumer reads."""
        return self._group

    # -- fetch ---------------------------------------------------------------------------------

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        if not self._tasks and not self._closed.is_set():
            self._tasks = [
                asyncio.create_task(self._flush_acks(), name=f"callboard-acks-{self._group}"),
                asyncio.create_task(self._renew_leases(), name=f"callboard-leases-{self._group}"),
            ]
        backoff = self._broker.backoff_start
        while not self._buffer:
            if self._closed.is_set():
                return ()
            try:
                just_subscribed = await self._until_closed(self._poll())
            except _Closed:
                return ()
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

    async def _poll(self) -> bool:
        """One round: subscribe if needed, then one long-poll. True if it had to subscribe."""
        subscribed_now = False
        if not self._subscribed:
            await self._client.put_subscription(self._group, self._topics, self._start)
            self._subscribed = subscribed_now = True
        polled = await self._client.poll(self._group, self._lease_ms)
        if polled.missing:
            logger.info("subscription %r is unknown to the server, subscribing again", self._group)
            self._subscribed = False
        for item in polled.deliveries:
            self._buffer.append(Delivery(item.event, item.attempt, item.ack_id))
        return subscribed_now

    async def _until_closed(self, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        closed = asyncio.create_task(self._closed.wait())
        try:
            await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task.cancelled():
            raise _Closed
        return task.result()

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds``; ``True`` if the consumer was closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)
        return self._closed.is_set()

    # -- acknowledging -------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        outstanding = self._outstanding
        for delivery in deliveries:
            ack_id = str(delivery.token)
            if outstanding.pop(ack_id, None) is not None:
                # Sent in batches by one task: many handlers finishing at once cost one request.
                self._acks.append(ack_id)
        if self._acks:
            self._ack_signal.set()

    async def _flush_acks(self) -> None:
        while not self._closed.is_set():
            await self._ack_signal.wait()
            self._ack_signal.clear()
            await self._send_acks()

    async def _send_acks(self, attempts: int = 3) -> None:
        backoff = self._broker.backoff_start
        while self._acks:
            ids, self._acks = self._acks, []
            for attempt in range(1, attempts + 1):
                try:
                    result = await self._client.ack(self._group, ids)
                except BrokerError as error:
                    if attempt == attempts or self._closed.is_set():
                        logger.warning(
                            "subscription %r: %d acknowledgements could not be sent, the "
                            "events will be delivered again: %s",
                            self._group,
                            len(ids),
                            error,
                        )
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
        if self._closed.is_set():
            return
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._broker._forget(self)
        await self._send_acks(attempts=1)
        unhandled = [str(d.token) for d in (*self._buffer, *self._outstanding.values())]
        self._buffer.clear()
        self._outstanding.clear()
        if unhandled:
            try:
                await self._client.nack(self._group, unhandled)
            except BrokerError as error:
                logger.info(
                    "subscription %r: %d unhandled events come back when their lease ends: %s",
                    self._group,
                    len(unhandled),
                    error,
                )


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

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def publish(self, event: Event) -> bool:
        return await self.client.publish(event)

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> RemoteConsumer:
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

    def _forget(self, consumer: RemoteConsumer) -> None:
        self._consumers.discard(consumer)
