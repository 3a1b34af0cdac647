#!/usr/bin/env python3
"""Costs at scale: what grows with the stored events and the subscriptions, on SQLite and PostgreSQL.

For each store (``--stores``), in one run:

``ingest``
    ``callboard serve`` with 0, 100 and 1,000 (``--idle``) in-process subscriptions on topics no
    request matches (half exact names ``idle-<n>``, half wildcards ``idle-<n>.*``; each opens a
    broker consumer, as a bus subscription does), driven by wrk as in ``bench/run.py`` (the same
    signed push on the topic ``plain``, which one counting subscription receives). Requests/s,
    p99, and the CPU time the server spent per accepted request (accepting and delivering). The
    counts take turns round after round on a fresh store each run; medians of the rounds.
``drain``
    One subscription drains ``--drain-events`` events published after it was created (one worker,
    a no-op handler, as ``bench/throughput.py``), on an empty store and on a store already
    holding ``--events`` events of another topic.
``scrape``
    ``GET /metrics`` with 100 and 1,000 (``--unread``) subscriptions that have read nothing of the
    ``--events`` stored events (each backlog is every stored event). Each scrape's time, whether
    it reported the broker up and the backlog it reported, and the worst latency of a paced
    request stream (``--stream-rate`` requests/s) during the scrapes and before them.
``retention``
    The stored events become deletable (``minAgeMs: 0``, ``maxCount: --keep``) and the server
    starts with retention on; its first pass deletes all but ``--keep`` of them while the paced
    stream runs and a subscription handles every streamed event (``--handler-ms`` each). Pass
    time, deleted rows, the stream's p99 and worst latency during the pass and outside it, and the
    events delivered again while the subscriber held them (a lease that ran out: the handler never
    fails, so an event seen twice was redelivered), and of those, the ones whose handler was
    still running.

    python bench/scale.py                                   # everything, 1M events (long)
    python bench/scale.py --events 50000 --unread 100 --idle 0,100 --seconds 5 --rounds 1
    python bench/scale.py --stores sqlite --sections scrape,retention
    PYTHONPATH=../base/src python bench/scale.py ...        # another tree's package

How the stored events are loaded: through the broker's own ``publish``, from this process, in
concurrent chunks of ``--load-chunk`` (the broker's group commit writes each chunk in a few
transactions), so the store holds exactly what a server would have written, whatever its version
keeps beside the events. The unread subscriptions are made the same way (``consume`` from the
beginning, then closed), and deleted before the retention pass.

The pass is observed from outside: ``min(seq)`` of the events table polled every 0.1 s; the pass
time runs from the last poll before the first deletion to the first poll after the last one, and
the pass is over once nothing has been deleted for ``--quiet`` seconds. The stream's latencies
run from when each request was due (a fixed rate), so a server that stops answering counts every
request it kept waiting.

SQLite uses files in a temporary directory; PostgreSQL schemas of their own
(``callboard_bench_scale_<random>``), dropped at the end. ``callboard serve`` listens on
``--port``. Results go to ``bench/results/scale-<time>.json`` as well. Needs wrk (the Debian
package ``wrk``) for ``ingest``.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The ingest benchmark's helpers (this folder is on the path of the script and of the server).
from run import (
    BODY,
    SECRET,
    cpu_seconds,
    ensure_wrk,
    metric,
    port_taken,
    postgres_execute,
    run_wrk,
    start,
    stop,
    wait_for,
    wrk_script,
)

from callboard import Event, ModuleContext, module

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

INGEST_TOPIC = "plain"  # what wrk and the paced stream post, and the handled subscription reads
STORED_TOPIC = "bench.stored"  # the stored events
DRAIN_TOPIC = "bench.drain"
HANDLED = "bench-scale"  # the subscription on INGEST_TOPIC
SECTIONS = ("ingest", "drain", "scrape", "retention")

# What the server's module reads (set by the driver).
IDLE_ENV = "BENCH_SCALE_IDLE"
HANDLER_ENV = "BENCH_SCALE_HANDLER_MS"
RECORD_ENV = "BENCH_SCALE_RECORD"


# -- the module the server loads (``events.load: ['scale:register']``) ---------------------------


async def never_called(event: Event) -> None:
    raise AssertionError(f"an idle subscription received {event.topic!r}")


def handled(delay: float, record: Path | None) -> Callable[[Event], Awaitable[None]]:
    """The handler of ``INGEST_TOPIC``: takes ``delay`` seconds; notes every event seen twice."""
    seen: set[str] = set()
    running: set[str] = set()

    async def handle(event: Event) -> None:
        if event.id in seen and record is not None:
            state = "running" if event.id in running else "done"
            with record.open("a") as out:  # rare: only redeliveries are written
                out.write(f"{state} {event.id}\n")
        seen.add(event.id)
        running.add(event.id)
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            running.discard(event.id)

    return handle


@module("bench-scale")
def register(context: ModuleContext) -> None:
    for n in range(int(os.environ.get(IDLE_ENV, "0"))):
        pattern = f"idle-{n}" if n % 2 == 0 else f"idle-{n}.*"
        context.subscribers.add_subscription(f"bench-idle-{n}", (pattern,), never_called)
    record = os.environ.get(RECORD_ENV)
    delay = float(os.environ.get(HANDLER_ENV, "0")) / 1000
    context.subscribers.add_subscription(
        HANDLED, (INGEST_TOPIC,), handled(delay, Path(record) if record else None)
    )


# -- stores ---------------------------------------------------------------------------------------


@dataclass
class Store:
    """One fresh store: a SQLite file or a PostgreSQL schema of its own."""

    kind: str
    url: str
    table: str  # the events table, as SQL names it
    path: Path | None = None
    schema: str | None = None
    conninfo: str | None = None

    def drop(self) -> None:
        if self.path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        if self.schema is not None and self.conninfo is not None:
            postgres_execute(self.conninfo, f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')

    async def scalar(self, query: str) -> Any:
        """One value of ``query`` on a connection of this process (the server keeps its own)."""
        if self.path is not None:
            connection = sqlite3.connect(self.path, timeout=30)
            try:
                return connection.execute(query).fetchone()[0]
            finally:
                connection.close()
        import asyncpg

        pg = await asyncpg.connect(self.conninfo)
        try:
            return await pg.fetchval(query)
        finally:
            await pg.close()


def new_store(kind: str, postgres: str, workdir: Path) -> Store:
    if kind == "sqlite":
        path = workdir / f"scale-{uuid.uuid4().hex[:8]}.db"
        return Store(kind, f"sqlite:///{path}", "events", path=path)
    if kind == "postgresql":
        schema = f"callboard_bench_scale_{uuid.uuid4().hex[:10]}"
        separator = "&" if "?" in postgres else "?"
        return Store(
            kind,
            f"{postgres}{separator}schema={schema}",
            f'"{schema}".events',
            schema=schema,
            conninfo=postgres,
        )
    raise SystemExit(f"unknown store {kind!r}: sqlite or postgresql")


@contextmanager
def fresh(kind: str, postgres: str, workdir: Path) -> Iterator[Store]:
    store = new_store(kind, postgres, workdir)
    try:
        yield store
    finally:
        store.drop()


def open_store(store: Store) -> Any:
    """A broker on ``store`` for this process; its retention never runs while we work."""
    from callboard.brokers import open_broker
    from callboard.brokers.base import RetentionPolicy

    return open_broker(store.url, retention=RetentionPolicy(interval=86_400.0))


async def publish_many(broker: Any, topic: str, count: int, chunk: int) -> float:
    """Publish ``count`` events on ``topic`` in concurrent chunks; the seconds it took."""
    began = time.perf_counter()
    for first in range(0, count, chunk):
        await asyncio.gather(
            *(
                broker.publish(Event(topic=topic, payload={"n": n}))
                for n in range(first, min(count, first + chunk))
            )
        )
    return time.perf_counter() - began


async def load(store: Store, count: int, chunk: int) -> dict[str, float]:
    broker = open_store(store)
    await broker.start()
    try:
        seconds = await publish_many(broker, STORED_TOPIC, count, chunk)
    finally:
        await broker.close()
    return {"events": count, "seconds": round(seconds, 1), "per_s": round(count / seconds)}


async def make_unread(store: Store, first: int, last: int) -> None:
    """Subscriptions ``bench-unread-<first..last-1>`` on the stored topic, nothing read yet."""
    broker = open_store(store)
    await broker.start()
    try:
        for n in range(first, last):
            consumer = await broker.consume(f"bench-unread-{n}", [STORED_TOPIC], start="beginning")
            await consumer.close()
    finally:
        await broker.close()


async def delete_unread(store: Store, count: int) -> None:
    """Delete ``bench-unread-<0..count-1>`` (by name: listing them would count their backlogs)."""
    broker = open_store(store)
    await broker.start()
    try:
        for n in range(count):
            await broker.delete_subscription(f"bench-unread-{n}")
    finally:
        await broker.close()


# -- the server -----------------------------------------------------------------------------------


def server_config(port: int, broker: str, retention: dict[str, int] | None) -> str:
    lines = [
        "backend:",
        f"  listen: {{host: 127.0.0.1, port: {port}}}",
        "logging: {level: warning}",
        "events:",
        f"  broker: '{broker}'",
        "  load: ['scale:register']",
        "  metrics: {maxSubscriptionLabels: 2000}",
        "  http:",
        f"    topics: [{INGEST_TOPIC}]",
        # Every request carries the same delivery id: ingest is measured, not deduplication.
        "    detectRedeliveries: false",
    ]
    if retention:
        lines.append("  retention:")
        lines += [f"    {key}: {value}" for key, value in retention.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Server:
    process: Any
    base: str
    log: Path

    port: int

    def metrics(self, timeout: float = 60.0) -> str:
        """``/metrics``; ``TimeoutError`` when it takes longer than ``timeout`` seconds."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()


