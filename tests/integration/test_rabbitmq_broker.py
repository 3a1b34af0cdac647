"""The RabbitMQ broker beyond the contract suite: its URL, names, outages, dedupe, retention.

Every test works under a name prefix of its own on the machine's RabbitMQ and deletes what it
made; outages go through ``servers.TcpProxy``, so the shared server is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from callboard.brokers import redact_url
from callboard.brokers.base import Broker, Consumer, Delivery, RetentionPolicy
from callboard.deadletters import dead_letter_event
from callboard.errors import BrokerUnavailable, ConfigError, SubscriptionError
from callboard.events import DELIVERY_ID, Event
from callboard.topics import TopicMatcher
from tests.contract.kits_rabbitmq import RABBITMQ_URL, drop_namespace, served_namespace
from tests.integration.servers import (
    Fleet,
    TcpProxy,
    free_port,
    handled,
    read_records,
    wait_for_records,
    write_config,
)
from tests.services import require_service

pytest.importorskip("aio_pika")

import aio_pika

from callboard.brokers.rabbitmq import RabbitBroker
from callboard.brokers.rabbitmq_names import (
    STAMP,
    binding_key,
    encode_event,
    parse_url,
    queue_name,
    routing_key,
    topic_of,
)

Opener = Callable[..., Awaitable[RabbitBroker]]


@pytest.fixture
async def open_rabbit() -> AsyncIterator[Opener]:
    """Opens started brokers on one prefix of this test's own; closes them and deletes the
    prefix's exchange and queues at the end."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"cb_it_{uuid.uuid4().hex[:12]}."
    opened: list[RabbitBroker] = []

    async def open_(
        url: str = RABBITMQ_URL, *, retention: RetentionPolicy | None = None, **query: str
    ) -> RabbitBroker:
        params = "&".join(f"{k}={v}" for k, v in {"prefix": prefix, **query}.items())
        broker = RabbitBroker.from_url(f"{url}?{params}", retention=retention)
        opened.append(broker)
        await broker.start()
        return broker

    yield open_
    for broker in opened:
        await broker.close()
    await drop_namespace(RABBITMQ_URL, prefix)


async def fetch(consumer: Consumer, count: int = 1, timeout: float = 5.0) -> list[Delivery]:
    found: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            found.extend(await consumer.fetch(count - len(found)))
    return found


def event(topic: str = "github.push", n: int = 0, **metadata: str) -> Event:
    return Event(topic=topic, payload={"n": n}, metadata=metadata)


# -- the URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1/", "amqp://"),
        ("amqp:///vhost", "no host"),
        ("amqp://host:notaport/", "bad port"),
        ("amqp://host/?heartbeat=0", "heartbeat"),
        ("amqp://host/?timeout=soon", "timeout"),
        ("amqp://host/?prefix=amq.mine", "prefix"),
        ("amqp://host/?prefix=", "prefix"),
    ],
)
def test_a_url_it_cannot_use_is_a_config_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        RabbitBroker.from_url(url)
    assert raised.value.path == "events.broker"


def test_the_url_keeps_the_brokers_parameters_and_passes_the_others_on() -> None:
    settings = parse_url("amqps://u:secret@mq:5671/prod?prefix=cb.&timeout=0.5&heartbeat=10&x=1")
    assert (settings.prefix, settings.timeout) == ("cb.", 0.5)
    assert settings.heartbeat == 10
    assert settings.url == "amqps://u:secret@mq:5671/prod?x=1"
    assert "secret" not in redact_url(settings.url)


def test_the_entry_points_name_the_broker() -> None:
    from callboard.brokers import open_broker

    try:
        broker = open_broker("amqp://guest:guest@127.0.0.1:5672/?prefix=cb_probe.")
    except ConfigError as error:  # the editable install predates the entry point
        pytest.skip(f"the amqp entry point is not installed yet: {error}")
    assert isinstance(broker, RabbitBroker)
    assert broker.capabilities.durable
    assert broker.capabilities.shared
    assert not broker.capabilities.replay


# -- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["github.push", "a.#", "a.%23", "x.100%.#b#", "$deadletter.g"])
def test_topics_map_to_routing_keys_and_back(topic: str) -> None:
    key = routing_key(topic)
    assert topic_of(key) == topic
    assert "#" not in key.split(".")


def test_patterns_map_to_amqp_binding_keys() -> None:
    assert binding_key("github.*") == "github.*"
    assert binding_key("gitlab.>") == "gitlab.*.#"
    assert binding_key(">") == "*.#"
    assert binding_key("a.#") == "a.%23"


