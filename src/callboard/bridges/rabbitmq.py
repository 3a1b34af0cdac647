"""callboard out to RabbitMQ, switched on by ``events.modules.rabbitmq``.

``rabbitmqPublishingEventConsumer`` (one instance, or named instances as Kafka's sections are)
forwards the events of its ``topics`` to an exchange, the callboard topic as routing key. Each
instance is a subscription (``rabbitmq:publisher:<instance>``) whose handler publishes a persistent
message on a channel with publisher confirms and returns only once RabbitMQ confirmed it: the
subscription moves past an event only when RabbitMQ took responsibility for it. A publish that
fails (no connection, a negative confirm, no confirm within ``timeout``, or, with ``mandatory``,
no queue bound for it) raises ``BridgeFailed``, so the shared delivery policy retries it and then
keeps a dead letter. The connection is made at the first publish and made again after a failure,
so callboard starts while RabbitMQ is down.

The body is the payload (text as it is, ``text/plain``; anything else JSON), or with ``format:
cloudevents`` the event as a structured-mode CloudEvent. Metadata becomes message headers as the
Kafka bridge's ``headers`` rule says (``forward``, ``whitelist``, ``blacklist``).

aio-pika (the ``rabbitmq`` extra) is imported when the first connection is made, so the settings
load without it; a configuration that names this bridge without it is refused at registration.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import Field, SecretStr

from callboard.bridges.kafka_settings import Headers, Millis
from callboard.bridges.settings import DEFAULT_INSTANCE, instances, require_extra
from callboard.brokers import redact_url
from callboard.cloud_events import STRUCTURED, to_attributes
from callboard.errors import BridgeFailed, ConfigError, InvalidTopicError
from callboard.events import Event
from callboard.extensions import ModuleContext
from callboard.extensions import module as define_module
from callboard.logs import quiet_aiormq_outages
from callboard.settings import Section
from callboard.topics import normalize_patterns

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

logger = logging.getLogger("callboard.bridges.rabbitmq")

PATH = "events.modules.rabbitmq.rabbitmqPublishingEventConsumer"


class Exchange(Section):
    """The exchange messages are published to; declared (durable) unless ``declare`` is off."""

    name: str = Field(default="callboard", min_length=1, max_length=255)
    type: Literal["topic", "direct", "fanout", "headers"] = "topic"
    durable: bool = True
    declare: bool = True


class PublishingConsumer(Section):
    """One instance of ``rabbitmqPublishingEventConsumer``."""

    #: Holds the password: kept out of ``repr`` and logs (``redact_url``).
    url: SecretStr = Field(min_length=1)
    exchange: Exchange = Exchange()
    #: The callboard topics (or patterns) forwarded.
    topics: tuple[str, ...] = Field(min_length=1)
    headers: Headers = Headers()
    format: Literal["json", "cloudevents"] = "json"
    #: The CloudEvents ``source`` of events that did not come in as CloudEvents.
    source: str = "callboard"
    #: A message no queue is bound for is a failed publish (retried, then a dead letter)
    #: rather than dropped by RabbitMQ.
    mandatory: bool = False
    #: How long a publish waits for the connection and the confirm.
    timeout: Millis = Field(default=10_000, gt=0)


def publisher_id(instance: str) -> str:
    return f"rabbitmq:publisher:{instance}"


def message_body(payload: Any) -> tuple[bytes, str]:
    """The body and content type a payload is sent as: text as it is, anything else JSON."""
    if isinstance(payload, str):
        return payload.encode(), "text/plain"
    return orjson.dumps(payload), "application/json"


class RabbitPublisher:
    """Publishes the events of one instance to its exchange; see the module."""

    def __init__(self, instance: str, settings: PublishingConsumer) -> None:
        self.instance = instance
        self.settings = settings
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting = asyncio.Lock()
        self._closed = False

    async def __call__(self, event: Event) -> None:
        import aio_pika

        body, content_type = self.message_body(event)
        headers: dict[str, Any] = {
            name: value
            for name, value in event.metadata.items()
            if self.settings.headers.chosen(name)
        }
        message = aio_pika.Message(
            body,
            headers=headers,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            timestamp=event.time,
            app_id="callboard",
        )
        try:
            exchange = await self._ready()
            await exchange.publish(
                message,
                routing_key=event.topic,
                mandatory=self.settings.mandatory,
                timeout=self.settings.timeout / 1000,
            )
        except (
            aio_pika.exceptions.AMQPError,
            # aiormq's "channel closed" is a RuntimeError, not a connection error.
            aio_pika.exceptions.ChannelInvalidStateError,
            ConnectionError,
            OSError,
            TimeoutError,
        ) as error:
            await self._forget()
            where = redact_url(self.settings.url.get_secret_value())
            raise BridgeFailed(
                f"RabbitMQ at {where} did not confirm event {event.id} "
                f"on {event.topic!r}: {error or type(error).__name__}"
            ) from error

    def message_body(self, event: Event) -> tuple[bytes, str]:
        if self.settings.format == "cloudevents":
            return orjson.dumps(to_attributes(event, source=self.settings.source)), STRUCTURED
        return message_body(event.payload)

    async def _ready(self) -> AbstractExchange:
        """The exchange on a channel with publisher confirms, connecting first if need be."""
        import aio_pika

        async with self._connecting:
            open_channel = self._channel is not None and not self._channel.is_closed
            if self._exchange is not None and open_channel:
                return self._exchange
            # Never connected, or RabbitMQ dropped the connection while it was idle.
            await self._forget()
            if self._closed:
                # Closed: callboard closes a module's subscriptions before its stop hooks, so
                # only a handler that outlived the shutdown timeout gets here; it counts as a
                # failed attempt.
                raise ConnectionError("the RabbitMQ bridge is stopping")
            settings = self.settings
            quiet_aiormq_outages()  # RabbitMQ dropping the connection: a line, not a traceback
            async with asyncio.timeout(settings.timeout / 1000):
                connection = await aio_pika.connect(
                    settings.url.get_secret_value(),
                    timeout=settings.timeout / 1000,
                    client_properties={"connection_name": publisher_id(self.instance)},
                )
                try:
                    channel: AbstractChannel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    wanted = settings.exchange
                    if wanted.declare:
                        exchange = await channel.declare_exchange(
                            wanted.name, wanted.type, durable=wanted.durable
                        )
                    else:
                        exchange = await channel.get_exchange(wanted.name, ensure=False)
                except BaseException:
                    await connection.close()
                    raise
            self._connection, self._channel, self._exchange = connection, channel, exchange
            return exchange

    async def _forget(self) -> None:
        """Drop the connection after a failure: the next publish connects again."""
        connection, self._connection = self._connection, None
        self._channel = self._exchange = None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception as error:
                logger.debug("closing a RabbitMQ connection failed: %s", error)

    async def close(self) -> None:
        """Close the connection; later publishes fail."""
        self._closed = True
        await self._forget()


class RabbitSection(Section):
    publishing: dict[str, Any] | None = Field(default=None, alias="rabbitmqPublishingEventConsumer")


@define_module("rabbitmq")
def module(context: ModuleContext) -> None:
    section = context.settings(RabbitSection)
    publishers = instances(section.publishing, PublishingConsumer, PATH)
    if publishers:
        require_extra("rabbitmq", "aio_pika", "rabbitmq", "the RabbitMQ bridge needs aio-pika")
    for name, settings in publishers.items():
        where = PATH if name == DEFAULT_INSTANCE else f"{PATH}.{name}"
        try:
            topics = normalize_patterns(settings.topics)
        except InvalidTopicError as error:
            raise ConfigError(f"{where}.topics", error.reason) from None
        publisher = RabbitPublisher(name, settings)
        context.subscribers.add_subscription(publisher_id(name), topics, publisher)
        context.lifecycle.on_stop(publisher.close)