@contextmanager
def serving(
    store: Store,
    args: argparse.Namespace,
    workdir: Path,
    *,
    idle: int = 0,
    handler_ms: float = 0.0,
    retention: dict[str, int] | None = None,
    record: Path | None = None,
) -> Iterator[Server]:
    if port_taken(args.port):
        raise SystemExit(f"port {args.port} is taken: stop what listens there or pass --port")
    config = workdir / "scale.yaml"
    config.write_text(server_config(args.port, store.url, retention))
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE)]))
    env = {
        **os.environ,
        "PYTHONPATH": path,
        IDLE_ENV: str(idle),
        HANDLER_ENV: str(handler_ms),
        RECORD_ENV: str(record or ""),
    }
    log = workdir / f"serve-{store.kind}.log"
    process = start([sys.executable, "-m", "callboard", "serve", "--config", str(config)], log, env)
    base = f"http://127.0.0.1:{args.port}"
    try:
        try:
            wait_for(f"{base}/readyz", 120)
        except SystemExit:
            raise SystemExit(f"callboard serve did not start:\n{log.read_text()[-3000:]}") from None
        server = Server(process, base, log, args.port)
        if idle:
            wait_running(server, idle + 1)
        yield server
    finally:
        stop(process)


def wait_running(server: Server, expected: int, seconds: float = 120.0) -> None:
    """Until the server runs all its subscriptions (a scrape: only on a small store)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if metric(server.metrics(), "callboard_subscription_running") >= expected:
            return
        time.sleep(0.2)
    raise SystemExit(f"the server did not run its {expected} subscriptions in {seconds:.0f}s")


def sample(text: str, name: str, subscription: str = "") -> float:
    """The sum of ``name``'s samples (with or without labels) whose subscription label starts
    with ``subscription``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")) and (
            not subscription or f'subscription="{subscription}' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def delivered(server: Server) -> tuple[float, float]:
    text = server.metrics()
    accepted = metric(text, "callboard_ingress_requests_total", topic=INGEST_TOPIC, status="202")
    handled_ = metric(text, "callboard_events_delivered_total", subscription=HANDLED)
    return accepted, handled_


