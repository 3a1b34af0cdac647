"""The Kafka broker (``kafka://host:port/?prefix=callboard.``): events on an Apache Kafka cluster.

A namespace (the ``prefix``) is three topics. ``<prefix>events`` is the event log: one
partition, so every group receives events in the one order Kafka stored them, across callboard
topics (the contract asks for it; Kafka orders records only within a partition). The callboard
topic travels in the record, so any topic name works without mapping. ``<prefix>deadletters``
keeps dead letters until they are taken; ``<prefix>groups`` (compacted) keeps each group's
patterns, owner and position, the dead letters taken, and the retention floor.

Every instance tails the three topics (``kafka_log``) and hands events to its groups' consumers
from that copy (``kafka_groups``); ``EventLog`` reads the same copy (``kafka_eventlog``). Kafka's
own consumer groups are not used: they lease whole partitions, not single events. The leases live
in the process, so a group is held by one instance at a time (``_hold``; a consumer in another
instance stands by and takes it over when the holder stops): the broker is not ``shared``. A
publish returns once Kafka acknowledged it (``acks=all``); concurrent publishes share the
producer's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError

from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    Capabilities,
    Consumer,
    EventPage,
    EventQuery,
    Outcome,
    RetentionPolicy,
    Start,
    SubscriptionInfo,
    name_problem,
)
from callboard.brokers.kafka_eventlog import EventIndex, GroupView, kept_letters, outcomes
from callboard.brokers.kafka_groups import GroupState, KafkaConsumer
from callboard.brokers.kafka_log import (
    FLOOR_KEY,
    HOLDER_PREFIX,
    Hold,
    Mirror,
    Stored,
    encode_record,
    expired_before,
    tail,
)
from callboard.brokers.kafka_setup import delete_records, ensure_topics, parse_url, stop
from callboard.brokers.storable import encode_checked
from callboard.errors import BrokerUnavailable, SubscriptionError
from callboard.events import Event
from callboard.topics import normalize_patterns

logger = logging.getLogger(__name__)


def _now_ms() -> int:
    return round(time.time() * 1000)


class KafkaBroker:
    """Events on a Kafka cluster; see the module."""

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str = "callboard.",
        timeout: float = 5.0,
        fetch_wait_ms: int = 100,
        idempotent: bool = False,
        client_id: str = "callboard",
        retention: RetentionPolicy | None = None,
        lease: float = 30.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._prefix = prefix
        self._timeout = timeout
        #: How long a read of the tail waits for new records. Kafka answers as soon as a record
        #: arrives; Tansu waits the whole time, so its tests use a short wait.
        self._fetch_wait_ms = fetch_wait_ms
        #: Kafka's idempotent producer: no duplicates from the producer's own retries.
        self._idempotent = idempotent
        #: One past the newest log offset Kafka acknowledged to this instance.
        self._acked_end = 0
        self._client_id = client_id
        self._retention = retention or RetentionPolicy()
        #: Seconds a group stays held by this process without renewal (see ``_hold``).
        self._lease = lease
        self._instance = uuid.uuid4().hex
        self._log = TopicPartition(prefix + "events", 0)
        self._letters = TopicPartition(prefix + "deadletters", 0)
        self._meta = TopicPartition(prefix + "groups", 0)
        self._mirror = Mirror(self._log, self._letters, self._meta)
        self._mirror.on_record = self._index
        self._mirror.on_floor = self._trim
        self._events = EventIndex()
        self._mirror.on_letter = self._events.add_letter
        self._delivery_ids: dict[tuple[str, str], int] = {}
        self._reserved: set[tuple[str, str]] = set()
        self._groups: dict[str, GroupState] = {}
        #: Consumers of groups another process holds, waiting to take them over.
        self._standing_by: weakref.WeakSet[KafkaConsumer] = weakref.WeakSet()
        self._producer: AIOKafkaProducer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._delete_records = True

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> KafkaBroker:
        """``kafka://host:port[,host:port]/?prefix=...&timeout=seconds&client_id=...``."""
        return cls(**parse_url(url), retention=retention)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(durable=True, shared=False, replay=True)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            linger_ms=1,
            enable_idempotence=self._idempotent,
            request_timeout_ms=round(self._timeout * 1000),
        )
        try:
            async with asyncio.timeout(self._timeout):
                await producer.start()
            await self._ensure_topics()
            reader = await self._start_reader()
        except (KafkaError, OSError, TimeoutError) as error:
            await producer.stop()
            raise BrokerUnavailable(
                f"Kafka at {self._bootstrap} is not reachable: {error or type(error).__name__}"
            ) from error
        except BaseException:
            await producer.stop()
            raise
        self._producer, self._reader = producer, reader
        self._tasks = [
            asyncio.create_task(tail(reader, self._mirror, self._dispatch), name="kafka-tail"),
            asyncio.create_task(self._flush_forever(), name="kafka-positions"),
            asyncio.create_task(self._clean_forever(), name="kafka-retention"),
            asyncio.create_task(self._renew_forever(), name="kafka-holds"),
        ]
        await self._catch_up(reader)

    async def _start_reader(self) -> AIOKafkaConsumer:
        reader = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._fetch_wait_ms,
            request_timeout_ms=max(round(self._timeout * 1000), 5000),
        )
        try:
            async with asyncio.timeout(self._timeout):
                await reader.start()
        except BaseException:
            await reader.stop()
            raise
        reader.assign([self._log, self._letters, self._meta])
        await reader.seek_to_beginning()
        return reader

    async def _catch_up(self, reader: AIOKafkaConsumer) -> None:
        """Read everything stored before ``start`` returns, so groups resume where they were."""
        try:
            async with asyncio.timeout(max(self._timeout, 10.0)):
                ends = await reader.end_offsets([self._log, self._letters, self._meta])
                for tp, end in ends.items():
                    if end:
                        await self._mirror.reached(tp, end - 1, self._timeout * 4)
        except (KafkaError, TimeoutError) as error:
            await self.abandon()
            raise BrokerUnavailable(
                f"could not read Kafka at {self._bootstrap}: {error}"
            ) from error

    async def close(self) -> None:
        if self._producer is None:
            return
        for group in self._groups.values():
            group.hand_back_all()
        with contextlib.suppress(BrokerUnavailable):
            await self._flush()
            for name in list(self._groups):
                if self._holds(name):
                    await self._write_meta(HOLDER_PREFIX + name, asdict(Hold(self._instance, 0)))
        await self.abandon()

    async def abandon(self) -> None:
        """Stop as a killed process would: nothing handed back, no position written."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        producer, reader = self._producer, self._reader
        self._producer = self._reader = None
        for client in (producer, reader):
            if client is not None:
                await stop(client)
        groups, self._groups = self._groups, {}
        for group in groups.values():
            group.closed = True
            await group.wake()
        standing_by, self._standing_by = self._standing_by, weakref.WeakSet()
        for consumer in standing_by:
            consumer.stand_down()

    # -- topics -----------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        return await self._ensure_topics()

    async def _ensure_topics(self) -> list[str]:
        return await ensure_topics(
            self._bootstrap,
            self._client_id,
            self._timeout,
            [
                NewTopic(self._log.topic, 1, 1, topic_configs={"retention.ms": "-1"}),
                NewTopic(self._letters.topic, 1, 1, topic_configs={"retention.ms": "-1"}),
                NewTopic(self._meta.topic, 1, 1, topic_configs={"cleanup.policy": "compact"}),
            ],
        )

    # -- writing ----------------------------------------------------------------------------

    async def _write(
        self, tp: TopicPartition, value: bytes | None, key: bytes | None, *, read_back: bool = True
    ) -> int:
        """Send one record and wait for Kafka's acknowledgement (and for the copy to hold it:
        what reads the copy then finds the write, as dead letters and group records must be)."""
        producer = self._producer
        if producer is None:
            raise BrokerUnavailable("the Kafka broker is not started (or was closed)")
        try:
            async with asyncio.timeout(self._timeout):
                sent = await producer.send(tp.topic, value, key=key, partition=0)
                offset: int = (await sent).offset
        except (KafkaError, TimeoutError) as error:
            raise BrokerUnavailable(
                f"Kafka at {self._bootstrap} did not acknowledge the write to {tp.topic}: "
                f"{error or type(error).__name__}"
            ) from error
        if tp == self._log:
            self._acked_end = max(self._acked_end, offset + 1)
        if read_back and not await self._mirror.reached(tp, offset, self._timeout):
            logger.warning(
                "Kafka acknowledged %s@%d but it was not read back yet", tp.topic, offset
            )
        return offset

    async def _read_to_end(self, *partitions: TopicPartition) -> None:
        """Wait until the copy holds every record of ``partitions`` written so far (by any
        instance): a decision on a group sees the latest claims on it, a search what any
        instance published before it."""
        reader = self._reader
        if reader is None:
            raise BrokerUnavailable("the Kafka broker is not started (or was closed)")
        try:
            async with asyncio.timeout(self._timeout):
                ends = await reader.end_offsets(list(partitions))
        except (KafkaError, TimeoutError) as error:
            raise BrokerUnavailable(
                f"could not read the end of the topics of Kafka at {self._bootstrap}: {error}"
            ) from error
        for tp, end in ends.items():
            if end and not await self._mirror.reached(tp, end - 1, self._timeout):
                logger.warning("%s was not read to its end yet", tp.topic)

    async def check(self) -> None:
        """``BrokerHealth``: Kafka tells the end of the group topic (one ``ListOffsets``
        round trip to its leader), within ``timeout``."""
        reader = self._reader
        if reader is None:
            raise BrokerUnavailable(
                f"the Kafka broker for {self._bootstrap} is not started (or was closed)"
            )
        try:
            async with asyncio.timeout(self._timeout):
                await reader.end_offsets([self._meta])
        except (KafkaError, OSError, TimeoutError) as error:
            raise BrokerUnavailable(
                f"Kafka at {self._bootstrap} did not tell the end of {self._meta.topic} "
                f"(waiting at most {self._timeout:g}s): {error or type(error).__name__}"
            ) from error

    async def _read_own_writes(self) -> None:
        """Wait until the copy holds every event this instance published."""
        if self._acked_end and not await self._mirror.reached(
            self._log, self._acked_end - 1, self._timeout
        ):
            logger.warning("the events published here were not read back from Kafka yet")

    async def _write_meta(self, key: str, value: Any) -> None:
        encoded = None if value is None else orjson.dumps(value)
        await self._write(self._meta, encoded, key.encode())

    async def publish(self, event: Event) -> bool:
        return await self._publish(event, None)

    async def _publish(self, event: Event, target: str | None) -> bool:
        payload, metadata = encode_checked(event)
        value = encode_record(event, payload, metadata, target)
        letter = event.topic.startswith(DEAD_LETTER_PREFIX) and target is None
        delivery_id = event.delivery_id if target is None and not letter else None
        key = (event.topic, delivery_id) if delivery_id is not None else None
        if key is not None:
            if key in self._delivery_ids or key in self._reserved:
                return False
            self._reserved.add(key)
        try:
            # An event is not read back: the groups' consumers get it from the tail, and what
            # counts the log (``subscriptions``, a new group at the end) waits for it there.
            offset = await self._write(
                self._letters if letter else self._log, value, None, read_back=letter
            )
        finally:
            if key is not None:
                self._reserved.discard(key)
        if key is not None:
            self._delivery_ids.setdefault(key, offset)
        return True

    def _index(self, stored: Stored) -> None:
        delivery_id = stored.event.delivery_id
        if delivery_id is not None and stored.target is None:
            self._delivery_ids.setdefault((stored.event.topic, delivery_id), stored.offset)
        self._events.add(stored)

    def _trim(self, old: int, new: int) -> None:
        self._delivery_ids = {k: o for k, o in self._delivery_ids.items() if o >= new}
        self._events.trim(new)

    async def _dispatch(self) -> None:
        """The copy grew: wake the consumers waiting in a fetch."""
        for group in list(self._groups.values()):
            await group.wake()

    # -- groups -----------------------------------------------------------------------------

    def _group_meta(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._mirror.meta.get("group:" + name)
        return found

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> Consumer:
        problem = name_problem(group)
        if problem is not None:
            raise SubscriptionError(problem)
        patterns = normalize_patterns(topics)
        await self._read_own_writes()
        meta = self._group_meta(group)
        if meta is not None and tuple(meta["topics"]) != patterns:
            raise SubscriptionError(
                f"the subscription {group!r} reads {list(meta['topics'])}, not {list(patterns)}; "
                "delete it first to change its topics"
            )
        if meta is None:
            await self._make_group(group, patterns, start, owner)
        elif meta.get("owner") is None and owner is not None:
            await self._write_meta("group:" + group, {**meta, "owner": owner})
        take = functools.partial(self._take, group, patterns)
        consumer = KafkaConsumer(
            group,
            await take(),
            take,
            lambda: self._group_meta(group) is not None,
            wait=self._lease / 3,
        )
        if consumer.standing_by:
            logger.info(
                "the subscription %r is read by another process on this Kafka namespace; this "
                "one stands by and takes it over when that one stops",
                group,
            )
            self._standing_by.add(consumer)
        return consumer

    async def _take(self, group: str, patterns: tuple[str, ...]) -> GroupState | None:
        """The group, held by this process from now on; ``None`` while another one holds it."""
        if not await self._hold(group):
            return None
        return self._load(group, patterns)

    async def _hold(self, group: str) -> bool:
        """Take the group for this process, unless another live process reads it.

        The broker is not ``shared``: two processes reading one group would each deliver every
        event, so a group is held by one instance at a time, for ``lease`` seconds renewed
        while it has consumers (a crashed process gives it up when its hold runs out).
        """
        await self._read_to_end(self._meta)
        held = self._mirror.holds.get(group)
        if held is not None and held.instance != self._instance:
            self._groups.pop(group, None)  # taken over since: resume from the written position
        if held is None or held.instance == self._instance or held.until <= _now_ms():
            await self._renew(group)  # a claim, which counts only if no one claimed it first
        return self._holds(group)

    def _holds(self, group: str) -> bool:
        held = self._mirror.holds.get(group)
        return held is not None and held.instance == self._instance

    async def _renew(self, group: str) -> None:
        until = _now_ms() + round(self._lease * 1000)
        await self._write_meta(HOLDER_PREFIX + group, asdict(Hold(self._instance, until)))

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            for name, state in list(self._groups.items()):
                if state.consumers > 0 and self._group_meta(name) is not None:
                    try:
                        await self._renew(name)
                    except BrokerUnavailable as error:
                        logger.warning("could not renew the hold on %r: %s", name, error)

    async def _make_group(
        self, group: str, patterns: tuple[str, ...], start: Start, owner: str | None
    ) -> None:
        state = GroupState(group, patterns, self._mirror)
        state.start_at(self._start_offset(start))
        await self._write_meta("pos:" + group, state.snapshot())
        await self._write_meta(
            "group:" + group, {"topics": list(patterns), "owner": owner, "start": state.next}
        )
        self._groups[group] = state

    def _start_offset(self, start: Start) -> int:
        if start == "end":
            return self._mirror.end
        if start == "beginning":
            return self._mirror.floor
        if not isinstance(start, datetime):
            raise SubscriptionError(
                f"start must be 'end', 'beginning' or a datetime, not {start!r}"
            )
        moment = round(start.timestamp() * 1000)
        later = [o for o, s in self._mirror.log.items() if s.stored_ms >= moment]
        return min(later, default=self._mirror.end)

    def _load(self, group: str, patterns: tuple[str, ...]) -> GroupState:
        state = self._groups.get(group)
        if state is None:
            state = GroupState(group, patterns, self._mirror)
            saved = self._mirror.meta.get("pos:" + group)
            if saved is not None:
                state.restore(saved)
            self._groups[group] = state
        return state

    def _state(self, group: str, patterns: tuple[str, ...]) -> GroupState:
        """The group as held here, or as its written position says (not loaded)."""
        return self._groups.get(group) or self._written(group, patterns)

    def _written(self, group: str, patterns: tuple[str, ...]) -> GroupState:
        """The group as its written position says (not loaded)."""
        state = GroupState(group, patterns, self._mirror)
        saved = self._mirror.meta.get("pos:" + group)
        if saved is not None:
            state.restore(saved)
        return state

    async def _flush(self) -> None:
        for name, state in list(self._groups.items()):
            if state.dirty and self._group_meta(name) is not None:
                state.dirty = False
                try:
                    await self._write_meta("pos:" + name, state.snapshot())
                except BrokerUnavailable:
                    state.dirty = True
                    raise

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            try:
                await self._flush()
            except BrokerUnavailable as error:
                logger.warning("could not record group positions, retrying: %s", error)
                await asyncio.sleep(1.0)

    # -- operations -------------------------------------------------------------------------

    async def subscriptions(self) -> list[SubscriptionInfo]:
        await self._read_own_writes()
        listed = []
        for key in sorted(k for k in self._mirror.meta if k.startswith("group:")):
            name = key.removeprefix("group:")
            meta = self._mirror.meta[key]
            state = self._state(name, tuple(meta["topics"]))
            listed.append(
                SubscriptionInfo(
                    name=name,
                    topics=state.topics,
                    in_flight=len(state.in_flight),
                    backlog=state.backlog(),
                    lost=state.lost,
                    owner=meta.get("owner"),
                )
            )
        return listed

    async def delete_subscription(self, group: str) -> bool:
        state = self._groups.get(group)
        if state is not None and state.consumers > 0:
            raise SubscriptionError(
                f"the subscription {group!r} is still read by a consumer of this broker; "
                "close it first"
            )
        existed = self._group_meta(group) is not None or bool(self._letters_of(group))
        self._groups.pop(group, None)
        if existed:
            await self._write_meta("group:" + group, None)
            await self._write_meta("pos:" + group, None)
            await self._write_meta(HOLDER_PREFIX + group, None)
            await self._write_meta(
                "letters:" + group, {"from": self._mirror.position[self._letters], "taken": []}
            )
        return existed

    def _letters_of(self, group: str) -> list[Event]:
        topic = DEAD_LETTER_PREFIX + group
        kept = kept_letters(self._mirror.meta)
        return [
            s.event
            for _, s in sorted(self._mirror.letters.items())
            if s.event.topic == topic and kept(s)
        ]

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        letters = self._letters_of(group)
        if ids is not None:
            wanted = set(ids)
            letters = [e for e in letters if e.id in wanted]
        letters = letters[:limit]
        if remove and letters:
            record = self._mirror.meta.get("letters:" + group) or {"from": 0, "taken": []}
            taken = [*record["taken"], *(e.id for e in letters)]
            await self._write_meta("letters:" + group, {"from": record["from"], "taken": taken})
        return letters

    async def deliver_to(self, group: str, event: Event) -> None:
        if self._group_meta(group) is None:
            raise SubscriptionError(f"no subscription {group!r} to deliver to")
        await self._publish(event, group)

    async def clean(self) -> int:
        await self._read_own_writes()
        mirror = self._mirror
        now_ms = _now_ms()
        floor = expired_before(mirror.log, mirror.floor, mirror.end, self._retention, now_ms)
        if floor <= mirror.floor:
            return 0
        deleted = sum(1 for o in mirror.log if o < floor)
        for key, meta in list(mirror.meta.items()):
            if key.startswith("group:"):
                name = key.removeprefix("group:")
                state = self._state(name, tuple(meta["topics"]))
                state.expire(floor)
                if name not in self._groups:
                    await self._write_meta("pos:" + name, state.snapshot())
        await self._flush()
        await self._write_meta(FLOOR_KEY, {"offset": floor})
        await self._delete_below(floor)
        return deleted

    async def _delete_below(self, floor: int) -> None:
        """Delete the expired records from Kafka too, where the server supports it."""
        if self._delete_records:
            self._delete_records = await delete_records(
                self._bootstrap, self._client_id, self._timeout, self._log, floor
            )

    async def _clean_forever(self) -> None:
        while True:
            await asyncio.sleep(self._retention.interval)
            try:
                await self.clean()
            except BrokerUnavailable as error:
                logger.warning("retention could not run now: %s", error)

    # -- the event log (kafka_eventlog) -------------------------------------------------------

    async def find_events(self, query: EventQuery) -> EventPage:
        """Read from the copy, once it holds what Kafka held when the search began."""
        await self._read_to_end(self._letters if query.dead_letters else self._log, self._meta)
        if query.dead_letters:
            return self._events.find_letters(query, kept_letters(self._mirror.meta))
        return self._events.find(query)

    async def event_outcomes(self, event_id: str) -> list[Outcome]:
        """Read from the copy, once it holds what Kafka held when the question was asked: a
        group held by another process is told as that process last wrote it (``kafka_eventlog``)."""
        await self._read_to_end(self._log, self._letters, self._meta)
        kept = kept_letters(self._mirror.meta)
        letters = [s for s in self._events.letters_naming(event_id) if kept(s)]
        views = [
            self._view(key.removeprefix("group:"), meta)
            for key, meta in self._mirror.meta.items()
            if key.startswith("group:")
        ]
        return outcomes(self._events.rows(event_id), letters, views)

    def _view(self, name: str, meta: dict[str, Any]) -> GroupView:
        live = self._groups.get(name) if self._holds(name) else None
        return GroupView.of(
            name,
            meta,
            live or self._written(name, tuple(meta["topics"])),
            live=live is not None,
            hold=self._mirror.holds.get(name),
            position=self._mirror.meta.get("pos:" + name) or {},
            now_ms=_now_ms(),
        )
