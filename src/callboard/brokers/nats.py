"""The NATS JetStream broker: ``nats://host:4222?prefix=callboard``.

One prefix is one broker's world on a server: a stream of events (``<prefix>_events``, every
topic under ``<prefix>.ev.``, events for one group under ``<prefix>.to.<group>``), a stream of
dead letters (``<prefix>_dead``) read without consuming, and a stream of group records
(``<prefix>_groups``: topics, owner, lost count; the last record per group kept). One stream of
events rather than one per topic prefix: retention counts events across all topics (as
``RetentionPolicy.max_count`` means), a group's patterns may span prefixes, and the stream's
sequence is the single order every group reads in.

A group is a durable pull consumer per source (``nats_consumer``) with explicit acks and
``AckWait`` as its lease. Publishing waits for JetStream's acknowledgement; concurrent publishes
share the connection and are pipelined. A delivery id is deduped by the stream (``Nats-Msg-Id``,
a digest of topic and id, within the stream's duplicate window); when the event it names was
already deleted by retention, the id is accepted again (the broker publishes under a successor id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import PubAck

from callboard.brokers import redact_url
from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
)
from callboard.brokers.nats_consumer import GroupHandle, NatsConsumer
from callboard.brokers.nats_names import (
    PREFIX,
    Layout,
    encode_event,
    group_key,
    message_id,
)
from callboard.brokers.nats_retention import NatsRetention
from callboard.errors import BrokerError, BrokerUnavailable, ConfigError, SubscriptionError
from callboard.events import Event
from callboard.topics import normalize_patterns

logger = logging.getLogger(__name__)

_PARAMETERS = ("prefix", "lease", "timeout", "replicas")
_HINT = (
    "expected nats://[user:password@]host[:port][,host:port...]"
    "[?prefix=callboard&lease=30&timeout=3&replicas=1]"
)


class NatsBroker(NatsRetention):
    """A broker on NATS JetStream (``Broker``, ``BrokerAdmin``)."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        prefix: str = "callboard",
        lease: float = 30.0,
        timeout: float = 3.0,
        replicas: int = 1,
        retention: RetentionPolicy | None = None,
    ) -> None:
        super().__init__(Layout(prefix), retention or RetentionPolicy(), timeout, replicas)
        self._servers = list(servers)
        self._lease = lease
        self._cleaner: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> NatsBroker:
        """The broker a ``nats://`` URL names; ``ConfigError`` for one it cannot use."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "nats" or not parts.netloc or parts.path not in ("", "/"):
            raise ConfigError("events.broker", f"cannot use {redact_url(url)!r}: {_HINT}")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(query) - set(_PARAMETERS))
        if unknown:
            raise ConfigError(
                "events.broker", f"unknown parameter(s) {unknown} in {redact_url(url)!r}: {_HINT}"
            )
        prefix = query.get("prefix", "callboard")
        if not PREFIX.fullmatch(prefix):
            raise ConfigError(
                "events.broker",
                f"prefix {prefix!r} must be 1 to 32 letters, digits, '_' or '-' (it names streams)",
            )
        credentials, _, hosts = parts.netloc.rpartition("@")
        auth = f"{credentials}@" if credentials else ""
        servers = [urlunsplit(("nats", auth + host, "", "", "")) for host in hosts.split(",")]
        lease, timeout, replicas = _numbers(query)
        return cls(
            servers,
            prefix=prefix,
            lease=lease,
            timeout=timeout,
            replicas=replicas,
            retention=retention,
        )

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=True, shared=True, replay=True)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._nc is not None:
            return
        self._nc = await self._connect()
        self._js = self._nc.jetstream(timeout=self._timeout)
        try:
            await self._ensure_streams()
        except BrokerError:
            await self._stop(hand_back=False)  # a later start() tries again from the start
            raise
        self._cleaner = asyncio.create_task(self._clean_every_interval(), name="nats-retention")

    async def _connect(self) -> Client:
        where = ", ".join(redact_url(s) for s in self._servers)

        async def disconnected() -> None:
            if self._nc is None:
                return  # closed on purpose (``_stop`` lets go of the client before closing it)
            logger.warning("NATS at %s: disconnected; reconnecting", where)

        async def reconnected() -> None:
            logger.info("NATS at %s: reconnected", where)

        async def failed(error: Exception) -> None:
            logger.warning("NATS at %s: %s", where, error)

        try:
            async with asyncio.timeout(self._timeout + 1):
                return await nats.connect(
                    servers=self._servers,
                    name="callboard",
                    connect_timeout=self._timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=failed,
                )
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise BrokerUnavailable(
                f"cannot connect to NATS at {where}: {error or type(error).__name__}; "
                "is nats-server running with JetStream (-js)?"
            ) from error

    async def close(self) -> None:
        await self._stop(hand_back=True)

    async def abandon(self) -> None:
        """Stop as a killed process would (tests): nothing handed back, no lease renewed."""
        await self._stop(hand_back=False)

    async def _stop(self, *, hand_back: bool) -> None:
        for members in list(self._readers.values()):
            for member in list(members):
                if hand_back:
                    await member.close()
                else:
                    member.abandon()
        self._readers.clear()
        if self._cleaner is not None:
            self._cleaner.cancel()
            self._cleaner = None
        nc, self._nc = self._nc, None
        if nc is not None:
            await asyncio.sleep(0)  # let the members' last words go out first
            try:
                await nc.close()
            except (nats.errors.Error, OSError) as error:
                logger.warning("NATS: closing the connection: %r", error)

    async def check(self) -> None:
        """``BrokerHealth``: connected, and JetStream answers a request within ``timeout``."""
        where = ", ".join(redact_url(s) for s in self._servers)
        nc = self._nc
        if nc is None:
            raise BrokerUnavailable(f"the NATS broker for {where} is not started")
        if not nc.is_connected:
            raise BrokerUnavailable(
                f"NATS at {where} is not connected (the client keeps reconnecting); "
                "is nats-server running and reachable?"
            )
        try:
            async with asyncio.timeout(self._timeout):
                await self._jsc.account_info()  # one round trip to JetStream, changing nothing
        except (nats.errors.Error, TimeoutError, OSError) as error:
            raise BrokerUnavailable(
                f"NATS at {where}: JetStream did not answer (waiting at most {self._timeout:g}s): "
                f"{error!r}; is the server up, with JetStream (-js)?"
            ) from error

    async def _clean_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._retention.interval)
            try:
                await self.clean()
            except BrokerError as error:
                logger.warning("NATS retention pass failed: %s; trying again later", error)

    async def migrate(self) -> list[str]:
        """Create the streams, or bring their limits to the retention policy; ``[]`` when they
        are up to date. Connects for the while if not started."""
        if self._nc is not None:
            return await self._ensure_streams(upgrade=True)
        self._nc = await self._connect()
        self._js = self._nc.jetstream(timeout=self._timeout)
        try:
            return await self._ensure_streams(upgrade=True)
        finally:
            nc, self._nc = self._nc, None
            await nc.close()

    # -- publish --------------------------------------------------------------------------------

    async def publish(self, event: Event) -> bool:
        data = encode_event(event)  # InvalidEventError before anything is sent
        topic = event.topic
        if topic.startswith(DEAD_LETTER_PREFIX):
            key = group_key(topic[len(DEAD_LETTER_PREFIX) :])
            await self._store(self._layout.dead_subject(key), data)
            return True
        delivery_id = event.delivery_id
        subject = self._layout.event_subject(topic)
        if delivery_id is None:
            await self._store(subject, data)
            return True
        msg_id = message_id(topic, delivery_id)
        for _ in range(16):
            ack = await self._store(subject, data, msg_id)
            if not ack.duplicate:
                return True
            if await self._still_stored(ack.seq):
                return False
            # The event this id named was deleted by retention: its id is free again. Every
            # publisher of it takes the same successor, so the stream still dedupes them.
            msg_id = f"{msg_id[:64]}.{ack.seq}"
        raise BrokerError(f"event {event.id!r}: delivery id {delivery_id!r} cannot be recorded")

    async def deliver_to(self, group: str, event: Event) -> None:
        key = group_key(group)
        data = encode_event(event)
        if await self._record(key) is None:
            raise SubscriptionError(f"no subscription {group!r} to deliver to")
        await self._store(self._layout.target_subject(key), data)

    async def _store(self, subject: str, data: bytes, msg_id: str | None = None) -> PubAck:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BrokerUnavailable(
                "NATS is not connected now (the broker is stopped or the server is unreachable); "
                "the event was not stored, send it again later"
            )
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            return await self._jsc.publish(subject, data, timeout=self._timeout, headers=headers)
        except nats.js.errors.APIError as error:
            raise BrokerError(f"NATS refused the event: {error}") from error
        except (nats.errors.Error, TimeoutError, OSError) as error:
            raise BrokerUnavailable(
                f"NATS did not confirm the event within {self._timeout}s ({error!r}); "
                "it may not be stored: send it again (its delivery id dedupes it)"
            ) from error

    # -- consume --------------------------------------------------------------------------------

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> NatsConsumer:
        patterns = normalize_patterns(topics)
        key = group_key(group)
        await self._join_record(group, key, patterns, owner)
        await self._ensure_consumers(key, patterns, start, self._lease)
        member = NatsConsumer(
            GroupHandle(
                nc=self._client,
                js=self._jsc,
                stream=self._layout.events,
                group=group,
                key=key,
                patterns=patterns,
                lease=self._lease,
                timeout=self._timeout,
                released=self._released.setdefault(key, set()),
                on_close=self._left,
            )
        )
        try:
            await member.open()
        except (nats.errors.Error, OSError) as error:
            raise BrokerUnavailable(
                f"subscription {group!r}: NATS refused this reader's inboxes ({error!r}); "
                "try again when the server is reachable"
            ) from error
        self._readers.setdefault(key, []).append(member)
        return member

    def _left(self, member: NatsConsumer) -> None:
        members = self._readers.get(group_key(member.group), [])
        if member in members:
            members.remove(member)

    async def subscriptions(self) -> list[SubscriptionInfo]:
        return await self._subscriptions(self._readers)


def _numbers(query: dict[str, str]) -> tuple[float, float, int]:
    """``lease``, ``timeout`` (positive seconds) and ``replicas`` (1 to 5) of a URL's query."""
    try:
        lease = float(query.get("lease", 30.0))
        timeout = float(query.get("timeout", 3.0))
        replicas = int(query.get("replicas", 1))
    except ValueError as error:
        raise ConfigError(
            "events.broker", f"lease and timeout are seconds, replicas a count: {error}"
        ) from error
    if lease <= 0 or timeout <= 0:
        raise ConfigError("events.broker", "lease and timeout must be positive seconds")
    if not 1 <= replicas <= 5:
        raise ConfigError("events.broker", f"replicas must be 1 to 5 (JetStream's), not {replicas}")
    return lease, timeout, replicas
