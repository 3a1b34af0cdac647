"""The NATS JetStream broker against real nats-servers: what the contract suite cannot say.

Most tests use the shared server (127.0.0.1:4222) under a prefix of their own; those that kill
the server run their own ``nats-server -js`` on a free port with a store directory of the test's
own, so the shared server is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from callboard.brokers import broker_entry_points, redact_url
from callboard.brokers.base import Delivery, RetentionPolicy
from callboard.errors import BrokerUnavailable, ConfigError
from callboard.events import DELIVERY_ID, Event
from tests.contract.kits_nats import NATS_HOST, NATS_PORT, NATS_URL, delete_streams
from tests.integration.servers import (
    Fleet,
    free_port,
    handled,
    passes_within,
    read_records,
    wait_for_records,
    write_config,
)
from tests.services import require_service, service_up

pytest.importorskip("nats")

from callboard.brokers.nats import NatsBroker
from callboard.brokers.nats_consumer import NatsConsumer
from callboard.brokers.nats_names import (
    Layout,
    ack_position,
    decode_token,
    encode_token,
    group_key,
    tokens_topic,
)

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def event(topic: str = "github.push", n: int = 0, **metadata: str) -> Event:
    return Event(topic=topic, payload={"n": n}, metadata=metadata)


async def fetch(consumer: NatsConsumer, count: int, timeout: float = 5.0) -> list[Delivery]:
    found: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            found.extend(await consumer.fetch(count - len(found)))
    return found


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    """A prefix of this test's own on the shared server, its streams deleted at the end."""
    require_service("NATS", NATS_HOST, NATS_PORT)
    name = f"cb_it_{uuid.uuid4().hex[:12]}"
    yield name
    await delete_streams(NATS_URL, name)


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[NatsBroker]:
    opened = NatsBroker([NATS_URL], prefix=prefix, lease=2.0)
    await opened.start()
    yield opened
    await opened.close()


# -- the URL ------------------------------------------------------------------------------------


def test_a_url_names_servers_prefix_lease_and_timeout() -> None:
    broker = NatsBroker.from_url(
        "nats://u:secret@a:4222,b:4223?prefix=orders&lease=5&timeout=2&replicas=3"
    )
    assert broker._servers == ["nats://u:secret@a:4222", "nats://u:secret@b:4223"]
    assert broker._layout.prefix == "orders"
    assert (broker._lease, broker._timeout, broker._replicas) == (5.0, 2.0, 3)
    assert NatsBroker.from_url("nats://localhost")._layout.prefix == "callboard"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nats://localhost/stream", "expected nats://"),
        ("nats://", "expected nats://"),
        ("redis://localhost", "expected nats://"),
        ("nats://localhost?prefix=a.b", "prefix 'a.b'"),
        ("nats://localhost?prefix=", "prefix ''"),
        ("nats://localhost?stream=x", "unknown parameter"),
        ("nats://localhost?lease=soon", "seconds"),
        ("nats://localhost?timeout=0", "positive"),
        ("nats://localhost?replicas=7", "replicas must be 1 to 5"),
        ("nats://localhost?replicas=two", "replicas a count"),
    ],
)
def test_a_url_the_broker_cannot_use_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        NatsBroker.from_url(url)
    assert raised.value.path == "events.broker"


def test_a_bad_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as raised:
        NatsBroker.from_url("nats://user:hunter2@localhost/path")
    assert "hunter2" not in str(raised.value)
    assert "hunter2" not in redact_url("nats://user:hunter2@localhost")


def test_the_scheme_is_declared_as_an_entry_point() -> None:
    if "nats" not in broker_entry_points():
        pytest.skip("the editable install predates the nats entry point; reinstall callboard")
    (entry,) = broker_entry_points()["nats"]
    assert entry.value.startswith("callboard.brokers.nats:NatsBroker.from_url")


# -- names on the engine ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "segment", ["push", "repo:push", "naïve", "a%b", "$deadletter", "a*b", "x>y", "日本", "a/b"]
)
def test_a_segment_maps_to_one_token_and_back(segment: str) -> None:
    token = encode_token(segment)
    assert decode_token(token) == segment
    assert "." not in token
    assert token not in ("*", ">")
    assert token.isascii()
    assert all(c.isprintable() and not c.isspace() for c in token)


