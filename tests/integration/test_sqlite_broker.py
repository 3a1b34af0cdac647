"""The SQLite broker beyond the contract: URLs, several processes, a killed process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callboard.brokers import open_broker, sqlite_store
from callboard.brokers.base import Delivery, RetentionPolicy
from callboard.brokers.sql.consumer import LeasedConsumer
from callboard.brokers.sqlite import SQLiteBroker
from callboard.cli import SERVE_BROKER, main
from callboard.config import load_config
from callboard.errors import ConfigError
from callboard.events import Event

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///callboard.db", "callboard.db"),
        ("sqlite:///data/cb.db", "data/cb.db"),
        ("sqlite:////var/lib/callboard/cb.db", "/var/lib/callboard/cb.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_urls_name_a_file(url: str, path: str) -> None:
    broker = open_broker(url, retention=RetentionPolicy(max_count=5))
    assert isinstance(broker, SQLiteBroker)
    assert broker.path == path
    assert broker.retention.max_count == 5
    assert broker.capabilities.durable is (path != ":memory:")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///x.db?journal=off"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SQLiteBroker.from_url(url)
    assert caught.value.path == "events.broker"


def test_serve_defaults_to_sqlite(tmp_path: Path) -> None:
    from callboard.cli import _load, _parser

    args = _parser().parse_args(["check-config"])
    assert _load(args).events.broker == SERVE_BROKER
    named = tmp_path / "memory.yaml"
    named.write_text("events:\n  broker: memory://\n")
    args = _parser().parse_args(["check-config", "-c", str(named)])
    assert _load(args).events.broker == "memory://"
    assert load_config().events.broker == "memory://"  # the library default is unchanged


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """``main()`` points logging at the captured stderr; put the test run's logging back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("keep_logging")
def test_migrate_command_creates_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "callboard.yaml"
    config.write_text(f"events:\n  broker: sqlite:///{tmp_path}/cb.db\n")
    assert main(["migrate", "-c", str(config)]) == 0
    assert "applied schema version 3" in capsys.readouterr().out
    assert (tmp_path / "cb.db").exists()
    assert main(["migrate", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "schema up to date"


async def test_a_version_1_store_is_upgraded_with_subscription_owners(tmp_path: Path) -> None:
    from callboard.brokers.sql import read_sql

    path = tmp_path / "v1.db"
    v1 = read_sql("sqlite", "schema.sql").replace(
        "updated_at REAL NOT NULL,", "updated_at REAL NOT NULL"
    )
    v1 = v1.replace("    owner TEXT\n", "").replace("user_version = 3", "user_version = 1")
    with sqlite3.connect(path) as connection:
        connection.executescript(v1)
        connection.execute(
            "INSERT INTO subscriptions (name, topics, position, created_at, updated_at)"
            " VALUES ('old', '[\"a\"]', 0, 0, 0)"
        )
    broker = SQLiteBroker(str(path))
    await broker.start()
    try:
        assert [(s.name, s.owner) for s in await broker.subscriptions()] == [("old", None)]
        consumer = await broker.consume("old", ["a"], owner="in-process")
        assert [(s.name, s.owner) for s in await broker.subscriptions()] == [("old", "in-process")]
        await consumer.close()
    finally:
        await broker.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (3,)


async def test_a_version_2_store_gets_its_event_id_index(tmp_path: Path) -> None:
    from callboard.brokers.base import EventQuery
    from callboard.brokers.sql import read_sql

    path = tmp_path / "v2.db"
    v2 = read_sql("sqlite", "schema.sql").replace("user_version = 3", "user_version = 2")
    v2 = v2.replace("CREATE INDEX IF NOT EXISTS events_id ON events (id);", "")
    with sqlite3.connect(path) as connection:
        connection.executescript(v2)
    broker = SQLiteBroker(str(path))
    await broker.start()
    try:
        sent = Event(topic="a", payload=1)
        await broker.publish(sent)
        page = await broker.find_events(EventQuery(event_id=sent.id))
        assert [stored.event for stored in page.events] == [sent]
    finally:
        await broker.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (3,)
        indexes = {row[1] for row in connection.execute("PRAGMA index_list(events)")}
        assert "events_id" in indexes


async def test_an_unwritable_store_is_reported_at_start(tmp_path: Path) -> None:
    from callboard.errors import BrokerUnavailable

    broker = SQLiteBroker(str(tmp_path / "missing" / "cb.db"))
    with pytest.raises(BrokerUnavailable, match="cannot be used"):
        await broker.start()


def _child(script: str, path: Path, *, capture: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(path)],
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        text=True,
        env=env,
    )


PUBLISHER = """
    import asyncio, sys
    from callboard.brokers.sqlite import SQLiteBroker
    from callboard.events import Event

    async def main():
        broker = SQLiteBroker(sys.argv[1])
        await broker.start()
        for n in range(300):
            await broker.publish(Event(topic="jobs", payload={"n": n, "by": sys.argv[2]}))
        await broker.close()

    sys.argv.append("{name}")
    asyncio.run(main())
"""


@pytest.mark.slow
async def test_processes_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "cb.db"
    broker = SQLiteBroker(str(path), poll_interval=0.05, watch_interval=0.01)
    await broker.start()
    try:
        consumer = await broker.consume("workers", ["jobs"])
        children = [_child(PUBLISHER.replace("{name}", name), path) for name in ("a", "b")]
        seen: dict[str, list[int]] = {"a": [], "b": []}
        async with asyncio.timeout(20):
            while sum(map(len, seen.values())) < 600:
                for delivery in await consumer.fetch(100):
                    seen[delivery.event.payload["by"]].append(delivery.event.payload["n"])
                    await consumer.ack((delivery,))
        for child in children:
            assert child.wait(10) == 0
        assert seen == {"a": list(range(300)), "b": list(range(300))}
    finally:
        await broker.close()


OPENER = """
    import asyncio, sys, time
    from callboard.brokers.sqlite import SQLiteBroker
    from callboard.events import Event

    async def main():
        time.sleep(max(0.0, {start} - time.time()))  # all children open the file together
        broker = SQLiteBroker(sys.argv[1])
        await broker.start()
        await broker.publish(Event(topic="jobs", payload={}))
        await broker.close()

    asyncio.run(main())
"""


@pytest.mark.slow
def test_processes_may_open_a_new_file_at_once(tmp_path: Path) -> None:
    """The second process to switch a new file to WAL is told it is busy, and waits."""
    import sqlite3
    import time

    for round in range(3):
        path = tmp_path / f"cb{round}.db"
        opener = OPENER.replace("{start}", repr(time.time() + 1.5))
        children = [_child(opener, path) for _ in range(8)]
        assert [child.wait(20) for child in children] == [0] * 8
        (count,) = sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()
        assert count == 8


WORKER = """
    import asyncio, sys
    from callboard.brokers.sqlite import SQLiteBroker
    from callboard.events import Event

    async def main():
        broker = SQLiteBroker(sys.argv[1], lease=0.5)
        await broker.start()
        consumer = await broker.consume("workers", ["jobs"])
        for n in range(100):
            await broker.publish(Event(topic="jobs", payload={"n": n}))
            print("published", n, flush=True)
        acked = 0
        while True:
            for delivery in await consumer.fetch(7):
                if acked < 40:
                    await consumer.ack((delivery,))
                    acked += 1
                    print("acked", delivery.event.payload["n"], flush=True)
            if acked >= 40:
                print("holding", flush=True)
                await asyncio.sleep(3600)

    asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_killed_process_loses_nothing_it_was_told_was_stored(tmp_path: Path) -> None:
    path = tmp_path / "cb.db"
    published: list[int] = []
    acked: list[int] = []
    with _child(WORKER, path, capture=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            word, _, number = line.partition(" ")
            if word == "published":
                published.append(int(number))
            elif word == "acked":
                acked.append(int(number))
            elif line.strip() == "holding":
                break
        child.send_signal(signal.SIGKILL)
    assert published == list(range(100))
    assert len(acked) == 40

    broker = SQLiteBroker(str(path), poll_interval=0.05)
    await broker.start()
    try:
        consumer = await broker.consume("workers", ["jobs"])
        received: list[int] = []
        async with asyncio.timeout(10):
            while len(received) < 60:
                received += [d.event.payload["n"] for d in await consumer.fetch(100)]
        assert sorted(received) == sorted(set(range(100)) - set(acked))
        listed = {s.name: s for s in await broker.subscriptions()}
        assert listed["workers"].in_flight == 60
    finally:
        await broker.close()


async def test_events_are_stored_as_json(tmp_path: Path) -> None:
    import sqlite3

    broker = SQLiteBroker(str(tmp_path / "cb.db"))
    await broker.start()
    await broker.publish(Event(topic="t", payload={"a": [1, 2]}, metadata={"k": ["x", "y"]}))
    await broker.close()
    with sqlite3.connect(tmp_path / "cb.db") as connection:
        payload, metadata = connection.execute("SELECT payload, metadata FROM events").fetchone()
    assert json.loads(payload) == {"a": [1, 2]}
    assert json.loads(metadata) == {"k": ["x", "y"]}


async def test_a_locked_file_holds_up_neither_the_loop_nor_the_publish(tmp_path: Path) -> None:
    """Another process's write lock: the group waits on the broker's thread, not on the loop."""
    import sqlite3

    path = tmp_path / "cb.db"
    broker = SQLiteBroker(str(path))
    await broker.start()
    try:
        await broker.publish(Event(topic="jobs", payload={"n": 0}))  # opens the file
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, as a writing process does
        publish = asyncio.ensure_future(broker.publish(Event(topic="jobs", payload={"n": 1})))
        ticks = 0
        for _ in range(20):  # the loop keeps running while the publish waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not publish.done()
        other.execute("COMMIT")
        other.close()
        assert await asyncio.wait_for(publish, 5) is True
        assert ticks == 20
        # Free again: the next group commits on the loop.
        assert await broker.publish(Event(topic="jobs", payload={"n": 2})) is True
    finally:
        await broker.close()
    stored = sqlite3.connect(path).execute("SELECT count(*) FROM events").fetchone()
    assert stored == (3,)


async def test_full_synchronous_commits_off_the_loop(tmp_path: Path) -> None:
    broker = SQLiteBroker.from_url(f"sqlite:///{tmp_path / 'cb.db'}?synchronous=full")
    await broker.start()
    try:
        assert not broker.sqlite.thread._inline
        assert await broker.publish(Event(topic="jobs", payload={})) is True
    finally:
        await broker.close()


# -- leases and a moving clock -------------------------------------------------------------------


class Clock:
    """A wall clock that can be set off, as an operator or a faulty host would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def _fetched(consumer: LeasedConsumer, count: int, timeout: float = 5.0) -> list[Delivery]:
    found: list[Delivery] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            found.extend(await consumer.fetch(count - len(found)))
    return found


def _sqlite(path: Path, clock: Clock) -> SQLiteBroker:
    return SQLiteBroker(str(path), lease=1.0, poll_interval=0.05, watch_interval=0.02, clock=clock)


async def test_leases_of_a_process_whose_clock_was_ahead_run_out(tmp_path: Path) -> None:
    """A process restarted with its clock an hour behind still gets the dead one's events."""
    path = tmp_path / "events.db"
    right, behind = Clock(), Clock()
    behind.offset = -3600.0
    before = _sqlite(path, right)
    await before.start()
    doomed = await before.consume("workers", ["jobs"])
    for n in range(3):
        await before.publish(Event(topic="jobs", payload=n))
    held = await _fetched(doomed, 3)
    await before.abandon()  # killed: its leases end a lease from now, an hour ahead of `after`
    after = _sqlite(path, behind)
    await after.start()
    try:
        consumer = await after.consume("workers", ["jobs"])
        again = await _fetched(consumer, 3)
        assert [d.event for d in again] == [d.event for d in held]
        assert {d.attempt for d in again} == {2}
        await consumer.ack(again)
        assert (await after.subscriptions())[0].in_flight == 0
    finally:
        await after.close()


async def test_a_clock_that_jumps_ahead_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Leases run out early: another consumer gets the event again, and the late ack says so."""
    clock = Clock()
    broker = _sqlite(tmp_path / "events.db", clock)
    await broker.start()
    try:
        slow = await broker.consume("workers", ["jobs"])
        await broker.publish(Event(topic="jobs", payload=1))
        (held,) = await _fetched(slow, 1)
        clock.offset = 3600.0  # every lease ran out at once
        other = await broker.consume("workers", ["jobs"])
        (again,) = await _fetched(other, 1)
        assert again.event == held.event
        assert again.attempt == 2
        with caplog.at_level(logging.WARNING, logger="callboard.brokers"):
            await slow.ack((held,))  # too late: the other consumer holds the event now
        assert "after its lease ran out" in caplog.text
        await other.ack((again,))
        await broker.publish(Event(topic="jobs", payload=2))
        (fresh,) = await _fetched(other, 1)
        assert fresh.event.payload == 2  # the first event is done with, not handed out again
        await other.ack((fresh,))
        (info,) = await broker.subscriptions()
        assert (info.in_flight, info.backlog) == (0, 0)
    finally:
        await broker.close()


async def test_an_expired_lease_still_held_is_acknowledged(tmp_path: Path) -> None:
    """A lease that ran out early but went to nobody else still counts when acknowledged."""
    clock = Clock()
    broker = _sqlite(tmp_path / "events.db", clock)
    await broker.start()
    try:
        consumer = await broker.consume("workers", ["jobs"])
        await broker.publish(Event(topic="jobs", payload=1))
        (held,) = await _fetched(consumer, 1)
        clock.offset = 3600.0
        await consumer.ack((held,))
        (info,) = await broker.subscriptions()
        assert (info.in_flight, info.backlog) == (0, 0)
    finally:
        await broker.close()


async def test_a_release_wakes_the_group_at_once(tmp_path: Path) -> None:
    """Not at the next poll (30 s here): the broker wakes the group's members when it hands
    leases back. (What a release means is the contract suite's to check.)"""
    broker = SQLiteBroker(str(tmp_path / "events.db"), poll_interval=30.0)
    await broker.start()
    try:
        one = await broker.consume("workers", ["jobs"])
        two = await broker.consume("workers", ["jobs"])
        await broker.publish(Event(topic="jobs", payload=1))
        held = await _fetched(one, 1)
        waiting = asyncio.ensure_future(two.fetch(10))
        await broker.publish(Event(topic="other", payload=None))  # lets `two` claim nothing
        await one.release(held)
        (again,) = await asyncio.wait_for(waiting, 5)
        assert (again.event.payload, again.attempt) == (1, 2)
    finally:
        await broker.close()


# -- retention: a pass costs what it deletes, off the event loop, logged once --------------------


def _store_events(path: Path, ages: list[float], topic: str = "jobs") -> None:
    """Events stored ``ages`` seconds ago, in that seq order (the clocks of several processes
    need not agree, so ages need not fall with seq)."""
    connection = sqlite_store.connect(str(path), synchronous="normal", busy_timeout=1.0)
    try:
        sqlite_store.migrate(connection)
        now = time.time()
        connection.executemany(
            "INSERT INTO events (id, topic, target, delivery_id, time_us, stored_at, payload, "
            "metadata) VALUES (?, ?, NULL, NULL, 0, ?, ?, '{}')",
            [(f"e{n}", topic, now - age, str(n)) for n, age in enumerate(ages, 1)],
        )
    finally:
        connection.close()


def _stored_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as connection:
        return [seq for (seq,) in connection.execute("SELECT seq FROM events ORDER BY seq")]


def _age(path: Path, seconds: float) -> None:
    """Make every stored event ``seconds`` older."""
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE events SET stored_at = stored_at - ?", (seconds,))


def _steps_of_a_pass(path: Path, policy: RetentionPolicy) -> tuple[int, int]:
    """A retention pass run by the store's own operations: events deleted, SQLite VM steps."""
    connection = sqlite_store.connect(str(path), synchronous="normal", busy_timeout=1.0)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection.set_progress_handler(count, 10)
    try:
        deleted, after = 0, 0
        bounds = sqlite_store.expire_range(connection, policy)
        while bounds is not None:
            expired = sqlite_store.expire(connection, policy, bounds, after)
            deleted += expired.deleted
            if expired.resume is None:
                break
            after = expired.resume
    finally:
        connection.close()
    return deleted, steps


def test_a_retention_pass_reads_what_it_deletes_not_what_it_keeps(tmp_path: Path) -> None:
    """The work of a pass (SQLite's VM steps, which follow the rows read) is the same beside a
    thousand kept events as beside fifty thousand: old by age, old by count, and young ones
    kept by ``min_age`` although beyond the count."""
    policy = RetentionPolicy(min_age=600, max_age=3600, max_count=50, batch_size=40)
    steps = []
    for kept in (1_000, 50_000):
        path = tmp_path / f"{kept}.db"
        # 100 older than max_age, 100 older than min_age, then `kept` younger than min_age.
        _store_events(path, [7200.0] * 100 + [1200.0] * 100 + [0.0] * kept)
        deleted, spent = _steps_of_a_pass(path, policy)
        assert deleted == 200
        assert _stored_seqs(path) == list(range(201, 201 + kept))
        steps.append(spent)
    assert steps[1] < steps[0] * 1.2, steps


async def test_retention_never_deletes_an_event_younger_than_allowed(tmp_path: Path) -> None:
    """``stored_at`` only nearly grows with seq (processes' clocks differ): the range of a pass
    is a bound, and each event's own age decides."""
    path = tmp_path / "events.db"
    # By age: seqs 1-20 two hours old but 5 and 12 young; 21-30 young but 25 old.
    ages = [7200.0 - n for n in range(1, 21)] + [0.0] * 10
    ages[4] = ages[11] = 0.0
    ages[24] = 7100.0
    _store_events(path, ages)
    broker = SQLiteBroker(
        str(path),
        retention=RetentionPolicy(min_age=60, max_age=3600, max_count=1_000, batch_size=4),
    )
    await broker.start()
    try:
        assert await broker.clean() == 19
        assert _stored_seqs(path) == [5, 12, *range(21, 25), *range(26, 31)]
        # By count: everything older than min_age beyond the newest 3, young ones kept.
        _age(path, 120.0)
        with sqlite3.connect(path) as connection:
            connection.execute(
                "UPDATE events SET stored_at = ? WHERE seq IN (12, 22)", (time.time(),)
            )
        broker.retention = RetentionPolicy(min_age=60, max_age=86_400, max_count=3, batch_size=2)
        assert await broker.clean() == 6
        assert _stored_seqs(path) == [12, 22, 28, 29, 30]
    finally:
        await broker.close()


async def test_retention_counts_what_each_group_lost_and_logs_a_pass_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over many batches: events beyond a group's position that it reads (or that were
    delivered to it alone), and events it holds unacknowledged; one warning per group with its
    total, one line for the pass."""
    broker = SQLiteBroker(
        str(tmp_path / "events.db"),
        retention=RetentionPolicy(min_age=0, max_age=3600, max_count=0, batch_size=3),
    )
    await broker.start()
    try:
        both = await broker.consume("both", ["a", "b"])
        await broker.consume("only-a", ["a"])
        done = await broker.consume("done", ["a", "b"])
        for n in range(12):
            await broker.publish(Event(topic="ab"[n % 2], payload=n))
        await broker.deliver_to("only-a", Event(topic="b", payload="redriven"))
        await broker.deliver_to("done", Event(topic="b", payload="redriven"))
        received = await _fetched(both, 4)
        await both.ack(received[:2])  # events 3 and 4 stay leased
        await done.ack(await _fetched(done, 13))
        with caplog.at_level(logging.DEBUG, logger="callboard.brokers"):
            assert await broker.clean() == 14
        lost = {s.name: s.lost for s in await broker.subscriptions()}
        # both: 2 leased + 8 not handed out; only-a: 6 of topic a + 1 delivered to it alone.
        assert lost == {"both": 10, "only-a": 7, "done": 0}
    finally:
        await broker.close()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("callboard.brokers")]
    retention = [line for line in lines if "retention" in line]
    assert len(retention) == 3, retention
    assert "'both' fell behind the retained window: retention deleted 10 events" in retention[0]
    assert "'only-a' fell behind the retained window: retention deleted 7 events" in retention[1]
    assert retention[2].startswith("retention deleted 14 events from the SQLite broker")
    assert "(5 batches; 17 events lost by 2 subscriptions); done" in retention[2]


async def test_a_retention_batch_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch waits, on the store's thread, for the event loop to run another task: inline
    on the loop it would wait in vain."""
    turns = 0
    during: list[bool] = []
    expire = sqlite_store.expire

    def watched(connection: sqlite3.Connection, *args: Any) -> Any:
        seen = turns
        give_up = time.monotonic() + 5.0
        while turns == seen and time.monotonic() < give_up:
            time.sleep(0.001)
        during.append(turns != seen)
        return expire(connection, *args)

    monkeypatch.setattr(sqlite_store, "expire", watched)
    path = tmp_path / "events.db"
    _store_events(path, [7200.0] * 30)
    broker = SQLiteBroker(
        str(path), retention=RetentionPolicy(min_age=60, max_age=3600, batch_size=10)
    )
    await broker.start()
    stop = asyncio.Event()

    async def spin() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    spinner = asyncio.create_task(spin())
    try:
        assert await broker.clean() == 30
    finally:
        stop.set()
        await spinner
        await broker.close()
    assert during == [True, True, True]


async def test_leases_stay_alive_through_a_long_retention_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass lasting two leases (its batches slowed down here): renewals go between its
    batches, so at each batch the handled event's lease is still running."""
    lease, batches = 0.3, 20
    alive: list[bool] = []
    expire = sqlite_store.expire

    def slow(connection: sqlite3.Connection, *args: Any) -> Any:
        time.sleep(2 * lease / batches)
        (expires_at,) = connection.execute("SELECT expires_at FROM leases").fetchone()
        alive.append(expires_at > time.time())
        return expire(connection, *args)

    path = tmp_path / "events.db"
    _store_events(path, [7200.0] * batches)
    broker = SQLiteBroker(
        str(path),
        lease=lease,
        poll_interval=0.05,
        retention=RetentionPolicy(min_age=60, max_age=3600, batch_size=1),
    )
    await broker.start()
    try:
        consumer = await broker.consume("workers", ["jobs"])
        await broker.publish(Event(topic="jobs", payload="young"))
        (held,) = await _fetched(consumer, 1)
        monkeypatch.setattr(sqlite_store, "expire", slow)
        assert await broker.clean() == batches
        assert alive == [True] * batches
        await consumer.ack((held,))
        (info,) = await broker.subscriptions()
        assert (info.in_flight, info.lost) == (0, 0)
    finally:
        await broker.close()


async def test_the_log_is_copied_back_off_the_write_path(tmp_path: Path) -> None:
    """Commits never checkpoint (a publish would pay for it); the broker's checkpoint thread does."""
    path = tmp_path / "cb.db"
    broker = SQLiteBroker(str(path))
    await broker.start()
    try:
        written = await asyncio.gather(
            *(
                broker.publish(Event(topic="big", payload={"n": n, "pad": "x" * 2_000}))
                for n in range(2_000)
            )
        )
        assert all(written)
        # About 4 MB went to the log; the database file holds them once a checkpoint ran.
        for _ in range(100):
            if path.stat().st_size >= 3_000_000:
                break
            await asyncio.sleep(0.05)
        assert path.stat().st_size >= 3_000_000
    finally:
        await broker.close()
    with sqlite3.connect(path) as connection:
        (pages,) = connection.execute("PRAGMA wal_autocheckpoint").fetchone()
    assert pages == 1_000  # a connection's own setting: other programs keep SQLite's default