def test_a_name_too_long_for_amqp_is_replaced_by_its_digest() -> None:
    group = "é" * 200  # 400 bytes
    name = queue_name("cb.", "group", group)
    assert len(name.encode()) <= 255
    assert name != queue_name("cb.", "group", "é" * 199)


async def test_segments_amqp_reads_as_wildcards_are_matched_literally(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    literal = await broker.consume("literal", ["a.#"])
    for n, topic in enumerate(["a.b", "a.%23", "a.#", "a.b.c"]):
        await broker.publish(event(topic, n))
    assert [d.event.topic for d in await fetch(literal, 1)] == ["a.#"]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(literal.fetch(10), 0.3)


async def test_a_group_named_beyond_amqps_limit_works(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    group = "é" * 200
    consumer = await broker.consume(group, ["github.push"])
    await broker.publish(event(n=1))
    assert [d.event.payload["n"] for d in await fetch(consumer)] == [1]
    assert group in {s.name for s in await broker.subscriptions()}


# -- dedupe, batching, replay -------------------------------------------------------------------


async def test_a_delivery_id_is_recognised_by_the_instance_that_accepted_it(
    open_rabbit: Opener,
) -> None:
    first = await open_rabbit()
    second = await open_rabbit()
    consumer = await first.consume("workers", ["github.push"])
    assert await first.publish(event(n=1, **{DELIVERY_ID: "d-1"})) is True
    assert await first.publish(event(n=2, **{DELIVERY_ID: "d-1"})) is False
    # The window is per broker instance (RabbitMQ has no dedupe): documented, not hidden.
    assert await second.publish(event(n=3, **{DELIVERY_ID: "d-1"})) is True
    assert [d.event.payload["n"] for d in await fetch(consumer, 2)] == [1, 3]


async def test_concurrent_publishes_are_all_confirmed_and_kept_in_order(
    open_rabbit: Opener,
) -> None:
    # How much faster overlapping confirms are is for the benchmarks (bench/run.py --brokers),
    # not a timed test on a shared machine.
    broker = await open_rabbit()
    consumer = await broker.consume("all", ["github.push"])
    accepted = await asyncio.gather(*(broker.publish(event(n=n)) for n in range(500)))
    assert all(accepted)
    got = await fetch(consumer, 500, timeout=20)
    assert [d.event.payload["n"] for d in got] == list(range(500))


async def test_each_publish_answers_for_its_own_confirm(open_rabbit: Opener) -> None:
    """Concurrent publishes share RabbitMQ's cumulative confirms, yet an event a queue refuses
    (``basic.nack``) fails its own publish and no other."""
    broker = await open_rabbit()
    full = f"{broker.settings.prefix}full"
    connection = await aio_pika.connect(RABBITMQ_URL)
    channel = await connection.channel()
    try:
        arguments = {"x-max-length": 1, "x-overflow": "reject-publish"}
        queue = await channel.declare_queue(full, durable=True, arguments=arguments)
        await queue.bind(f"{broker.settings.prefix}events", "github.push")
        results = await asyncio.gather(
            *(broker.publish(event(n=n)) for n in range(5)), return_exceptions=True
        )
        assert results[0] is True
        for refused in results[1:]:
            assert isinstance(refused, BrokerUnavailable)
            assert "basic.nack" in str(refused)
    finally:
        await channel.queue_delete(full)
        await connection.close()


async def test_an_event_no_subscription_takes_is_accepted_and_kept_nowhere(
    open_rabbit: Opener,
) -> None:
    broker = await open_rabbit()
    assert await broker.publish(event("gitlab.push", n=1, **{DELIVERY_ID: "d-1"})) is True
    assert await broker.publish(event("gitlab.push", n=1, **{DELIVERY_ID: "d-1"})) is False
    late = await broker.consume("late", ["gitlab.push"])
    await broker.publish(event("gitlab.push", n=2))
    assert [d.event.payload["n"] for d in await fetch(late)] == [2]


async def test_concurrent_listings_from_two_servers_see_every_group(open_rabbit: Opener) -> None:
    """The registry is read by taking every record: readers take turns (a lock), so none sees
    the registry emptied by another."""
    here = await open_rabbit()
    there = await open_rabbit()
    names = {f"group-{n}" for n in range(5)}
    for name in names:
        await here.consume(name, ["github.push"], owner=f"service={name}")
    listings = await asyncio.gather(
        *(broker.subscriptions() for broker in (here, there) * 4),
    )
    for listing in listings:
        assert {s.name: s.owner for s in listing} == {n: f"service={n}" for n in names}


async def test_migrate_declares_what_is_missing_without_starting() -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"cb_it_{uuid.uuid4().hex[:12]}."
    broker = RabbitBroker.from_url(f"{RABBITMQ_URL}?prefix={prefix}")
    try:
        applied = await broker.migrate()
        assert applied == [f"declared {prefix}{name}" for name in ("events", "registry")]
        assert await broker.migrate() == []
    finally:
        await drop_namespace(RABBITMQ_URL, prefix)


async def _make_old_ledger(prefix: str) -> None:
    """The ledger queue earlier versions kept: bound to every event, holding some."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"{prefix}events", aio_pika.ExchangeType.TOPIC, durable=True
        )
        ledger = await channel.declare_queue(f"{prefix}ledger", durable=True)
        await ledger.bind(exchange, "#")
        await exchange.publish(aio_pika.Message(encode_event(event())), "github.push")
    finally:
        await connection.close()


async def test_migrate_deletes_the_ledger_of_earlier_versions() -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"cb_it_{uuid.uuid4().hex[:12]}."
    broker = RabbitBroker.from_url(f"{RABBITMQ_URL}?prefix={prefix}")
    try:
        await _make_old_ledger(prefix)
        applied = await broker.migrate()
        assert applied == [
            f"declared {prefix}registry",
            f"deleted {prefix}ledger (retention now trims each subscription's queue)",
        ]
        assert await broker.migrate() == []
    finally:
        await drop_namespace(RABBITMQ_URL, prefix)


async def test_a_server_started_beside_an_old_ledger_deletes_it_and_works(
    open_rabbit: Opener,
) -> None:
    first = await open_rabbit()
    await _make_old_ledger(first.settings.prefix)
    broker = await open_rabbit()
    assert await broker._ready(f"{broker.settings.prefix}ledger") is None
    consumer = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    assert [d.event.payload["n"] for d in await fetch(consumer)] == [1]
    assert await broker.clean() == 0


async def test_a_new_group_cannot_replay(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    with pytest.raises(SubscriptionError, match="start='end'"):
        await broker.consume("late", ["github.push"], start="beginning")


# -- RabbitMQ out of reach ----------------------------------------------------------------------


async def test_start_with_nothing_listening_is_unavailable_quickly() -> None:
    broker = RabbitBroker.from_url(f"amqp://guest:guest@127.0.0.1:{free_port()}/?timeout=2")
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot connect"):
        await broker.start()
    assert time.monotonic() - began < 3
    await broker.close()


async def _publish_until_accepted(broker: Broker, sent: Event, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            assert await broker.publish(sent) is True
            return
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_an_outage_fails_publishes_quickly_and_fetch_recovers(
    open_rabbit: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callboard.brokers.rabbitmq_group")
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    try:
        broker = await open_rabbit(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout="2")
        consumer = await broker.consume("workers", ["github.push"])
        await broker.publish(event(n=1))
        first = await fetch(consumer)
        await consumer.ack(first)

        await proxy.cut()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(event(n=2))
        assert time.monotonic() - began < 3
        waiting = asyncio.create_task(fetch(consumer, 1, timeout=30))
        other = asyncio.create_task(fetch(consumer, 1, timeout=30))
        await asyncio.sleep(2.5)
        assert not waiting.done()  # fetch waits through the outage instead of raising
        assert not other.done()
        other.cancel()  # loses nothing

        await proxy.restore()
        await _publish_until_accepted(broker, event(n=3), within=20)
        got = await waiting
        while got[-1].event.payload["n"] != 3:
            # An acknowledgement the cut swallowed: the event comes again (at least once).
            assert got[-1].event.payload["n"] == 1
            await consumer.ack(got)
            got = await fetch(consumer, 1, timeout=10)
        await consumer.ack(got)
        # Two fetches retrying every second through the outage: one warning, one recovery.
        said = [r.getMessage() for r in caplog.records if r.name.endswith("rabbitmq_group")]
        warned = [m for m in said if "unreachable" in m]
        assert len(warned) == 1, warned
        assert warned[0].startswith("group workers: RabbitMQ unreachable (")
        assert [m for m in said if "reachable again" in m] != []
    finally:
        await proxy.close()


async def test_the_health_check_fails_during_an_outage_and_passes_once_it_is_over(
    open_rabbit: Opener,
) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        broker = await open_rabbit(url, timeout="2")
        await broker.check()
        await proxy.cut()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{proxy.port}"):
            await broker.check()
        assert time.monotonic() - began < 3
        await proxy.restore()
        # aio-pika reconnects by itself (every 5 seconds); the broker is not restarted.
        deadline = time.monotonic() + 20
        while True:
            try:
                await broker.check()
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline, "the check never passed again"
                await asyncio.sleep(0.2)
    finally:
        await proxy.close()


async def test_the_health_check_of_a_broker_not_started_fails() -> None:
    broker = RabbitBroker.from_url(f"amqp://guest:secret@127.0.0.1:{free_port()}/")
    with pytest.raises(BrokerUnavailable, match="not started") as caught:
        await broker.check()
    assert "secret" not in str(caught.value)


# -- retention ----------------------------------------------------------------------------------


def numbers(deliveries: list[Delivery]) -> list[int]:
    return [d.event.payload["n"] for d in deliveries]


async def test_retention_counts_each_groups_queue_on_its_own(open_rabbit: Opener) -> None:
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=2, batch_size=2)
    broker = await open_rabbit(retention=policy)
    pushes = await broker.consume("pushes", ["github.push"])
    merges = await broker.consume("merges", ["gitlab.merge_request"])
    for n in range(5):
        await broker.publish(event("github.push", n))
    for n in range(5, 7):
        await broker.publish(event("gitlab.merge_request", n))
    # Seven events stored, two of them in merges' queue: only pushes' queue is over the count.
    assert await broker.clean() == 3
    listed = {s.name: s for s in await broker.subscriptions()}
    assert {name: (s.lost, s.backlog) for name, s in listed.items()} == {
        "pushes": (3, 2),
        "merges": (0, 2),
    }
    assert numbers(await fetch(pushes, 2)) == [3, 4]
    assert numbers(await fetch(merges, 2)) == [5, 6]
    assert await broker.clean() == 0


async def _put_old_events(broker: RabbitBroker, group: str, numbers: range, age: float) -> None:
    """Events published ``age`` seconds ago, as RabbitMQ would hold them in the group's queue."""
    stamp = time.time_ns() - int(age * 1e9)
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        for n in numbers:
            message = aio_pika.Message(encode_event(event(n=n)), headers={STAMP: stamp})
            await channel.default_exchange.publish(
                message, queue_name(broker.settings.prefix, "group", group)
            )
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("policy", "deleted"),
    [
        # Older than max_age: deleted whatever the count.
        (RetentionPolicy(min_age=0, max_age=3600, max_count=100), 3),
        # Beyond max_count and older than min_age: deleted, the oldest first.
        (RetentionPolicy(min_age=600, max_age=86_400, max_count=2), 2),
        # Beyond max_count but younger than min_age: kept.
        (RetentionPolicy(min_age=3 * 3600, max_age=86_400, max_count=2), 0),
    ],
)
async def test_retention_ages_each_event_by_its_publish_time(
    open_rabbit: Opener, policy: RetentionPolicy, deleted: int
) -> None:
    broker = await open_rabbit(retention=policy)
    consumer = await broker.consume("workers", ["github.push"])
    await _put_old_events(broker, "workers", range(3), age=2 * 3600)
    await broker.publish(event(n=3))
    assert await broker.clean() == deleted
    assert numbers(await fetch(consumer, 4 - deleted)) == list(range(deleted, 4))
    listed = await broker.subscriptions()
    assert [(s.lost, s.in_flight) for s in listed] == [(deleted, 4 - deleted)]


async def test_retention_leaves_what_consumers_hold_and_trims_what_comes_after(
    open_rabbit: Opener,
) -> None:
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=3, batch_size=1)
    broker = await open_rabbit(retention=policy)
    consumer = await broker.consume("workers", ["github.push"])
    for n in range(6):
        await broker.publish(event(n=n))
    held = await fetch(consumer, 2)
    released = await fetch(consumer, 1)
    await consumer.release(released)
    # Six in the queue, three too many: the two handed out stay, the released one and the
    # two after it go.
    assert await broker.clean() == 3
    await consumer.ack(held)
    assert numbers(await fetch(consumer, 1)) == [5]
    assert [s.lost for s in await broker.subscriptions()] == [3]


