"""The Kafka broker's local copy of its three topics, kept up to date by one reader.

Every broker instance tails the event log, the dead letters and the compacted group topic of its
namespace from the beginning of what Kafka (and the logical retention floor) still holds. Groups
are dispatched from this copy, and every write waits until the copy has it, so a broker reads its
own writes: a dead letter is listed, a group seen, as soon as ``publish`` returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from callboard.brokers.base import RetentionPolicy
from callboard.events import Event

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The meta key holding the logical retention floor of the event log.
FLOOR_KEY = "floor"
#: The prefix of the meta keys naming which instance reads a group.
HOLDER_PREFIX = "holder:"


@dataclass(frozen=True, slots=True)
class Hold:
    """Which broker instance reads a group, and until when (milliseconds since the epoch)."""

    instance: str
    until: int


@dataclass(frozen=True, slots=True)
class Stored:
    """One record of the event log or of the dead letters, decoded."""

    offset: int
    event: Event
    #: The only group that receives it (``deliver_to``), or ``None``.
    target: str | None
    #: When Kafka stored it, in milliseconds since the epoch.
    stored_ms: int


def encode_record(event: Event, payload: bytes, metadata: bytes, target: str | None) -> bytes:
    """The record value: everything of the event, so the log needs no other store."""
    delta = event.time - _EPOCH
    time_us = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    head = orjson.dumps({"id": event.id, "topic": event.topic, "time": time_us, "target": target})
    return b'{"h":' + head + b',"p":' + payload + b',"m":' + metadata + b"}"


def decode_record(offset: int, value: bytes, stored_ms: int) -> Stored:
    body = orjson.loads(value)
    head = body["h"]
    time = _EPOCH + timedelta(microseconds=head["time"])
    event = Event.restore(head["topic"], body["p"], body["m"], head["id"], time)
    return Stored(offset, event, head["target"], stored_ms)


def _decoded(tp: TopicPartition, offset: int, value: bytes, stored_ms: int) -> Stored | None:
    """The record decoded, or ``None`` (logged) for one callboard did not write."""
    try:
        return decode_record(offset, value, stored_ms)
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("skipping record %s@%d, not a callboard event: %s", tp.topic, offset, error)
        return None


class Mirror:
    """The records of one namespace, as far as the reader has read them."""

    def __init__(self, log: TopicPartition, letters: TopicPartition, meta: TopicPartition) -> None:
        self.log_tp, self.letters_tp, self.meta_tp = log, letters, meta
        #: The event log from ``floor`` on, by offset.
        self.log: dict[int, Stored] = {}
        self.letters: dict[int, Stored] = {}
        #: The latest value of every live key of the group topic.
        self.meta: dict[str, Any] = {}
        #: Which instance holds each group, decided in the order of the group topic.
        self.holds: dict[str, Hold] = {}
        #: The first offset of the log still retained (the logical retention floor).
        self.floor = 0
        #: The next offset to read, per partition.
        self.position: dict[TopicPartition, int] = {log: 0, letters: 0, meta: 0}
        self._changed = asyncio.Condition()
        #: Called with each new log record (dispatch, the delivery id index, the event index).
        self.on_record: Callable[[Stored], None] = lambda stored: None
        #: Called with each new dead letter (the event index).
        self.on_letter: Callable[[Stored], None] = lambda stored: None
        #: Called when the floor moved up (trim indexes).
        self.on_floor: Callable[[int, int], None] = lambda old, new: None

    @property
    def end(self) -> int:
        return self.position[self.log_tp]

    def apply(
        self,
        tp: TopicPartition,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        stored_ms: int,
    ) -> None:
        """Take one record read from Kafka (or confirmed by a write)."""
        if offset < self.position[tp]:
            return
        self.position[tp] = offset + 1
        if tp == self.meta_tp:
            self._apply_meta(key, value, stored_ms)
        elif value is None:
            return
        elif tp == self.log_tp:
            stored = _decoded(tp, offset, value, stored_ms)
            if stored is not None and offset >= self.floor:
                self.log[offset] = stored
                self.on_record(stored)
        elif (stored := _decoded(tp, offset, value, stored_ms)) is not None:
            self.letters[offset] = stored
            self.on_letter(stored)

    def _apply_meta(self, key: bytes | None, value: bytes | None, stored_ms: int) -> None:
        if key is None:
            return
        name = key.decode()
        if name.startswith(HOLDER_PREFIX):
            self._apply_hold(name.removeprefix(HOLDER_PREFIX), value, stored_ms)
            return
        if value is None:
            self.meta.pop(name, None)
            return
        decoded = orjson.loads(value)
        self.meta[name] = decoded
        if name == FLOOR_KEY:
            self.raise_floor(int(decoded["offset"]))

    def _apply_hold(self, group: str, value: bytes | None, stored_ms: int) -> None:
        """A claim on a group counts only if, when Kafka stored it, the group was free, held by
        the same instance, or held past its time. Every instance reads the claims in one order,
        so all of them agree on the holder, even of two claims written at once."""
        if value is None:  # the group was deleted
            self.holds.pop(group, None)
            return
        decoded = orjson.loads(value)
        claim = Hold(str(decoded["instance"]), int(decoded["until"]))
        current = self.holds.get(group)
        if current is None or current.instance == claim.instance or current.until <= stored_ms:
            self.holds[group] = claim

    def raise_floor(self, floor: int) -> None:
        """Forget the log below ``floor`` (retention deleted it)."""
        if floor <= self.floor:
            return
        old, self.floor = self.floor, floor
        for offset in [o for o in self.log if o < floor]:
            del self.log[offset]
        self.on_floor(old, floor)

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def reached(self, tp: TopicPartition, offset: int, timeout: float) -> bool:
        """Wait until the record at ``offset`` was read; ``False`` after ``timeout``."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: self.position[tp] > offset)
        except TimeoutError:
            return False
        return True


async def tail(
    consumer: AIOKafkaConsumer, mirror: Mirror, changed: Callable[[], Awaitable[None]]
) -> None:
    """Read the namespace's topics forever; log and retry while Kafka is unreachable."""
    failing = False
    while True:
        try:
            batches = await consumer.getmany(timeout_ms=500, max_records=2_000)
        except KafkaError as error:
            if not failing:
                logger.warning("reading from Kafka failed, retrying: %s", error)
            failing = True
            await asyncio.sleep(0.5)
            continue
        if failing:
            logger.info("reading from Kafka again")
            failing = False
        if not batches:
            continue
        for tp, records in batches.items():
            for record in records:
                mirror.apply(tp, record.offset, record.key, record.value, record.timestamp)
        await mirror.notify()
        await changed()


def expired_before(
    log: Mapping[int, Stored], floor: int, end: int, policy: RetentionPolicy, now_ms: int
) -> int:
    """The first offset the policy keeps: everything of the log below it is deleted.

    The log is in the order Kafka stored it, so what is deleted is always a prefix: the events
    older than ``max_age``, and beyond the newest ``max_count`` those older than ``min_age``.
    """
    count = len(log)
    for index, (offset, stored) in enumerate(sorted(log.items())):
        age = now_ms - stored.stored_ms
        too_old = age > policy.max_age * 1000
        too_many = count - index > policy.max_count and age >= policy.min_age * 1000
        if not (too_old or too_many):
            return offset
    return max(end, floor)
