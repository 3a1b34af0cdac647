"""The broker on Redis Streams: ``redis://host:6379/0?prefix=callboard`` (``rediss://``: TLS).

Design
------
Every event is appended to one stream, ``P:log`` (``P`` the URL's ``prefix``), whose entry ids
number events in publish order: it is the retention window, the source of replays and the
clock of every other stream. A subscription id has a stream of its own, ``P:q:<group>``, with
one Redis consumer group in it; a publish runs one Lua script that refuses a delivery id seen
on the topic (a key per topic and delivery id, set with the entry's id), appends the event to
the log and to the stream of every group whose patterns match its topic, under the log's id.
Fan-out on write, in the script, is what emulates callboard's patterns (Redis has no topic
matching): a group's stream holds exactly its events, so Redis' own figures give its backlog and
in-flight counts, and a group created on one server receives what another publishes at once.

Consumers are Redis consumers of the group (``redis_consumer``): ``XREADGROUP`` hands out new
entries, ``XAUTOCLAIM`` with the lease as min-idle-time takes back what a dead process held,
and a live process renews what its consumers hold every third of a lease (``XCLAIM ...
JUSTID``). Acknowledging deletes the entry from the group's stream. Handing back moves the
entries to a pseudo-consumer idle since the epoch, which the next claim takes first.

Concurrent publishes go out together, in call order, in one pipeline; each returns once Redis
answered its script. Retention trims the log oldest first (``XDEL`` by batches, as the policy's
minimum age forbids a blind ``XTRIM``), deletes the delivery ids of what it removes, and drops
the entries groups had not received yet, counting them as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from callboard.brokers import redact_url
from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.brokers.columns import encode_event
from callboard.brokers.redis_consumer import UNREACHABLE, RedisConsumer, decode_entry, pack_event
from callboard.brokers.redis_publisher import Outgoing, Publisher
from callboard.brokers.redis_scripts import ACK as ACK_SCRIPT
from callboard.brokers.redis_scripts import (
    CLEAN,
    CONSUME,
    DELETE,
    LEAVE,
    PRUNE,
    PUBLISH,
    RELEASE,
    RENEW,
    STATS,
    TAKE,
)
from callboard.brokers.redis_settings import CONNECT_TIMEOUT, PUBLISH_TIMEOUT, RedisSettings
from callboard.errors import (
    BrokerError,
    BrokerUnavailable,
    ServiceClosedError,
    SubscriptionError,
)
from callboard.events import Event
from callboard.topics import normalize_patterns

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Scripts:
    """The broker's Lua scripts, registered once with the client (loaded on first use)."""

    publish: Any
    consume: Any
    take: Any
    ack: Any
    release: Any
    leave: Any
    renew: Any
    stats: Any
    delete: Any
    clean: Any
    prune: Any

    @classmethod
    def register(cls, client: aioredis.Redis) -> Scripts:
        texts = (
            PUBLISH,
            CONSUME,
            TAKE,
            ACK_SCRIPT,
            RELEASE,
            LEAVE,
            RENEW,
            STATS,
            DELETE,
            CLEAN,
            PRUNE,
        )
        return cls(*(client.register_script(text) for text in texts))


#: Seconds after which a consumer that holds nothing and was not heard from is forgotten.
STALE_CONSUMER = 3600.0


