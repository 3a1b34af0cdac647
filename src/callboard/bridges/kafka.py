"""The Kafka bridges, switched on by ``events.modules.kafka`` (Backstage's module and keys).

``kafkaConsumingEventPublisher`` publishes the messages of Kafka topics to callboard topics
(``kafka_in``); ``kafkaPublishingEventConsumer`` sends the events of callboard topics to Kafka
(``kafka_out``). Each section is one instance (its keys at the top) or named instances
(``<name>: {...}``); the single form is the instance ``default``.

This module reads the settings only: the driver (aiokafka, the ``kafka`` extra) is imported by
``kafka_in`` and ``kafka_out``, loaded here once a section is configured, so callboard without the
extra still starts, and a configuration that needs it is refused with the extra to install.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from callboard.bridges.kafka_settings import ConsumingPublisher, PublishingConsumer
from callboard.bridges.settings import DEFAULT_INSTANCE, instances, require_extra
from callboard.errors import ConfigError, InvalidTopicError
from callboard.extensions import ModuleContext
from callboard.extensions import module as define_module
from callboard.settings import Section
from callboard.topics import normalize_patterns, validate_topic

PATH = "events.modules.kafka"


class KafkaSection(Section):
    consuming: dict[str, Any] | None = Field(default=None, alias="kafkaConsumingEventPublisher")
    publishing: dict[str, Any] | None = Field(default=None, alias="kafkaPublishingEventConsumer")


def require_driver() -> None:
    """Refuse a Kafka bridge when aiokafka (the ``kafka`` extra) is not installed."""
    require_extra("kafka", "aiokafka", "kafka", "the Kafka bridges need aiokafka")


def publisher_id(instance: str, topic: str) -> str:
    """The subscription that sends ``topic`` to Kafka (Backstage: ``kafka:publisher:<topic>``)."""
    return f"kafka:publisher:{instance}:{topic}"


@define_module("kafka")
def module(context: ModuleContext) -> None:
    section = context.settings(KafkaSection)
    inlets = instances(
        section.consuming, ConsumingPublisher, f"{PATH}.kafkaConsumingEventPublisher"
    )
    outlets = instances(
        section.publishing, PublishingConsumer, f"{PATH}.kafkaPublishingEventConsumer"
    )
    if not inlets and not outlets:
        return
    require_driver()
    for name, consuming in inlets.items():
        _add_inlets(context, name, consuming)
    for name, publishing in outlets.items():
        _add_outlets(context, name, publishing)


def _path(instance: str, direction: str) -> str:
    where = "" if instance == DEFAULT_INSTANCE else f".{instance}"
    return f"{PATH}.{direction}{where}"


def _add_inlets(context: ModuleContext, name: str, settings: ConsumingPublisher) -> None:
    from callboard.bridges.kafka_in import KafkaInlet

    path = _path(name, "kafkaConsumingEventPublisher")
    for index, entry in enumerate(settings.topics):
        try:
            validate_topic(entry.topic)
        except InvalidTopicError as error:
            raise ConfigError(f"{path}.topics.{index}.topic", error.reason) from None
        inlet = KafkaInlet(name, settings, entry, context.inlet_meter)
        context.lifecycle.on_start(inlet.start)
        context.lifecycle.on_stop(inlet.stop)


def _add_outlets(context: ModuleContext, name: str, settings: PublishingConsumer) -> None:
    from callboard.bridges.kafka_out import KafkaOutlet

    path = _path(name, "kafkaPublishingEventConsumer")
    outlet = KafkaOutlet(name, settings)
    seen: set[str] = set()
    for index, entry in enumerate(settings.topics):
        where = f"{path}.topics.{index}.topic"
        try:
            normalize_patterns(entry.topic)
        except InvalidTopicError as error:
            raise ConfigError(where, error.reason) from None
        if entry.topic in seen:
            raise ConfigError(
                where,
                f"{entry.topic!r} is listed twice; an instance forwards a topic once (name "
                "another instance to send it to a second Kafka topic)",
            )
        seen.add(entry.topic)
        context.subscribers.add_subscription(
            publisher_id(name, entry.topic), entry.topic, outlet.sender(entry)
        )
    context.lifecycle.on_stop(outlet.close)