async def test_backlog_figures_stay_exact_as_each_queue_is_trimmed(open_rabbit: Opener) -> None:
    """The contract's model of backlog, lost and retention, with ``max_count`` per group's queue
    (the broker's declared deviation): several rounds, groups made at different positions,
    events for one group only."""
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=300, batch_size=120)
    broker = await open_rabbit(retention=policy)
    rng = random.Random(23)
    topics = ("github.push", "github.issues", "gitlab.push", "gerrit.change-merged")
    patterns = {"pushes": ["*.push"], "github": ["github.>"], "all": [">"], "gerrit": ["gerrit.*"]}
    matchers = {name: TopicMatcher(p) for name, p in patterns.items()}
    consumers: dict[str, Consumer] = {}
    waiting: dict[str, list[int]] = {}  # per group, what it has not received, in order
    lost = dict.fromkeys(patterns, 0)
    n = 0
    for round_ in range(6):
        if round_ < len(patterns):
            name = list(patterns)[round_]
            consumers[name] = await broker.consume(name, patterns[name])
            waiting[name] = []
        for _ in range(rng.randint(150, 350)):
            topic = rng.choice(topics)
            await broker.publish(event(topic, n))
            for name in consumers:
                if matchers[name](topic):
                    waiting[name].append(n)
            n += 1
        for name in consumers:
            await broker.deliver_to(name, event("github.issues", n))  # for that group only
            waiting[name].append(n)
            n += 1
        for name in rng.sample(sorted(consumers), k=min(2, len(consumers))):
            took = await fetch(consumers[name], rng.randint(0, min(150, len(waiting[name]))))
            await consumers[name].ack(took)
            assert numbers(took) == waiting[name][: len(took)]
            del waiting[name][: len(took)]
        if round_ in (2, 4, 5):
            gone = {name: max(0, len(waiting[name]) - policy.max_count) for name in waiting}
            assert await broker.clean() == sum(gone.values()), round_
            for name, count in gone.items():
                lost[name] += count
                del waiting[name][:count]
        listed = {s.name: s for s in await broker.subscriptions()}
        figures = {name: (listed[name].backlog, listed[name].in_flight) for name in consumers}
        assert figures == {name: (len(waiting[name]), 0) for name in consumers}, round_
        assert {name: listed[name].lost for name in consumers} == {
            name: lost[name] for name in consumers
        }, round_
    for name, consumer in consumers.items():
        assert numbers(await fetch(consumer, len(waiting[name]), timeout=20)) == waiting[name]


