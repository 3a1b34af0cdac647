"""Replay on the RabbitMQ broker with ``?history=true``: the history stream, groups filled from
it, the console's replay, and ``callboard replay`` against real ``callboard serve`` processes.

Every test works under a name prefix of its own on the machine's RabbitMQ and deletes what it
made. What the contract suite asks of a broker that replays runs on the ``rabbitmq_history``
kit; here is what is RabbitMQ's own: the stream's declaration and retention, no loss while a
group is filled under a load of publishes, a making cut off, two servers making one group.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from callboard.brokers.base import Consumer, Delivery, RetentionPolicy
from callboard.deadletters import dead_letter_event
from callboard.errors import ConfigError, SubscriptionError
from callboard.events import Event
from tests.acceptance.test_console import BEARER, Inbox, console_app, running, until
from tests.contract.kits_rabbitmq import RABBITMQ_URL, drop_namespace, served_namespace
from tests.integration.servers import ROOT, Fleet, handled, read_records, write_config
from tests.services import require_service

pytest.importorskip("aio_pika")

import aio_pika

from callboard.brokers.rabbitmq import RabbitBroker
from callboard.brokers.rabbitmq_history import PREFETCH
from callboard.brokers.rabbitmq_names import MARKER, decode_event, history_name, queue_name

Opener = Callable[..., Awaitable[RabbitBroker]]


@pytest.fixture
async def open_rabbit() -> AsyncIterator[Opener]:
    """Opens started brokers with history on (unless ``history="false"``), on one prefix of
    this test's own; closes them and deletes what the prefix names at the end."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"cb_hist_{uuid.uuid4().hex[:12]}."
    opened: list[RabbitBroker] = []

    async def open_(
        *, retention: RetentionPolicy | None = None, segment: int | None = None, **query: str
    ) -> RabbitBroker:
        params = {"prefix": prefix, "history": "true", **query}
        url = f"{RABBITMQ_URL}?{'&'.join(f'{k}={v}' for k, v in params.items())}"
        broker = RabbitBroker.from_url(url, retention=retention)
        if segment is not None:
            broker.history_segment = segment
        opened.append(broker)
        await broker.start()
        return broker

    yield open_
    for broker in opened:
        await broker.close()
    await drop_namespace(RABBITMQ_URL, prefix)


def event(topic: str = "github.push", n: int = 0) -> Event:
    return Event(topic=topic, payload={"n": n})


def numbers(deliveries: list[Delivery]) -> list[int]:
    return [d.event.payload["n"] for d in deliveries]


async def fetch(consumer: Consumer, count: int, timeout: float = 10.0) -> list[Delivery]:
    found: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            found.extend(await consumer.fetch(count - len(found)))
    await consumer.ack(found)
    return found


async def read_stream(prefix: str) -> list[Event]:
    """Every event the history stream holds, oldest first (markers left out).

    RabbitMQ 3.10 may close the connection of a stream consumer starting while retention
    deletes a segment (``INTERNAL_ERROR``): the reading is tried again then."""
    for _ in range(2):
        try:
            return await _read_stream(prefix)
        except aio_pika.exceptions.ConnectionClosed:
            pass
    return await _read_stream(prefix)


async def _read_stream(prefix: str) -> list[Event]:
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        stream = history_name(prefix)
        # A marker of the test's own says where the stream ends.
        token = uuid.uuid4().hex
        marker = aio_pika.Message(b"", headers={MARKER: token})
        await channel.default_exchange.publish(marker, stream)
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(stream, ensure=False)
        found: list[Event] = []
        async with (
            asyncio.timeout(10),
            queue.iterator(arguments={"x-stream-offset": "first"}) as it,
        ):
            async for message in it:
                await message.ack()
                mark = (message.headers or {}).get(MARKER)
                if mark == token:
                    return found
                if mark is None:
                    found.append(decode_event(message.body))
        raise AssertionError("the stream ended before the test's marker")
    finally:
        await connection.close()


# -- the stream ---------------------------------------------------------------------------------


async def test_migrate_declares_the_stream_once_without_starting() -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"cb_hist_{uuid.uuid4().hex[:12]}."
    broker = RabbitBroker.from_url(f"{RABBITMQ_URL}?prefix={prefix}&history=true")
    try:
        applied = await broker.migrate()
        assert applied == [
            f"declared {prefix}events",
            f"declared {prefix}registry",
            f"declared {prefix}history (the history replays read)",
        ]
        assert await broker.migrate() == []
    finally:
        await drop_namespace(RABBITMQ_URL, prefix)