def test_patterns_keep_their_wildcards_and_topics_round_trip() -> None:
    layout = Layout("cb")
    assert layout.event_subject("github.*") == "cb.ev.github.*"
    assert layout.event_subject("gitlab.>") == "cb.ev.gitlab.>"
    assert layout.event_subject("naïve.push") == "cb.ev.na%C3%AFve.push"
    assert tokens_topic("na%C3%AFve.repo:push") == "naïve.repo:push"


def test_one_filter_covers_every_pattern_of_a_group() -> None:
    layout = Layout("cb")
    assert layout.filter_subject(("github.push",)) == "cb.ev.github.push"
    assert layout.filter_subject(("github.push", "github.issues")) == "cb.ev.github.>"
    assert layout.filter_subject(("github.push", "gitlab.>")) == "cb.ev.>"
    assert layout.filter_subject(("github", "github.push")) == "cb.ev.>"
    assert layout.filter_subject(("a.b.c", "a.b.d.>")) == "cb.ev.a.b.>"


async def test_topics_nats_cannot_carry_as_they_are_are_delivered_intact(
    broker: NatsBroker,
) -> None:
    consumer = await broker.consume("intl", ["naïve.*", "repo:push.>"])
    sent = [event("naïve.événement", 1), event("repo:push.a%b", 2), event("naïve.x.y", 3)]
    for item in sent:
        assert await broker.publish(item) is True
    got = await fetch(consumer, 2)
    assert [d.event for d in got] == sent[:2]
    await consumer.ack(got)


def test_the_ack_subject_tells_the_stream_sequence_and_the_deliveries() -> None:
    assert ack_position("$JS.ACK.cb_events.gabc.3.1207.40.1733450000000000000.12") == (1207, 3)
    newer = "$JS.ACK._.ACCHASH.cb_events.gabc.1.88.7.1733450000000000000.0.tok"
    assert ack_position(newer) == (88, 1)
    assert ack_position(newer.rpartition(".")[0]) == (88, 1)
    assert ack_position(newer + ".reserved") == (88, 1)
    with pytest.raises(ValueError, match="not the ack subject"):
        ack_position("_INBOX.abc.def")


# -- publishing ---------------------------------------------------------------------------------


async def test_a_delivery_id_is_deduped_per_topic_by_the_stream(broker: NatsBroker) -> None:
    consumer = await broker.consume("dedupe", ["github.>"])
    assert await broker.publish(event(n=1, **{DELIVERY_ID: "d"})) is True
    assert await broker.publish(event(n=2, **{DELIVERY_ID: "d"})) is False
    assert await broker.publish(event("github.issues", 3, **{DELIVERY_ID: "d"})) is True
    # Another broker instance on the same streams recognises it too.
    other = NatsBroker([NATS_URL], prefix=broker._layout.prefix)
    await other.start()
    try:
        assert await other.publish(event(n=4, **{DELIVERY_ID: "d"})) is False
    finally:
        await other.close()
    got = await fetch(consumer, 2)
    assert [d.event.payload["n"] for d in got] == [1, 3]


async def test_concurrent_publishes_are_pipelined_on_one_connection(broker: NatsBroker) -> None:
    consumer = await broker.consume("bulk", ["bulk.>"])
    started = time.monotonic()
    accepted = await asyncio.gather(*(broker.publish(event("bulk.x", n)) for n in range(1500)))
    elapsed = time.monotonic() - started
    assert all(accepted)
    # Pipelined on one connection, 1500 confirmed publishes take well under a few seconds.
    assert elapsed < 5, elapsed
    # All held at once, unacknowledged: more than JetStream's default cap of 1000.
    got = await fetch(consumer, 1500, timeout=20)
    assert sorted(d.event.payload["n"] for d in got) == list(range(1500))