# -- consumers: leaving, rejoining, outages --------------------------------------------------------


async def test_a_consumer_closed_while_its_fetch_starts_consuming_leaves_nothing_held(
    open_rabbit: Opener,
) -> None:
    """The last member closes while its fetch is starting the consumer: no consumer may be
    left behind it, holding the group's events in a process nobody reads them from."""
    first = await open_rabbit()
    second = await open_rabbit()
    leaving = await first.consume("workers", ["github.push"])
    fetching = asyncio.create_task(leaving.fetch(10))
    hub = first._hubs["workers"]
    for _ in range(10_000):
        if hub._lock.locked():  # the consumer is being started
            break
        await asyncio.sleep(0)
    else:
        pytest.fail("the fetch never started the consumer")
    await leaving.close()
    assert tuple(await asyncio.wait_for(fetching, 5)) == ()
    staying = await second.consume("workers", ["github.push"])
    for n in range(6):
        await first.publish(event(n=n))
    assert numbers(await fetch(staying, 6, timeout=5)) == list(range(6))


async def test_a_group_deleted_by_another_server_can_be_subscribed_again(
    open_rabbit: Opener,
) -> None:
    reader = await open_rabbit()
    admin = await open_rabbit()
    consumer = await reader.consume("workers", ["github.push"])
    waiting = asyncio.create_task(consumer.fetch(1))
    await asyncio.sleep(0.3)  # consuming
    assert await admin.delete_subscription("workers") is True
    with pytest.raises(SubscriptionError, match="no longer exists"):
        await asyncio.wait_for(waiting, 5)
    await consumer.close()
    again = await reader.consume("workers", ["github.push"])
    await reader.publish(event(n=1))
    assert numbers(await fetch(again)) == [1]


