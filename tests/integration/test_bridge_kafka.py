"""The Kafka bridges on a Tansu server, through the real application.

In: Kafka messages become events of a callboard topic with their headers as metadata, offsets are
committed only once the events are stored (a server killed with -9 mid-stream loses nothing), an
undecodable message becomes a dead letter while the partition goes on, and the bridge rides out
Kafka going away; its metrics count what was stored and dead-lettered, and the failures to
reach Kafka. Out: every event reaches Kafka, acknowledged before the subscription moves on;
while Kafka is away the shared policy retries and, after its last attempt, keeps a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from callboard import CallboardApp, Event, ModuleContext, create_app, load_config, module
from callboard.bridges.kafka import publisher_id
from callboard.bridges.kafka_in import dead_letter_group
from callboard.events import DELIVERY_ID
from tests.integration.servers import Fleet, Server, TcpProxy, free_port, read_records
from tests.services import require_service, tansu

pytest.importorskip("aiokafka")

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

pytestmark = pytest.mark.slow

#: Short group timers: Tansu waits out the whole rebalance timeout when a group forms.
GROUP_TIMERS = {"sessionTimeout": 2000, "rebalanceTimeout": 500, "heartbeatInterval": 300}
FAST_RETRY = {"initialRetryTime": 100, "maxRetryTime": 500}


@pytest.fixture(scope="module")
def kafka() -> Iterator[str]:
    """One Tansu for the module's tests; each test uses topics and groups of its own."""
    with tansu() as address:
        host, _, port = address.partition(":")
        require_service("Tansu (Kafka)", host, int(port))
        yield address


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


class Inbox:
    """What a subscription received."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def on_event(self, event: Event) -> None:
        self.events.append(event)

    async def holds(self, count: int, within: float = 30) -> list[Event]:
        deadline = time.monotonic() + within
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"{len(self.events)} of {count} events came"
            await asyncio.sleep(0.05)
        return self.events


def app_with(modules: dict[str, Any], inbox: Inbox, topics: str = "orders") -> CallboardApp:
    @module("inbox")
    def register(context: ModuleContext) -> None:
        context.subscribers.add_subscription("inbox", topics, inbox.on_event)

    config = load_config(
        overrides={
            "events": {
                "delivery": {"attempts": 3, "initialDelayMs": 50, "maxDelayMs": 200},
                "modules": modules,
            }
        }
    )
    return create_app(config, modules=[register], use_entry_points=False)


def inlet(address: str, kafka_topic: str, group: str, **options: Any) -> dict[str, Any]:
    kafka = {"topics": [kafka_topic], "groupId": group, "fromBeginning": True, **GROUP_TIMERS}
    return {
        "kafkaConsumingEventPublisher": {
            "clientId": "callboard-test",
            "brokers": [address],
            "retry": FAST_RETRY,
            "requestTimeout": 3000,
            "topics": [{"topic": "orders", "kafka": kafka | options}],
        }
    }


@contextlib.asynccontextmanager
async def producer(address: str) -> AsyncIterator[Any]:
    kafka = AIOKafkaProducer(bootstrap_servers=address, acks="all")
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


async def read_topic(address: str, topic: str, count: int, within: float = 30) -> list[Any]:
    """The first ``count`` messages of ``topic``, by partition and offset."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=address, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = time.monotonic() + within
        while len(found) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} messages in {topic}"
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(messages)
    finally:
        await consumer.stop()
    return found


def bridge_sample(app: CallboardApp, name: str, bridge: str, **labels: str) -> float | None:
    registry = app.board.metrics.registry
    return registry.get_sample_value(name, {"bridge": bridge, **labels})


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.1)


# -- in ---------------------------------------------------------------------------------------


async def test_messages_become_events_with_their_headers_as_metadata(kafka: str) -> None:
    topic, group, inbox = unique("in"), unique("g"), Inbox()
    app = app_with({"kafka": inlet(kafka, topic, group)}, inbox)
    async with producer(kafka) as out:
        for n in range(20):
            headers = [("X-Source", b"shop"), ("tag", b"a"), ("tag", b"b")]
            await out.send_and_wait(topic, orjson.dumps({"n": n}), partition=0, headers=headers)
    async with app.board.lifespan():
        events = await inbox.holds(20)
    assert [e.payload for e in events] == [{"n": n} for n in range(20)]
    first = events[0]
    assert first.topic == "orders"
    assert first.metadata["x-source"] == "shop"
    assert first.metadata["tag"] == ["a", "b"]
    assert first.metadata[DELIVERY_ID].startswith(f"kafka:default:{topic}:0:0:")


