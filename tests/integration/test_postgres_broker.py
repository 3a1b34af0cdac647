"""The PostgreSQL broker beyond the contract: URLs, migrations, notifications, outages."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from callboard.brokers import open_broker
from callboard.brokers.base import RetentionPolicy
from callboard.cli import main
from callboard.errors import BrokerError, BrokerUnavailable, InvalidEventError
from callboard.events import Event
from tests.integration.servers import TcpProxy
from tests.services import (
    POSTGRES_URL,
    drop_postgres_schema,
    postgres_execute,
    postgres_rows,
    require_service,
)

pytestmark = pytest.mark.postgres

pytest.importorskip("asyncpg")

from callboard.brokers import postgres_ops as ops  # noqa: E402
from callboard.brokers.postgres import PostgresBroker  # noqa: E402
from callboard.brokers.postgres_ops import Queries, numbered, pattern_regex  # noqa: E402
from callboard.brokers.sql import StoredEvent, encode_event, read_sql  # noqa: E402
from callboard.brokers.sql.retention import RetentionRange  # noqa: E402


@pytest.fixture
def schema() -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"callboard_test_{uuid.uuid4().hex[:12]}"
    yield name
    drop_postgres_schema(name)


def test_urls_name_a_database_and_a_schema() -> None:
    broker = open_broker(
        "postgresql://postgres@db:5432/events?schema=cb&sslmode=require",
        retention=RetentionPolicy(max_count=7),
    )
    assert isinstance(broker, PostgresBroker)
    assert broker.schema == "cb"
    assert broker.conninfo == "postgresql://postgres@db:5432/events?sslmode=require"
    assert broker.retention.max_count == 7
    assert PostgresBroker.from_url("postgres://h/db").schema == "callboard"


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("github.push", ["github.push"], ["github.pushed", "github", "githubXpush"]),
        ("github.*", ["github.push", "github.a:b"], ["github", "github.a.b"]),
        ("gitlab.>", ["gitlab.a", "gitlab.a.b"], ["gitlab", "gitlabs.a"]),
        ("*", ["plain"], ["$deadletter", "a.b"]),
        (">", ["a", "a.b"], ["$deadletter.x"]),
        ("$deadletter.x", ["$deadletter.x"], ["$deadletter.y"]),
    ],
)
async def test_patterns_match_in_sql_as_in_python(
    pattern: str, matches: list[str], misses: list[str]
) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    regex = pattern_regex(pattern)
    for topic in matches + misses:
        ((hit,),) = await postgres_rows("SELECT $1::text ~ $2::text", topic, regex)
        assert hit is (topic in matches), (pattern, topic)


async def test_migrations_build_what_schema_sql_describes(schema: str) -> None:
    migrated = PostgresBroker(POSTGRES_URL, schema=schema)
    assert await migrated.migrate() == [
        "0001_init.sql",
        "0002_operations.sql",
        "0003_leased_batches.sql",
        "0004_plain_publish.sql",
        "0005_subscription_owner.sql",
        "0006_event_ids.sql",
    ]
    assert await migrated.migrate() == []
    reference = schema + "_ref"
    text = read_sql("postgres", "schema.sql")
    try:
        await postgres_execute(f'CREATE SCHEMA "{reference}"')
        await postgres_execute(text.replace("{schema}", f'"{reference}"'))

        async def shape(name: str) -> list[tuple[Any, ...]]:
            columns = await postgres_rows(
                "SELECT table_name, column_name, data_type, is_nullable, column_default"
                " FROM information_schema.columns WHERE table_schema = $1"
                " AND table_name <> 'migrations' ORDER BY 1, 2",
                name,
            )
            indexes = await postgres_rows(
                "SELECT indexname, replace(indexdef, $1, 'S') FROM pg_indexes"
                " WHERE schemaname = $2 AND tablename <> 'migrations' ORDER BY 1",
                name,
                name,
            )
            functions = await postgres_rows(
                "SELECT p.proname, replace(pg_get_functiondef(p.oid), $1, 'S') FROM pg_proc AS p"
                " JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = $2"
                " ORDER BY 1",
                name,
                name,
            )
            return columns + indexes + functions

        assert await shape(schema) == await shape(reference)
    finally:
        await postgres_execute(f'DROP SCHEMA IF EXISTS "{reference}" CASCADE')


async def test_a_schema_migrated_by_a_newer_callboard_is_refused(schema: str) -> None:
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.migrate()
    await postgres_execute(
        f"INSERT INTO \"{schema}\".migrations (name) VALUES ('9999_from_the_future.sql')"
    )
    with pytest.raises(BrokerError, match=r"9999_from_the_future\.sql.*a newer callboard"):
        await broker.migrate()


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """``main()`` points logging at the captured stderr; put the test run's logging back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("keep_logging")
def test_migrate_command(schema: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "callboard.yaml"
    config.write_text(f"events:\n  broker: {POSTGRES_URL}?schema={schema}\n")
    assert main(["migrate", "-c", str(config)]) == 0
    assert (
        "applied 0001_init.sql, 0002_operations.sql, 0003_leased_batches.sql, "
        "0004_plain_publish.sql" in capsys.readouterr().out
    )
    assert main(["migrate", "-c", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "schema up to date"


async def test_an_unreachable_server_fails_fast() -> None:
    broker = PostgresBroker("postgresql://postgres@127.0.0.1:1/postgres", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.start()
    assert time.monotonic() - started < 3


async def test_notifications_wake_other_instances(schema: str) -> None:
    # Polls far apart: only a notification can deliver within the deadline below.
    one = PostgresBroker(POSTGRES_URL, schema=schema, poll_interval=30)
    two = PostgresBroker(POSTGRES_URL, schema=schema, poll_interval=30)
    await one.start()
    await two.start()
    try:
        consumer = await two.consume("workers", ["jobs"])
        await asyncio.sleep(0.2)  # the listener connects in the background
        fetched = asyncio.create_task(consumer.fetch(10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await one.publish(Event(topic="jobs", payload=1))
        (delivery,) = await asyncio.wait_for(fetched, 2)
        assert delivery.event.payload == 1
        assert time.monotonic() - started < 1
    finally:
        await one.close()
        await two.close()


async def backends(application: str) -> list[int]:
    rows = await postgres_rows(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = 'postgres'",
        application,
    )
    return [pid for (pid,) in rows]


async def test_the_broker_recovers_when_its_connections_are_killed(schema: str) -> None:
    broker = PostgresBroker(POSTGRES_URL, schema=schema, poll_interval=0.1, timeout=1)
    await broker.start()
    try:
        consumer = await broker.consume("workers", ["jobs"])
        await asyncio.sleep(0.3)
        before = set(await backends("callboard-listener"))
        for pid in set(await backends("callboard")) | before:
            await postgres_rows("SELECT pg_terminate_backend($1)", pid)
        outcomes: list[bool | None] = []
        for n in range(20):
            try:
                outcomes.append(await broker.publish(Event(topic="jobs", payload=n)))
            except BrokerUnavailable:
                outcomes.append(None)
            await asyncio.sleep(0.05)
        assert outcomes[-5:] == [True] * 5
        published = [n for n, ok in enumerate(outcomes) if ok]
        received: list[int] = []
        async with asyncio.timeout(5):
            while len(received) < len(published):
                for delivery in await consumer.fetch(50):
                    received.append(delivery.event.payload)
                    await consumer.ack((delivery,))
        assert received == published
        for _ in range(50):
            if set(await backends("callboard-listener")) - before:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the listener did not reconnect")
    finally:
        await broker.close()


async def test_the_health_check_fails_during_an_outage_and_passes_once_it_is_over(
    schema: str,
) -> None:
    """PostgreSQL behind a proxy that is cut (connections dropped, new ones refused), then
    restored: the same broker, not restarted, passes its check again."""
    parts = urlsplit(POSTGRES_URL)
    proxy = TcpProxy("127.0.0.1", parts.port or 5432)
    await proxy.start()
    proxied = urlunsplit(
        parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{proxy.port}")
    )
    broker = PostgresBroker(proxied, schema=schema, timeout=1)
    try:
        with pytest.raises(BrokerUnavailable, match="not running"):
            await broker.check()
        await broker.start()
        await broker.check()
        await proxy.cut()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="PostgreSQL"):
            await broker.check()
        assert time.monotonic() - began < 3
        await proxy.restore()
        deadline = time.monotonic() + 10
        while True:
            try:
                await broker.check()
                break
            except BrokerUnavailable:
                assert time.monotonic() < deadline, "the check never passed again"
                await asyncio.sleep(0.2)
        # A partition: connections stay open and nothing answers. The check gives up in time.
        proxy.stall()
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="PostgreSQL"):
            await broker.check()
        assert time.monotonic() - began < 4
    finally:
        proxy.flow()
        await broker.close()
        await proxy.close()


async def test_group_commit_batches_concurrent_publishes(schema: str) -> None:
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        await broker.consume("all", ["load.*"])
        started = time.monotonic()
        accepted = await asyncio.gather(
            *(broker.publish(Event(topic="load.test", payload=n)) for n in range(2000))
        )
        elapsed = time.monotonic() - started
        assert all(accepted)
        ((stored,),) = await postgres_rows(f'SELECT count(*) FROM "{schema}".events')
        assert stored == 2000
        assert elapsed < 5, f"2000 concurrent publishes took {elapsed:.1f}s"
    finally:
        await broker.close()


class Leasing:
    """The broker's claim and ack functions called directly, in a migrated schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def claim(self, consumer: str, limit: int = 10) -> list[tuple[int, int]]:
        rows = await postgres_rows(
            f'SELECT r_seq, r_attempt FROM "{self.schema}".claim($1, $2, $3, 30.0)',
            "workers",
            consumer,
            limit,
        )
        return [(seq, attempt) for seq, attempt in rows]

    async def ack(self, consumer: str, *seqs: int) -> list[int]:
        rows = await postgres_rows(
            f'SELECT r_seq FROM "{self.schema}".ack($1, $2, $3)',
            ["workers"] * len(seqs),
            list(seqs),
            [consumer] * len(seqs),
        )
        return sorted(seq for (seq,) in rows)

    async def run_out(self) -> None:
        for table in ("leased_batches", "leases"):
            await postgres_execute(
                f"UPDATE \"{self.schema}\".{table} SET expires_at = now() - interval '1s'"
            )

    async def batches(self) -> list[tuple[str, list[int]]]:
        rows = await postgres_rows(
            f'SELECT consumer, pending FROM "{self.schema}".leased_batches ORDER BY first_seq'
        )
        return [(consumer, list(pending)) for consumer, pending in rows]

    async def leases(self) -> list[tuple[int, str, int]]:
        rows = await postgres_rows(
            f'SELECT seq, consumer, attempt FROM "{self.schema}".leases ORDER BY seq'
        )
        return [(seq, consumer, attempt) for seq, consumer, attempt in rows]


async def leasing(schema: str, events: int) -> tuple[Leasing, list[int]]:
    """A schema with the group ``workers`` and ``events`` events for it; their seqs."""
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        await broker.consume("workers", ["jobs"])
        await broker.abandon()
    finally:
        await broker.close()
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        for n in range(events):
            await broker.publish(Event(topic="jobs", payload=n))
    finally:
        await broker.close()
    rows = await postgres_rows(f'SELECT seq FROM "{schema}".events ORDER BY seq')
    return Leasing(schema), [seq for (seq,) in rows]


async def test_new_events_are_leased_as_one_batch_until_acknowledged(schema: str) -> None:
    leasing_, seqs = await leasing(schema, 5)
    assert await leasing_.claim("c1") == [(seq, 1) for seq in seqs]
    assert await leasing_.batches() == [("c1", seqs)]
    assert await leasing_.leases() == []
    assert await leasing_.ack("c1", seqs[0], seqs[3]) == [seqs[0], seqs[3]]
    assert await leasing_.batches() == [("c1", [seqs[1], seqs[2], seqs[4]])]
    # Not held: acknowledged already, or by a consumer that does not hold them.
    assert await leasing_.ack("c1", seqs[0]) == []
    assert await leasing_.ack("c2", seqs[1]) == []
    assert await leasing_.ack("c1", seqs[1], seqs[2], seqs[4]) == [seqs[1], seqs[2], seqs[4]]
    assert await leasing_.batches() == []
    assert await leasing_.claim("c1") == []


async def test_a_batch_that_ran_out_is_handed_out_again_event_by_event(schema: str) -> None:
    leasing_, seqs = await leasing(schema, 4)
    await leasing_.claim("c1")
    assert await leasing_.ack("c1", seqs[1]) == [seqs[1]]
    await leasing_.run_out()
    # The claim splits the batch; what it has no room for stays with c1, run out.
    assert await leasing_.claim("c2", limit=1) == [(seqs[0], 2)]
    assert await leasing_.batches() == []
    assert await leasing_.leases() == [(seqs[0], "c2", 2), (seqs[2], "c1", 1), (seqs[3], "c1", 1)]
    # c1 is late but nobody took seqs[2] yet: its acknowledgement counts. seqs[0] is c2's now.
    assert await leasing_.ack("c1", seqs[0], seqs[2]) == [seqs[2]]
    assert await leasing_.claim("c2") == [(seqs[3], 2)]
    assert await leasing_.ack("c2", seqs[0], seqs[3]) == [seqs[0], seqs[3]]
    assert await leasing_.leases() == []


async def test_a_batch_handed_back_goes_to_the_next_claim(schema: str) -> None:
    leasing_, seqs = await leasing(schema, 3)
    await leasing_.claim("c1")
    assert await leasing_.ack("c1", seqs[0]) == [seqs[0]]
    ((count,),) = await postgres_rows(
        f'SELECT count(*) FROM "{schema}".leased_batches WHERE consumer = $1', "c1"
    )
    assert count == 1
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        listed = {s.name: s for s in await broker.subscriptions()}
        assert (listed["workers"].in_flight, listed["workers"].backlog) == (2, 0)
        assert await broker.postgres.run(ops.release, "workers", "c1", None)
        listed = {s.name: s for s in await broker.subscriptions()}
        assert (listed["workers"].in_flight, listed["workers"].backlog) == (0, 2)
    finally:
        await broker.close()
    assert await leasing_.claim("c2") == [(seqs[1], 2), (seqs[2], 2)]


async def test_events_released_from_a_batch_are_handed_out_again_first(schema: str) -> None:
    leasing_, seqs = await leasing(schema, 4)
    await leasing_.claim("c1")
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        release = [seqs[1], seqs[3]]
        assert not await broker.postgres.run(ops.release, "workers", "c2", release)  # not c2's
        assert await broker.postgres.run(ops.release, "workers", "c1", release)
        assert await leasing_.batches() == [("c1", [seqs[0], seqs[2]])]
        assert [(seq, consumer) for seq, consumer, _ in await leasing_.leases()] == [
            (seqs[1], None),
            (seqs[3], None),
        ]
        listed = {s.name: s for s in await broker.subscriptions()}
        assert (listed["workers"].in_flight, listed["workers"].backlog) == (2, 2)
    finally:
        await broker.close()
    assert await leasing_.claim("c2") == [(seqs[1], 2), (seqs[3], 2)]
    # The rest of the batch is still c1's: its acknowledgements count.
    assert await leasing_.ack("c1", seqs[0], seqs[1], seqs[2]) == [seqs[0], seqs[2]]


async def test_the_broker_learns_which_acknowledgements_found_their_lease(schema: str) -> None:
    leasing_, seqs = await leasing(schema, 3)
    await leasing_.claim("c1")
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        acks = [("workers", "c1", seqs[0]), ("workers", "c2", seqs[1]), ("workers", "c1", seqs[2])]
        assert await broker.postgres.run(ops.ack, acks) == [True, False, True]
        assert await broker.postgres.run(ops.ack, acks[:1]) == [False]
    finally:
        await broker.close()
    assert await leasing_.batches() == [("c1", [seqs[1]])]


async def connect() -> Any:
    import asyncpg

    return await asyncpg.connect(POSTGRES_URL)


@pytest.mark.parametrize(
    ("first", "second", "held"),
    [
        # The second acknowledgement finishes the batch the first one shrank.
        ((0,), (1, 2), [1, 2]),
        # The same event twice: held once.
        ((0,), (0,), []),
    ],
)
async def test_concurrent_acknowledgements_of_a_batch_add_up(
    schema: str, first: tuple[int, ...], second: tuple[int, ...], held: list[int]
) -> None:
    leasing_, seqs = await leasing(schema, 3)
    await leasing_.claim("c1")
    sql = f'SELECT r_seq FROM "{schema}".ack($1, $2, $3)'

    def args(*picked: int) -> list[Any]:
        return [["workers"] * len(picked), [seqs[n] for n in picked], ["c1"] * len(picked)]

    one, two = await connect(), await connect()
    try:
        transaction = one.transaction()
        await transaction.start()
        assert sorted(r[0] for r in await one.fetch(sql, *args(*first))) == [seqs[n] for n in first]
        later = asyncio.ensure_future(two.fetch(sql, *args(*second)))
        await asyncio.sleep(0.3)
        assert not later.done()  # waits for the first acknowledgement's lock
        await transaction.commit()
        assert sorted(r[0] for r in await later) == [seqs[n] for n in held]
    finally:
        await one.close()
        await two.close()
    left = [seqs[n] for n in range(3) if n not in first + second]
    assert await leasing_.batches() == ([("c1", left)] if left else [])


async def test_a_claim_does_not_wait_for_a_batch_that_retention_holds(schema: str) -> None:
    leasing_, seqs = await leasing(schema, 3)
    await leasing_.claim("c1")
    await leasing_.run_out()
    retention = await connect()
    try:
        transaction = retention.transaction()
        await transaction.start()
        await retention.execute(
            f'SELECT 1 FROM "{schema}".leased_batches FOR UPDATE'  # as split_batches does
        )
        # The claim takes the group's row; the batch it cannot lock is left for the next one.
        assert await asyncio.wait_for(leasing_.claim("c2"), 2) == []
        await retention.execute(
            f'UPDATE "{schema}".subscriptions SET lost = lost + 1 WHERE name = $1', "workers"
        )
        await transaction.commit()
    finally:
        await retention.close()
    assert await leasing_.claim("c2") == [(seq, 2) for seq in seqs]


async def test_deleting_a_subscription_during_a_claim_leaves_nothing_behind(schema: str) -> None:
    leasing_, _ = await leasing(schema, 3)
    claiming = await connect()
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        transaction = claiming.transaction()
        await transaction.start()
        await claiming.fetch(f'SELECT * FROM "{schema}".claim($1, $2, 10, 30.0)', "workers", "c1")
        deleting = asyncio.ensure_future(broker.postgres.run(ops.delete_subscription, "workers"))
        await asyncio.sleep(0.3)
        assert not deleting.done()  # waits for the claim
        await transaction.commit()
        assert await deleting is True
    finally:
        await claiming.close()
        await broker.close()
    assert (await leasing_.batches(), await leasing_.leases()) == ([], [])


async def test_retention_counts_leased_events_it_deletes_as_lost(schema: str) -> None:
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=1, batch_size=10)
    leasing_, seqs = await leasing(schema, 3)
    await leasing_.claim("c1")
    await leasing_.ack("c1", seqs[0])
    broker = PostgresBroker(POSTGRES_URL, schema=schema, retention=policy)
    await broker.start()
    try:
        assert await broker.clean() == 2
        listed = {s.name: s for s in await broker.subscriptions()}
        assert (listed["workers"].lost, listed["workers"].in_flight) == (1, 1)
    finally:
        await broker.close()
    assert await leasing_.batches() == []
    assert await leasing_.leases() == [(seqs[2], "c1", 1)]
    assert await leasing_.ack("c1", seqs[2]) == [seqs[2]]


def test_queries_are_bound_to_the_schema() -> None:
    queries = Queries("cb")
    assert queries.channel == "callboard.cb"
    assert len({queries.publish_lock, queries.migrate_lock, queries.clean_lock}) == 3


def test_named_parameters_are_numbered_for_asyncpg() -> None:
    statement = numbered("SELECT %(a)s, %(b)s::bigint, %(a)s, 100%% FROM t WHERE x = %(c)s")
    assert statement.text == "SELECT $1, $2::bigint, $1, 100% FROM t WHERE x = $3"
    assert statement.names == ("a", "b", "c")
    assert statement.args({"c": 3, "a": 1, "b": 2, "unused": 4}) == [1, 2, 3]
    queries = Queries('we"ird')
    for name in ("publish", "claim", "ack", "join", "expire"):
        assert "%" not in queries[name].text, name
        assert '"we""ird".' in queries[name].text, name


async def test_leases_left_ahead_by_the_servers_clock_run_out_within_a_lease(schema: str) -> None:
    """The server's clock moved back an hour after a dead instance's claim: not an hour's wait."""
    dead = PostgresBroker(POSTGRES_URL, schema=schema, lease=0.6, poll_interval=0.05)
    live = PostgresBroker(POSTGRES_URL, schema=schema, lease=0.6, poll_interval=0.05)
    await dead.start()
    await live.start()
    try:
        doomed = await dead.consume("workers", ["jobs"])
        for n in range(3):
            await dead.publish(Event(topic="jobs", payload=n))
        held: list[Any] = []
        async with asyncio.timeout(5):
            while len(held) < 3:
                held.extend(await doomed.fetch(3 - len(held)))
        await dead.abandon()
        for table in ("leased_batches", "leases"):
            await postgres_execute(
                f"UPDATE \"{schema}\".{table} SET expires_at = now() + interval '1 hour'"
            )
        consumer = await live.consume("workers", ["jobs"])
        again: list[Any] = []
        async with asyncio.timeout(5):
            while len(again) < 3:
                again.extend(await consumer.fetch(3 - len(again)))
        assert sorted(d.event.payload for d in again) == [0, 1, 2]
        assert {d.attempt for d in again} == {2}
    finally:
        await live.close()
        await dead.close()


async def test_data_the_server_refuses_fails_only_its_own_publish(schema: str) -> None:
    """What the broker's own checks let through to the server and the server refuses (here a
    NUL in the id, handed to the group commit directly) is ``InvalidEventError``, never an
    outage, and spoils none of the publishes committed with it."""
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.start()
    try:
        await broker.consume("all", ["load.*"])
        good = [encode_event(Event(topic="load.test", payload=n)) for n in range(10)]
        bad = StoredEvent("ev\x00", "load.test", None, 0, "null", "{}")
        outcomes = await asyncio.gather(
            *(broker._publishes.submit((e, None)) for e in [*good[:5], bad, *good[5:]]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[5], InvalidEventError)
        assert "its id" in str(outcomes[5])
        assert outcomes[:5] + outcomes[6:] == [True] * 10
        ((stored,),) = await postgres_rows(f'SELECT count(*) FROM "{schema}".events')
        assert stored == 10
        with pytest.raises(InvalidEventError, match="its id"):
            await broker._publishes.submit((bad, None))
    finally:
        await broker.close()


# -- retention: a pass costs what it deletes, logged once ----------------------------------------


async def _store_events(schema: str, ages: list[float], topic: str = "jobs") -> None:
    """Events stored ``ages`` seconds ago, in that seq order (instances' transactions need not
    commit in the order of their clocks, so ages need not fall with seq)."""
    await postgres_rows(
        f'INSERT INTO "{schema}".events (id, topic, time_us, stored_at, payload, metadata) '
        "SELECT 'e' || n, $2, 0, now() - make_interval(secs => a), n::text, '{}' "
        "FROM unnest($1::float8[]) WITH ORDINALITY AS t (a, n) ORDER BY t.n",
        ages,
        topic,
    )
    await postgres_execute(f'ANALYZE "{schema}".events')


async def _stored_seqs(schema: str) -> list[int]:
    return [seq for (seq,) in await postgres_rows(f'SELECT seq FROM "{schema}".events ORDER BY 1')]


def _rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows of ``relation`` the scans of a plan (``EXPLAIN (ANALYZE, FORMAT JSON)``) returned
    or filtered out."""
    read = 0
    if plan.get("Relation Name") == relation and plan["Node Type"].endswith("Scan"):
        read += plan["Actual Rows"] * plan["Actual Loops"] + plan.get("Rows Removed by Filter", 0)
    return read + sum(_rows_read(child, relation) for child in plan.get("Plans", []))


async def test_a_retention_batch_reads_a_batch_of_the_table_not_the_table(schema: str) -> None:
    """Beside 20,000 events kept (younger than min_age, beyond the count), finding a pass's
    range reads a few rows, and a batch reads its window of the primary key."""
    broker = PostgresBroker(POSTGRES_URL, schema=schema)
    await broker.migrate()
    ages = [7200.0] * 100 + [1200.0] * 100 + [0.0] * 20_000
    await _store_events(schema, [age - n / 1000 for n, age in enumerate(ages)])
    policy = RetentionPolicy(min_age=600, max_age=3600, max_count=50, batch_size=40)
    q = Queries(schema)
    connection = await connect()
    try:

        async def read(name: str, params: dict[str, Any]) -> int:
            statement = q[name]
            transaction = connection.transaction()
            await transaction.start()
            try:
                plan = await connection.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {statement.text}", *statement.args(params)
                )
            finally:
                await transaction.rollback()
            return _rows_read(json.loads(plan)[0]["Plan"], "events")

        ages = {"max_age": policy.max_age, "min_age": policy.min_age}
        assert await read("expire_range", {**ages, "max_count": policy.max_count}) <= 60
        bounds = await ops.expire_range(connection, q, policy)
        assert bounds == RetentionRange(edge=200, upto=200)
        window = {"after": 120, "skip": policy.batch_size - 1}
        assert await read("expire_window", window) == policy.batch_size
        batch = {"after": 120, "upto": 160, "edge": bounds.edge, **ages}
        assert await read("expire", batch) <= 2 * policy.batch_size
        deleted, after = 0, 0
        while True:
            expired = await ops.expire(connection, q, policy, bounds, after)
            assert expired is not None
            deleted += expired.deleted
            if expired.resume is None:
                break
            after = expired.resume
    finally:
        await connection.close()
    assert deleted == 200
    assert await _stored_seqs(schema) == list(range(201, 20_201))


async def test_retention_never_deletes_an_event_younger_than_allowed(schema: str) -> None:
    """The range of a pass is a bound (``stored_at`` only nearly grows with seq): each event's
    own age decides."""
    await PostgresBroker(POSTGRES_URL, schema=schema).migrate()
    # By age: seqs 1-20 two hours old but 5 and 12 young; 21-30 young but 25 old.
    ages = [7200.0 - n for n in range(1, 21)] + [0.0] * 10
    ages[4] = ages[11] = 0.0
    ages[24] = 7100.0
    await _store_events(schema, ages)
    policy = RetentionPolicy(min_age=60, max_age=3600, max_count=1_000, batch_size=4)
    broker = PostgresBroker(POSTGRES_URL, schema=schema, retention=policy)
    await broker.start()
    try:
        assert await broker.clean() == 19
        assert await _stored_seqs(schema) == [5, 12, *range(21, 25), *range(26, 31)]
        # By count: everything older than min_age beyond the newest 3, young ones kept.
        await postgres_execute(
            f'UPDATE "{schema}".events SET stored_at = CASE WHEN seq IN (12, 22) THEN now() '
            "ELSE stored_at - interval '2 minutes' END"
        )
        broker.retention = RetentionPolicy(min_age=60, max_age=86_400, max_count=3, batch_size=2)
        assert await broker.clean() == 6
        assert await _stored_seqs(schema) == [12, 22, 28, 29, 30]
    finally:
        await broker.close()


async def test_retention_counts_what_each_group_lost_and_logs_a_pass_once(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Over many batches: events beyond a group's position that it reads (or that were
    delivered to it alone), and events it holds unacknowledged, in leased batches or single
    leases; one warning per group with its total, one line for the pass."""
    policy = RetentionPolicy(min_age=0, max_age=3600, max_count=0, batch_size=3)
    broker = PostgresBroker(POSTGRES_URL, schema=schema, retention=policy)
    await broker.start()
    try:
        both = await broker.consume("both", ["a", "b"])
        await broker.consume("only-a", ["a"])
        done = await broker.consume("done", ["a", "b"])
        for n in range(12):
            await broker.publish(Event(topic="ab"[n % 2], payload=n))
        await broker.deliver_to("only-a", Event(topic="b", payload="redriven"))
        await broker.deliver_to("done", Event(topic="b", payload="redriven"))
        received: list[Any] = []
        async with asyncio.timeout(5):
            while len(received) < 4:
                received.extend(await both.fetch(4 - len(received)))
        await both.ack(received[:2])  # events 3 and 4 stay leased
        handled: list[Any] = []
        async with asyncio.timeout(5):
            while len(handled) < 13:
                handled.extend(await done.fetch(13 - len(handled)))
        await done.ack(handled)
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
    assert retention[2].startswith("retention deleted 14 events from the PostgreSQL broker")
    assert "(5 batches; 17 events lost by 2 subscriptions); done" in retention[2]
