"""callboard out to Kafka: a subscription per forwarded topic, sending each event to a Kafka topic.

A ``KafkaOutlet`` is one instance of ``kafkaPublishingEventConsumer``. Each of its ``topics[]`` is
a subscription (``kafka:publisher:<instance>:<topic>``) whose handler sends the event and returns
only once Kafka acknowledged it with every in-sync replica (``acks=all``): the subscription moves
past an event only when Kafka keeps it. A send that fails raises ``BridgeFailed``, so the shared
delivery policy retries it and, after the last attempt, keeps it as a dead letter. The producer is
started at the first send, so callboard starts while Kafka is down; ``kafka.idempotent`` makes
it Kafka's idempotent producer (no duplicates from its own resends).

The message value is the payload as Backstage sends it (text as it is, anything else as JSON),
or, with ``format: cloudevents``, the event as a structured-mode CloudEvent (JSON, with
``content-type: application/cloudevents+json``). Metadata becomes headers only with
``headers.forward``, filtered by the white- or blacklist.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from callboard.bridges.kafka_settings import OutTopic, PublishingConsumer, client_options
from callboard.cloud_events import STRUCTURED, to_attributes
from callboard.errors import BridgeFailed
from callboard.events import Event
from callboard.service import Handler

logger = logging.getLogger("callboard.bridges.kafka")


def message_value(payload: Any) -> bytes:
    """The bytes Backstage sends for a payload: text as UTF-8, anything else as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return orjson.dumps(payload)


class KafkaSender:
    """Sends the events of one ``topics[]`` entry, through a producer of its own."""

    def __init__(self, instance: str, settings: PublishingConsumer, entry: OutTopic) -> None:
        self.instance = instance
        self.entry = entry
        self._settings = settings
        self._rule = entry.header_rule()
        self._producer: Any = None
        self._starting = asyncio.Lock()
        self._closed = False

    async def __call__(self, event: Event) -> None:
        producer = await self._started()
        value, headers = self.message(event)
        topic = self.entry.kafka.topic
        try:
            async with asyncio.timeout(self._settings.request_timeout / 1000):
                await producer.send_and_wait(topic, value, headers=headers)
        except (KafkaError, OSError, TimeoutError) as error:
            raise BridgeFailed(
                f"Kafka did not acknowledge event {event.id} on topic {topic!r}: "
                f"{error or type(error).__name__}"
            ) from error

    def message(self, event: Event) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The value and headers of the message ``event`` is sent as."""
        headers = [
            (name, item.encode())
            for name, value in event.metadata.items()
            if self._rule.chosen(name)
            for item in (value if isinstance(value, list) else (value,))
        ]
        if self.entry.format == "cloudevents":
            document = to_attributes(event, source=self.entry.source)
            return orjson.dumps(document), [("content-type", STRUCTURED.encode()), *headers]
        return message_value(event.payload), headers

    async def _started(self) -> Any:
        async with self._starting:
            if self._producer is not None:
                return self._producer
            if self._closed:
                # Closed: callboard closes a module's subscriptions before its stop hooks, so
                # only a handler that outlived the shutdown timeout gets here; it counts as a
                # failed attempt.
                raise BridgeFailed("the Kafka bridge is stopping")
            kafka = self.entry.kafka
            retry = kafka.retry or self._settings.retry
            options = client_options(self._settings) | {
                "retry_backoff_ms": round(retry.initial_retry_time)
            }
            producer = AIOKafkaProducer(acks="all", enable_idempotence=kafka.idempotent, **options)
            try:
                async with asyncio.timeout(self._settings.request_timeout / 1000):
                    await producer.start()
            except (KafkaError, OSError, TimeoutError) as error:
                await _stop(producer)
                raise BridgeFailed(
                    f"Kafka at {','.join(self._settings.brokers)} cannot be reached: "
                    f"{error or type(error).__name__}"
                ) from error
            self._producer = producer
            return producer

    async def close(self) -> None:
        """Stop the producer once what it holds is sent; later sends fail."""
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop(producer)


class KafkaOutlet:
    """One instance of ``kafkaPublishingEventConsumer``: a sender per forwarded topic."""

    def __init__(self, instance: str, settings: PublishingConsumer) -> None:
        self.instance = instance
        self.settings = settings
        self._senders: list[KafkaSender] = []

    def sender(self, entry: OutTopic) -> Handler:
        """The handler of the subscription that forwards ``entry.topic``."""
        sender = KafkaSender(self.instance, self.settings, entry)
        self._senders.append(sender)
        return sender

    async def close(self) -> None:
        for sender in self._senders:
            await sender.close()


async def _stop(producer: Any) -> None:
    """Stop a producer whatever state its connections are in (Kafka may be gone)."""
    try:
        await producer.stop()
    except (KafkaError, OSError) as error:
        logger.debug("stopping a Kafka producer failed: %s", error)