async def test_a_dead_letter_is_kept_apart_from_events(broker: NatsBroker) -> None:
    consumer = await broker.consume("catch-all", [">"])
    letter = event("$deadletter.catch-all", 1)
    assert await broker.publish(letter) is True
    assert await broker.take_dead_letters("catch-all") == [letter]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consumer.fetch(1), 0.5)


# -- the engine unreachable ---------------------------------------------------------------------


async def test_start_against_nothing_listening_fails_quickly() -> None:
    broker = NatsBroker([f"nats://127.0.0.1:{free_port()}"], timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="cannot connect to NATS"):
        await broker.start()
    assert time.monotonic() - started < 5


async def test_publish_on_a_broker_not_connected_fails_at_once() -> None:
    broker = NatsBroker([f"nats://127.0.0.1:{free_port()}"])
    with pytest.raises(BrokerUnavailable):
        await broker.publish(event())


class NatsServer:
    """A nats-server of the test's own, with JetStream on a store directory that outlives it."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: ASYNC220 (a daemon, not waited for here)
            [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", self.port, 0.2):
            assert time.monotonic() < deadline, "nats-server did not start"
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    if not Path(NATS_SERVER).exists():
        pytest.skip("nats-server is not installed")
    server = NatsServer(tmp_path / "jetstream")
    yield server
    server.kill()


@pytest.mark.slow
async def test_a_killed_server_loses_nothing_answered_and_the_broker_recovers(
    own_server: NatsServer,
) -> None:
    await own_server.start()
    broker = NatsBroker([own_server.url], prefix="outage", lease=2.0, timeout=2.0)
    await broker.start()
    consumer = await broker.consume("survivor", ["jobs"])
    accepted: set[int] = set()
    refused: list[float] = []
    stop = asyncio.Event()

    async def publish_all() -> None:
        n = 0
        while not stop.is_set():
            sent = time.monotonic()
            try:
                if await broker.publish(event("jobs", n)):
                    accepted.add(n)
            except BrokerUnavailable:
                refused.append(time.monotonic() - sent)
                await asyncio.sleep(0.05)
            n += 1
            await asyncio.sleep(0.005)

    received: set[int] = set()
    everything_received = asyncio.Event()

    async def receive_all() -> None:
        while True:
            got = await consumer.fetch(50)
            received.update(d.event.payload["n"] for d in got)
            await consumer.ack(got)
            if stop.is_set() and accepted <= received:
                everything_received.set()

    publisher = asyncio.create_task(publish_all())
    receiver = asyncio.create_task(receive_all())
    try:
        await asyncio.sleep(1)
        own_server.kill()
        await asyncio.sleep(3)  # longer than the publish timeout: a publish then in flight fails
        assert refused, "publishing went on while the server was down"
        before = len(accepted)
        await own_server.start()
        deadline = time.monotonic() + 15
        while len(accepted) < before + 20:
            assert time.monotonic() < deadline, "publishing did not recover"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        stop.set()
        await publisher
        if accepted <= received:
            everything_received.set()
        async with asyncio.timeout(20):
            await everything_received.wait()
    finally:
        stop.set()
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await broker.close()
    # Refused within a few seconds each, never hung.
    assert max(refused) < 4, max(refused)


@pytest.mark.slow
async def test_the_health_check_fails_while_the_server_is_down_and_passes_once_it_is_back(
    own_server: NatsServer,
) -> None:
    await own_server.start()
    broker = NatsBroker([own_server.url], prefix="health", timeout=1.0)
    with pytest.raises(BrokerUnavailable, match="not started"):
        await broker.check()
    await broker.start()
    try:
        await broker.check()
        own_server.kill()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=f"NATS at {own_server.url}"):
            await broker.check()
        assert time.monotonic() - began < 3
        await asyncio.sleep(0.5)  # the client is reconnecting by now: still down
        with pytest.raises(BrokerUnavailable, match=f"NATS at {own_server.url}"):
            await broker.check()
        await own_server.start()
        await passes_within(broker, 15)  # the same broker, not restarted
    finally:
        await broker.close()


# -- two callboard serve processes --------------------------------------------------------------


@pytest.mark.slow
async def test_two_servers_deliver_each_event_once_per_subscription(
    prefix: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    if "nats" not in broker_entry_points():
        pytest.skip("the editable install predates the nats entry point; reinstall callboard")
    url = f"{NATS_URL}?prefix={prefix}&lease=2"
    servers = await fleet.start(write_config(tmp_path, url), client)
    events = range(120)
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
        assert not [n for n, count in counts.items() if count > 1], subscription
    pids = {s.pid for s in servers}
    for subscription in ("A", "B"):
        assert {r.pid for r in records if r.subscription == subscription} == pids
    await fleet.stop_all()


# -- operations ---------------------------------------------------------------------------------


async def test_migrate_creates_the_streams_then_has_nothing_to_do(prefix: str) -> None:
    broker = NatsBroker([NATS_URL], prefix=prefix)  # never started
    applied = await broker.migrate()
    assert applied == [
        f"created stream {prefix}_events",
        f"created stream {prefix}_dead",
        f"created stream {prefix}_groups",
    ]
    assert await broker.migrate() == []
    shorter = NatsBroker(
        [NATS_URL], prefix=prefix, retention=RetentionPolicy(max_age=3600, interval=60)
    )
    assert await shorter.migrate() == [f"updated the limits of stream {prefix}_events"]
    assert await shorter.migrate() == []


async def test_retention_never_deletes_events_younger_than_min_age(prefix: str) -> None:
    policy = RetentionPolicy(min_age=600, max_age=3600, max_count=2)
    broker = NatsBroker([NATS_URL], prefix=prefix, retention=policy)
    await broker.start()
    try:
        for n in range(5):
            await broker.publish(event(n=n))
        assert await broker.clean() == 0
    finally:
        await broker.close()


async def test_a_group_of_several_patterns_gets_only_what_they_match(broker: NatsBroker) -> None:
    consumer = await broker.consume("mixed", ["github.push", "gitlab.>"])
    for n, topic in enumerate(("github.issues", "github.push", "other", "gitlab.mr.open")):
        await broker.publish(event(topic, n))
    got = await fetch(consumer, 2)
    assert [d.event.topic for d in got] == ["github.push", "gitlab.mr.open"]
    await consumer.ack(got)
    (info,) = await broker.subscriptions()
    assert (info.in_flight, info.backlog) == (0, 0)


# -- settling -----------------------------------------------------------------------------------


async def test_a_batch_from_both_consumers_of_a_group_is_settled_before_ack_returns(
    broker: NatsBroker,
) -> None:
    consumer = await broker.consume("both", ["github.push"])
    for n in range(6):
        await broker.publish(event(n=n))
        await broker.deliver_to("both", event("direct.one", 10 + n))
    got = await fetch(consumer, 12)
    assert sorted(d.event.payload["n"] for d in got) == [*range(6), *range(10, 16)]
    await consumer.release(got[::2])
    again = await fetch(consumer, 6)
    assert [d.attempt for d in again] == [2] * 6
    await consumer.ack([*got[1::2], *again])
    # Each consumer confirmed its last settle: every one before it was handled, right now.
    key = group_key("both")
    for name in (key, key + "_to"):
        info = await broker._jsc.consumer_info(broker._layout.events, name)
        assert (info.num_ack_pending, info.num_pending) == (0, 0)
    (listed,) = await broker.subscriptions()
    assert (listed.in_flight, listed.backlog) == (0, 0)


async def test_acks_the_server_cannot_confirm_are_counted_in_the_log(
    broker: NatsBroker, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = await broker.consume("vanishing", ["github.push"])
    for n in range(3):
        await broker.publish(event(n=n))
    got = await fetch(consumer, 3)
    await broker._jsc.delete_consumer(broker._layout.events, group_key("vanishing"))
    await consumer.ack(got)
    assert "3 of 3 +ACK not confirmed by NATS" in caplog.text


async def test_closing_the_broker_is_not_reported_as_a_disconnection(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = NatsBroker([NATS_URL], prefix=prefix)
    await broker.start()
    await broker.close()
    assert "disconnected" not in caplog.text
