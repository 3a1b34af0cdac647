"""The Kafka broker against Tansu servers: what the contract suite cannot say.

Most tests use the session's Tansu server (``tests.contract.kits_kafka``) under a topic prefix of
their own; those that stop the server run their own Tansu on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from callboard.brokers import open_broker
from callboard.brokers.base import DEAD_LETTER_PREFIX
from callboard.errors import BrokerUnavailable, ConfigError
from callboard.events import DELIVERY_ID, Event
from tests.integration.servers import TcpProxy
from tests.services import free_port, service_up, tansu, tansu_binary

pytest.importorskip("aiokafka")

from callboard.brokers.kafka import KafkaBroker
from tests.contract.kits_kafka import delete_topics, tansu_address


def event(topic: str = "github.push", n: int = 0, **metadata: str) -> Event:
    return Event(topic=topic, payload={"n": n}, metadata=metadata)


@pytest.fixture
async def broker() -> AsyncIterator[KafkaBroker]:
    address = tansu_address()
    prefix = f"cb_it_{uuid.uuid4().hex[:12]}."
    opened = KafkaBroker(address, prefix=prefix, fetch_wait_ms=10)
    await opened.start()
    try:
        yield opened
    finally:
        await opened.close()
        await delete_topics(address, prefix)


# -- the URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("kafka://", "expected kafka://host:port"),
        ("kafka://user:secret@host:9092", "SASL"),
        ("kafka://host:9092/?partitions=3", "unknown parameters"),
        ("kafka://host:9092/?prefix=a/b", "prefix"),
        ("kafka://host:9092/?timeout=0", "timeout"),
        ("kafka://host:9092/?fetch_wait_ms=x", "fetch_wait_ms"),
        ("kafka://host:9092/?idempotent=maybe", "idempotent"),
        ("kafka://host:9092,:1", "bad host"),
    ],
)
def test_a_url_it_cannot_use_is_a_config_error(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        KafkaBroker.from_url(url)
    assert "secret" not in str(raised.value)


def test_a_good_url_is_parsed() -> None:
    broker = KafkaBroker.from_url(
        "kafka://k1:9092,k2:9093/?prefix=shop.&timeout=2&idempotent=true&fetch_wait_ms=50"
    )
    assert broker._bootstrap == "k1:9092,k2:9093"
    assert broker._log.topic == "shop.events"
    assert (broker._timeout, broker._idempotent, broker._fetch_wait_ms) == (2.0, True, 50)


def test_open_broker_finds_the_kafka_broker() -> None:
    try:
        opened = open_broker("kafka://127.0.0.1:9092/?prefix=x.")
    except ConfigError as error:  # the editable install does not declare the entry point yet
        pytest.skip(str(error))
    assert isinstance(opened, KafkaBroker)


# -- Kafka unreachable --------------------------------------------------------------------------


async def test_start_against_nothing_listening_is_unavailable_quickly() -> None:
    broker = KafkaBroker(f"127.0.0.1:{free_port()}", timeout=2)
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="not reachable"):
        await broker.start()
    assert time.monotonic() - began < 5


async def test_publish_while_kafka_is_down_is_unavailable_and_fetch_waits() -> None:
    port = free_port()
    with tansu(port) as address:
        broker = KafkaBroker(address, prefix="down.", timeout=1, fetch_wait_ms=10)
        await broker.start()
        consumer = await broker.consume("workers", ["github.push"])
        assert await broker.publish(event(n=1))
        (delivery,) = await asyncio.wait_for(consumer.fetch(1), 3)
        await consumer.ack((delivery,))
    # The server is gone (a stopped Tansu keeps nothing: memory storage).
    waiting = asyncio.create_task(consumer.fetch(1))
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.publish(event(n=2))
    assert time.monotonic() - began < 4
    await asyncio.sleep(0.5)
    assert not waiting.done()  # waiting, not raising
    await consumer.close()
    assert await asyncio.wait_for(waiting, 2) == ()
    await broker.abandon()


@contextlib.contextmanager
def tansu_behind(proxy: int) -> Iterator[int]:
    """A Tansu of the test's own on a free port that tells clients to connect through the
    proxy listening on ``proxy`` (Kafka clients connect where the metadata says); its port."""
    port = free_port()
    process = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{proxy}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", port, timeout=0.2):
            assert process.poll() is None, "Tansu exited at its start"
            assert time.monotonic() < deadline, "Tansu did not start"
            time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_the_health_check_fails_during_an_outage_and_passes_once_it_is_over() -> None:
    proxy_port = free_port()
    with tansu_behind(proxy_port) as port:
        proxy = TcpProxy("127.0.0.1", port)
        proxy.port = proxy_port
        await proxy.start()
        broker = KafkaBroker(
            f"127.0.0.1:{proxy_port}", prefix="health.", timeout=1, fetch_wait_ms=10
        )
        try:
            with pytest.raises(BrokerUnavailable, match="not started"):
                await broker.check()
            await broker.start()
            await broker.check()
            await proxy.cut()
            began = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=f"Kafka at 127.0.0.1:{proxy_port}"):
                await broker.check()
            assert time.monotonic() - began < 3
            await proxy.restore()
            deadline = time.monotonic() + 20
            while True:  # the same broker, not restarted: its clients connect again
                try:
                    await broker.check()
                    break
                except BrokerUnavailable:
                    assert time.monotonic() < deadline, "the check never passed again"
                    await asyncio.sleep(0.2)
        finally:
            await broker.close()
            await proxy.close()


# -- publishing ---------------------------------------------------------------------------------


async def test_any_topic_name_travels_in_the_record(broker: KafkaBroker) -> None:
    topics = ["github.push", "ünïcode.tópic", "with space.and:colon", "a.b-c_d.$e"]
    consumer = await broker.consume("all", [">"])
    for n, topic in enumerate(topics):
        await broker.publish(event(topic, n))
    got = [await consumer.fetch(1) for _ in topics]
    assert [d[0].event.topic for d in got] == topics


async def test_a_delivery_id_is_recognised_by_a_restarted_broker(broker: KafkaBroker) -> None:
    assert await broker.publish(event(n=1, **{DELIVERY_ID: "d-1"}))
    again = KafkaBroker(broker._bootstrap, prefix=broker._prefix, fetch_wait_ms=10)
    await again.start()
    try:
        assert await again.publish(event(n=2, **{DELIVERY_ID: "d-1"})) is False
        assert await again.publish(event("github.issues", 3, **{DELIVERY_ID: "d-1"})) is True
    finally:
        await again.close()


async def test_concurrent_publishes_are_all_acknowledged_in_order(broker: KafkaBroker) -> None:
    # How much concurrent publishes gain by sharing the producer's batches is for the
    # benchmarks (bench/run.py --brokers), not a timed test on a shared machine.
    consumer = await broker.consume("all", ["github.push"])
    results = await asyncio.gather(*(broker.publish(event(n=n)) for n in range(500)))
    assert all(results)
    got: list[int] = []
    while len(got) < 500:
        batch = await asyncio.wait_for(consumer.fetch(500), 10)
        await consumer.ack(batch)
        got += [d.event.payload["n"] for d in batch]
    assert got == list(range(500))


async def test_dead_letters_are_kept_apart_from_the_log(broker: KafkaBroker) -> None:
    consumer = await broker.consume("indexer", [">"])
    letter = event(DEAD_LETTER_PREFIX + "indexer", 1)
    await broker.publish(letter)
    assert await broker.take_dead_letters("indexer") == [letter]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consumer.fetch(1), 0.3)


async def test_migrate_creates_the_topics_once() -> None:
    address = tansu_address()
    prefix = f"cb_it_{uuid.uuid4().hex[:12]}."
    broker = KafkaBroker(address, prefix=prefix)
    try:
        assert await broker.migrate() == [
            f"created topic {prefix}events",
            f"created topic {prefix}deadletters",
            f"created topic {prefix}groups",
        ]
        assert await broker.migrate() == []
    finally:
        await delete_topics(address, prefix)


# -- one process per group ----------------------------------------------------------------------


async def test_a_group_read_by_another_process_waits_until_it_is_let_go(
    broker: KafkaBroker,
) -> None:
    other = KafkaBroker(broker._bootstrap, prefix=broker._prefix, fetch_wait_ms=10, lease=1.5)
    await other.start()
    try:
        held = await broker.consume("workers", ["github.push"])
        # The other process's consumer stands by: its fetches wait while the group is held.
        standing_by = await other.consume("workers", ["github.push"])
        waiting = asyncio.ensure_future(standing_by.fetch(1))
        await broker.publish(event(n=1))
        (first,) = await asyncio.wait_for(held.fetch(1), 3)
        await held.ack((first,))
        await broker.publish(event(n=2))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await broker.close()  # lets the group go, its position written
        (second,) = await asyncio.wait_for(waiting, 3)  # taken over within a third of a lease
        assert (second.event.payload, second.attempt) == ({"n": 2}, 1)
        # A crashed holder gives the group up when its hold runs out. Its position, delivery
        # counts included, is written every 50 ms: a crash sooner would count one attempt less.
        await asyncio.sleep(0.2)
        await other.abandon()
        again = KafkaBroker(broker._bootstrap, prefix=broker._prefix, fetch_wait_ms=10, lease=1.5)
        await again.start()
        try:
            resumed = await again.consume("workers", ["github.push"])
            assert resumed.standing_by
            (third,) = await asyncio.wait_for(resumed.fetch(1), 4)
            assert (third.event.payload, third.attempt) == ({"n": 2}, 2)
        finally:
            await again.close()
    finally:
        await other.close()


async def test_a_consumer_standing_by_ends_with_its_broker(broker: KafkaBroker) -> None:
    other = KafkaBroker(broker._bootstrap, prefix=broker._prefix, fetch_wait_ms=10)
    await other.start()
    await broker.consume("workers", ["github.push"])
    standing_by = await other.consume("workers", ["github.push"])
    waiting = asyncio.ensure_future(standing_by.fetch(1))
    await asyncio.sleep(0.1)
    await other.close()
    assert await asyncio.wait_for(waiting, 3) == ()