async def test_a_batch_acknowledged_across_a_reconnection_acknowledges_its_live_events(
    open_rabbit: Opener,
) -> None:
    """A delivery fetched before an outage (its channel is gone, RabbitMQ requeued it) and
    deliveries fetched after, acknowledged together: the live ones are acknowledged."""
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        broker = await open_rabbit(url, timeout="2")
        consumer = await broker.consume("workers", ["github.push"])
        await broker.publish(event(n=1))
        before = await fetch(consumer)
        await proxy.cut()
        await proxy.restore()
        await _publish_until_accepted(broker, event(n=2), within=20)
        after = await fetch(consumer, 2, timeout=20)
        assert sorted(numbers(after)) == [1, 2]  # 1 again: its first channel is gone
        await consumer.ack([*before, *after])
        await consumer.close()
        again = await broker.consume("workers", ["github.push"])
        with pytest.raises(TimeoutError):
            await fetch(again, 1, timeout=1)
    finally:
        await proxy.close()


async def test_fetches_wider_than_amqps_prefetch_window_still_consume(
    open_rabbit: Opener,
) -> None:
    broker = await open_rabbit()
    consumer = await broker.consume("workers", ["github.push"])
    await broker.publish(event(n=1))
    assert numbers(await fetch(consumer, 1)) == [1]
    waiting = [asyncio.create_task(consumer.fetch(40_000)) for _ in range(2)]
    await asyncio.sleep(0.3)
    await broker.publish(event(n=2))
    done, _ = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert [numbers(list(task.result())) for task in done] == [[2]]
    await consumer.close()
    await asyncio.gather(*waiting)


