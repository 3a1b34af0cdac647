"""The Redis broker against real Redis servers: what the contract suite cannot say.

Most tests use the shared server (127.0.0.1:6379) under a key prefix of their own; those that
kill or stall Redis run their own ``redis-server`` (append-only file on) on a free port, or go
through a ``TcpProxy``, so the shared server is never touched.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from callboard.brokers import open_broker, redact_url
from callboard.brokers.base import Delivery, RetentionPolicy
from callboard.errors import BrokerUnavailable, ConfigError, SubscriptionError
from callboard.events import DELIVERY_ID, Event
from tests.contract.kits_redis import REDIS_URL, delete_prefix
from tests.integration.servers import (
    Fleet,
    TcpProxy,
    free_port,
    passes_within,
    readiness_becomes,
    write_config,
)
from tests.integration.test_multi_instance import (
    test_a_killed_instance_loses_nothing_and_its_event_goes_to_the_other as killed_instance,
)
from tests.integration.test_multi_instance import (
    test_each_subscription_gets_each_event_exactly_once as each_event_once,
)
from tests.services import require_service, service_up

pytest.importorskip("redis")

from callboard.brokers.redis import RedisBroker


def event(topic: str = "github.push", n: int = 0, **metadata: str) -> Event:
    return Event(topic=topic, payload={"n": n}, metadata=metadata)


async def fetch(consumer: object, count: int, timeout: float = 5.0) -> list[Delivery]:
    found: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            found.extend(await consumer.fetch(count - len(found)))  # type: ignore[attr-defined]
    return found


async def collect(consumer: object, wanted: set[int], timeout: float = 30.0) -> set[int]:
    """Fetch and acknowledge until every number in ``wanted`` was received; all received."""
    received: set[int] = set()
    async with asyncio.timeout(timeout):
        while not wanted <= received:
            got = await consumer.fetch(100)  # type: ignore[attr-defined]
            received |= {d.event.payload["n"] for d in got}
            await consumer.ack(got)  # type: ignore[attr-defined]
    return received


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    require_service("Redis", "127.0.0.1", 6379)
    name = f"cb_test_{uuid.uuid4().hex[:12]}"
    yield name
    await delete_prefix(REDIS_URL, name)


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[RedisBroker]:
    made = RedisBroker(f"{REDIS_URL}?prefix={prefix}", lease=2.0, poll_interval=0.05)
    await made.start()
    yield made
    await made.close()


# -- the URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://127.0.0.1:port/0",
        "redis://127.0.0.1:6379/zero",
        "redis://127.0.0.1:6379/0?stream=x",
        "redis://127.0.0.1:6379/0?lease=-1",
        "redis://127.0.0.1:6379/0?poll=soon",
        "redis://127.0.0.1:6379/0?prefix=",
        "redis://127.0.0.1:6379/0?prefix=a%20b",
        "http://127.0.0.1:6379/0",
    ],
)
def test_a_url_the_broker_cannot_use_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"events\.broker"):
        RedisBroker.from_url(url)


def test_the_url_gives_prefix_lease_and_poll() -> None:
    broker = RedisBroker.from_url("rediss://u:secret@example.com:6380/3?prefix=cb&lease=7&poll=0.5")
    assert (broker.prefix, broker.lease, broker.poll_interval) == ("cb:", 7.0, 0.5)
    assert "secret" not in broker.url
    assert broker.capabilities.durable
    assert broker.capabilities.shared
    assert broker.capabilities.replay


def test_open_broker_finds_the_redis_broker_by_its_scheme() -> None:
    for scheme in ("redis", "rediss"):
        assert isinstance(open_broker(f"{scheme}://127.0.0.1:6379/0"), RedisBroker)


# -- Redis unreachable --------------------------------------------------------------------------


async def test_start_against_nothing_listening_fails_quickly_without_the_password() -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    broker = RedisBroker(url)
    began = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        await broker.start()
    assert time.monotonic() - began < 3
    assert "hunter2" not in str(caught.value)
    assert redact_url(url) in str(caught.value)
    await broker.close()


async def test_a_stalled_redis_answers_publish_quickly_and_the_broker_recovers(
    prefix: str,
) -> None:
    """A partition: connections stay open and nothing answers. ``publish`` gives up within
    seconds; ``fetch`` keeps waiting and gets the events once Redis answers again."""
    proxy = TcpProxy("127.0.0.1", 6379)
    await proxy.start()
    broker = RedisBroker(f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}", poll_interval=0.05)
    try:
        await broker.start()
        consumer = await broker.consume("workers", ["github.push"])
        assert await broker.publish(event(n=0)) is True
        reading = asyncio.create_task(collect(consumer, {0, 2}))
        proxy.stall()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.publish(event(n=1))
        assert time.monotonic() - began < 8
        assert not reading.done()
        proxy.flow()
        assert await broker.publish(event(n=2)) is True
        # Every answered publish is received; the unanswered one may or may not have been
        # stored (Redis ran it once the stall ended): at-least-once, the sender retries.
        assert await reading >= {0, 2}
    finally:
        proxy.flow()
        await broker.close()
        await proxy.close()


# -- names, dedupe, batching --------------------------------------------------------------------


async def test_topics_groups_and_delivery_ids_with_any_characters_round_trip(
    broker: RedisBroker,
) -> None:
    group = "über:group{1}*"
    consumer = await broker.consume(group, ["a:b.*", "$odd.topic"])
    sent = [
        event("a:b.ü", 1, **{DELIVERY_ID: "x"}),
        # The same topic and delivery id spelled across the separator: not the same pair.
        event("a:b.ü:x", 2, **{DELIVERY_ID: "x"}),
        event("$odd.topic", 3, **{DELIVERY_ID: "1:x"}),
    ]
    for item in sent:
        assert await broker.publish(item) is True
    got = await fetch(consumer, 3)
    assert [d.event for d in got] == sent
    assert await broker.publish(event("a:b.ü:x", 4, **{DELIVERY_ID: "x"})) is False
    await consumer.ack(got)
    (info,) = [s for s in await broker.subscriptions() if s.name == group]
    assert set(info.topics) == {"a:b.*", "$odd.topic"}


async def test_every_key_lives_under_the_prefix(broker: RedisBroker, prefix: str) -> None:
    import redis.asyncio as aioredis

    consumer = await broker.consume("g", ["github.>"])
    await broker.publish(event(n=1, **{DELIVERY_ID: "d"}))
    await broker.publish(Event(topic="$deadletter.g", payload={}))
    await consumer.ack(await fetch(consumer, 1))
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = {key.decode() async for key in client.scan_iter(match=f"{prefix}:*")}
    finally:
        await client.aclose()
    assert {k.split(":")[1] for k in keys} <= {"log", "routes", "q", "dl", "d", "owners", "lost"}
    assert f"{prefix}:log" in keys


async def test_a_delivery_id_is_forgotten_after_the_window(prefix: str) -> None:
    policy = RetentionPolicy(min_age=0, max_age=0.3)
    broker = RedisBroker(f"{REDIS_URL}?prefix={prefix}", retention=policy)
    await broker.start()
    try:
        assert await broker.publish(event(n=1, **{DELIVERY_ID: "d"})) is True
        assert await broker.publish(event(n=2, **{DELIVERY_ID: "d"})) is False
        await asyncio.sleep(0.5)
        assert await broker.publish(event(n=3, **{DELIVERY_ID: "d"})) is True
    finally:
        await broker.close()


async def test_concurrent_publishes_share_pipelines(broker: RedisBroker) -> None:
    sends: list[int] = []
    send = broker._send

    async def counting(batch):  # type: ignore[no-untyped-def]
        sends.append(len(batch))
        return await send(batch)

    broker._publisher._send = counting
    consumer = await broker.consume("all", ["github.push"])
    accepted = await asyncio.gather(*(broker.publish(event(n=n)) for n in range(300)))
    assert all(accepted)
    assert sum(sends) == 300
    assert len(sends) <= 10, sends
    got = await fetch(consumer, 300)
    assert [d.event.payload["n"] for d in got] == list(range(300))


async def test_a_group_deleted_and_made_again_elsewhere_is_a_new_group(prefix: str) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    here, there = RedisBroker(url, poll_interval=0.05), RedisBroker(url, poll_interval=0.05)
    await here.start()
    await there.start()
    try:
        reader = await there.consume("moved", ["github.push"])
        assert await here.delete_subscription("moved") is True
        with pytest.raises(SubscriptionError, match="no longer exists"):
            await fetch(reader, 1, timeout=3)
    finally:
        await here.close()
        await there.close()


async def test_clean_forgets_consumers_of_killed_processes(prefix: str) -> None:
    import redis.asyncio as aioredis

    url = f"{REDIS_URL}?prefix={prefix}"
    killed, alive = RedisBroker(url, lease=0.3), RedisBroker(url, lease=0.3, poll_interval=0.05)
    await killed.start()
    await alive.start()
    try:
        doomed = await killed.consume("workers", ["github.push"])
        await killed.publish(event(n=1))
        await fetch(doomed, 1)
        await killed.abandon()
        survivor = await alive.consume("workers", ["github.push"])
        (again,) = await fetch(survivor, 1)
        await survivor.ack((again,))
        alive.stale_consumer = 0.2
        await asyncio.sleep(0.3)
        await alive.clean()
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            consumers = await client.xinfo_consumers(f"{prefix}:q:workers", "cb")
        finally:
            await client.aclose()
        assert doomed.name not in {c["name"].decode() for c in consumers}
        # A live member that held nothing may be forgotten too (Redis 7.0 counts idle time
        # from its last delivery): harmless, its next read makes it again.
        await alive.publish(event(n=2))
        assert [d.event.payload["n"] for d in await fetch(survivor, 1)] == [2]
    finally:
        await alive.close()


async def test_a_redis_that_forgot_the_scripts_still_takes_publishes(own_redis: OwnRedis) -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{own_redis.port}/0", poll_interval=0.05)
    await broker.start()
    try:
        consumer = await broker.consume("workers", ["jobs"])
        assert await broker.publish(event("jobs", 1)) is True
        await broker.client.script_flush()
        assert await broker.publish(event("jobs", 2)) is True
        assert [d.event.payload["n"] for d in await fetch(consumer, 2)] == [1, 2]
    finally:
        await broker.close()


# -- Redis killed and restarted under publishing ------------------------------------------------


class OwnRedis:
    """A ``redis-server`` of this test's own, append-only file on, that can be killed."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--save",
            "",
            "--dir",
            str(self.directory),
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", self.port, 0.1):
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.mark.slow
async def test_redis_killed_under_publishing_loses_nothing_answered(own_redis: OwnRedis) -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{own_redis.port}/0", lease=2.0, poll_interval=0.05)
    await broker.start()
    consumer = await broker.consume("workers", ["jobs"])
    answered: set[int] = set()
    refused = 0
    slowest = 0.0

    async def publish_all() -> None:
        nonlocal refused, slowest
        for n in range(600):
            began = time.monotonic()
            try:
                if await broker.publish(event("jobs", n)):
                    answered.add(n)
            except BrokerUnavailable:
                refused += 1
            slowest = max(slowest, time.monotonic() - began)
            await asyncio.sleep(0.005)

    publishing = asyncio.create_task(publish_all())
    await asyncio.sleep(0.8)
    own_redis.kill()
    await asyncio.sleep(1.0)
    own_redis.start()
    await publishing
    try:
        assert refused > 0, "Redis was never seen down"
        assert slowest < 6
        await collect(consumer, answered)
    finally:
        await broker.close()


