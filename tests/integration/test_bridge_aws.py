"""The AWS bridges against moto in server mode, driven by the real SDK (aiobotocore).

- SQS in: messages published to the topic with their attributes as metadata and the message id
  as delivery id, SNS-wrapped ones unwrapped, a poison message in dead letters, every one
  deleted; a message whose store failed is kept and comes back after its visibility timeout;
  moto stopped and started again on the same port: the bridge resumes. The bridge's metrics
  count what was stored and dead-lettered, the failed rounds, and whether it is connected.
- SNS out and EventBridge out: events arrive in an SQS queue subscribed to the topic, or
  targeted by a rule; an event too large, and a topic that does not exist, end in dead letters
  after the retries.
- The batcher's partial failures (a fake request, no service), and the missing ``aws`` extra.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from aiobotocore.session import get_session

from callboard.app import Callboard, build
from callboard.bridges.aws_out import MAX_BYTES, Batcher, Entry, Refusal, within_bytes
from callboard.brokers import open_broker
from callboard.config import parse_config
from callboard.errors import BridgeFailed, BrokerUnavailable, ConfigError, ModuleError
from callboard.events import DELIVERY_ID, Event
from callboard.extensions import ModuleContext, module
from tests.integration.servers import (
    SUPPORT_MODULE,
    Fleet,
    handled,
    read_records,
    wait_for_records,
)
from tests.services import free_port, moto_server

T = TypeVar("T")
REGION = "us-east-1"
CREDENTIALS = {"accessKeyId": "testing", "secretAccessKey": "testing"}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@asynccontextmanager
async def aws(endpoint: str, service: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        service,
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as made:
        yield made


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def queue_arn(sqs: Any, url: str) -> str:
    found = await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
    return str(found["Attributes"]["QueueArn"])


async def queue_depth(sqs: Any, url: str) -> int:
    """Messages in the queue, visible or not."""
    found = await sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )
    return sum(int(value) for value in found["Attributes"].values())


async def drain(sqs: Any, url: str, count: int, within: float = 20) -> list[dict[str, Any]]:
    """Receive (and delete) ``count`` messages from the queue."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while len(found) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} messages arrived"
        answer = await sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
        )
        for message in answer.get("Messages", []):
            found.append(message)
            await sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    return found


