"""The bus API's subscriptions over any broker: one ``Feed`` per subscription id and server.

A feed is one member of the broker's consumer group named by the subscription id, and fetches
only when an HTTP reader asks, so several servers can share one group. What it fetched waits for
a reader as a batch, or is leased to one; whatever must go back to the group (a batch nobody came
for, a lease that ran out, deliveries refused) is released (``Consumer.release``): the group has
it again at once, first in line, and the feed reads on with the same consumer.

A feed nobody reads stops fetching after ``linger`` seconds, so events are not taken for a server
nobody asks. On a durable broker it then also leaves the group until the next read (the group
lives on without members there): what its last fetch may have taken goes back to the group, and
an idle subscription costs the broker nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence

from callboard.brokers.base import Broker, BrokerAdmin, Consumer, Delivery, Start
from callboard.bus.wire import BATCH_SIZE, NOTIFIED, WireDelivery
from callboard.errors import SubscriptionError

logger = logging.getLogger("callboard.bus")


def _notified(delivery: Delivery) -> tuple[str, ...] | list[str]:
    value = delivery.event.metadata.get(NOTIFIED)
    if value is None:
        return ()
    return [value] if isinstance(value, str) else value


class Batch:
    """Events fetched together, waiting for a reader or leased to one."""

    def __init__(self, consumer: Consumer, deliveries: Sequence[Delivery]) -> None:
        #: The consumer that fetched them, and settles them.
        self.consumer = consumer
        self.deliveries = {secrets.token_urlsafe(12): d for d in deliveries}
        #: Ack ids neither acknowledged nor handed back yet.
        self.open = set(self.deliveries)
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False

    def wire(self) -> list[WireDelivery]:
        return [WireDelivery(k, d.attempt, d.event) for k, d in self.deliveries.items()]

    def events(self) -> list[Delivery]:
        return list(self.deliveries.values())


class Feed:
    """One subscription id on this server: its consumer, waiting batches and leases."""

    def __init__(
        self,
        broker: Broker,
        id: str,
        topics: tuple[str, ...],
        *,
        batch_size: int = BATCH_SIZE,
        hold: float = 5.0,
        linger: float = 1.0,
        owner: str | None = None,
    ) -> None:
        self.id = id
        self.topics = topics
        #: Who may read it (``SubscriptionInfo.owner``); recorded whenever the feed joins the
        #: group, so a group made before owners were recorded is claimed by its first bus reader.
        self.owner = owner
        self._broker = broker
        #: The group outlives its members: an idle feed may leave it (see the module's doc).
        self._may_leave = broker.capabilities.durable
        self._batch_size = batch_size
        self._hold = hold
        self._linger = linger
        self._consumer: Consumer | None = None
        self._fetch: asyncio.Task[None] | None = None
        self._ready: deque[Batch] = deque()
        self._leases: dict[str, Batch] = {}
        #: Batches taken by a reader and not settled yet (being sent, or leased).
        self._out: set[Batch] = set()
        self._waiters: set[asyncio.Future[None]] = set()
        self._users = 0
        self._resting: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def open(self, start: Start = "end") -> None:
        self._consumer = await self._broker.consume(
            self.id, self.topics, start=start, owner=self.owner
        )

    # -- reading -------------------------------------------------------------------------------

    async def take(self, grace: float, limit: int | None = None) -> Batch | None:
        """A batch (of at most ``limit`` events) if one is ready or arrives within ``grace``
        seconds, else ``None``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self._users += 1
        try:
            # A competing reader may take the batch this one waited for: then fetch again.
            while (
                not self._ready and not self._closed and (remaining := deadline - loop.time()) > 0
            ):
                task = self._ensure_fetch(limit)
                await asyncio.wait({task}, timeout=remaining)
                if task.done() and not task.cancelled():
                    error = task.exception()
                    if error is not None:
                        raise error
            return self._pop_ready(limit)
        finally:
            self._left()

    async def wait(self, timeout: float) -> None:
        """Hold until a batch is ready for this subscription, or ``timeout`` seconds pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.add(waiter)
        self._users += 1
        try:
            while not self._ready and not waiter.done() and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                task = self._ensure_fetch()
                await asyncio.wait({task, waiter}, timeout=remaining)
                if task.done() and not self._ready and not task.cancelled() and task.exception():
                    return  # the broker failed: let the client come back and hear about it
        finally:
            self._waiters.discard(waiter)
            self._left()

    def _left(self) -> None:
        """A reader is done; once none is left, the feed rests after ``linger`` seconds."""
        self._users -= 1
        if not self._users and not self._closed:
            # Keep the fetch for a reader that comes straight back (they do).
            if self._resting is not None:
                self._resting.cancel()
            self._resting = asyncio.get_running_loop().call_later(self._linger, self._rest)

    def _rest(self) -> None:
        """Nobody read for ``linger`` seconds: stop fetching, and leave the group if it may."""
        self._resting = None
        if self._users or self._closed:
            return
        if self._fetch is not None and not self._fetch.done():
            self._fetch.cancel()
        if self._may_leave and not self._ready and not self._out and self._consumer:
            consumer, self._consumer = self._consumer, None
            self._spawn(consumer.close())

    def _ensure_fetch(self, limit: int | None = None) -> asyncio.Task[None]:
        if self._fetch is None or self._fetch.done():
            count = self._batch_size if limit is None else min(limit, self._batch_size)
            task = asyncio.create_task(
                self._run_fetch(count), name=f"callboard-bus-fetch-{self.id}"
            )
            task.add_done_callback(self._fetch_done)
            self._fetch = task
        return self._fetch

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._fetch is task:
            self._fetch = None
        if not task.cancelled() and task.exception() is not None:
            logger.warning("bus subscription %r: fetch failed: %s", self.id, task.exception())

    async def _run_fetch(self, count: int) -> None:
        # Cancelling it loses nothing: what the consumer took is returned by its next fetch,
        # or goes back to the group when the consumer is closed.
        consumer = self._consumer
        if consumer is None:
            consumer = await self._broker.consume(self.id, self.topics, owner=self.owner)
            if self._closed:
                await consumer.close()
                return
            self._consumer = consumer
        while True:
            fetched = await consumer.fetch(count)
            if not fetched:
                return  # closed
            kept = [d for d in fetched if self.id not in _notified(d)]
            if kept:
                # No await between the fetch and this: a cancelled fetch never drops a batch.
                self._make_ready(consumer, kept)
            if len(kept) < len(fetched):
                # Their publisher already delivered them to this subscription in-process.
                done = [d for d in fetched if self.id in _notified(d)]
                await asyncio.shield(self._spawn(consumer.ack(done)))
            if kept:
                return

    def _make_ready(self, consumer: Consumer, kept: list[Delivery]) -> None:
        batch = Batch(consumer, kept)
        self._ready.append(batch)
        batch.timer = asyncio.get_running_loop().call_later(
            self._hold, self._spawn_release, batch, "nobody came for it"
        )
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _pop_ready(self, limit: int | None = None) -> Batch | None:
        if not self._ready:
            return None
        waiting = self._ready[0]
        if limit is not None and len(waiting.deliveries) > limit:
            # The first ``limit`` go to this reader; the rest waits for the next one.
            ack_ids = list(waiting.deliveries)[:limit]
            part = Batch(waiting.consumer, [waiting.deliveries.pop(k) for k in ack_ids])
            waiting.open.difference_update(ack_ids)
            self._out.add(part)
            return part
        batch = self._ready.popleft()
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        self._out.add(batch)
        return batch

    # -- settling ------------------------------------------------------------------------------

    async def finish(self, batch: Batch, *, handled: bool) -> None:
        """Backstage's read: acknowledge the whole batch, or give it back if it was not sent."""
        if handled and not batch.ended:
            batch.open.clear()
            await batch.consumer.ack(batch.events())
        await self._end(batch)

    def lease(self, batch: Batch, seconds: float) -> list[WireDelivery]:
        """Hand a batch out under a lease; what is not acknowledged in time comes back."""
        for ack_id in batch.open:
            self._leases[ack_id] = batch
        batch.timer = asyncio.get_running_loop().call_later(
            seconds, self._spawn_release, batch, "its lease ran out"
        )
        return batch.wire()

    async def ack(self, ack_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        return await self._settle(ack_ids, acknowledge=True)

    async def nack(self, ack_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Hand deliveries back at once: the group has them again, not counted as failures."""
        return await self._settle(ack_ids, acknowledge=False)

    def renew(self, ack_ids: Iterable[str], seconds: float) -> tuple[list[str], list[str]]:
        done, unknown = [], []
        for ack_id in ack_ids:
            batch = self._leases.get(ack_id)
            if batch is None:
                unknown.append(ack_id)
                continue
            done.append(ack_id)
            if batch.timer is not None:
                batch.timer.cancel()
            batch.timer = asyncio.get_running_loop().call_later(
                seconds, self._spawn_release, batch, "its lease ran out"
            )
        return done, unknown

    async def _settle(
        self, ack_ids: Iterable[str], *, acknowledge: bool
    ) -> tuple[list[str], list[str]]:
        done: list[str] = []
        unknown: list[str] = []
        #: Per consumer that fetched them, in order: one call each.
        settled: dict[Consumer, list[Delivery]] = {}
        finished: list[Batch] = []
        for ack_id in dict.fromkeys(ack_ids):
            batch = self._leases.pop(ack_id, None)
            if batch is None:
                unknown.append(ack_id)
                continue
            settled.setdefault(batch.consumer, []).append(batch.deliveries[ack_id])
            batch.open.discard(ack_id)
            done.append(ack_id)
            if not batch.open:
                finished.append(batch)
        for consumer, deliveries in settled.items():
            if acknowledge:
                await consumer.ack(deliveries)
            else:
                await consumer.release(deliveries)
        for batch in finished:
            await self._end(batch)
        return done, unknown

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        """Run ``work`` to its end even if the caller is cancelled; ``close`` awaits it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _spawn_release(self, batch: Batch, why: str) -> None:
        self._spawn(self._release(batch, why))

    async def _release(self, batch: Batch, why: str) -> None:
        if batch.ended:
            return
        if batch in self._ready:
            self._ready.remove(batch)
        if batch.open:
            logger.info(
                "bus subscription %r: %d events go back to the subscription: %s",
                self.id,
                len(batch.open),
                why,
            )
        await self._end(batch)

    async def _end(self, batch: Batch) -> None:
        """The batch is settled: what is still open goes back to the group."""
        if batch.ended:
            return
        batch.ended = True
        self._out.discard(batch)
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        if batch.open:
            for ack_id in batch.open:
                self._leases.pop(ack_id, None)
            unsettled = [batch.deliveries[ack_id] for ack_id in batch.open]
            batch.open.clear()
            await batch.consumer.release(unsettled)
        if not self._users and self._resting is None and not self._closed:
            # Its reader is gone: rest once nothing else comes.
            self._resting = asyncio.get_running_loop().call_later(self._linger, self._rest)

    async def close(self) -> None:
        """Leave the group; every event not acknowledged goes back to it."""
        if self._closed:
            return
        self._closed = True
        if self._resting is not None:
            self._resting.cancel()
            self._resting = None
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._fetch is not None:
            self._fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fetch
        while self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await next(iter(self._tasks))
        # Closing the consumer hands back everything still out; the batches just end.
        for batch in [*self._ready, *self._out]:
            batch.ended = True
            if batch.timer is not None:
                batch.timer.cancel()
                batch.timer = None
        self._ready.clear()
        self._out.clear()
        self._leases.clear()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.close()


class Feeds:
    """The feeds of this server, made on ``PUT`` or, for a group the broker already holds,
    on first read, and ended on ``DELETE``."""

    def __init__(self, broker: Broker, *, batch_size: int = BATCH_SIZE, hold: float = 5.0) -> None:
        self._broker = broker
        self._batch_size = batch_size
        self._hold = hold
        self._feeds: dict[str, Feed] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    def _new(self, id: str, topics: tuple[str, ...], owner: str | None) -> Feed:
        return Feed(
            self._broker, id, topics, batch_size=self._batch_size, hold=self._hold, owner=owner
        )

    def local_feed(self, id: str) -> Feed | None:
        return self._feeds.get(id)

    def owner(self, id: str) -> str | None:
        """The owner of this server's feed for ``id`` (``None``: no feed, or none recorded)."""
        feed = self._feeds.get(id)
        return None if feed is None else feed.owner

    def local(self) -> dict[str, tuple[str, ...]]:
        """Subscription id -> topics, for the feeds of this server."""
        return {id: feed.topics for id, feed in self._feeds.items()}

    async def upsert(
        self, id: str, topics: tuple[str, ...], start: Start = "end", owner: str | None = None
    ) -> bool:
        """Create the subscription or replace its topics; ``True`` when it was new here.

        ``owner`` is recorded if the broker has none for the group yet.
        """
        async with self._lock:
            self._check_open()
            known = self._feeds.get(id)
            if known is not None and set(known.topics) == set(topics):
                return False
            feed = self._new(id, topics, owner)
            try:
                await feed.open(start if known is None else "end")
            except SubscriptionError:
                if known is None:
                    raise
                # The broker keeps a group's topics: leave the group and make it afresh.
                del self._feeds[id]
                await known.close()
                known = None
                await feed.open("end")
            if known is not None:
                await known.close()
            self._feeds[id] = feed
            return known is None

    async def find(
        self, id: str, topics: tuple[str, ...] | None, owner: str | None = None
    ) -> Feed | None:
        """This server's feed for ``id``; made from the broker's record (its ``topics`` and
        ``owner``) when it has one."""
        feed = self._feeds.get(id)
        if feed is not None or not topics:
            return feed
        async with self._lock:
            self._check_open()
            feed = self._feeds.get(id)
            if feed is None:
                feed = self._new(id, topics, owner)
                await feed.open("end")  # an existing group resumes where it was
                self._feeds[id] = feed
            return feed

    async def leave(self, id: str) -> None:
        """Close this server's feed for ``id``, leaving the group as it is in the broker."""
        async with self._lock:
            feed = self._feeds.pop(id, None)
        if feed is not None:
            await feed.close()

    async def delete(self, id: str) -> bool:
        """Leave and forget the subscription ``id``; ``True`` when there was one to delete.

        This server's feed is closed first (its unacknowledged events go back to the group),
        since the broker refuses to forget a group that a consumer of it still reads. Both
        happen under the lock, so a read arriving meanwhile cannot make the feed again in
        between; it finds the subscription gone. A feed counts as something deleted even when
        the broker then has nothing left to forget: an in-memory group ends with its last
        member.
        """
        async with self._lock:
            self._check_open()
            feed = self._feeds.pop(id, None)
            if feed is not None:
                await feed.close()
            broker = self._broker
            if not isinstance(broker, BrokerAdmin):
                return feed is not None  # a broker without operations keeps nothing to forget
            try:
                forgotten = await broker.delete_subscription(id)
            except SubscriptionError as error:
                raise SubscriptionError(
                    f"cannot delete subscription {id!r}: subscribers inside this callboard "
                    f"server (not bus readers) read it: {error}"
                ) from error
            return feed is not None or forgotten

    def _check_open(self) -> None:
        if self._closed:
            raise SubscriptionError("the bus is shutting down")

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            feeds = list(self._feeds.values())
            self._feeds.clear()
        for feed in feeds:
            await feed.close()