def wait_delivered(server: Server, seconds: float = 120.0) -> tuple[float, float]:
    deadline = time.monotonic() + seconds
    accepted, handled_ = delivered(server)
    while handled_ < accepted and time.monotonic() < deadline:
        time.sleep(0.2)
        accepted, handled_ = delivered(server)
    return accepted, handled_


# -- a paced request stream -----------------------------------------------------------------------


@dataclass
class Stream:
    """``rate`` POSTs a second on ``threads`` kept-alive connections; latency from when each
    request was due, so a server that stops answering counts every request it kept waiting."""

    port: int
    rate: float
    threads: int = 4
    samples: list[tuple[float, float, bool]] = field(default_factory=list)  # due, latency, ok
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Stream:
        began = time.monotonic()
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(began + n / self.rate,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(180)

    def _run(self, due: float) -> None:
        interval = self.threads / self.rate
        headers = {"Content-Type": "application/json"}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        while not self._stop.is_set():
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                connection.request("POST", f"/api/events/http/{INGEST_TOPIC}", BODY, headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 202
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                ok = False
            self.samples.append((due, time.monotonic() - due, ok))
            due += interval
        connection.close()

    def between(self, begin: float, end: float) -> list[tuple[float, float, bool]]:
        return [s for s in self.samples if begin <= s[0] < end]


def latency_summary(samples: list[tuple[float, float, bool]]) -> dict[str, Any]:
    if not samples:
        return {"requests": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "errors": 0}
    latencies = sorted(s[1] for s in samples)
    return {
        "requests": len(samples),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1),
        "errors": sum(1 for s in samples if not s[2]),
    }


# -- sections -------------------------------------------------------------------------------------


def ingest_run(kind: str, idle: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    script = workdir / "push.lua"
    script.write_text(wrk_script(BODY, SECRET))
    with (
        fresh(kind, args.postgres, workdir) as store,
        serving(store, args, workdir, idle=idle) as s,
    ):
        cpu_before = cpu_seconds(s.process.pid)
        url = f"{s.base}/api/events/http/{INGEST_TOPIC}"
        result = run_wrk(url, script, args.seconds, args.connections)
        accepted, handled_ = wait_delivered(s)
        cpu_after = cpu_seconds(s.process.pid)
    cpu = (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else None
    return {
        **result,
        "accepted": accepted,
        "delivered": handled_,
        "cpu_us": cpu / accepted * 1e6 if cpu is not None and accepted else None,
    }


def ingest(kind: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    ensure_wrk()
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.idle}
    for _ in range(args.rounds):
        for n in args.idle:  # the counts take turns, so a drift of the machine hits all alike
            runs[n].append(ingest_run(kind, n, args, workdir))
            print(f"  {kind} ingest, {n} idle: {runs[n][-1]}", flush=True)
    base = statistics.median(r["req_per_s"] for r in runs[args.idle[0]])
    rows = []
    for n in args.idle:
        rate = statistics.median(r["req_per_s"] for r in runs[n])
        cpus = [r["cpu_us"] for r in runs[n] if r["cpu_us"] is not None]
        rows.append(
            {
                "idle": n,
                "req_per_s": round(rate),
                "p99_ms": round(statistics.median(r["p99"] for r in runs[n]) / 1000, 2),
                "cpu_us": round(statistics.median(cpus), 1) if cpus else None,
                "errors": sum(r["errors"] for r in runs[n]),
                "undelivered": sum(max(0, r["accepted"] - r["delivered"]) for r in runs[n]),
                "ratio": round(rate / base, 3) if base else None,
            }
        )
    return rows


async def drain(broker: Any, count: int, chunk: int, batch_size: int) -> dict[str, float]:
    """One subscription made now drains ``count`` events published after it (a no-op handler)."""
    from callboard.default_service import DefaultEventsService

    group = "bench-drain"
    holder = await broker.consume(group, [DRAIN_TOPIC])  # keeps the group while we publish
    published = await publish_many(broker, DRAIN_TOPIC, count, chunk)
    received = 0
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        nonlocal received
        received += 1
        if received >= count:
            done.set()

    service = DefaultEventsService(broker, batch_size=batch_size)
    began = time.perf_counter()
    await service.subscribe(group, DRAIN_TOPIC, handler)
    await asyncio.wait_for(done.wait(), timeout=max(120.0, count / 100))
    drained = time.perf_counter() - began
    for subscription in service.subscriptions:
        await subscription.close()
    await holder.close()
    await broker.delete_subscription(group)
    return {"drain_per_s": round(count / drained), "publish_per_s": round(count / published)}


async def drain_on(store: Store, args: argparse.Namespace) -> dict[str, float]:
    broker = open_store(store)
    await broker.start()
    try:
        return await drain(broker, args.drain_events, args.load_chunk, args.batch_size)
    finally:
        await broker.close()


def scrape(store: Store, unread: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``--scrapes`` scrapes of ``/metrics`` while the paced stream runs."""
    scrapes: list[dict[str, Any]] = []
    windows: list[tuple[float, float]] = []
    with serving(store, args, workdir) as server, Stream(args.port, args.stream_rate) as stream:
        time.sleep(args.quiet)  # the stream alone first: its worst latency without scrapes
        calm_end = time.monotonic()
        for _ in range(args.scrapes):
            began = time.monotonic()
            try:
                text = server.metrics(timeout=args.scrape_timeout)
                seconds = time.monotonic() - began
                scrapes.append(
                    {
                        "seconds": round(seconds, 3),
                        "broker_up": sample(text, "callboard_broker_up"),
                        "backlog": sample(text, "callboard_subscription_backlog", "bench-unread-"),
                    }
                )
            except TimeoutError:
                scrapes.append({"seconds": None, "broker_up": None, "backlog": None})
            windows.append((began, time.monotonic()))
            if scrapes[-1]["seconds"] is None:
                break  # the next scrape would only queue behind this one
        time.sleep(1.0)
    during = [s for begin, end in windows for s in stream.between(begin, end)]
    times = [s["seconds"] for s in scrapes if s["seconds"] is not None]
    return {
        "unread": unread,
        "scrapes": scrapes,
        "median_ms": round(statistics.median(times) * 1000, 1) if times else None,
        "max_ms": round(max(times) * 1000, 1) if times else None,
        "timed_out": sum(1 for s in scrapes if s["seconds"] is None),
        "expected_backlog": unread * args.events,
        "stream_calm": latency_summary(stream.between(0, calm_end)),
        "stream_during": latency_summary(during),
    }


@dataclass
class PassWatch:
    """``min(seq)`` of the events table over time: when a retention pass deleted."""

    first_change: float | None = None  # the last poll before the first deletion
    last_change: float | None = None  # the first poll after the last deletion
    polls: int = 0


async def watch_pass(store: Store, args: argparse.Namespace, began: float) -> PassWatch:
    watch = PassWatch()
    query = f"SELECT coalesce(min(seq), 0) FROM {store.table}"
    low = await store.scalar(query)
    before = time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        now_low = await store.scalar(query)
        now = time.monotonic()
        watch.polls += 1
        if now_low != low:
            if watch.first_change is None:
                watch.first_change = before
            watch.last_change = now
            low = now_low
        before = now
        if watch.first_change is None and now - began > args.first_pass_wait:
            return watch  # no pass began
        if watch.last_change is not None and now - watch.last_change > args.quiet:
            return watch  # the pass is over
        if watch.first_change is not None and now - watch.first_change > args.retention_timeout:
            return watch  # cut short


def redeliveries(record: Path) -> dict[str, int]:
    lines = record.read_text().split() if record.exists() else []
    states = lines[0::2]
    return {"redelivered": len(states), "while_running": states.count("running")}


def retention(store: Store, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    loaded_max = asyncio.run(store.scalar(f"SELECT max(seq) FROM {store.table}"))
    count_query = f"SELECT count(*) FROM {store.table} WHERE seq <= {loaded_max}"
    loaded = asyncio.run(store.scalar(count_query))
    record = workdir / f"redelivered-{store.kind}.txt"
    record.unlink(missing_ok=True)
    policy = {"minAgeMs": 0, "maxCount": args.keep, "intervalMs": 3_600_000}
    with (
        serving(
            store, args, workdir, handler_ms=args.handler_ms, retention=policy, record=record
        ) as server,
        Stream(args.port, args.stream_rate) as stream,
    ):
        began = time.monotonic()
        watch = asyncio.run(watch_pass(store, args, began))
        accepted, handled_ = wait_delivered(server)
    left = asyncio.run(store.scalar(count_query))
    first, last = watch.first_change, watch.last_change
    if first is not None and last is not None:
        during = stream.between(first, last)
        outside = [s for s in stream.samples if not first <= s[0] < last]
    else:
        during, outside = [], stream.samples
    return {
        "stored": loaded,
        "deleted": loaded - left,
        "pass_s": round(last - first, 2) if first is not None and last is not None else None,
        "pass_started_after_s": round(first - began, 1) if first is not None else None,
        "stream_during": latency_summary(during),
        "stream_outside": latency_summary(outside),
        "accepted": accepted,
        "handled": handled_,
        **redeliveries(record),
    }


# -- one store, every section ---------------------------------------------------------------------


def run_store(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if "ingest" in args.sections:
        result["ingest"] = ingest(kind, args, workdir)
    if "drain" in args.sections:
        with fresh(kind, args.postgres, workdir) as empty:
            result["drain_empty"] = asyncio.run(drain_on(empty, args))
        print(f"  {kind} drain, empty store: {result['drain_empty']}", flush=True)
    if not {"drain", "scrape", "retention"} & set(args.sections):
        return result
    with fresh(kind, args.postgres, workdir) as store:
        result["load"] = asyncio.run(load(store, args.events, args.load_chunk))
        print(f"  {kind} loaded: {result['load']}", flush=True)
        if "drain" in args.sections:
            result["drain_full"] = asyncio.run(drain_on(store, args))
            print(f"  {kind} drain, {args.events:,} stored: {result['drain_full']}", flush=True)
        if "scrape" in args.sections:
            result["scrape"] = []
            made = 0
            for unread in args.unread:
                asyncio.run(make_unread(store, made, unread))
                made = unread
                result["scrape"].append(scrape(store, unread, args, workdir))
                print(f"  {kind} scrape, {unread} unread: {result['scrape'][-1]}", flush=True)
            asyncio.run(delete_unread(store, made))
        if "retention" in args.sections:
            result["retention"] = retention(store, args, workdir)
            print(f"  {kind} retention: {result['retention']}", flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------


def show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    ingest_table(results)
    scrape_table(results)
    retention_table(results)
    drain_table(results, args)


def ingest_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [(kind, row) for kind, r in results.items() for row in r.get("ingest", [])]
    if not rows:
        return
    print("\n| store | idle subscriptions | req/s | x 0 | p99 ms | CPU µs/request | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, row in rows:
        print(
            f"| {kind} | {row['idle']:,} | {row['req_per_s']:,} | {row['ratio']} | "
            f"{row['p99_ms']} | {show(row['cpu_us'])} | {row['errors'] + row['undelivered']} |"
        )


def scrape_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [(kind, row) for kind, r in results.items() for row in r.get("scrape", [])]
    if not rows:
        return
    print(
        "\n| store | unread subscriptions | scrape ms (median) | max | timed out | broker up | "
        "backlog reported / expected | stream worst ms: calm | during scrapes |"
    )
    print("|---|---:|---:|---:|---:|---|---|---:|---:|")
    for kind, row in rows:
        ups = {s["broker_up"] for s in row["scrapes"] if s["broker_up"] is not None}
        backlog = max((s["backlog"] or 0 for s in row["scrapes"]), default=0)
        print(
            f"| {kind} | {row['unread']:,} | {show(row['median_ms'])} | {show(row['max_ms'])} | "
            f"{row['timed_out']} | {'yes' if ups == {1.0} else ('no' if ups else '-')} | "
            f"{backlog:,.0f} / {row['expected_backlog']:,} | "
            f"{show(row['stream_calm']['max_ms'])} | {show(row['stream_during']['max_ms'])} |"
        )


def retention_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [(kind, r["retention"]) for kind, r in results.items() if "retention" in r]
    if not rows:
        return
    print(
        "\n| store | stored | deleted | pass s | stream p99 ms: outside | during | worst during | "
        "redelivered | of which running |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, row in rows:
        print(
            f"| {kind} | {row['stored']:,} | {row['deleted']:,} | {show(row['pass_s'])} | "
            f"{show(row['stream_outside']['p99_ms'])} | {show(row['stream_during']['p99_ms'])} | "
            f"{show(row['stream_during']['max_ms'])} | {row['redelivered']} | "
            f"{row['while_running']} |"
        )


def drain_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    rows = [(kind, r) for kind, r in results.items() if "drain_empty" in r]
    if not rows:
        return
    print(f"\n| store | drained/s, 0 stored | drained/s, {args.events:,} stored | ratio |")
    print("|---|---:|---:|---:|")
    for kind, r in rows:
        empty = r["drain_empty"]["drain_per_s"]
        full = r.get("drain_full", {}).get("drain_per_s")
        ratio = round(full / empty, 2) if full and empty else None
        print(f"| {kind} | {empty:,} | {show(full)} | {show(ratio)} |")


# -- main -----------------------------------------------------------------------------------------


def numbers(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--stores", default="sqlite,postgresql", help="sqlite, postgresql or both")
    add("--sections", default=",".join(SECTIONS), help="any of " + ", ".join(SECTIONS))
    add("--events", type=int, default=1_000_000, help="stored events (scrape, retention, drain)")
    add("--idle", type=numbers, default=[0, 100, 1000], help="idle subscription counts (ingest)")
    add("--unread", type=numbers, default=[100, 1000], help="unread subscription counts (scrape)")
    add("--seconds", type=int, default=10, help="each wrk run (ingest)")
    add("--rounds", type=int, default=3, help="rounds of the ingest counts")
    add("--connections", type=int, default=32, help="wrk connections (ingest)")
    add("--scrapes", type=int, default=3, help="scrapes per count")
    add("--scrape-timeout", type=float, default=60.0, help="seconds before a scrape is given up")
    add("--stream-rate", type=float, default=100.0, help="paced stream requests/s")
    add("--keep", type=int, default=10_000, help="events retention keeps (maxCount)")
    add("--handler-ms", type=float, default=2.0, help="handler time during retention")
    add("--first-pass-wait", type=float, default=60.0, help="seconds to wait for the pass")
    add("--retention-timeout", type=float, default=900.0, help="seconds a pass is watched")
    add("--quiet", type=float, default=3.0, help="seconds without deletion that end a pass")
    add("--drain-events", type=int, default=20_000, help="events drained (drain)")
    add("--batch-size", type=int, default=32, help="the drain worker's fetch size")
    add("--load-chunk", type=int, default=2_000, help="concurrent publishes while loading")
    add("--port", type=int, default=7030, help="callboard serve's port")
    add(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server (a schema of its own is created and dropped)",
    )
    args = parser.parse_args(argv)
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import callboard

    print(f"callboard from {Path(callboard.__file__).parent}")
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}: {' '.join(sys.argv[1:]) or '(defaults)'}", flush=True
    )
    workdir = Path(tempfile.mkdtemp(prefix="callboard-scale-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for kind in args.stores:
            results[kind] = run_store(kind, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out / f"scale-{stamp}.json").write_text(
        json.dumps(
            {
                "callboard": str(Path(callboard.__file__).parent),
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
