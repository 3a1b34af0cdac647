"""Kafka into callboard: each message of a Kafka consumer group published to a callboard topic.

One ``KafkaInlet`` runs one Kafka consumer (``topics[]`` of ``kafkaConsumingEventPublisher``) in a
task of its own. Per fetched batch it publishes every message (``EventsService.publish``, which
returns once the broker stored the event), and only then counts the partition's offset as stored;
the offsets committed to Kafka are the stored ones, never further. A crash therefore loses nothing:
what was read and not committed is read again, and since each event carries a delivery id made of
the message's coordinates (topic, partition, offset and timestamp), a broker that detects
redeliveries keeps one copy.

A batch's messages are handed to the broker in their order, all at once (one commit of the store
for many); a message the broker could not take is tried again, after a back-off that grows with
``retry``, until it is stored: the partition waits, nothing is skipped. When the broker came back,
the messages it had refused are stored after the later ones it had taken.

A message that can never be published (its value is not JSON, or it holds what no broker can
keep) is handed to the events service (a ``DeadLetterSink``) as a dead letter of
``kafka:consumer:<instance>:<groupId>``, with the reason and the value as text, and the partition
goes on. While Kafka cannot be reached the consumer tries again with the same back-off, and
resumes from the last commit. What is stored, dead-lettered and failed, and whether the consumer
is connected, go to the inlet's meter (``callboard_bridge_*`` in ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from callboard.bridges.kafka_settings import ConsumingPublisher, InTopic, client_options
from callboard.deadletters import DeadLetterSink, reason_of, require_sink
from callboard.errors import InvalidEventError
from callboard.events import DELIVERY_ID, Event, MetadataValue
from callboard.extensions import InletMeters
from callboard.service import EventsService

logger = logging.getLogger("callboard.bridges.kafka")

#: Messages taken from Kafka per fetch, at most.
MAX_RECORDS = 500
#: Seconds a fetch waits for messages before the loop looks whether it should stop or commit.
FETCH_WAIT = 1.0
#: Seconds ``stop`` waits for the batch under way to be stored before it gives up on it.
STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Read:
    """One Kafka message as an event, or why it cannot be one."""

    message: Any
    event: Event
    #: Why the value cannot be published (it is not JSON); ``None`` when it can.
    problem: Exception | None = None


def dead_letter_group(instance: str, group_id: str) -> str:
    """The name under which an inlet's dead letters are kept."""
    return f"kafka:consumer:{instance}:{group_id}"