async def eventually(probe: Callable[[], Awaitable[T]], within: float = 20, what: str = "") -> T:
    """The first truthy answer of ``probe``, asked again until ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while True:
        found = await probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


async def until(check: Callable[[], bool], within: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


class Recorder:
    """A module with one subscription that keeps what it gets."""

    def __init__(self, topics: str | Sequence[str]) -> None:
        self.events: list[Event] = []

        @module("recorder")
        def setup(context: ModuleContext) -> None:
            context.subscribers.add_subscription("recorder", topics, self._keep)

        self.module = setup

    async def _keep(self, event: Event) -> None:
        self.events.append(event)


class FlakyBroker:
    """The memory broker, whose publishes of events fail while ``failing`` is set."""

    def __init__(self) -> None:
        self.inner = open_broker("memory://")
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def publish(self, event: Event) -> bool:
        if self.failing and not event.topic.startswith("$"):
            raise BrokerUnavailable("the store is down (a test)")
        return bool(await self.inner.publish(event))


def board_for(modules: dict[str, Any], *extra: Any, broker: Any = None) -> Callboard:
    config = parse_config(
        {
            "events": {
                "broker": "memory://",
                "delivery": {"attempts": 3, "initialDelayMs": 20, "maxDelayMs": 100},
                "modules": modules,
            }
        },
        env={},
    )
    return build(config, modules=list(extra), broker=broker, use_entry_points=False)


def sqs_in(endpoint: str, url: str, topic: str = "orders", **queue: Any) -> dict[str, Any]:
    return {
        "awsSqsConsumingEventPublisher": {
            "topics": {
                topic: {
                    "queue": {
                        "url": url,
                        "region": REGION,
                        "endpoint": endpoint,
                        "waitTime": "1s",
                        **CREDENTIALS,
                        **queue,
                    },
                    "waitTimeAfterEmptyReceive": "100ms",
                }
            }
        }
    }


# -- SQS in ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_sqs_messages_become_events_and_are_deleted_once_stored(endpoint: str) -> None:
    async with aws(endpoint, "sqs") as sqs, aws(endpoint, "sns") as sns:
        url = (await sqs.create_queue(QueueName=unique("in")))["QueueUrl"]
        topic_arn = (await sns.create_topic(Name=unique("wrapping")))["TopicArn"]
        await sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=await queue_arn(sqs, url))
        sent = await sqs.send_message(
            QueueUrl=url,
            MessageBody=json.dumps({"order": 1}),
            MessageAttributes={
                "X-Source": {"DataType": "String", "StringValue": "shop"},
                "count": {"DataType": "Number", "StringValue": "3"},
                "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
            },
        )
        published = await sns.publish(
            TopicArn=topic_arn,
            Message=json.dumps({"order": 2}),
            MessageAttributes={
                "kind": {"DataType": "String", "StringValue": "wrapped"},
                "tags": {"DataType": "String.Array", "StringValue": '["a", "b"]'},
            },
        )
        poison = await sqs.send_message(QueueUrl=url, MessageBody="{not json")

        recorder = Recorder("orders")
        board = board_for({"awsSqs": sqs_in(endpoint, url)}, recorder.module)
        async with board.lifespan():
            await until(lambda: len(recorder.events) == 2, what="two events")
            letters = await eventually(
                lambda: board.events.dead_letters("awsSqs.orders"), what="the dead letter"
            )

            async def empty() -> bool:
                return await queue_depth(sqs, url) == 0

            await eventually(empty, what="every message deleted")
            assert sqs_sample(board, "callboard_bridge_connected") == 1

        by_order = {event.payload["order"]: event for event in recorder.events}
        plain, wrapped = by_order[1], by_order[2]
        assert plain.topic == "orders"
        assert plain.metadata["x-source"] == "shop"
        assert plain.metadata["count"] == "3"
        assert "blob" not in plain.metadata
        assert plain.delivery_id == sent["MessageId"]
        assert wrapped.payload == {"order": 2}, "the SNS envelope is unwrapped"
        assert wrapped.metadata["kind"] == "wrapped"
        assert wrapped.metadata["tags"] == ["a", "b"]
        assert wrapped.delivery_id == published["MessageId"], "SNS's message id, not SQS's"

        [letter] = letters
        assert letter.event.payload == "{not json"
        assert letter.event.metadata[DELIVERY_ID] == poison["MessageId"]
        assert "not JSON" in letter.error
        messages = "callboard_bridge_messages_total"
        assert sqs_sample(board, messages, outcome="stored") == 2
        assert sqs_sample(board, messages, outcome="dead_letter") == 1
        assert sqs_sample(board, "callboard_bridge_failures_total") == 0
        assert sqs_sample(board, "callboard_bridge_connected") == 0, "stopped"


def sqs_sample(board: Callboard, name: str, **labels: str) -> float | None:
    """A figure of the SQS bridge reading into ``orders``."""
    return board.metrics.registry.get_sample_value(name, {"bridge": "awsSqs.orders", **labels})


@pytest.mark.slow
async def test_a_message_is_deleted_only_after_it_is_stored(endpoint: str) -> None:
    async with aws(endpoint, "sqs") as sqs:
        url = (await sqs.create_queue(QueueName=unique("flaky")))["QueueUrl"]
        await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": 1}))
        broker = FlakyBroker()
        broker.failing = True
        recorder = Recorder("orders")
        config = sqs_in(endpoint, url, visibilityTimeout="1s")
        board = board_for({"awsSqs": config}, recorder.module, broker=broker)
        async with board.lifespan():
            # Received and refused by the store: not deleted, only invisible for a second.
            await asyncio.sleep(2.5)
            assert recorder.events == []
            assert await queue_depth(sqs, url) == 1, "kept in the queue while the store fails"
            broker.failing = False
            await until(lambda: len(recorder.events) == 1, what="the message, once stored")
            await asyncio.sleep(1.5)  # another visibility timeout: nothing comes twice
        assert [event.payload for event in recorder.events] == [{"n": 1}]
        assert await queue_depth(sqs, url) == 0


@pytest.mark.slow
async def test_the_bridge_resumes_when_sqs_comes_back() -> None:
    port = free_port()
    recorder = Recorder("orders")
    with moto_server(port) as endpoint:
        async with aws(endpoint, "sqs") as sqs:
            url = (await sqs.create_queue(QueueName="resumes"))["QueueUrl"]
            await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": 1}))
    board = board_for({"awsSqs": sqs_in(endpoint, url)}, recorder.module)
    # moto is down when the bridge starts: it keeps trying.
    async with board.lifespan():
        await asyncio.sleep(2)
        assert (sqs_sample(board, "callboard_bridge_failures_total") or 0) >= 1
        assert sqs_sample(board, "callboard_bridge_connected") == 0
        with moto_server(port):
            async with aws(endpoint, "sqs") as sqs:
                # A fresh moto has forgotten the queue: make it again at the same address.
                assert (await sqs.create_queue(QueueName="resumes"))["QueueUrl"] == url
                await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": 2}))
                await until(lambda: len(recorder.events) == 1, within=40, what="resumed")
                assert sqs_sample(board, "callboard_bridge_connected") == 1
        await asyncio.sleep(2)  # down again for a while, and back
        with moto_server(port):
            async with aws(endpoint, "sqs") as sqs:
                await sqs.create_queue(QueueName="resumes")
                await sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": 3}))
                await until(lambda: len(recorder.events) == 2, within=40, what="resumed again")
    assert [event.payload for event in recorder.events] == [{"n": 2}, {"n": 3}]


# -- SNS and EventBridge out -----------------------------------------------------------------


def out(endpoint: str, **target: Any) -> dict[str, Any]:
    return {"region": REGION, "endpoint": endpoint, **CREDENTIALS, **target}


@pytest.mark.slow
async def test_sns_out_publishes_events_with_their_metadata(endpoint: str) -> None:
    async with aws(endpoint, "sqs") as sqs, aws(endpoint, "sns") as sns:
        url = (await sqs.create_queue(QueueName=unique("from-sns")))["QueueUrl"]
        topic_arn = (await sns.create_topic(Name=unique("out")))["TopicArn"]
        await sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=await queue_arn(sqs, url),
            Attributes={"RawMessageDelivery": "true"},
        )
        modules = {
            "awsSns": {
                "awsSnsPublishingEventConsumer": {
                    "shop": out(endpoint, topicArn=topic_arn, topics=["orders.>"])
                }
            }
        }
        board = board_for(modules)
        async with board.lifespan():
            await asyncio.gather(
                *(
                    board.events.publish(
                        Event(
                            topic="orders.created",
                            payload={"n": n},
                            metadata={"x-shop": "berlin", "tags": ["a", "b"]},
                        )
                    )
                    for n in range(25)
                )
            )
            big = Event(topic="orders.created", payload={"blob": "x" * MAX_BYTES})
            await board.events.publish(big)
            await board.events.publish(Event(topic="billing.paid", payload={"not": "sent"}))
            messages = await drain(sqs, url, 25)

            [letter] = await eventually(
                lambda: board.events.dead_letters("awsSns.shop"), what="the dead letter"
            )

        assert sorted(json.loads(m["Body"])["n"] for m in messages) == list(range(25))
        attributes = messages[0]["MessageAttributes"]
        assert attributes["callboard-topic"]["StringValue"] == "orders.created"
        assert attributes["x-shop"]["StringValue"] == "berlin"
        assert json.loads(attributes["tags"]["StringValue"]) == ["a", "b"]
        assert letter.event.id == big.id
        assert letter.attempts == 3
        assert "at most 262144 bytes" in letter.error


@pytest.mark.slow
async def test_sns_failures_are_retried_then_dead_lettered(endpoint: str) -> None:
    missing = f"arn:aws:sns:{REGION}:123456789012:{unique('missing')}"
    modules = {
        "awsSns": {
            "awsSnsPublishingEventConsumer": {
                "gone": out(endpoint, topicArn=missing, topics=["orders"])
            }
        }
    }
    board = board_for(modules)
    async with board.lifespan():
        event = Event(topic="orders", payload={"n": 1})
        await board.events.publish(event)
        letters = await eventually(
            lambda: board.events.dead_letters("awsSns.gone"), what="the dead letter"
        )
    [letter] = letters
    assert letter.event.id == event.id
    assert letter.attempts == 3
    assert "NotFound" in letter.error


@pytest.mark.slow
async def test_eventbridge_out_puts_events_a_rule_sends_to_sqs(endpoint: str) -> None:
    async with aws(endpoint, "sqs") as sqs, aws(endpoint, "events") as bus:
        url = (await sqs.create_queue(QueueName=unique("from-bus")))["QueueUrl"]
        source = unique("callboard")
        rule = unique("rule")
        await bus.put_rule(Name=rule, EventPattern=json.dumps({"source": [source]}))
        await bus.put_targets(
            Rule=rule, Targets=[{"Id": "queue", "Arn": await queue_arn(sqs, url)}]
        )
        modules = {
            "awsEventBridge": {
                "awsEventBridgePublishingEventConsumer": {
                    "audit": out(endpoint, source=source, topics=["github.>"])
                }
            }
        }
        board = board_for(modules)
        async with board.lifespan():
            for n in range(12):
                await board.events.publish(Event(topic="github.push", payload={"n": n}))
            await board.events.publish(Event(topic="github.ping", payload=["not", "an object"]))
            messages = await drain(sqs, url, 13)

    bodies = [json.loads(message["Body"]) for message in messages]
    pushes = [body for body in bodies if body["detail-type"] == "github.push"]
    assert sorted(body["detail"]["n"] for body in pushes) == list(range(12))
    assert all(body["source"] == source for body in bodies)
    [ping] = [body for body in bodies if body["detail-type"] == "github.ping"]
    assert ping["detail"] == {"payload": ["not", "an object"]}


# -- batching, without a service -------------------------------------------------------------


def entry(n: int, size: int = 10) -> Entry:
    return Entry({"n": n}, size)


async def test_a_refused_entry_fails_its_own_call_alone() -> None:
    requests: list[list[int]] = []

    async def send(entries: Sequence[Entry]) -> list[Refusal | None]:
        requests.append([e.fields["n"] for e in entries])
        return [("Throttled", "slow down") if e.fields["n"] == 3 else None for e in entries]

    batcher = Batcher(send, "the service")
    results = await asyncio.gather(
        *(batcher.put(entry(n)) for n in range(12)), return_exceptions=True
    )
    failed = [n for n, result in enumerate(results) if isinstance(result, BaseException)]
    assert failed == [3]
    assert isinstance(results[3], BridgeFailed)
    assert results[3].code == "Throttled"
    assert sorted(n for request in requests for n in request) == list(range(12))
    assert max(len(request) for request in requests) == 10, "gathered, ten at most a request"


async def test_a_failed_request_fails_every_call_in_it() -> None:
    async def send(entries: Sequence[Entry]) -> list[Refusal | None]:
        raise OSError("connection refused")

    batcher = Batcher(send, "the service")
    results = await asyncio.gather(
        *(batcher.put(entry(n)) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, BridgeFailed) and "could not be reached" in str(r) for r in results)


def test_requests_stay_within_the_byte_limit() -> None:
    half = MAX_BYTES // 2
    sizes = [len(request) for request in within_bytes([entry(n, half) for n in range(5)])]
    assert sizes == [2, 2, 1]


# -- configuration ---------------------------------------------------------------------------


def test_without_the_aws_extra_the_start_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiobotocore", None)
    with pytest.raises(ModuleError, match=r"callboard\[aws\]"):
        board_for({"awsSqs": sqs_in("http://127.0.0.1:1", "http://127.0.0.1:1/1/q")})


def test_wrong_keys_are_refused_with_their_path() -> None:
    config = sqs_in("http://127.0.0.1:1", "http://127.0.0.1:1/1/q", waitTime="30s")
    with pytest.raises(ConfigError, match=r"awsSqs.*waitTime must be within 0..20"):
        board_for({"awsSqs": config})
    with pytest.raises(ConfigError, match="set both accessKeyId and secretAccessKey"):
        board_for(
            {
                "awsSns": {
                    "awsSnsPublishingEventConsumer": {
                        "x": {
                            "topicArn": "arn:aws:sns:us-east-1:1:t",
                            "topics": ["a"],
                            "accessKeyId": "only",
                        }
                    }
                }
            }
        )


@pytest.mark.slow
async def test_the_bridges_can_send_cloudevents(endpoint: str) -> None:
    async with (
        aws(endpoint, "sqs") as sqs,
        aws(endpoint, "sns") as sns,
        aws(endpoint, "events") as bus,
    ):
        sns_url = (await sqs.create_queue(QueueName=unique("ce-sns")))["QueueUrl"]
        bus_url = (await sqs.create_queue(QueueName=unique("ce-bus")))["QueueUrl"]
        topic_arn = (await sns.create_topic(Name=unique("ce")))["TopicArn"]
        await sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=await queue_arn(sqs, sns_url),
            Attributes={"RawMessageDelivery": "true"},
        )
        source = unique("shop")
        rule = unique("rule")
        await bus.put_rule(Name=rule, EventPattern=json.dumps({"source": [source]}))
        await bus.put_targets(
            Rule=rule, Targets=[{"Id": "q", "Arn": await queue_arn(sqs, bus_url)}]
        )
        modules = {
            "awsSns": {
                "awsSnsPublishingEventConsumer": {
                    "ce": out(
                        endpoint,
                        topicArn=topic_arn,
                        topics=["orders"],
                        format="cloudevents",
                        source=source,
                    )
                }
            },
            "awsEventBridge": {
                "awsEventBridgePublishingEventConsumer": {
                    "ce": out(endpoint, topics=["orders"], format="cloudevents", source=source)
                }
            },
        }
        board = board_for(modules)
        event = Event(topic="orders", payload={"n": 1})
        async with board.lifespan():
            await board.events.publish(event)
            [from_sns] = await drain(sqs, sns_url, 1)
            [from_bus] = await drain(sqs, bus_url, 1)

    for document in (json.loads(from_sns["Body"]), json.loads(from_bus["Body"])["detail"]):
        assert document["specversion"] == "1.0"
        assert document["id"] == event.id
        assert document["type"] == "orders"
        assert document["source"] == source
        assert document["data"] == {"n": 1}


# -- a served process killed mid-stream --------------------------------------------------------


def served_config(directory: Path, endpoint: str, url: str) -> Path:
    """A ``callboard serve`` configuration: SQLite, the recording module, SQS into ``jobs``."""
    path = directory / "callboard.yaml"
    path.write_text(
        f"""
