"""The inbound bridges' seams: dead letters kept through the events service
(``DeadLetterSink``), found where operators look for them, and the bridge metrics given through
the module context. The SQS reader runs against a fake client and the recording service."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from callboard.app import build
from callboard.bridges.aws_sqs import (
    Publisher,
    QueueReader,
    SqsBridge,
    TopicQueue,
    dead_letter_source,
)
from callboard.bridges.kafka_in import KafkaInlet
from callboard.bridges.kafka_settings import ConsumingPublisher
from callboard.brokers import admin, open_broker
from callboard.bus.admin import list_dead_letters, list_subscriptions
from callboard.deadletters import DeadLetterSink
from callboard.default_service import DefaultEventsService
from callboard.errors import ModuleError
from callboard.events import DELIVERY_ID, Event
from callboard.extensions import ModuleContext
from callboard.metrics import Metrics
from callboard.testing import DeadLetterCall, RecordingEventsService

URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
SOURCE = "awsSqs.orders"


class FakeSqs:
    """Hands out the messages given, once; records deletions; fails when told."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.messages = messages
        self.deleted: list[str] = []
        self.failing: Exception | None = None
        self.failed = asyncio.Event()

    async def receive_message(self, **options: Any) -> dict[str, Any]:
        if self.failing is not None:
            self.failed.set()
            raise self.failing
        messages, self.messages = self.messages, []
        return {"Messages": messages}

    async def delete_message_batch(self, **request: Any) -> dict[str, Any]:
        self.deleted += [entry["ReceiptHandle"] for entry in request["Entries"]]
        return {}


def message(id: str, body: str) -> dict[str, Any]:
    return {"MessageId": id, "ReceiptHandle": f"handle-{id}", "Body": body}


def reader(sqs: FakeSqs, events: RecordingEventsService, metrics: Metrics) -> QueueReader:
    settings = TopicQueue.model_validate(
        {"queue": {"url": URL, "region": "eu-west-1"}, "waitTimeAfterEmptyReceive": "0s"}
    )
    meter = metrics.bridges.meter(dead_letter_source("orders"))
    sqs_client: Any = sqs
    return QueueReader("orders", settings, sqs_client, events, events, meter)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"bridge": SOURCE, **labels})


async def test_a_poison_message_is_kept_through_the_service_and_counted() -> None:
    sqs = FakeSqs([message("m1", '{"order": 1}'), message("m2", "{not json")])
    metrics = Metrics()
    async with RecordingEventsService() as events:
        await reader(sqs, events, metrics).one_round()

        [stored] = events.published_on("orders")
        assert stored.payload == {"order": 1}
        [call] = events.dead_lettered
        assert isinstance(call, DeadLetterCall)
        assert call.source == SOURCE
        assert call.event.payload == "{not json"
        assert call.event.metadata[DELIVERY_ID] == "m2"
        assert call.reason.startswith("PoisonMessage: the message body is not JSON")
        [letter] = await events.dead_letters(SOURCE)
        assert letter.event.payload == "{not json"
        assert letter.error == call.reason
        assert letter.event.topic == "orders"
    assert sorted(sqs.deleted) == ["handle-m1", "handle-m2"], "both settled, both deleted"
    messages = "callboard_bridge_messages_total"
    assert sample(metrics, messages, outcome="stored") == 1
    assert sample(metrics, messages, outcome="dead_letter") == 1
    assert sample(metrics, "callboard_bridge_connected") == 1


async def test_a_redelivered_message_is_counted_as_a_duplicate() -> None:
    sqs = FakeSqs([message("m1", '{"order": 1}')])
    metrics = Metrics()
    async with RecordingEventsService() as events:
        queue = reader(sqs, events, metrics)
        await queue.one_round()
        sqs.messages = [message("m1", '{"order": 1}')]
        await queue.one_round()
    messages = "callboard_bridge_messages_total"
    assert sample(metrics, messages, outcome="stored") == 1
    assert sample(metrics, messages, outcome="duplicate") == 1
    assert sample(metrics, messages, outcome="dead_letter") == 0


