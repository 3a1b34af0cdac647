"""The Kafka and RabbitMQ bridges' settings: Backstage's keys, one or named instances, errors by
key path, and what a Kafka client is given."""

from __future__ import annotations

import importlib.util
import ssl
from typing import Any

import pytest

from callboard.bridges import kafka, rabbitmq
from callboard.bridges.kafka_settings import ConsumingPublisher, Headers, client_options
from callboard.errors import ConfigError, ModuleError
from callboard.extensions import ModuleContext
from callboard.settings import validate_section

IN = {
    "clientId": "backstage-events",
    "brokers": ["kafka:9092"],
    "topics": [{"topic": "orders", "kafka": {"topics": ["shop.orders"], "groupId": "cb"}}],
}
OUT = {
    "clientId": "backstage-events",
    "brokers": ["kafka:9092"],
    "topics": [{"topic": "orders", "kafka": {"topic": "shop.orders"}}],
}


def registered(name: str, section: dict[str, Any]) -> ModuleContext:
    context = ModuleContext(name, section)
    target = kafka.module if name == "kafka" else rabbitmq.module
    target.register(context)
    return context


def test_one_instance_and_named_instances_are_both_read() -> None:
    single = registered("kafka", {"kafkaConsumingEventPublisher": IN})
    assert len(single.lifecycle.start_hooks) == 1
    named = registered(
        "kafka",
        {
            "kafkaConsumingEventPublisher": {"a": IN, "b": IN},
            "kafkaPublishingEventConsumer": {"shop": OUT},
        },
    )
    assert len(named.lifecycle.start_hooks) == 2
    [subscription] = named.subscribers.subscriptions
    assert subscription.id == "kafka:publisher:shop:orders"
    assert subscription.topics == ("orders",)


def test_backstage_defaults() -> None:
    settings = validate_section(ConsumingPublisher, IN, "x")
    options = settings.topics[0].kafka
    assert (options.from_beginning, options.auto_commit, options.pause_on_error) == (
        False,
        True,
        False,
    )
    assert (options.session_timeout, options.rebalance_timeout) == (30_000, 60_000)
    retry = settings.retry
    assert (retry.initial_retry_time, retry.max_retry_time, retry.retries) == (300, 30_000, 5)


def test_durations_are_milliseconds_or_backstage_durations() -> None:
    topics = [{**IN["topics"][0], "kafka": {**IN["topics"][0]["kafka"], "sessionTimeout": "45s"}}]
    settings = validate_section(
        ConsumingPublisher, {**IN, "retry": {"maxRetryTime": {"seconds": 2}}, "topics": topics}, "x"
    )
    assert settings.retry.max_retry_time == 2000
    assert settings.topics[0].kafka.session_timeout == 45_000


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"kafkaConsumingEventPublisher": {**IN, "brokers": []}}, "brokers"),
        ({"kafkaConsumingEventPublisher": {"a": {**IN, "groupId": "x"}}}, ".a.groupId"),
        ({"kafkaConsumingEventPublisher": {**IN, "topics": [{"topic": "a*"}]}}, "topics.0.kafka"),
        (
            {"kafkaPublishingEventConsumer": {"shop": {**OUT, "topics": OUT["topics"] * 2}}},
            "1.topic",
        ),
        ({"kafkaConsumingEventPublishers": IN}, "kafkaConsumingEventPublishers"),
    ],
)
def test_a_wrong_key_is_named_by_its_path(section: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registered("kafka", section)
    assert caught.value.path.startswith("events.modules.kafka.")
    assert caught.value.path.endswith(path)


def test_a_callboard_topic_must_be_valid() -> None:
    topics = [{"topic": "orders.*", "kafka": IN["topics"][0]["kafka"]}]
    with pytest.raises(ConfigError, match=r"topics\.0\.topic"):
        registered("kafka", {"kafkaConsumingEventPublisher": {**IN, "topics": topics}})


def test_without_the_driver_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def missing(name: str, *args: Any) -> Any:
        return None if name in ("aiokafka", "aio_pika") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(ModuleError, match=r"callboard\[kafka\]"):
        registered("kafka", {"kafkaConsumingEventPublisher": IN})
    with pytest.raises(ModuleError, match=r"callboard\[rabbitmq\]"):
        registered(
            "rabbitmq",
            {"rabbitmqPublishingEventConsumer": {"url": "amqp://h/", "topics": ["a"]}},
        )
    assert registered("kafka", {}).lifecycle.start_hooks == []


def test_headers_are_forwarded_by_whitelist_or_blacklist() -> None:
    assert not Headers().chosen("x-a")
    blacklist = Headers(forward=True)
    assert blacklist.chosen("x-a")
    assert not blacklist.chosen("authorization")
    whitelist = Headers(forward=True, whitelist=("X-A",), blacklist=("x-a",))
    assert whitelist.chosen("x-a")
    assert not whitelist.chosen("x-b")


def test_client_options_for_tls_and_sasl() -> None:
    plain = client_options(validate_section(ConsumingPublisher, IN, "x"))
    assert plain["security_protocol"] == "PLAINTEXT"
    assert plain["bootstrap_servers"] == ["kafka:9092"]
    secured = {
        **IN,
        "ssl": {"rejectUnauthorized": False},
        "sasl": {"mechanism": "scram-sha-512", "username": "u", "password": "hunter2-secret"},
    }
    options = client_options(validate_section(ConsumingPublisher, secured, "x"))
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == "hunter2-secret"
    assert options["ssl_context"].verify_mode == ssl.CERT_NONE
    assert "hunter2" not in repr(validate_section(ConsumingPublisher, secured, "x"))


def test_rabbitmq_instances_and_their_subscriptions() -> None:
    context = registered(
        "rabbitmq",
        {
            "rabbitmqPublishingEventConsumer": {
                "url": "amqp://guest:guest@127.0.0.1/",
                "topics": ["orders.>", "github"],
            }
        },
    )
    [subscription] = context.subscribers.subscriptions
    assert subscription.id == "rabbitmq:publisher:default"
    secured = {"url": "amqp://callboard:hunter2-secret@rabbit/", "topics": ["a"]}
    settings = validate_section(rabbitmq.PublishingConsumer, secured, "x")
    assert "hunter2" not in repr(settings)
    assert subscription.topics == ("orders.>", "github")
    with pytest.raises(ConfigError, match=r"rabbitmqPublishingEventConsumer\.topics"):
        registered(
            "rabbitmq",
            {"rabbitmqPublishingEventConsumer": {"url": "amqp://h/", "topics": ["a.>.b"]}},
        )
    with pytest.raises(ConfigError, match=r"exchange\.type"):
        registered(
            "rabbitmq",
            {
                "rabbitmqPublishingEventConsumer": {
                    "url": "amqp://h/",
                    "topics": ["a"],
                    "exchange": {"type": "x"},
                }
            },
        )
