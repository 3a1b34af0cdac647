#!/usr/bin/env python3
"""Durable delivery throughput: events/s through ONE subscription with a no-op handler.

For each broker, in one process: create the subscription, publish ``--events`` events (in
concurrent chunks, so publishes share commits), then start the subscription's single worker
(``DefaultEventsService``: fetch a batch, call the handler, acknowledge) and time how long it
takes to hand every event to the handler. Each round uses a fresh store; the table shows the
median of the rounds and each broker's ratio to the first one.

    python bench/throughput.py                              # memory, sqlite, postgresql
    python bench/throughput.py --brokers sqlite --events 20000
    python bench/throughput.py --postgres postgresql://postgres@127.0.0.1:5432/postgres
    python bench/throughput.py --brokers postgresql,nats,redis,rabbitmq,kafka

SQLite uses a file in a temporary directory; PostgreSQL a schema of its own
(``callboard_bench_<random>``), dropped afterwards. NATS, Redis and RabbitMQ are the servers on
this machine's standard ports, Kafka a Tansu the benchmark starts (``bench/engines.py``); each
round opens them with ``open_broker`` on a prefix of its own (``callboard_bench_<random>``),
deleted afterwards. A broker whose server is down is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path

from engines import ENGINES, Namespace, tansu
from engines import available as engine_available

from callboard import Event
from callboard.brokers import open_broker
from callboard.brokers.base import Broker
from callboard.default_service import DefaultEventsService

TOPIC = "bench.throughput"
GROUP = "bench-drain"


@asynccontextmanager
async def open_store(
    kind: str, postgres: str, workdir: Path, kafka: str = ""
) -> AsyncIterator[Broker]:
    """A started broker of ``kind`` on a fresh store, removed afterwards."""
    if kind == "memory":
        from callboard.brokers.memory import MemoryBroker

        broker: Broker = MemoryBroker()
        await broker.start()
        try:
            yield broker
        finally:
            await broker.close()
    elif kind == "sqlite":
        from callboard.brokers.sqlite import SQLiteBroker

        path = workdir / f"{uuid.uuid4().hex}.db"
        broker = SQLiteBroker(str(path))
        await broker.start()
        try:
            yield broker
        finally:
            await broker.close()  # the file goes with the temporary directory
    elif kind == "postgresql":
        import asyncpg

        from callboard.brokers.postgres import PostgresBroker

        schema = f"callboard_bench_{uuid.uuid4().hex[:12]}"
        broker = PostgresBroker(postgres, schema=schema)
        await broker.start()
        try:
            yield broker
        finally:
            await broker.close()
            connection = await asyncpg.connect(postgres)
            try:
                await connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await connection.close()
    elif kind in ENGINES:
        namespace = Namespace(kind, kafka)
        broker = open_broker(namespace.url)
        await broker.start()
        try:
            yield broker
        finally:
            await broker.close()
            namespace.close()
    else:
        raise SystemExit(
            f"unknown broker {kind!r}: memory, sqlite, postgresql, {', '.join(ENGINES)}"
        )


async def publish_all(broker: Broker, count: int, chunk: int = 500) -> float:
    """Publish ``count`` events in concurrent chunks; the seconds it took."""
    began = time.perf_counter()
    for first in range(0, count, chunk):
        await asyncio.gather(
            *(
                broker.publish(Event(topic=TOPIC, payload={"n": n}))
                for n in range(first, min(count, first + chunk))
            )
        )
    return time.perf_counter() - began


async def one_round(
    kind: str, postgres: str, workdir: Path, count: int, batch_size: int, kafka: str = ""
) -> dict[str, float]:
    async with open_store(kind, postgres, workdir, kafka) as broker:
        # A member that never fetches keeps the group (and, in memory, its queue) alive while
        # the events are published; it takes nothing, so the worker below gets them all.
        holder = await broker.consume(GROUP, [TOPIC])
        published = await publish_all(broker, count)
        received = 0
        done = asyncio.Event()
        last = -1
        in_order = True

        async def handler(event: Event) -> None:
            nonlocal received, last, in_order
            n = event.payload["n"]
            in_order = in_order and n > last
            last = n
            received += 1
            if received >= count:
                done.set()

        service = DefaultEventsService(broker, batch_size=batch_size)
        began = time.perf_counter()
        await service.subscribe(GROUP, TOPIC, handler)
        await asyncio.wait_for(done.wait(), timeout=max(60.0, count / 100))
        drained = time.perf_counter() - began
        # Close the subscription (flushing its acknowledgements) before the broker goes.
        for subscription in service.subscriptions:
            await subscription.close()
        await holder.close()
        left = next(
            (s.in_flight + s.backlog for s in await broker.subscriptions() if s.name == GROUP), 0
        )
        return {
            "publish_per_s": count / published,
            "drain_per_s": count / drained,
            "in_order": float(in_order),
            "left": float(left),
        }


def available(kind: str, postgres: str) -> bool:
    if kind in ENGINES:
        return engine_available(kind) is None
    if kind != "postgresql":
        return True
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(postgres)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 1):
            return True
    except OSError:
        return False


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    kinds = [k for k in kinds if available(k, args.postgres) or skipped(k)]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="callboard-throughput-"))
        kafka = stack.enter_context(tansu()) if "kafka" in kinds else ""
        for _ in range(args.rounds):
            for kind in kinds:  # brokers in turn, so a drift of the machine hits all alike
                results[kind].append(
                    await one_round(
                        kind, args.postgres, Path(tmp), args.events, args.batch_size, kafka
                    )
                )
    rows: list[dict[str, object]] = []
    base = statistics.median(r["drain_per_s"] for r in results[kinds[0]]) if kinds else 0.0
    for kind in kinds:
        rs = results[kind]
        drain = statistics.median(r["drain_per_s"] for r in rs)
        rows.append(
            {
                "broker": kind,
                "events": args.events,
                "drain_per_s": round(drain),
                "publish_per_s": round(statistics.median(r["publish_per_s"] for r in rs)),
                "in_order": all(r["in_order"] for r in rs),
                "left_after": max(r["left"] for r in rs),
                "ratio_to_first": round(drain / base, 2) if base else None,
            }
        )
    return rows


def skipped(kind: str) -> bool:
    print(f"skipping {kind}: its server does not answer", file=sys.stderr)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--brokers",
        default="memory,sqlite,postgresql",
        help=f"any of memory, sqlite, postgresql, {', '.join(ENGINES)}",
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="the worker's fetch size")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server to use (a schema of its own is created and dropped)",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    stamp = time.strftime("%Y-%m-%d %H:%M")
    print(
        f"{stamp}: one subscription, one worker (batch {args.batch_size}), no-op handler, "
        f"{args.events:,} events, median of {args.rounds} rounds\n"
    )
    print("| broker | drained events/s | published events/s | in order | left | x first |")
    print("|---|---:|---:|---|---:|---:|")
    show: Callable[[object], str] = lambda v: f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    for row in rows:
        print(
            f"| {row['broker']} | {show(row['drain_per_s'])} | {show(row['publish_per_s'])} | "
            f"{'yes' if row['in_order'] else 'NO'} | {show(row['left_after'])} | "
            f"{row['ratio_to_first']} |"
        )
    return 0 if all(r["in_order"] and not r["left_after"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
