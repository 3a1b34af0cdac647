"""One member of a consumer group of the Redis broker.

A group has a stream of its own (``P:q:<group>``) holding one Redis consumer group; each
member is a Redis consumer of it with a name no other member has. A fetch first claims what is
due again (entries handed back, which idle since the epoch, and entries whose holder stopped
renewing them for a lease), oldest first, then new entries (``TAKE``); only when there is
nothing does it block on ``XREADGROUP``, in slices of the poll interval so that entries handed
back by another member are seen within one. The attempt is the entry's delivery count.

A fetch reads in a task of its own, shielded from cancellation: a cancelled fetch leaves the
task running and the next fetch returns what it took, so nothing taken is lost in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from callboard.brokers.base import Delivery
from callboard.brokers.columns import StoredEvent, decode_event
from callboard.brokers.redis_scripts import GROUP
from callboard.errors import BrokerError, SubscriptionError
from callboard.events import Event

if TYPE_CHECKING:
    from callboard.brokers.redis import RedisBroker

log = logging.getLogger(__name__)

#: What the driver raises while the server cannot be reached.
UNREACHABLE = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)

#: The longest wait between two attempts to reach the server again, in seconds.
MAX_BACKOFF = 2.0


def pack_event(stored: StoredEvent) -> str:
    """An event as one stream field: id, topic, time (µs), metadata and payload, a line each.

    None of them holds a line break (names are printable, JSON escapes its own), and one field
    instead of five makes an entry four elements of a reply instead of twelve: parsing replies
    is most of what reading a stream costs the client.
    """
    return "\n".join(
        (stored.id, stored.topic, str(stored.time_us), stored.metadata, stored.payload)
    )


def decode_entry(fields: dict[bytes, bytes]) -> Event:
    """The event an entry (of the log, a group's stream or its dead letters) holds."""
    event_id, topic, time_us, metadata, payload = fields[b"e"].split(b"\n", 4)
    return decode_event(event_id.decode(), topic.decode(), int(time_us), payload, metadata)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _missing_group(error: ResponseError) -> bool:
    return "NOGROUP" in str(error)


class RedisConsumer:
    """A member of one group: fetches, acknowledges and hands back the group's entries."""

    def __init__(self, broker: RedisBroker, group: str, name: str) -> None:
        self._broker = broker
        self.group = group
        self.name = name
        self.stream = broker.key("q:", group)
        self._reading: asyncio.Task[list[Delivery]] | None = None
        self._spare: list[Delivery] = []
        #: The ids of the entries this consumer received and has not settled: what the broker
        #: renews (not everything pending under its name: see ``redis_scripts.RENEW``).
        self.held: set[bytes | str] = set()
        self.closed = False

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        if self.closed:
            return ()
        if self._spare:
            return self._take_spare(max_count)
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(max_count))
        # Shielded: a cancelled fetch leaves the read running for the next fetch to finish.
        got = await asyncio.shield(self._reading)
        self._reading = None
        if self.closed:
            return ()
        self._spare = got
        return self._take_spare(max_count)

    def _take_spare(self, max_count: int) -> list[Delivery]:
        taken, self._spare = self._spare[:max_count], self._spare[max_count:]
        return taken

    async def _read(self, max_count: int) -> list[Delivery]:
        """Wait until there are entries to take and take up to ``max_count`` of them."""
        broker = self._broker
        failures = 0
        while not self.closed:
            try:
                got = await self._take(max_count)
                if not got:
                    got = await self._block(max_count)
            except UNREACHABLE as error:
                failures += 1
                delay = min(MAX_BACKOFF, broker.poll_interval * 2**failures)
                log.warning(
                    "subscription %r: Redis unreachable (%s); trying again in %.1fs",
                    self.group,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except ResponseError as error:
                if _missing_group(error):
                    raise SubscriptionError(
                        f"subscription {self.group!r} no longer exists: it was deleted; "
                        "subscribe again to make it afresh"
                    ) from error
                raise BrokerError(
                    f"subscription {self.group!r}: Redis refused a read: {error}"
                ) from error
            if failures:
                log.info("subscription %r: Redis reachable again", self.group)
                failures = 0
            if got:
                self.held.update(d.token for d in got if isinstance(d.token, bytes | str))
                return got
        return []

    async def _take(self, max_count: int) -> list[Delivery]:
        broker = self._broker
        rows = await broker.scripts.take(
            args=[self.stream, self.name, broker.lease_ms, max_count], client=broker.client
        )
        return [
            Delivery(decode_entry(_pairs(fields)), int(attempt), entry_id)
            for entry_id, fields, attempt in rows
        ]

    async def _block(self, max_count: int) -> list[Delivery]:
        broker = self._broker
        reply: Any = await broker.client.xreadgroup(
            GROUP,
            self.name,
            {self.stream: ">"},
            count=max_count,
            block=max(1, round(broker.poll_interval * 1000)),
        )
        if not reply:
            return []
        return [
            Delivery(decode_entry(fields), 1, entry_id)
            for _, entries in reply
            for entry_id, fields in entries
        ]

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self._settle(self._broker.scripts.ack, deliveries, "acknowledge")

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self._settle(self._broker.scripts.release, deliveries, "hand back")

    async def _settle(self, script: Any, deliveries: Sequence[Delivery], what: str) -> None:
        """Run ``script`` on the entries of ``deliveries``; a failure is dropped with a warning
        (the entries then come back once the lease runs out, as at-least-once allows)."""
        ids = [d.token for d in deliveries if isinstance(d.token, bytes | str)]
        # Renewed no more, whatever the answer: if it is lost, they come back after the lease.
        self.held.difference_update(ids)
        try:
            await script(args=[self.stream, self.name, *ids], client=self._broker.client)
        except (*UNREACHABLE, ResponseError) as error:
            log.warning(
                "subscription %r: could not %s %d event(s) (%s); they come back after the lease",
                self.group,
                what,
                len(ids),
                error,
            )

    async def close(self) -> None:
        """Leave the group: wait for a read under way, then hand back everything held."""
        if self.closed:
            return
        self.closed = True
        reading, self._reading = self._reading, None
        if reading is not None:
            # A read ends within a poll interval once closed; what it took is handed back.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(reading, self._broker.poll_interval + 5.0)
        self._spare = []
        self.held.clear()
        self._broker.forget(self)
        await self._settle(self._broker.scripts.leave, [], "hand back everything held to")

    def abandon(self) -> None:
        """Stop as a killed process would: hand nothing back, renew nothing."""
        self.closed = True
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None