# -- real servers -------------------------------------------------------------------------------


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A broker URL on a prefix of this test's own, deleted once its servers are gone."""
    with served_namespace() as url:
        yield url


@pytest.mark.slow
async def test_two_servers_deliver_each_event_once_per_subscription(
    amqp_url: str, tmp_path: Path
) -> None:
    fleet = Fleet(tmp_path)
    try:
        async with httpx.AsyncClient() as client:
            servers = await fleet.start(write_config(tmp_path, amqp_url), client)
            events = range(100)
            limit = asyncio.Semaphore(8)

            async def post(n: int) -> None:
                async with limit:
                    response = await servers[n % 2].post(client, "jobs", n)
                assert response.status_code == 202, (n, response.text)

            await asyncio.gather(*(post(n) for n in events))
            await wait_for_records(tmp_path, {"A": set(events), "B": set(events)}, fleet)
            await asyncio.sleep(0.5)  # a second delivery would come now, if any
            records = read_records(tmp_path)
            for subscription in ("A", "B"):
                counts = handled(records, subscription)
                assert set(counts) == set(events)
                assert not [n for n, c in counts.items() if c > 1], subscription
            await fleet.stop_all()
    finally:
        fleet.kill_all()


@pytest.mark.slow
async def test_a_killed_servers_event_goes_to_the_other(amqp_url: str, tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        async with httpx.AsyncClient() as client:
            servers = await fleet.start(write_config(tmp_path, amqp_url, lease=2.0), client)
            assert (await servers[0].post(client, "slow", -1)).status_code == 202
            deadline = time.monotonic() + 10
            while not (started := [r for r in read_records(tmp_path) if r.subscription == "slow"]):
                assert time.monotonic() < deadline, "no server started the slow handler"
                await asyncio.sleep(0.02)
            (victim,) = [s for s in servers if s.pid == started[0].pid]
            (survivor,) = [s for s in servers if s is not victim]
            victim.kill()
            assert await victim.wait_exit(5) is not None
            (tmp_path / "release").touch()
            records = await wait_for_records(tmp_path, {"slow": {-1}}, fleet, timeout=20)
            slow = [(r.pid, r.phase) for r in records if r.subscription == "slow"]
            assert slow == [(victim.pid, "start"), (survivor.pid, "start"), (survivor.pid, "done")]
            await fleet.stop_all()
    finally:
        fleet.kill_all()


async def test_a_deleted_group_stays_deleted_after_a_reconnection(open_rabbit: Opener) -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    try:
        broker = await open_rabbit(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", timeout="2")
        consumer = await broker.consume("retired", ["github.push"])
        await broker.publish(dead_letter_event("retired", event(), RuntimeError("boom"), 3))
        await consumer.close()
        assert await broker.delete_subscription("retired") is True
        await proxy.cut()
        await proxy.restore()
        await _publish_until_accepted(broker, event(n=1), within=20)
        prefix = broker.settings.prefix
        for kind in ("group", "dead"):
            assert await broker._ready(queue_name(prefix, kind, "retired")) is None
    finally:
        await proxy.close()