async def test_the_stream_holds_every_published_event_and_nothing_sent_to_one_queue(
    open_rabbit: Opener,
) -> None:
    broker = await open_rabbit()
    assert broker.capabilities.replay
    await broker.consume("mine", ["github.*"])
    await broker.publish(event("github.push", 1))
    await broker.publish(event("nobody.listens", 2))  # taken by no group: kept all the same
    await broker.publish(dead_letter_event("mine", event("github.push", 3), "failed", 1))
    await broker.deliver_to("mine", event("github.issues", 4))
    kept = await read_stream(broker.settings.prefix)
    assert [(e.topic, e.payload["n"]) for e in kept] == [("github.push", 1), ("nobody.listens", 2)]


async def test_a_broker_with_a_different_age_keeps_the_streams_and_works(
    open_rabbit: Opener, caplog: pytest.LogCaptureFixture
) -> None:
    await open_rabbit(retention=RetentionPolicy(max_age=3600))
    other = await open_rabbit(retention=RetentionPolicy(max_age=7200))
    assert "keeps the arguments it was declared with" in caplog.text
    await other.publish(event(n=1))
    consumer = await other.consume("late", ["github.push"], start="beginning")
    assert numbers(await fetch(consumer, 1)) == [1]


async def test_the_stream_deletes_events_older_than_the_retention_age(
    open_rabbit: Opener,
) -> None:
    # Segments of 2 kB: RabbitMQ deletes whole segments by age, once a newer one is started.
    broker = await open_rabbit(retention=RetentionPolicy(min_age=0, max_age=1), segment=2000)
    for n in range(20):
        await broker.publish(Event(topic="github.push", payload={"n": n, "pad": "x" * 200}))
    prefix = broker.settings.prefix
    assert len(await read_stream(prefix)) == 20
    deadline = time.monotonic() + 15
    n = 100
    while any(e.payload["n"] < 20 for e in await read_stream(prefix)):
        assert time.monotonic() < deadline, "events older than max_age stayed in the stream"
        await asyncio.sleep(0.5)
        await broker.publish(Event(topic="github.push", payload={"n": n, "pad": "x" * 200}))
        n += 1


async def test_without_history_a_replay_says_how_to_turn_it_on(open_rabbit: Opener) -> None:
    broker = await open_rabbit(history="false")
    assert not broker.capabilities.replay
    assert await broker._ready(history_name(broker.settings.prefix)) is None
    with pytest.raises(SubscriptionError, match=r"\?history=true in events\.broker"):
        await broker.consume("late", ["github.push"], start=datetime.now(UTC))