def as_text(value: bytes | None) -> str:
    """Bytes as storable text: UTF-8 with what is not replaced, and no NUL."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace").replace("\x00", "\ufffd")


def headers_metadata(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, MetadataValue]:
    """Kafka headers as metadata: values as text, a repeated header as a list."""
    metadata: dict[str, MetadataValue] = {}
    for key, raw in headers:
        name, value = key.lower(), as_text(raw)
        known = metadata.get(name)
        if known is None:
            metadata[name] = value
        elif isinstance(known, list):
            known.append(value)
        else:
            metadata[name] = [known, value]
    return metadata


class KafkaInlet:
    """One Kafka consumer publishing what it reads to one callboard topic; see the module."""

    def __init__(
        self, instance: str, settings: ConsumingPublisher, entry: InTopic, meters: InletMeters
    ) -> None:
        self.instance = instance
        self.topic = entry.topic
        self.options = entry.kafka
        self.id = dead_letter_group(instance, entry.kafka.group_id)
        self._settings = settings
        self._retry = settings.retry
        self._meter = meters(self.id)
        self._events: EventsService | None = None
        self._sink: DeadLetterSink | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        #: Waiting on Kafka with nothing unstored in hand: ``stop`` may cancel at once.
        self._waiting = False
        #: Per partition, one past the newest offset stored and not yet committed.
        self._stored: dict[Any, int] = {}
        self._committed_at = monotonic()

    async def start(self, events: EventsService) -> None:
        self._events, self._sink = events, require_sink(events, "kafka")
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"callboard {self.id}")

    async def stop(self) -> None:
        """Store the batch under way (for ``STOP_TIMEOUT`` at most), commit, leave the group."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        if self._waiting:
            task.cancel()
        done, _ = await asyncio.wait([task], timeout=STOP_TIMEOUT)
        if not done:
            logger.warning("Kafka bridge %s: the batch under way was not stored in time", self.id)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._meter.connected(False)

    # -- the consumer's life ----------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            consumer = self._consumer()
            try:
                self._waiting = True
                try:
                    async with asyncio.timeout(self._settings.request_timeout / 1000):
                        await consumer.start()
                finally:
                    self._waiting = False
                self._meter.connected(True)
                if failures:
                    logger.info("Kafka bridge %s: connected again", self.id)
                failures = 0
                await self._consume(consumer)
            except Exception as error:
                # Whatever failed, the bridge starts its consumer again after a back-off: it
                # never stops by itself while callboard runs.
                failures += 1
                self._meter.failed()
                self._meter.connected(False)
                delay = self._retry.delay(failures)
                known = isinstance(error, KafkaError | OSError | TimeoutError)
                logger.warning(
                    "Kafka bridge %s: %s (%s); starting again in %.1fs from the last commit",
                    self.id,
                    f"Kafka at {','.join(self._settings.brokers)} failed" if known else "failed",
                    error or type(error).__name__,
                    delay,
                    exc_info=None if known else error,
                )
            finally:
                await self._close(consumer)
            if failures:
                await self._stopped_within(delay)

    def _consumer(self) -> Any:
        kafka = self.options
        consumer = AIOKafkaConsumer(
            group_id=kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if kafka.from_beginning else "latest",
            session_timeout_ms=round(kafka.session_timeout),
            rebalance_timeout_ms=round(kafka.rebalance_timeout),
            heartbeat_interval_ms=round(kafka.heartbeat_interval),
            metadata_max_age_ms=round(kafka.metadata_max_age),
            max_partition_fetch_bytes=kafka.max_bytes_per_partition,
            fetch_min_bytes=kafka.min_bytes,
            fetch_max_bytes=kafka.max_bytes,
            fetch_max_wait_ms=round(kafka.max_wait_time),
            **client_options(self._settings),
        )
        consumer.subscribe(topics=list(kafka.topics), listener=_CommitOnRevoke(self, consumer))
        return consumer

    async def _consume(self, consumer: Any) -> None:
        while not self._stopping.is_set():
            self._waiting = True
            try:
                batches = await consumer.getmany(
                    timeout_ms=round(FETCH_WAIT * 1000), max_records=MAX_RECORDS
                )
            finally:
                self._waiting = False
            for partition, messages in batches.items():
                if not await self._store_all([self._read(m) for m in messages]):
                    return  # stopping: what was not stored is read again
                self._stored[partition] = messages[-1].offset + 1
            if self._stored and (
                not self.options.auto_commit
                or monotonic() - self._committed_at >= self.options.auto_commit_interval / 1000
            ):
                await self.commit(consumer)

    async def commit(self, consumer: Any, only: Sequence[Any] | None = None) -> None:
        """Commit the stored offsets (of the partitions ``only``, when given) still assigned."""
        assigned = consumer.assignment()
        offsets = {
            tp: offset
            for tp, offset in self._stored.items()
            if tp in assigned and (only is None or tp in only)
        }
        for tp in list(self._stored):
            if tp not in assigned or tp in offsets:
                del self._stored[tp]
        if not offsets:
            return
        try:
            async with asyncio.timeout(self._settings.request_timeout / 1000):
                await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            # The group moved the partitions on: their new reader starts from the last commit,
            # and the redelivery is caught by the broker's delivery ids.
            logger.info("Kafka bridge %s: offsets not committed (%s)", self.id, error)
        except (KafkaError, OSError, TimeoutError) as error:
            for tp, offset in offsets.items():
                self._stored.setdefault(tp, offset)
            logger.warning(
                "Kafka bridge %s: could not commit offsets (%s); trying again with the next batch",
                self.id,
                error or type(error).__name__,
            )
            return
        self._committed_at = monotonic()

    async def _close(self, consumer: Any) -> None:
        if self._stored:
            await self.commit(consumer)
        self._stored.clear()
        try:
            await consumer.stop()
        except (KafkaError, OSError) as error:
            logger.debug("Kafka bridge %s: stopping the consumer failed: %s", self.id, error)
        except asyncio.CancelledError:
            # aiokafka's fetcher can end in a cancellation of its own making; only ours counts.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise

    # -- messages into events ---------------------------------------------------------------

    def _read(self, message: Any) -> Read:
        metadata = headers_metadata(message.headers)
        metadata[DELIVERY_ID] = (
            f"kafka:{self.instance}:{message.topic}:{message.partition}:{message.offset}"
            f":{message.timestamp}"
        )
        value = message.value
        try:
            if value is None:
                raise ValueError("the message has no value (a tombstone)")
            payload = orjson.loads(value)
        except ValueError as error:
            return Read(message, Event(topic=self.topic, payload=None, metadata=metadata), error)
        return Read(message, Event(topic=self.topic, payload=payload, metadata=metadata))

    async def _store_all(self, reads: list[Read]) -> bool:
        """Store every message, trying again those that failed; ``False`` when stopping first."""
        failures = 0
        while reads:
            results = await asyncio.gather(*map(self._store, reads), return_exceptions=True)
            failed = [(r, e) for r, e in zip(reads, results, strict=True) if e is not None]
            if not failed:
                return True
            for _, error in failed:
                if not isinstance(error, Exception):
                    raise error  # a cancellation
            failures += 1
            delay = self._retry.delay(failures)
            logger.warning(
                "Kafka bridge %s: %d messages could not be stored (%s); trying again in %.1fs, "
                "their offsets wait",
                self.id,
                len(failed),
                failed[0][1],
                delay,
            )
            if await self._stopped_within(delay):
                return False
            reads = [read for read, _ in failed]
        return True

    async def _store(self, read: Read) -> None:
        assert self._events is not None
        problem = read.problem
        if problem is None:
            try:
                self._meter.stored(await self._events.publish(read.event))
                return
            except InvalidEventError as error:
                problem = error
        await self._dead_letter(read, problem)

    async def _dead_letter(self, read: Read, problem: Exception) -> None:
        """Keep a message that can never be published as a dead letter of the bridge."""
        assert self._sink is not None
        message = read.message
        event = Event(
            topic=self.topic,
            payload=as_text(message.value),
            metadata=headers_metadata(message.headers)
            | {DELIVERY_ID: str(read.event.metadata[DELIVERY_ID])},
        )
        await self._sink.dead_letter(self.id, event, reason_of(problem))
        self._meter.dead_lettered()
        logger.warning(
            "Kafka bridge %s: message %s/%d@%d cannot be published on %r (%s); kept as a dead "
            "letter of %r",
            self.id,
            message.topic,
            message.partition,
            message.offset,
            self.topic,
            problem,
            self.id,
        )

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits what was stored of the partitions the group takes away, before it does."""

    def __init__(self, inlet: KafkaInlet, consumer: Any) -> None:
        self._inlet = inlet
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._inlet.commit(self._consumer, only=list(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Nothing to do: reading resumes from the group's committed offsets."""