# -- the health check (/readyz) -----------------------------------------------------------------


async def test_the_health_check_fails_while_redis_is_down_and_passes_once_it_is_back(
    own_redis: OwnRedis,
) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    broker = RedisBroker(url)
    with pytest.raises(BrokerUnavailable, match="not running"):
        await broker.check()
    await broker.start()
    try:
        await broker.check()
        own_redis.kill()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=f"Redis at {url}"):
            await broker.check()
        assert time.monotonic() - began < 3
        own_redis.start()
        await passes_within(broker, 10)  # the same broker, not restarted
    finally:
        await broker.close()


async def test_the_health_check_of_a_stalled_redis_fails_within_seconds(prefix: str) -> None:
    proxy = TcpProxy("127.0.0.1", 6379)
    await proxy.start()
    broker = RedisBroker(f"redis://127.0.0.1:{proxy.port}/0?prefix={prefix}")
    try:
        await broker.start()
        await broker.check()
        proxy.stall()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="did not answer PING"):
            await broker.check()
        assert time.monotonic() - began < 3
        proxy.flow()
        await passes_within(broker, 10)
    finally:
        proxy.flow()
        await broker.close()
        await proxy.close()


# -- two callboard serve processes --------------------------------------------------------------
# The scenarios of ``test_multi_instance`` (SQLite and PostgreSQL there), on Redis.