class RedisBroker:
    """``Broker`` and ``BrokerAdmin`` over Redis Streams (one server; not Redis Cluster)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str | None = None,
        lease: float | None = None,
        poll_interval: float | None = None,
        retention: RetentionPolicy | None = None,
    ) -> None:
        settings = RedisSettings.parse(url)
        self.url = redact_url(url)
        self.prefix = (prefix if prefix is not None else settings.prefix) + ":"
        self.lease = lease if lease is not None else settings.lease
        self.poll_interval = poll_interval if poll_interval is not None else settings.poll
        self.retention = retention if retention is not None else RetentionPolicy()
        self.stale_consumer = STALE_CONSUMER
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            settings.address,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=PUBLISH_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=10,
        )
        self.scripts = Scripts.register(self.client)
        self._publisher = Publisher(self._send)
        self._consumers: dict[str, RedisConsumer] = {}
        self._instance = uuid.uuid4().hex[:12]
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> RedisBroker:
        return cls(url, retention=retention)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=True, shared=True, replay=True)

    @property
    def lease_ms(self) -> int:
        """The lease in milliseconds: the min-idle-time after which an entry is claimed again."""
        return max(1, round(self.lease * 1000))

    def key(self, kind: str, name: str = "") -> str:
        """The name of one of the broker's keys (``log``, ``q:<group>``...)."""
        return f"{self.prefix}{kind}{name}"

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        await self._call("connect to", self.client.ping())
        self._started = True
        self._tasks = [
            asyncio.create_task(self._every(self.lease / 3, self._renew), name="redis-renew"),
            asyncio.create_task(
                self._every(self.retention.interval, self.clean), name="redis-retention"
            ),
        ]

    async def close(self) -> None:
        for consumer in list(self._consumers.values()):
            await consumer.close()
        await self._stop()

    async def abandon(self) -> None:
        """Stop as a killed process would: nothing handed back, no lease renewed."""
        for consumer in list(self._consumers.values()):
            consumer.abandon()
        self._consumers.clear()
        await self._stop()

    async def _stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._started = False
        await self.client.aclose()

    async def check(self) -> None:
        """``BrokerHealth``: Redis answers ``PING`` within ``CONNECT_TIMEOUT`` seconds."""
        if not self._started:
            raise BrokerUnavailable(f"the Redis broker for {self.url} is not running")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._call("ping", self.client.ping())
        except TimeoutError:
            raise BrokerUnavailable(
                f"Redis at {self.url} did not answer PING within {CONNECT_TIMEOUT:g}s"
            ) from None

    async def _every(self, seconds: float, step: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except Exception as error:  # background work outlives a failed step: log, go on
                log.warning("Redis broker %s: background step failed: %s", self.url, error)

    async def _renew(self) -> None:
        """Renew the leases of everything this process's consumers hold, in one round trip."""
        consumers = [c for c in self._consumers.values() if c.held]
        if not consumers:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for consumer in consumers:
                await self.scripts.renew(
                    args=[consumer.stream, consumer.name, *consumer.held], client=pipe
                )
            await self._call("renew leases on", pipe.execute(raise_on_error=False))

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await a driver call, its errors translated to callboard's."""
        try:
            return await awaitable
        except UNREACHABLE as error:
            raise BrokerUnavailable(f"could not {what} Redis at {self.url}: {error}") from error
        except aioredis.RedisError as error:
            raise BrokerError(f"Redis at {self.url} refused to {what} it: {error}") from error

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self, event: Event) -> bool:
        if not self._started:
            raise ServiceClosedError(f"the Redis broker for {self.url} is not running")
        outgoing = self._outgoing(event)
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                return await self._publisher.submit(outgoing)
        except TimeoutError:
            raise BrokerUnavailable(
                f"Redis at {self.url} did not confirm the event within {PUBLISH_TIMEOUT}s"
            ) from None

    def _outgoing(self, event: Event, target: str = "") -> Outgoing:
        stored = encode_event(event)  # refuses what no broker can keep (InvalidEventError)
        packed = pack_event(stored)
        if not target and event.topic.startswith(DEAD_LETTER_PREFIX):
            letters = self.key("dl:", event.topic[len(DEAD_LETTER_PREFIX) :])
            return Outgoing(letters, ["e", packed])
        dedupe = ""
        if stored.delivery_id is not None and not target:
            dedupe = self.key("d:", f"{len(stored.topic)}:{stored.topic}:{stored.delivery_id}")
        ttl = str(max(1, round(self.retention.max_age * 1000)))
        return Outgoing(None, [self.prefix, dedupe, ttl, target, stored.topic, packed])

    async def _send(self, batch: Sequence[Outgoing]) -> list[object]:
        """One pipeline for a batch of publishes; per publish, its reply or its error.

        The script goes by its hash alone (redis-py's scripts in a pipeline would first ask
        ``SCRIPT EXISTS``, a second round trip per batch); after a restart of Redis forgot it,
        the publishes it refused are loaded and sent again.
        """
        replies = await self._pipeline(batch)
        forgotten = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if forgotten:
            await self._call("load the publish script on", self.client.script_load(PUBLISH))
            again = await self._pipeline([batch[i] for i in forgotten])
            for i, reply in zip(forgotten, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: Sequence[Outgoing]) -> list[object]:
        sha = self.scripts.publish.sha
        async with self.client.pipeline(transaction=False) as pipe:
            for item in batch:
                if item.letters is not None:
                    fields = dict(zip(item.args[::2], item.args[1::2], strict=True))
                    pipe.xadd(item.letters, fields)  # type: ignore[arg-type]
                else:
                    pipe.evalsha(sha, 0, *item.args)
            replies: list[object] = await self._call(
                "publish to", pipe.execute(raise_on_error=False)
            )
        return replies

    async def deliver_to(self, group: str, event: Event) -> None:
        outgoing = self._outgoing(event, target=group)
        try:
            await self._call("deliver to", self.scripts.publish(args=outgoing.args))
        except BrokerError as error:
            if "NOGROUP" in str(error):
                raise SubscriptionError(f"no subscription {group!r} to deliver to") from None
            raise

    # -- consuming ------------------------------------------------------------------------------

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> RedisConsumer:
        patterns = normalize_patterns(topics)
        wanted = "\n".join(sorted(set(patterns)))
        first = _start_id(start)
        found = await self._call(
            "join a group on",
            self.scripts.consume(args=[self.prefix, group, wanted, owner or "", first]),
        )
        existing = found.decode() if isinstance(found, bytes) else str(found)
        if existing != wanted:
            raise SubscriptionError(
                f"subscription {group!r} already reads {existing.splitlines()}; "
                f"cannot join it with {list(patterns)}: use another subscription id"
            )
        consumer = RedisConsumer(self, group, f"{self._instance}-{uuid.uuid4().hex[:8]}")
        self._consumers[consumer.name] = consumer
        return consumer

    def forget(self, consumer: RedisConsumer) -> None:
        """A consumer left: renew nothing more for it."""
        self._consumers.pop(consumer.name, None)

    # -- operations -----------------------------------------------------------------------------

    async def subscriptions(self) -> list[SubscriptionInfo]:
        rows = await self._call("list the groups on", self.scripts.stats(args=[self.prefix]))
        found = []
        for name, patterns, owner, lost, length, pending, released in rows:
            in_flight = int(pending) - int(released)
            found.append(
                SubscriptionInfo(
                    name=name.decode(),
                    topics=tuple(patterns.decode().splitlines()),
                    in_flight=in_flight,
                    backlog=int(length) - in_flight,
                    lost=int(lost),
                    owner=owner.decode() if owner else None,
                )
            )
        return sorted(found, key=lambda info: info.name)

    async def delete_subscription(self, group: str) -> bool:
        readers = sum(1 for c in self._consumers.values() if c.group == group)
        if readers:
            raise SubscriptionError(
                f"subscription {group!r} is still read by {readers} consumer(s) in this "
                "process; stop them before deleting it"
            )
        forgotten = await self._call(
            "delete a group on", self.scripts.delete(args=[self.prefix, group])
        )
        return int(forgotten) > 0

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        stream = self.key("dl:", group)
        wanted = set(ids) if ids is not None else None
        chosen: list[tuple[bytes, Event]] = []
        cursor = "-"
        while len(chosen) < limit:
            entries: Any = await self._call(
                "read dead letters on", self.client.xrange(stream, cursor, "+", count=500)
            )
            if not entries:
                break
            for entry_id, fields in entries:
                letter = decode_entry(fields)
                if wanted is None or letter.id in wanted:
                    chosen.append((entry_id, letter))
            cursor = "(" + entries[-1][0].decode()
        chosen = chosen[:limit]
        if remove and chosen:
            await self._call(
                "take dead letters from", self.client.xdel(stream, *(i for i, _ in chosen))
            )
        return [letter for _, letter in chosen]

    async def clean(self) -> int:
        """Delete what the retention policy no longer keeps, a batch per script run."""
        policy = self.retention
        args = [
            self.prefix,
            round(policy.min_age * 1000),
            round(policy.max_age * 1000),
            policy.max_count,
            policy.batch_size,
        ]
        deleted = 0
        while True:
            step = int(await self._call("apply retention on", self.scripts.clean(args=args)))
            deleted += step
            if step < policy.batch_size:
                break
        if deleted:
            log.info("Redis broker %s: retention deleted %d event(s)", self.url, deleted)
        # Members of killed processes linger in Redis' list of consumers: forget the idle ones.
        idle = round(self.stale_consumer * 1000)
        await self._call("forget stale consumers on", self.scripts.prune(args=[self.prefix, idle]))
        return deleted

    async def migrate(self) -> list[str]:
        """Redis makes streams, hashes and consumer groups as they are first used: ``[]``."""
        return []


def _start_id(start: Start) -> str:
    """The first log entry a new group replays: ``end`` for none."""
    if start == "end":
        return "end"
    if start == "beginning":
        return "-"
    if isinstance(start, datetime):
        if start.utcoffset() is None:
            raise SubscriptionError("a start time must be timezone-aware")
        return f"{math.floor(start.timestamp() * 1000)}-0"
    raise SubscriptionError(f"start must be 'end', 'beginning' or a datetime, not {start!r}")