async def test_an_undecodable_message_is_a_dead_letter_and_the_partition_goes_on(
    kafka: str,
) -> None:
    topic, group, inbox = unique("poison"), unique("g"), Inbox()
    app = app_with({"kafka": inlet(kafka, topic, group)}, inbox)
    async with producer(kafka) as out:
        await out.send_and_wait(topic, b'{"n": 0}', partition=0)
        await out.send_and_wait(topic, b"not json {", partition=0, headers=[("kind", b"bad")])
        await out.send_and_wait(topic, b'{"n": 2}', partition=0)
    source = dead_letter_group("default", group)
    async with app.board.lifespan():
        events = await inbox.holds(2)
        [letter] = await app.board.events.dead_letters(source)
        assert bridge_sample(app, "callboard_bridge_connected", source) == 1
    assert [e.payload for e in events] == [{"n": 0}, {"n": 2}]
    messages = "callboard_bridge_messages_total"
    assert bridge_sample(app, messages, source, outcome="stored") == 2
    assert bridge_sample(app, messages, source, outcome="dead_letter") == 1
    assert bridge_sample(app, "callboard_bridge_connected", source) == 0, "stopped"
    assert bridge_sample(app, "callboard_bridge_failures_total", source) == 0
    assert letter.event.payload == "not json {"
    assert letter.event.topic == "orders"
    assert letter.event.metadata["kind"] == "bad"
    assert "JSONDecodeError" in letter.error
    assert letter.attempts == 1


async def test_a_kafka_that_cannot_be_reached_is_counted_as_failures() -> None:
    group = unique("g")
    source = dead_letter_group("default", group)
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    app = app_with({"kafka": inlet(address, unique("away"), group)}, Inbox())
    async with app.board.lifespan():

        async def failed_twice() -> bool:
            return (bridge_sample(app, "callboard_bridge_failures_total", source) or 0) >= 2

        await eventually(failed_twice)
        assert bridge_sample(app, "callboard_bridge_connected", source) == 0


async def test_a_group_resumes_after_what_it_stored_before_it_stopped(kafka: str) -> None:
    """With ``autoCommit`` (the default) the stored offsets are committed when the bridge stops."""
    topic, group = unique("resume"), unique("g")
    first, second = Inbox(), Inbox()
    async with producer(kafka) as out:
        for n in range(5):
            await out.send_and_wait(topic, orjson.dumps({"n": n}), partition=0)
    async with app_with({"kafka": inlet(kafka, topic, group)}, first).board.lifespan():
        await first.holds(5)
    async with producer(kafka) as out:
        await out.send_and_wait(topic, b'{"n": 5}', partition=0)
    async with app_with({"kafka": inlet(kafka, topic, group)}, second).board.lifespan():
        [event] = await second.holds(1)
        await asyncio.sleep(1)  # anything read again would have come by now
    assert event.payload == {"n": 5}
    assert len(second.events) == 1


async def test_the_bridge_rides_out_kafka_going_away(kafka: str) -> None:
    from tests.integration.test_kafka_broker import tansu_behind

    proxy_port = free_port()
    with tansu_behind(proxy_port) as port:
        proxy = TcpProxy("127.0.0.1", port)
        proxy.port = proxy_port
        await proxy.start()
        address = f"127.0.0.1:{proxy_port}"
        topic, group, inbox = unique("outage"), unique("g"), Inbox()
        app = app_with({"kafka": inlet(address, topic, group, autoCommit=False)}, inbox)
        try:
            async with producer(address) as out:
                await out.send_and_wait(topic, b'{"n": 0}', partition=0)
            async with app.board.lifespan():
                await inbox.holds(1)
                await proxy.cut()
                await asyncio.sleep(4)  # the consumer notices and backs off
                await proxy.restore()
                async with producer(address) as out:
                    for n in range(1, 6):
                        await out.send_and_wait(topic, orjson.dumps({"n": n}), partition=0)
                events = await inbox.holds(6, within=45)
        finally:
            await proxy.close()
    assert {e.payload["n"] for e in events} == set(range(6))


# -- in, served: kill -9 mid-stream ------------------------------------------------------------


def served_config(directory: Path, address: str, topic: str, group: str) -> Path:
    broker = f"sqlite:///{directory / 'events.db'}"
    section = inlet(address, topic, group, autoCommit=False)
    section["kafkaConsumingEventPublisher"]["topics"][0]["topic"] = "jobs"
    config = {
        "events": {
            "broker": broker,
            "load": ["tests.integration.support_modules:instance"],
            "modules": {
                "instance": {"broker": broker, "record": str(directory / "deliveries.log")},
                "kafka": section,
            },
        }
    }
    path = directory / "callboard.yaml"
    path.write_bytes(orjson.dumps(config))  # JSON is YAML
    return path


