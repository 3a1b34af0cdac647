"""The RabbitMQ-out bridge on the machine's RabbitMQ, through the real application.

Every event reaches the exchange under its topic as routing key, persistent, confirmed before the
subscription moves on; while RabbitMQ is away (a proxy in front of it is cut) the shared policy
retries and the event is delivered once it is back, or kept as a dead letter after the last
attempt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from callboard import CallboardApp, Event, create_app, load_config
from callboard.bridges.rabbitmq import publisher_id
from tests.integration.servers import TcpProxy
from tests.services import require_service

aio_pika = pytest.importorskip("aio_pika")

pytestmark = pytest.mark.slow

URL = "amqp://guest:guest@127.0.0.1:{port}/"


def app_with(section: dict[str, Any]) -> CallboardApp:
    config = load_config(
        overrides={
            "events": {
                "delivery": {"attempts": 4, "initialDelayMs": 300, "maxDelayMs": 1000},
                "modules": {"rabbitmq": {"rabbitmqPublishingEventConsumer": section}},
            }
        }
    )
    return create_app(config, use_entry_points=False)


def publisher(port: int, exchange: str, **options: Any) -> dict[str, Any]:
    return {
        "url": URL.format(port=port),
        "exchange": {"name": exchange},
        "topics": ["orders.>"],
        "timeout": 2000,
        **options,
    }


class Queue:
    """A queue of the test's own bound to the exchange with ``#``, and what it received."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.messages: list[Any] = []

    async def take(self, count: int, within: float = 30) -> list[Any]:
        deadline = time.monotonic() + within
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} messages came"
            await asyncio.sleep(0.05)
        return self.messages


@pytest.fixture
async def queue() -> AsyncIterator[Queue]:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    exchange = f"cb-bridge-test-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(URL.format(port=5672))
    found = Queue(exchange)
    try:
        channel = await connection.channel()
        declared = await channel.declare_exchange(exchange, "topic", durable=True)
        bound = await channel.declare_queue(exclusive=True)
        await bound.bind(declared, "#")

        async def keep(message: Any) -> None:
            found.messages.append(message)
            await message.ack()

        await bound.consume(keep)
        yield found
        await declared.delete()
    finally:
        await connection.close()


async def test_every_event_reaches_the_exchange_confirmed_and_persistent(queue: Queue) -> None:
    headers = {"forward": True, "whitelist": ["x-trace"]}
    app = app_with(publisher(5672, queue.exchange, headers=headers))
    async with app.board.lifespan():
        for n in range(30):
            metadata = {"x-trace": str(n), "authorization": "token t"}
            topic = "orders.paid" if n % 2 else "orders.new"
            await app.board.events.publish(Event(topic=topic, payload={"n": n}, metadata=metadata))
        await app.board.events.publish(Event(topic="other", payload={"n": 99}))
        messages = await queue.take(30)
    assert [orjson.loads(m.body)["n"] for m in messages] == list(range(30))
    for message in messages:
        n = orjson.loads(message.body)["n"]
        assert message.routing_key == ("orders.paid" if n % 2 else "orders.new")
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        assert message.headers == {"x-trace": str(n)}


async def test_events_go_out_as_cloud_events(queue: Queue) -> None:
    app = app_with(publisher(5672, queue.exchange, format="cloudevents", source="/shop"))
    async with app.board.lifespan():
        event = Event(topic="orders.new", payload="plain text")
        await app.board.events.publish(event)
        [message] = await queue.take(1)
    document = orjson.loads(message.body)
    assert message.content_type == "application/cloudevents+json"
    assert (document["id"], document["source"], document["type"]) == (
        event.id,
        "/shop",
        "orders.new",
    )


async def test_an_event_sent_while_rabbitmq_is_away_is_retried_then_delivered(
    queue: Queue,
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    app = app_with(publisher(proxy.port, queue.exchange))
    try:
        async with app.board.lifespan():
            await app.board.events.publish(Event(topic="orders.new", payload={"n": 0}))
            await queue.take(1)
            await proxy.cut()
            await app.board.events.publish(Event(topic="orders.new", payload={"n": 1}))
            await asyncio.sleep(0.8)  # the first attempts fail
            await proxy.restore()
            messages = await queue.take(2)
    finally:
        await proxy.close()
    assert [orjson.loads(m.body)["n"] for m in messages] == [0, 1]


async def test_a_connection_dropped_while_idle_is_made_again_at_the_next_event(
    queue: Queue,
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    app = app_with(publisher(proxy.port, queue.exchange))
    try:
        async with app.board.lifespan():
            await app.board.events.publish(Event(topic="orders.new", payload={"n": 0}))
            await queue.take(1)
            await proxy.cut()  # RabbitMQ drops the idle connection; the client sees it closed
            await asyncio.sleep(0.5)
            await proxy.restore()
            await app.board.events.publish(Event(topic="orders.new", payload={"n": 1}))
            messages = await queue.take(2)
            letters = await app.board.events.dead_letters(publisher_id("default"))
    finally:
        await proxy.close()
    assert [orjson.loads(m.body)["n"] for m in messages] == [0, 1]
    assert letters == []


async def test_an_event_rabbitmq_never_takes_becomes_a_dead_letter(queue: Queue) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    await proxy.cut()  # RabbitMQ is away for the whole test
    app = app_with(publisher(proxy.port, queue.exchange))
    async with app.board.lifespan():
        await app.board.events.publish(Event(topic="orders.new", payload={"n": 0}))
        deadline = time.monotonic() + 30
        while not (letters := await app.board.events.dead_letters(publisher_id("default"))):
            assert time.monotonic() < deadline, "no dead letter came"
            await asyncio.sleep(0.1)
    [letter] = letters
    assert letter.event.payload == {"n": 0}
    assert letter.attempts == 4
    assert "BridgeFailed" in letter.error
    assert queue.messages == []


async def test_a_mandatory_message_no_queue_takes_is_a_failure(queue: Queue) -> None:
    app = app_with(publisher(5672, queue.exchange + "-unbound", mandatory=True))
    async with app.board.lifespan():
        await app.board.events.publish(Event(topic="orders.new", payload={"n": 0}))
        deadline = time.monotonic() + 30
        while not (letters := await app.board.events.dead_letters(publisher_id("default"))):
            assert time.monotonic() < deadline, "no dead letter came"
            await asyncio.sleep(0.1)
    assert "BridgeFailed" in letters[0].error
