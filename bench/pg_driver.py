#!/usr/bin/env python3
"""CPU cost of the PostgreSQL broker's hot statements per driver: asyncpg (used) and psycopg.

Runs the broker's own functions (``publish``, ``claim``, ``ack`` of the migrations) in a schema
of their own, one after the other on one connection, and prints per call the wall time and the
CPU time of this process (the driver's work: encoding parameters, decoding rows, its wait loop).
With asyncpg it also prints, per call, the WAL the server wrote and, when the server runs on this
machine, the CPU time of its backend (``/proc/<pid>/schedstat``).

    python bench/pg_driver.py [--url postgresql://postgres@127.0.0.1:5432/postgres]

psycopg (the broker's driver before asyncpg) is measured when it is installed
(``pip install "psycopg[binary]"``); callboard does not need it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from callboard.brokers.postgres import PostgresBroker

SCHEMA = "callboard_bench_driver"
# The request body of the ingest benchmark, from the shared folder beside the repository (as in
# ``run.py``); a similar document when it is not there.
SHARED = Path(
    os.environ.get("CALLBOARD_BENCH_SHARED", Path(__file__).resolve().parents[2] / "shared")
)
BODY = SHARED / "anchors/backstage/github_push.json"
BATCH = 27  # the size of a publish commit under the ingest benchmark's load
ROUNDS = 400


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, call: Callable[[], Awaitable[Any]]) -> None:
    for _ in range(20):
        await call()
    wall, used = time.perf_counter(), cpu()
    for _ in range(ROUNDS):
        await call()
    wall, used = time.perf_counter() - wall, cpu() - used
    print(f"| {name} | {wall / ROUNDS * 1e6:,.0f} | {used / ROUNDS * 1e6:,.0f} |")


def server_cpu(pid: int) -> float | None:
    """Seconds on the CPU of a server backend, if it runs on this machine."""
    try:
        with open(f"/proc/{pid}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9
    except OSError:
        return None


async def measure_server(
    connection: Any,
    name: str,
    call: Callable[[], Awaitable[Any]],
    after: Callable[[], Awaitable[Any]],
) -> None:
    """The server's side of ``call``: its backend's CPU and the WAL written, per call.

    ``after`` runs between calls, unmeasured (a claim needs events, an ack needs a claim).
    """
    pid = await connection.fetchval("SELECT pg_backend_pid()")
    lsn = "SELECT pg_current_wal_insert_lsn()"
    spent, wal = 0.0, 0
    for _ in range(ROUNDS):
        start, before = server_cpu(pid), await connection.fetchval(lsn)
        await call()
        end, written = server_cpu(pid), await connection.fetchval(lsn)
        wal += int(await connection.fetchval("SELECT $1::pg_lsn - $2::pg_lsn", written, before))
        if start is not None and end is not None:
            spent += end - start
        await after()
    backend = f"{spent / ROUNDS * 1e6:,.0f}" if spent else "(server not on this machine)"
    print(f"| {name} | {backend} | {wal / ROUNDS:,.0f} |")


def publish_args(payload: str) -> list[Any]:
    return [
        1,
        "bench",
        "{}",
        [f"id-{n}" for n in range(BATCH)],
        ["plain"] * BATCH,
        [None] * BATCH,
        None,  # no delivery ids: the broker's plain insert (0004_plain_publish.sql)
        [1_700_000_000_000_000] * BATCH,
        [payload] * BATCH,
        ["{}"] * BATCH,
    ]


async def with_psycopg(url: str, payload: str) -> None:
    try:
        import psycopg  # optional: only this comparison uses it
    except ImportError:
        print('\n(psycopg is not installed: `pip install "psycopg[binary]"` to compare)')
        return
    connection = await psycopg.AsyncConnection.connect(url, autocommit=True)
    await connection.execute("SET synchronous_commit = off")
    s = SCHEMA
    publish = (
        f"SELECT * FROM {s}.publish(%s::bigint, %s, %s, %b::text[], %b::text[], %b::text[], "
        "%b::text[], %b::bigint[], %b::text[], %b::text[])"
    )
    claim = f"SELECT * FROM {s}.claim(%s, %s, %s::integer, %s::float8)"
    ack = f"SELECT * FROM {s}.ack(%b::text[], %b::bigint[], %b::text[])"

    async def publish_once() -> None:
        cursor = await connection.execute(publish, publish_args(payload), prepare=True)
        await cursor.fetchall()

    async def claim_and_ack() -> None:
        cursor = await connection.execute(claim, ["g", "c", BATCH, 30.0], prepare=True)
        seqs = [row[0] for row in await cursor.fetchall()]
        cursor = await connection.execute(
            ack, [["g"] * len(seqs), seqs, ["c"] * len(seqs)], prepare=True
        )
        await cursor.fetchall()

    await measure(f"psycopg {psycopg.__version__}: publish {BATCH}", publish_once)
    await measure(f"psycopg {psycopg.__version__}: claim + ack {BATCH}", claim_and_ack)
    await connection.close()


async def with_asyncpg(url: str, payload: str) -> None:
    connection = await asyncpg.connect(url)
    await connection.execute("SET synchronous_commit = off")
    s = SCHEMA
    publish = await connection.prepare(
        f"SELECT * FROM {s}.publish($1::bigint, $2, $3, $4::text[], $5::text[], $6::text[], "
        "$7::text[], $8::bigint[], $9::text[], $10::text[])"
    )
    claim = await connection.prepare(f"SELECT * FROM {s}.claim($1, $2, $3::integer, $4::float8)")
    ack = await connection.prepare(f"SELECT * FROM {s}.ack($1::text[], $2::bigint[], $3::text[])")

    async def publish_once() -> None:
        await publish.fetch(*publish_args(payload))

    async def claim_and_ack() -> None:
        seqs = [row[0] for row in await claim.fetch("g", "c", BATCH, 30.0)]
        await ack.fetch(["g"] * len(seqs), seqs, ["c"] * len(seqs))

    await measure(f"asyncpg {asyncpg.__version__}: publish {BATCH}", publish_once)
    await measure(f"asyncpg {asyncpg.__version__}: claim + ack {BATCH}", claim_and_ack)

    claimed: list[int] = []

    async def claim_once() -> None:
        claimed[:] = [row[0] for row in await claim.fetch("g", "c", BATCH, 30.0)]

    async def ack_once() -> None:
        await ack.fetch(["g"] * len(claimed), claimed, ["c"] * len(claimed))

    async def nothing() -> None:
        return None

    print("\n| statement | server backend CPU µs per call | WAL bytes per call |")
    print("|---|---:|---:|")
    await measure_server(connection, f"publish {BATCH}", publish_once, nothing)
    await measure_server(connection, f"claim {BATCH}", claim_once, ack_once)
    await publish_once()
    await claim_once()
    await measure_server(
        connection, f"ack {BATCH}", ack_once, publish_and_claim(publish_once, claim_once)
    )
    await connection.close()


def publish_and_claim(
    publish: Callable[[], Awaitable[None]], claim: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    async def both() -> None:
        await publish()
        await claim()

    return both


async def admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    url = parser.parse_args().url
    payload = BODY.read_text() if BODY.exists() else '{"ref": "refs/heads/main"}' * 12
    await admin(url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    await PostgresBroker.from_url(f"{url}?schema={SCHEMA}").migrate()
    await admin(
        url,
        f"INSERT INTO {SCHEMA}.subscriptions (name, topics, regexes, position) "
        "VALUES ('g', '{plain}', '{^plain$}', 0)",
    )
    print(f"{ROUNDS} calls each, {len(payload)}-byte payloads\n")
    print("| driver: statement | wall µs per call | client CPU µs per call |")
    print("|---|---:|---:|")
    try:
        await with_psycopg(url, payload)
        await with_asyncpg(url, payload)
    finally:
        await admin(url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


if __name__ == "__main__":
    asyncio.run(main())