events:
  broker: "sqlite:///{directory / "events.db"}"
  delivery:
    batchSize: 8
  load: ["{SUPPORT_MODULE}"]
  modules:
    instance:
      broker: "sqlite:///{directory / "events.db"}"
      record: "{directory / "deliveries.log"}"
      lease: 2
      poll: 0.1
    awsSqs:
      awsSqsConsumingEventPublisher:
        topics:
          jobs:
            queue:
              url: "{url}"
              region: {REGION}
              endpoint: "{endpoint}"
              accessKeyId: testing
              secretAccessKey: testing
              waitTime: 1s
              visibilityTimeout: 2s
            waitTimeAfterEmptyReceive: 100ms
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.slow
async def test_a_server_killed_mid_stream_loses_no_message(
    endpoint: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    count = 400
    async with aws(endpoint, "sqs") as sqs:
        url = (await sqs.create_queue(QueueName=unique("served")))["QueueUrl"]
        for first in range(0, count, 10):
            entries = [
                {"Id": str(n), "MessageBody": json.dumps({"n": n})}
                for n in range(first, first + 10)
            ]
            await sqs.send_message_batch(QueueUrl=url, Entries=entries)
        config = served_config(tmp_path, endpoint, url)
        [first_server] = await fleet.start(config, client, count=1)
        await until(lambda: len(handled(read_records(tmp_path), "A")) >= 40, what="a start")
        first_server.kill()
        await first_server.wait_exit(10)
        await fleet.start(config, client, count=1)
        await wait_for_records(tmp_path, {"A": set(range(count))}, fleet, timeout=60)

        async def empty() -> bool:
            return await queue_depth(sqs, url) == 0

        await eventually(empty, within=30, what="the queue emptied")
    done = handled(read_records(tmp_path), "A")
    assert set(done) == set(range(count))
    # At least once: only events whose acknowledgement the kill lost come twice (a batch).
    assert sum(times - 1 for times in done.values()) <= 8