@pytest.mark.slow
async def test_serve_is_not_ready_while_redis_is_down_and_ready_again_once_it_is_back(
    own_redis: OwnRedis, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    (server,) = await fleet.start(write_config(tmp_path, url), client, count=1)
    own_redis.kill()
    down = await readiness_becomes(client, server.url, 503, within=10)
    assert down["status"] == "not ready"
    assert f"Redis at {url}" in str(down["broker"])
    own_redis.start()
    assert await readiness_becomes(client, server.url, 200, within=15) == {"status": "ready"}
    await fleet.stop_all()


@pytest.mark.slow
async def test_two_servers_on_one_redis_deliver_each_event_once_per_subscription(
    prefix: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    await each_event_once(f"{REDIS_URL}?prefix={prefix}", tmp_path, fleet, client)


@pytest.mark.slow
async def test_a_killed_server_loses_nothing_and_its_event_goes_to_the_other(
    prefix: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    await killed_instance(f"{REDIS_URL}?prefix={prefix}", tmp_path, fleet, client)


async def test_one_acknowledgement_of_more_events_than_lua_unpacks_at_once(
    broker: RedisBroker,
) -> None:
    # ``batchSize`` goes up to 10,000; Lua's unpack takes a few thousand values at most.
    consumer = await broker.consume("large", ["github.push"])
    count = 9_000
    await asyncio.gather(*(broker.publish(event(n=n)) for n in range(count)))
    held: list[Delivery] = []
    while len(held) < count:
        held += await consumer.fetch(count - len(held))
    await consumer.ack(held)
    (info,) = [s for s in await broker.subscriptions() if s.name == "large"]
    assert (info.in_flight, info.backlog) == (0, 0)
    await consumer.close()