async def test_a_failed_receive_is_counted_and_shows_as_disconnected() -> None:
    sqs = FakeSqs([message("m1", '{"order": 1}')])
    metrics = Metrics()
    async with RecordingEventsService() as events:
        queue = reader(sqs, events, metrics)
        await queue.one_round()
        assert sample(metrics, "callboard_bridge_connected") == 1
        sqs.failing = OSError("SQS is unreachable")
        task = asyncio.create_task(queue.run())
        await asyncio.wait_for(sqs.failed.wait(), 10)
        await asyncio.sleep(0)  # the reader counts the failure, then waits out its back-off
        assert sample(metrics, "callboard_bridge_connected") == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sample(metrics, "callboard_bridge_failures_total") == 1


class PlainService:
    """An events service that cannot keep dead letters (a user's own)."""

    async def publish(self, event: Event) -> bool:
        return True


async def test_a_service_that_cannot_keep_dead_letters_is_refused_by_name() -> None:
    assert isinstance(RecordingEventsService(), DeadLetterSink)
    assert not isinstance(PlainService(), DeadLetterSink)
    publisher = Publisher.model_validate({"topics": {"orders": {"queue": {"url": URL}}}})
    sqs = SqsBridge(publisher, Metrics().bridges.meter)
    with pytest.raises(ModuleError, match="module 'awsSqs': keeps the messages it cannot publish"):
        await sqs.start(PlainService())  # type: ignore[arg-type]
    settings = ConsumingPublisher.model_validate(
        {
            "clientId": "cb",
            "brokers": ["127.0.0.1:1"],
            "topics": [{"topic": "orders", "kafka": {"topics": ["shop"], "groupId": "g"}}],
        }
    )
    inlet = KafkaInlet("default", settings, settings.topics[0], Metrics().bridges.meter)
    with pytest.raises(ModuleError, match=r"module 'kafka': .*PlainService"):
        await inlet.start(PlainService())  # type: ignore[arg-type]


async def test_a_bridge_s_dead_letters_are_listed_as_a_subscription_s(tmp_path: Path) -> None:
    broker = open_broker(f"sqlite:///{tmp_path / 'cb.db'}")
    metrics = Metrics()
    async with DefaultEventsService(broker, metrics=metrics) as events:
        original = Event(topic="orders", payload="{not json", metadata={DELIVERY_ID: "m2"})
        await events.dead_letter(SOURCE, original, "PoisonMessage: not JSON")
        await events.dead_letter(SOURCE, original, "PoisonMessage: not JSON")
        listed = await list_dead_letters(broker, SOURCE, limit=10)
        assert listed.count("topic=orders") == 2
        assert "PoisonMessage: not JSON" in listed
        [info] = await admin(broker).subscriptions()
        assert (info.name, info.backlog, info.in_flight) == (SOURCE, 0, 0)
        await events.publish(Event(topic="orders", payload={"order": 1}))
        assert SOURCE in await list_subscriptions(broker)
        [info] = await admin(broker).subscriptions()
        assert info.backlog == 0, "the group reads nothing but its dead-letter topic"
    counted = metrics.registry.get_sample_value(
        "callboard_dead_letters_total", {"subscription": SOURCE}
    )
    assert counted == 2


async def test_the_application_gives_modules_its_bridge_metrics() -> None:
    seen: list[ModuleContext] = []

    class Probe:
        name = "probe"

        def register(self, context: ModuleContext) -> None:
            seen.append(context)

    board = build(modules=[Probe()], use_entry_points=False)
    [context] = seen
    context.inlet_meter("probe.orders").stored(True)
    value = board.metrics.registry.get_sample_value(
        "callboard_bridge_messages_total", {"bridge": "probe.orders", "outcome": "stored"}
    )
    assert value == 1
    # A context built without an application counts nothing and needs nothing.
    ModuleContext("alone").inlet_meter("x").failed()