async def test_a_server_killed_mid_stream_loses_no_message(
    kafka: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    topic, group, total = unique("crash"), unique("g"), 600
    config = served_config(tmp_path, kafka, topic, group)
    [server] = await fleet.start(config, client, count=1)

    def handled() -> set[int]:
        return {r.n for r in read_records(tmp_path) if r.subscription == "A"}

    async def stream() -> None:
        """Messages on two partitions, a few at a time, while the server is killed."""
        async with producer(kafka) as out:
            for n in range(total):
                await out.send(topic, orjson.dumps({"n": n}), partition=n % 2)
                if n % 10 == 9:
                    await out.flush()
                    await asyncio.sleep(0.02)
            await out.flush()

    streaming = asyncio.create_task(stream())
    try:
        deadline = time.monotonic() + 30
        while len(handled()) < 100:
            assert time.monotonic() < deadline, fleet.logs()
            await asyncio.sleep(0.01)
        server.kill()
        await server.wait_exit(10)
        assert not streaming.done(), "the stream ended before the kill: nothing was tested"
        await streaming
    finally:
        streaming.cancel()
    again = Server(config, tmp_path, "restarted")
    fleet.servers.append(again)
    await again.wait_ready(client)
    deadline = time.monotonic() + 45
    while (missing := set(range(total)) - handled()) != set():
        assert time.monotonic() < deadline, f"lost: {sorted(missing)[:20]}\n{fleet.logs()}"
        await asyncio.sleep(0.1)


# -- out --------------------------------------------------------------------------------------


def outlet(address: str, kafka_topic: str, **entry: Any) -> dict[str, Any]:
    return {
        "kafkaPublishingEventConsumer": {
            "shop": {
                "clientId": "callboard-test",
                "brokers": [address],
                "requestTimeout": 2000,
                "retry": FAST_RETRY,
                "topics": [{"topic": "orders", "kafka": {"topic": kafka_topic}, **entry}],
            }
        }
    }


async def test_every_event_reaches_kafka_with_the_forwarded_headers(kafka: str) -> None:
    topic = unique("out")
    headers = {"forward": True, "blacklist": ["authorization", "x-secret"]}
    app = app_with({"kafka": outlet(kafka, topic, headers=headers)}, Inbox())
    async with app.board.lifespan():
        for n in range(30):
            metadata = {"x-trace": str(n), "authorization": "token t", "x-secret": "s"}
            await app.board.events.publish(
                Event(topic="orders", payload={"n": n}, metadata=metadata)
            )
        messages = await read_topic(kafka, topic, 30)
    assert sorted(orjson.loads(m.value)["n"] for m in messages) == list(range(30))
    for message in messages:
        names = {name for name, _ in message.headers}
        assert names == {"x-trace"}


async def test_events_go_out_as_cloud_events(kafka: str) -> None:
    topic = unique("ce")
    app = app_with({"kafka": outlet(kafka, topic, format="cloudevents", source="/shop")}, Inbox())
    async with app.board.lifespan():
        event = Event(topic="orders", payload={"n": 1})
        await app.board.events.publish(event)
        [message] = await read_topic(kafka, topic, 1)
    document = orjson.loads(message.value)
    assert document["id"] == event.id
    assert document["source"] == "/shop"
    assert document["type"] == "orders"
    assert document["data"] == {"n": 1}
    assert ("content-type", b"application/cloudevents+json") in message.headers


async def test_a_send_while_kafka_is_away_is_retried_then_delivered(kafka: str) -> None:
    from tests.integration.test_kafka_broker import tansu_behind

    proxy_port = free_port()
    with tansu_behind(proxy_port) as port:
        proxy = TcpProxy("127.0.0.1", port)
        proxy.port = proxy_port
        await proxy.start()
        address = f"127.0.0.1:{proxy_port}"
        topic = unique("away")
        app = app_with({"kafka": outlet(address, topic)}, Inbox())
        try:
            async with app.board.lifespan():
                await app.board.events.publish(Event(topic="orders", payload={"n": 0}))
                await read_topic(address, topic, 1)
                await proxy.cut()
                await app.board.events.publish(Event(topic="orders", payload={"n": 1}))
                await asyncio.sleep(1)  # the first attempts fail
                await proxy.restore()
                messages = await read_topic(address, topic, 2, within=45)
        finally:
            await proxy.close()
    assert sorted(orjson.loads(m.value)["n"] for m in messages) == [0, 1]


async def test_a_send_kafka_never_takes_becomes_a_dead_letter(kafka: str) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    app = app_with({"kafka": outlet(address, unique("nowhere"))}, Inbox())
    async with app.board.lifespan():
        await app.board.events.publish(Event(topic="orders", payload={"n": 0}))
        subscription = publisher_id("shop", "orders")

        async def kept() -> bool:
            return bool(await app.board.events.dead_letters(subscription))

        await eventually(kept)
        [letter] = await app.board.events.dead_letters(subscription)
    assert letter.event.payload == {"n": 0}
    assert letter.attempts == 3
    assert "BridgeFailed" in letter.error