async def test_a_start_time_must_be_timezone_aware(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    with pytest.raises(SubscriptionError, match="timezone-aware"):
        await broker.consume("late", ["github.push"], start=datetime.now())


def test_a_bad_history_value_is_refused_before_connecting() -> None:
    with pytest.raises(ConfigError, match=r"\?history= must be true or false, not 'yes'"):
        RabbitBroker.from_url("amqp://127.0.0.1/?history=yes")


# -- groups filled from the stream --------------------------------------------------------------


async def test_a_new_group_gets_the_kept_events_oldest_first_then_live_ones(
    open_rabbit: Opener,
) -> None:
    broker = await open_rabbit()
    count = 2 * PREFETCH + 50  # several batches of the reader
    for n in range(count):
        await broker.publish(event("github.push" if n % 3 else "gitlab.push", n))
    consumer = await broker.consume("late", ["github.*"], start="beginning")
    await broker.publish(event("github.push", count))
    await broker.publish(event("gitlab.push", count + 1))
    expected = [n for n in range(count) if n % 3] + [count]
    assert numbers(await fetch(consumer, len(expected))) == expected
    listed = {s.name: s for s in await broker.subscriptions()}
    assert (listed["late"].backlog, listed["late"].lost) == (0, 0)


async def test_an_existing_group_ignores_its_start(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    consumer = await broker.consume("workers", ["github.push"])
    await consumer.close()
    await broker.publish(event(n=1))
    again = await broker.consume("workers", ["github.push"], start="beginning")
    await broker.publish(event(n=2))
    assert numbers(await fetch(again, 2)) == [1, 2]


async def test_no_event_published_while_a_group_is_made_is_lost(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    publisher = await open_rabbit()
    before = 3 * PREFETCH
    for n in range(before):
        await broker.publish(event(n=n))
    published: list[int] = []
    stop = asyncio.Event()
    reached: dict[int, asyncio.Event] = {50: asyncio.Event()}

    async def publish_meanwhile() -> None:
        n = before
        while not stop.is_set():
            await publisher.publish(event(n=n))
            published.append(n)
            if len(published) in reached:
                reached[len(published)].set()
            n += 1

    load = asyncio.create_task(publish_meanwhile())
    try:
        async with asyncio.timeout(10):
            await reached[50].wait()  # the load is under way before the group is made
        consumer = await broker.consume("late", ["github.push"], start="beginning")
        after = reached[len(published) + 50] = asyncio.Event()
        async with asyncio.timeout(10):
            await after.wait()  # and goes on after it is made
    finally:
        stop.set()
        await load
    expected = list(range(before)) + published
    got: list[int] = []
    async with asyncio.timeout(30):
        while not set(expected) <= set(got):
            batch = list(await consumer.fetch(200))
            await consumer.ack(batch)
            got += numbers(batch)
    counts = Counter(got)
    assert not [n for n, c in counts.items() if c > 2], "an event came more than twice"
    # What was kept before the making began comes first, in order, once.
    assert got[:before] == list(range(before))


@pytest.mark.parametrize("freeze", ["copying", "bound"])
async def test_a_making_cut_off_is_made_afresh_by_the_next_subscribe(
    open_rabbit: Opener, freeze: str
) -> None:
    doomed = await open_rabbit()
    kept = PREFETCH + 10
    for n in range(kept):
        await doomed.publish(event(n=n))
    queue = queue_name(doomed.settings.prefix, "group", "late")
    frozen = asyncio.Event()

    async def forever() -> None:
        frozen.set()
        await asyncio.Event().wait()

    # The process freezes in the middle of copying the history (the queue not bound yet), or
    # once the queue is filled and bound, before its last marker...
    if freeze == "copying":
        confirmed, copies = doomed._confirmed, 0

        async def copy_some(
            exchange: str, key: str, body: bytes, properties: Any, channel: Any = None
        ) -> None:
            nonlocal copies
            if key == queue:
                copies += 1
                if copies > PREFETCH // 2:
                    await forever()
            await confirmed(exchange, key, body, properties, channel)

        doomed._confirmed = copy_some  # type: ignore[method-assign]
    else:
        mark, marks = doomed._mark, 0

        async def mark_once() -> str:
            nonlocal marks
            marks += 1
            if marks == 2:
                await forever()
            return await mark()

        doomed._mark = mark_once  # type: ignore[method-assign]
    making = asyncio.create_task(doomed.consume("late", ["github.push"], start="beginning"))
    async with asyncio.timeout(10):
        await frozen.wait()
    # ... and is killed: its connection drops, and with it the lock of the making.
    await doomed.abandon()
    making.cancel()
    with pytest.raises((asyncio.CancelledError, Exception)):
        await making
    survivor = await open_rabbit()
    listed = {s.name: s for s in await survivor.subscriptions()}
    assert listed["late"].topics == ("github.push",)  # listed (and deletable) meanwhile
    assert 0 < listed["late"].backlog <= kept
    await survivor.publish(event(n=kept))
    consumer = await survivor.consume("late", ["github.push"], start="beginning")
    # Made afresh: the copies of the making cut off are gone, the history copied whole, bound.
    assert await survivor._ready(queue) == kept + 1
    await survivor.publish(event(n=kept + 1))
    assert numbers(await fetch(consumer, kept + 2)) == list(range(kept + 2))


async def test_two_servers_making_one_group_at_once_fill_it_once(open_rabbit: Opener) -> None:
    first, second = await open_rabbit(), await open_rabbit()
    for n in range(PREFETCH + 10):
        await first.publish(event(n=n))
    await asyncio.gather(
        first.consume("late", ["github.push"], start="beginning"),
        second.consume("late", ["github.push"], start="beginning"),
    )
    queue = queue_name(first.settings.prefix, "group", "late")
    assert await first._ready(queue) == PREFETCH + 10
    listed = await second.subscriptions()
    assert [(s.name, s.backlog) for s in listed] == [("late", PREFETCH + 10)]


async def test_a_failed_making_leaves_nothing_behind(open_rabbit: Opener) -> None:
    broker = await open_rabbit()
    await broker.publish(event(n=1))

    async def refuse(*_: Any) -> None:
        raise ConnectionError("cut")

    broker._bind = refuse  # type: ignore[method-assign]
    with pytest.raises(Exception, match="cut"):
        await broker.consume("late", ["github.push"], start="beginning")
    assert await broker.subscriptions() == []
    assert await broker._ready(queue_name(broker.settings.prefix, "group", "late")) is None


# -- the console's replay and callboard replay against real servers ---------------------------


async def test_the_consoles_replay_delivers_the_kept_events_again() -> None:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"cb_hist_{uuid.uuid4().hex[:12]}."
    inbox = Inbox()
    app = console_app(inbox, f"{RABBITMQ_URL}?prefix={prefix}&history=true")
    since = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    try:
        async with running(app) as client:
            for n in range(3):
                answer = await client.post("/api/events/http/plain", json={"n": n})
                assert answer.status_code == 202

            def received(count: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    return len(inbox.events) == count

                return check

            await until(received(3), "the events reached the inbox")
            confirmed = await client.post(
                "/console/replay",
                data={"subscription": "inbox", "since": since, "confirm": "yes"},
                headers=BEARER,
            )
            assert confirmed.status_code == 303
            assert "replayed+3+events" in confirmed.headers["location"]
            await until(received(6), "the replayed events reached the inbox")
            assert [e.payload["n"] for e in inbox.events] == [0, 1, 2, 0, 1, 2]
    finally:
        await drop_namespace(RABBITMQ_URL, prefix)


@pytest.fixture
def history_url() -> Iterator[str]:
    """A broker URL with history on, on a prefix of this test's own, deleted at the end."""
    with served_namespace("&history=true") as url:
        yield url


def callboard(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "callboard", *args, "--config", str(config)]
    return subprocess.run(
        command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=60
    )


async def handled_at_least(workdir: Path, wanted: dict[str, Counter[int]], fleet: Fleet) -> None:
    """Wait until each subscription handled each event at least as many times as ``wanted``."""
    deadline = time.monotonic() + 30
    while True:
        records = read_records(workdir)
        short = {
            name: {n: c for n, c in counts.items() if handled(records, name)[n] < c}
            for name, counts in wanted.items()
        }
        if not any(short.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not handled (enough): {short}\n{fleet.logs()}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_callboard_replay_delivers_the_kept_events_since_a_time_again(
    history_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, history_url)
    fleet = Fleet(tmp_path)
    try:
        async with httpx.AsyncClient() as client:
            (server,) = await fleet.start(config, client, count=1)
            for n in range(10):
                assert (await server.post(client, "jobs", n)).status_code == 202
            once = Counter(range(10))
            await handled_at_least(tmp_path, {"A": once, "B": once}, fleet)
            since = datetime.now(UTC)
            for n in range(10, 20):
                assert (await server.post(client, "jobs", n)).status_code == 202
            once = Counter(range(20))
            await handled_at_least(tmp_path, {"A": once, "B": once}, fleet)

            done = await asyncio.to_thread(
                callboard, config, "replay", "--subscription", "A", "--since", since.isoformat()
            )
            assert done.returncode == 0, done.stderr
            assert "replayed 10 events on ['jobs'] to A" in done.stdout

            again = once + Counter(range(10, 20))
            await handled_at_least(tmp_path, {"A": again}, fleet)
            # A last event flushes what the subscriptions have yet to handle.
            assert (await server.post(client, "jobs", 99)).status_code == 202
            await handled_at_least(tmp_path, {"A": Counter([99]), "B": Counter([99])}, fleet)
            records = read_records(tmp_path)
            assert handled(records, "A") == again + Counter([99])
            assert handled(records, "B") == once + Counter([99])
            # The replay's reading group is gone.
            listed = await asyncio.to_thread(callboard, config, "subscriptions")
            assert listed.returncode == 0, listed.stderr
            assert "replay." not in listed.stdout
            await fleet.stop_all()
    finally:
        fleet.kill_all()


@pytest.mark.parametrize("history", ["true", "false"])
async def test_a_queue_with_no_record_is_adopted_with_its_events(
    open_rabbit: Opener, history: str
) -> None:
    """What an earlier version left when killed between making a queue and recording it, or
    what every queue looks like once the registry queue is lost: kept, never deleted."""
    broker = await open_rabbit(history=history)
    queue = queue_name(broker.settings.prefix, "group", "workers")
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        made = await channel.declare_queue(
            queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await made.bind(f"{broker.settings.prefix}events", "github.push")
        for n in range(5):
            await broker.publish(event(n=n))
        consumer = await broker.consume("workers", ["github.push"])
        got: list[Delivery] = []
        while len(got) < 5:
            got += await asyncio.wait_for(consumer.fetch(5 - len(got)), 10)
        assert sorted(numbers(got)) == list(range(5))
        await consumer.ack(got)
        await consumer.close()
        (listed,) = [s for s in await broker.subscriptions() if s.name == "workers"]
        assert listed.topics == ("github.push",)
    finally:
        await connection.close()


async def test_a_made_subscription_leaves_one_record(open_rabbit: Opener) -> None:
    """Every read takes every record: the ``making`` record of a complete subscription is
    removed, so the registry holds one per subscription, as before making was recorded."""
    broker = await open_rabbit(history="false")
    for n in range(5):
        consumer = await broker.consume(f"g{n}", ["github.push"], owner="service=a")
        await consumer.close()
    await broker.subscriptions()  # a read, which drops the records said again since
    assert await broker._ready(f"{broker.settings.prefix}registry") == 5
