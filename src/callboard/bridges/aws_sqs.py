"""SQS in: each configured queue's messages published to a callboard topic, deleted once stored.

Configuration, Backstage's keys (``events.modules.awsSqs.awsSqsConsumingEventPublisher``)::

    topics:
      <callboard topic>:
        queue:
          url: https://sqs.eu-west-1.amazonaws.com/123456789012/orders   # required
          region: eu-west-1            # endpoint, accessKeyId, secretAccessKey: bridges/aws.py
          visibilityTimeout: 30s       # default: the queue's own
          waitTime: 20s                # long poll, 0..20 s
        timeout: 260s                  # one receive-publish-delete round; default waitTime +
                                       # waitTimeAfterEmptyReceive + 180 s
        waitTimeAfterEmptyReceive: 1m

Each queue is read by a task of its own, ten messages per long poll. A message's body is the
payload (JSON); a message SNS delivered (``Type: Notification``) is unwrapped to the message SNS
was given, and its attributes read from SNS's envelope. String and number attributes become
metadata (``String.Array`` a list), and the message id (SNS's, for a wrapped one) the delivery id,
so a message received twice is a redelivery the broker does not store again.

A message is deleted only once the broker stored it: if the broker fails, the message comes back
after its visibility timeout. A message that cannot be decoded (not JSON, a broken SNS envelope)
or that no broker can keep is handed to the events service (a ``DeadLetterSink``) as a dead
letter of ``awsSqs.<topic>`` with the reason, and is then deleted; if even the dead letter cannot be stored it stays in the queue, where the queue's
own redrive policy, if it has one, takes it. When SQS cannot be reached, or the broker did not
store a message, the task logs it, waits (1 s, doubling up to 30 s) and tries again. Each
queue's reader tells its meter what it stored and dead-lettered, SQS's failures, and whether its
last receive succeeded (``callboard_bridge_*`` in ``/metrics``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from callboard.bridges.aws import ClientSettings, client, require_sdk, sdk_error
from callboard.bridges.settings import Duration
from callboard.deadletters import DeadLetterSink, reason_of, require_sink
from callboard.errors import BrokerUnavailable, CallboardError, InvalidEventError, InvalidTopicError
from callboard.events import DELIVERY_ID, Event, MetadataValue
from callboard.extensions import FunctionModule, InletMeter, InletMeters, ModuleContext
from callboard.service import EventsService
from callboard.settings import Section
from callboard.topics import validate_topic

if TYPE_CHECKING:
    from types_aiobotocore_sqs.client import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        DeleteMessageBatchRequestEntryTypeDef,
        MessageTypeDef,
    )

NAME = "awsSqs"
logger = logging.getLogger("callboard.bridges.aws_sqs")

#: Messages per receive: SQS's most.
RECEIVE_MAX = 10
#: Waits after a failed round: the first, and the longest as it doubles.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


class Queue(ClientSettings):
    url: str
    visibility_timeout: Duration | None = Field(default=None, alias="visibilityTimeout", ge=0)
    wait_time: Duration = Field(default=20.0, alias="waitTime")

    @model_validator(mode="after")
    def _wait_within(self) -> Queue:
        if not 0 <= self.wait_time <= 20:
            raise ValueError("waitTime must be within 0..20 seconds")
        return self


class TopicQueue(Section):
    queue: Queue
    timeout: Duration | None = None
    wait_time_after_empty_receive: Duration = Field(
        default=60.0, alias="waitTimeAfterEmptyReceive", ge=0
    )

    @property
    def round_timeout(self) -> float:
        """Seconds one round may take: ``timeout``, or Backstage's default."""
        idle = self.queue.wait_time + self.wait_time_after_empty_receive
        return self.timeout if self.timeout is not None else idle + 180.0

    @model_validator(mode="after")
    def _timeout_beyond_waits(self) -> TopicQueue:
        idle = self.queue.wait_time + self.wait_time_after_empty_receive
        if self.timeout is not None and self.timeout <= idle:
            raise ValueError(
                f"timeout ({self.timeout:g}s) must be greater than waitTime + "
                f"waitTimeAfterEmptyReceive ({idle:g}s)"
            )
        return self


class Publisher(Section):
    #: The queue read into each callboard topic (a concrete topic, not a pattern).
    topics: dict[str, TopicQueue] = {}

    @field_validator("topics")
    @classmethod
    def _topic_names(cls, topics: dict[str, TopicQueue]) -> dict[str, TopicQueue]:
        for topic in topics:
            try:
                validate_topic(topic)
            except InvalidTopicError as error:
                raise ValueError(str(error)) from None
        return topics


class Settings(Section):
    publisher: Publisher = Field(default=Publisher(), alias="awsSqsConsumingEventPublisher")


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one SQS message carries: its payload, metadata and delivery id."""

    payload: Any
    metadata: dict[str, MetadataValue]
    delivery_id: str


def dead_letter_source(topic: str) -> str:
    """The name under which the poison messages read into ``topic`` are kept."""
    return f"{NAME}.{topic}"


class PoisonMessage(ValueError):
    """A message whose body cannot be decoded; it goes to dead letters, never retried."""


def _listed(value: str) -> list[str]:
    items = json.loads(value)
    if not isinstance(items, list):
        raise ValueError("not a list")
    return [item if isinstance(item, str) else json.dumps(item) for item in items]


def _attribute(kind: str, value: str | None) -> MetadataValue | None:
    """An attribute's metadata value: strings and numbers as they are, ``String.Array`` as a
    list; binary (and what cannot be read) left out."""
    if value is None:
        return None
    if kind == "String.Array":
        try:
            return _listed(value)
        except ValueError:
            return value
    return value if kind.startswith(("String", "Number")) else None


def _metadata(found: Mapping[str, MetadataValue | None]) -> dict[str, MetadataValue]:
    return {name.lower(): value for name, value in found.items() if value is not None}


def decode(message: MessageTypeDef) -> Decoded:
    """Payload, metadata and delivery id of an SQS message; ``PoisonMessage`` says what is wrong."""
    body = message.get("Body", "")
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise PoisonMessage(f"the message body is not JSON: {error}") from None
    if isinstance(payload, dict) and payload.get("Type") == "Notification":
        return _unwrap(payload)
    attributes = message.get("MessageAttributes", {})
    metadata = _metadata(
        {
            name: _attribute(value.get("DataType", ""), value.get("StringValue"))
            for name, value in attributes.items()
        }
    )
    return Decoded(payload, metadata, message.get("MessageId", ""))


def _unwrap(envelope: dict[str, Any]) -> Decoded:
    """The message SNS was given, from the envelope it delivers to SQS."""
    inner = envelope.get("Message")
    if not isinstance(inner, str):
        raise PoisonMessage("the SNS notification has no Message")
    try:
        payload = json.loads(inner)
    except ValueError as error:
        raise PoisonMessage(f"the SNS notification's Message is not JSON: {error}") from None
    attributes = envelope.get("MessageAttributes") or {}
    if not isinstance(attributes, dict):
        raise PoisonMessage("the SNS notification's MessageAttributes is not an object")
    metadata = _metadata(
        {
            name: _attribute(str(value.get("Type", "")), value.get("Value"))
            for name, value in attributes.items()
            if isinstance(value, dict)
        }
    )
    return Decoded(payload, metadata, str(envelope.get("MessageId", "")))


class QueueReader:
    """Reads one queue into one callboard topic until stopped."""

    def __init__(
        self,
        topic: str,
        settings: TopicQueue,
        sqs: SQSClient,
        events: EventsService,
        dead: DeadLetterSink,
        meter: InletMeter,
    ) -> None:
        self.topic = topic
        self.settings = settings
        #: The source whose dead letters keep this queue's poison messages.
        self.subscription = dead_letter_source(topic)
        self._sqs = sqs
        self._events = events
        self._dead = dead
        self._meter = meter
        self._url = settings.queue.url

    async def run(self) -> None:
        """Round after round; a failed round is logged and the next waits, longer each time."""
        try:
            await self._rounds()
        finally:
            self._meter.connected(False)

    async def _rounds(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                async with asyncio.timeout(self.settings.round_timeout):
                    await self.one_round()
            except Exception as error:
                if not isinstance(error, CallboardError):
                    # SQS failed, or the round timed out; the broker's failures are not SQS's.
                    self._meter.failed()
                    self._meter.connected(False)
                logger.warning(
                    "SQS queue %s (topic %r): %s; trying again in %gs",
                    self._url,
                    self.topic,
                    error if not isinstance(error, TimeoutError) else "the round timed out",
                    backoff,
                    # The SDK's failures explain themselves; anything else is a bug to show.
                    exc_info=not (
                        sdk_error(error) or isinstance(error, CallboardError | TimeoutError)
                    ),
                )
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            else:
                backoff = BACKOFF_FIRST

    async def one_round(self) -> None:
        """Receive up to ten messages, publish them, delete those stored; idle if none came."""
        queue = self.settings.queue
        options: dict[str, Any] = {}
        if queue.visibility_timeout is not None:
            options["VisibilityTimeout"] = round(queue.visibility_timeout)
        answer = await self._sqs.receive_message(
            QueueUrl=self._url,
            MaxNumberOfMessages=RECEIVE_MAX,
            WaitTimeSeconds=round(queue.wait_time),
            MessageAttributeNames=["All"],
            **options,
        )
        self._meter.connected(True)
        messages = answer.get("Messages", [])
        if not messages:
            await asyncio.sleep(self.settings.wait_time_after_empty_receive)
            return
        settled = await asyncio.gather(*(self._take(message) for message in messages))
        await self._delete([handle for handle in settled if isinstance(handle, str)])
        failed = [error for error in settled if isinstance(error, Exception)]
        if failed:
            # The broker is failing: the round counts as failed, and the next one waits.
            raise BrokerUnavailable(
                f"{len(failed)} of {len(messages)} messages were not stored and come back "
                f"after their visibility timeout: {failed[0]}"
            ) from failed[0]

    async def _take(self, message: MessageTypeDef) -> str | Exception | None:
        """Store one message as an event (or a dead letter): its receipt handle once stored,
        the broker's failure, or ``None`` when it stays in the queue for good reason."""
        try:
            decoded = decode(message)
            event = Event(
                topic=self.topic,
                payload=decoded.payload,
                metadata={**decoded.metadata, DELIVERY_ID: decoded.delivery_id},
            )
            self._meter.stored(await self._events.publish(event))
        except (PoisonMessage, InvalidEventError) as error:
            return await self._dead_letter(message, error)
        except Exception as error:
            return error
        return message.get("ReceiptHandle")

    async def _dead_letter(self, message: MessageTypeDef, error: Exception) -> str | None:
        metadata: dict[str, MetadataValue] = {DELIVERY_ID: message.get("MessageId", "")}
        original = Event(topic=self.topic, payload=message.get("Body", ""), metadata=metadata)
        try:
            await self._dead.dead_letter(self.subscription, original, reason_of(error))
        except Exception as failure:
            logger.error(
                "SQS message %s of %s cannot be published (%s) and could not be kept as a dead "
                "letter either (%s); it stays in the queue",
                message.get("MessageId"),
                self._url,
                error,
                failure,
            )
            return None
        self._meter.dead_lettered()
        logger.error(
            "SQS message %s of %s cannot be published; moved to the dead letters of %r: %s",
            message.get("MessageId"),
            self._url,
            self.subscription,
            error,
        )
        return message.get("ReceiptHandle")

    async def _delete(self, handles: Sequence[str]) -> None:
        if not handles:
            return
        entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
            {"Id": str(index), "ReceiptHandle": handle} for index, handle in enumerate(handles)
        ]
        answer = await self._sqs.delete_message_batch(QueueUrl=self._url, Entries=entries)
        failed = answer.get("Failed", [])
        if failed:
            # Not lost: they come back and are known redeliveries.
            logger.warning(
                "SQS queue %s did not delete %d stored messages (%s); they come back and are "
                "recognised as redeliveries",
                self._url,
                len(failed),
                "; ".join(f"{f.get('Code')}: {f.get('Message', '')}" for f in failed[:3]),
            )


class SqsBridge:
    """The module's running part: a client and a reading task per configured topic."""

    def __init__(self, publisher: Publisher, meters: InletMeters) -> None:
        self._publisher = publisher
        self._meters = meters
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, events: EventsService) -> None:
        sink = require_sink(events, NAME)
        for topic, settings in self._publisher.topics.items():
            sqs: SQSClient = await self._stack.enter_async_context(client("sqs", settings.queue))
            meter = self._meters(dead_letter_source(topic))
            reader = QueueReader(topic, settings, sqs, events, sink, meter)
            self._tasks.append(asyncio.create_task(reader.run(), name=f"callboard-sqs-{topic}"))
            logger.info("reading SQS queue %s into topic %r", settings.queue.url, topic)

    async def stop(self) -> None:
        """Stop reading; a message published and not yet deleted comes back as a redelivery."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._stack.aclose()


def _register(context: ModuleContext) -> None:
    settings = context.settings(Settings)
    require_sdk(NAME)
    bridge = SqsBridge(settings.publisher, context.inlet_meter)
    context.lifecycle.on_start(bridge.start)
    context.lifecycle.on_stop(bridge.stop)


module = FunctionModule(NAME, _register)
