#!/usr/bin/env python3
"""Cross-instance latency: from a publish on one instance to the handler on another.

For each broker, two ``callboard serve`` processes share one store: instance A (the ingress
only) and instance B (the ingress and a subscription whose handler records, for each event,
the time since the client sent it). The driver POSTs ``--events`` webhooks to A's ingress, one
at a time per connection (``--concurrency`` connections), each with its send time in a header;
the event goes through the store to B, which is woken by the broker (PostgreSQL: LISTEN/NOTIFY;
SQLite: watching the file's data version) and hands it to the handler. The figure is therefore
client send -> A accepts and commits -> B's handler, on one machine's clock. On the distributed
engines (``nats``, ``redis``, ``rabbitmq``, ``kafka``) the two instances share a prefix of their
own (``bench/engines.py``), deleted afterwards; B is woken as its broker does it (NATS and Redis
push, RabbitMQ pushes (basic.consume), Kafka tails the log). Kafka runs on a Tansu the benchmark starts; its broker
is not ``shared``, which two instances allow here because A holds no subscription.

``backstage`` in ``--brokers`` runs the same workload against two Backstage backends
(``bench/backstage_instance.js``, Node, the packages of the Backstage anchor that
``<shared>/anchors/backstage/setup.sh`` installs) on Backstage's PostgreSQL event bus, in a
database of their own (``--backstage-database``, dropped and created afresh): A has the HTTP
ingress and no subscriber; B subscribes to the topic. An event goes: A's ingress -> A's events
service (no local subscriber) -> POST /api/events/bus/v1/events on A's events-backend -> INSERT
into event_bus_events and pg_notify -> B's events-backend, holding B's subscriber's long poll
(GET .../subscriptions/{id}/events, 202), wakes and ends it after 1-10 ms -> B's subscriber
polls again and gets the event (200) -> B's handler. Backstage's bus drops the event's metadata,
so B reports when it received each event and the driver subtracts its own send time.

    python bench/latency.py                                   # sqlite and postgresql
    python bench/latency.py --brokers sqlite,postgresql,backstage
    python bench/latency.py --brokers postgresql --events 5000 --concurrency 4
    python bench/latency.py --brokers postgresql,nats,redis,rabbitmq,kafka
    python bench/latency.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

SQLite uses a file in a temporary directory; PostgreSQL a schema of its own
(``callboard_bench_<random>``), dropped afterwards. Ports: ``--port`` and ``--port + 1``
(callboard), ``--backstage-port`` and ``--backstage-port + 1`` (Backstage A and B).

This file is also the subscriber module B loads (``events.load: ['latency:register']``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from engines import ENGINES, Namespace, available, tansu

# The ingest benchmark's process helpers, and its PostgreSQL one.
from run import get, port_taken, postgres_execute, stop, wait_for

from callboard import Event, ModuleContext, module

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOPIC = "plain"
SENT_AT = "x-bench-sent-at"

# -- the subscriber module (runs inside instance B) ---------------------------------------------

_out: IO[str] | None = None


async def record(event: Event) -> None:
    received = time.time()
    sent = float(event.metadata.get(SENT_AT, "0") or 0)
    if _out is not None:
        _out.write(f"{event.payload.get('n', -1)} {(received - sent) * 1000:.3f}\n")


@module("bench-latency")
def register(context: ModuleContext) -> None:
    global _out
    _out = open(os.environ["BENCH_LATENCY_FILE"], "a", buffering=1)  # noqa: SIM115
    context.subscribers.add_subscription("bench-latency", (TOPIC,), record)


# -- the driver ---------------------------------------------------------------------------------


def config(port: int, broker: str, subscriber: bool) -> str:
    lines = [
        "backend:",
        f"  listen: {{host: 127.0.0.1, port: {port}}}",
        "logging: {level: warning}",
        "events:",
        f"  broker: '{broker}'",
        "  http:",
        f"    topics: [{TOPIC}]",
    ]
    if subscriber:
        lines.append("  load: ['latency:register']")
    return "\n".join(lines) + "\n"


def send(port: int, numbers: list[int], errors: list[str], sent: dict[int, float]) -> None:
    """POST one event per number to the ingress, one at a time, on one kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    path = f"/api/events/http/{TOPIC}"
    for n in numbers:
        body = json.dumps({"n": n}).encode()
        now = time.time()
        sent[n] = now
        headers = {"Content-Type": "application/json", SENT_AT: repr(now)}
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 202:
            errors.append(f"{n}: HTTP {response.status}")
    connection.close()


def drive(
    port: int, first: int, count: int, concurrency: int, sent: dict[int, float] | None = None
) -> list[str]:
    """Send events ``first`` .. ``first + count - 1``; ``sent`` gets each one's send time."""
    errors: list[str] = []
    sent = {} if sent is None else sent
    numbers = list(range(first, first + count))
    threads = [
        threading.Thread(target=send, args=(port, numbers[i::concurrency], errors, sent))
        for i in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def read_latencies(path: Path) -> dict[int, float]:
    found: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            n, _, ms = line.partition(" ")
            if ms:
                found[int(n)] = float(ms)
    return found


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(kind: str, url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    latency_file = workdir / f"{kind}-latencies.txt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "BENCH_LATENCY_FILE": str(latency_file),
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # B first: its subscription exists (and starts at the end) before A publishes.
        for name, port, subscriber in (("b", args.port + 1, True), ("a", args.port, False)):
            path = workdir / f"{kind}-{name}.yaml"
            path.write_text(config(port, url, subscriber))
            log = (workdir / f"{kind}-{name}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "callboard", "serve", "--config", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )
            wait_for(f"http://127.0.0.1:{port}/readyz")
        warmup = args.warmup
        errors = drive(args.port, 0, warmup, 1)
        errors += drive(args.port, warmup, args.events, args.concurrency)
        total = warmup + args.events
        deadline = time.monotonic() + 60
        found = read_latencies(latency_file)
        while len(found) < total and time.monotonic() < deadline:
            time.sleep(0.2)
            found = read_latencies(latency_file)
    finally:
        for process in reversed(processes):
            stop(process)
    values = [ms for n, ms in found.items() if n >= warmup]
    return summary(kind, args, values, errors)


def summary(
    kind: str, args: argparse.Namespace, values: list[float], errors: list[str]
) -> dict[str, Any]:
    return {
        "broker": kind,
        "events": args.events,
        "concurrency": args.concurrency,
        "received": len(values),
        "errors": len(errors),
        "p50_ms": round(percentile(values, 0.50), 2) if values else None,
        "p90_ms": round(percentile(values, 0.90), 2) if values else None,
        "p99_ms": round(percentile(values, 0.99), 2) if values else None,
        "max_ms": round(max(values), 2) if values else None,
        "mean_ms": round(statistics.fmean(values), 2) if values else None,
    }


def drop_schema(postgres: str, schema: str) -> None:
    postgres_execute(postgres, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# -- Backstage: two backends on its PostgreSQL event bus (bench/backstage_instance.js) -----------

# B's subscription; Backstage prefixes the plugin id, so on the bus it is benchlatency.latency-b.
BACKSTAGE_SUBSCRIBER = "latency-b"


def anchor_dir(shared: Path) -> Path:
    """The installed Backstage anchor (whose node_modules we use), as its ``setup.sh`` prints it."""
    if not shutil.which("node"):
        raise SystemExit("the backstage entry needs Node.js (node) on the PATH")
    setup = shared / "anchors/backstage/setup.sh"
    if not setup.is_file():
        raise SystemExit(
            f"the backstage entry needs the Backstage anchor: no {setup} (set --shared or "
            "CALLBOARD_BENCH_SHARED to the folder that holds anchors/backstage), or leave "
            "backstage out of --brokers"
        )
    result = subprocess.run([str(setup)], capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"the Backstage anchor could not be installed ({setup}: {last})")
    return Path(result.stdout.strip().splitlines()[-1])


def backstage_config(port: int, postgres: str, database: str) -> str:
    """One instance's app-config (JSON, which is YAML): its port, the shared bus database."""
    parts = urlsplit(postgres)
    connection = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": parts.username or "postgres",
        "password": parts.password or "postgres",
        "database": database,
    }
    config = {
        "app": {"baseUrl": "http://127.0.0.1:3000"},
        "backend": {
            "baseUrl": f"http://127.0.0.1:{port}",
            "listen": {"host": "127.0.0.1", "port": port},
            # One database for both instances, a schema per plugin in it (events, benchlatency):
            # the default division mode would ignore connection.database and share
            # backstage_plugin_events with any other Backstage on this server.
            "database": {"client": "pg", "pluginDivisionMode": "schema", "connection": connection},
            "auth": {"dangerouslyDisableDefaultAuthPolicy": True},
            "logger": {"level": "warn"},
        },
        "events": {"http": {"topics": [TOPIC]}},
    }
    return json.dumps(config, indent=2) + "\n"


def recreate_database(postgres: str, database: str, create: bool = True) -> None:
    # One statement at a time: DROP and CREATE DATABASE refuse to run in a transaction block,
    # which a script of several statements is.
    postgres_execute(postgres, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    if create:
        postgres_execute(postgres, f'CREATE DATABASE "{database}"')


def bus_query(postgres: str, database: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """The rows of a query (parameters ``$1``...) on the Backstage bus's database."""
    import asyncio

    import asyncpg

    async def run() -> list[tuple[Any, ...]]:
        connection = await asyncpg.connect(postgres, database=database)
        try:
            return [tuple(row) for row in await connection.fetch(sql, *params)]
        except asyncpg.UndefinedTableError:  # the events plugin has not migrated yet
            return []
        finally:
            await connection.close()

    return asyncio.run(run())


def subscription_appears(postgres: str, database: str, subscription: str) -> bool:
    """B's poll loop creates its subscription lazily; events published before it are not kept."""
    deadline = time.monotonic() + 20
    sql = "SELECT 1 FROM events.event_bus_subscriptions WHERE id = $1"
    while not bus_query(postgres, database, sql, subscription):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def records(port: int) -> dict[str, Any]:
    return dict(json.loads(get(f"http://127.0.0.1:{port}/api/benchlatency/records")))


def start_backstage(
    name: str,
    port: int,
    subscriber: str,
    workdir: Path,
    env: dict[str, str],
    args: argparse.Namespace,
    database: str,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    """Start instance ``name`` (added to ``processes``) and wait until it is ready.

    With a subscriber, also until its subscription is on the bus. Backstage's events client
    subscribes once, at start; if its own bus router answered 404 then ("events backend not
    found") it stays local-only for good, so such an instance is started again.
    """
    path = workdir / f"backstage-{name}.yaml"
    path.write_text(backstage_config(port, args.postgres, database))
    subscription = f"benchlatency.{subscriber}"
    for attempt in range(1, 4):
        # The child keeps its own copy of the log's descriptor; ours is closed at once.
        with (workdir / f"backstage-{name}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    ["node", str(HERE / "backstage_instance.js"), "--config", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, "BENCH_SUBSCRIBER_ID": subscriber, "BENCH_TOPICS": TOPIC},
                    cwd=workdir,
                    start_new_session=True,
                )
            )
        wait_for(f"http://127.0.0.1:{port}/.backstage/health/v1/readiness")
        if not subscriber or subscription_appears(args.postgres, database, subscription):
            return
        stop(processes.pop())
        print(f"{subscription} did not appear on the bus (attempt {attempt})", file=sys.stderr)
    raise SystemExit(f"subscription {subscription} did not appear on the Backstage bus")


def measure_backstage(args: argparse.Namespace, workdir: Path, anchor: Path) -> dict[str, Any]:
    # Backstage looks upwards from its working directory for a package.json (the project root).
    (workdir / "package.json").write_text('{"name": "callboard-latency-bench", "private": true}\n')
    database = args.backstage_database
    a_port, b_port = args.backstage_port, args.backstage_port + 1
    for port in (a_port, b_port):
        if port_taken(port):
            raise SystemExit(f"port {port} is taken (--backstage-port picks the pair to use)")
    env = {**os.environ, "NODE_ENV": "production", "BACKSTAGE_ANCHOR_DIR": str(anchor)}
    processes: list[subprocess.Popen[bytes]] = []
    recreate_database(args.postgres, database)
    try:
        # B first: its subscription must exist on the bus before A publishes.
        for name, port, subscriber in (("b", b_port, BACKSTAGE_SUBSCRIBER), ("a", a_port, "")):
            start_backstage(name, port, subscriber, workdir, env, args, database, processes)
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{b_port}/api/benchlatency/reset", b"")
        ).close()
        warmup = args.warmup
        sent: dict[int, float] = {}
        errors = drive(a_port, 0, warmup, 1, sent)
        errors += drive(a_port, warmup, args.events, args.concurrency, sent)
        total = warmup + args.events
        deadline = time.monotonic() + 60
        on_b = records(b_port)
        while on_b["count"] < total and time.monotonic() < deadline:
            time.sleep(0.2)
            on_b = records(b_port)
        time.sleep(0.5)  # anything delivered twice would show now
        on_b = records(b_port)
        on_a = records(a_port)
        bus = bus_query(
            args.postgres,
            database,
            "SELECT created_by, count(*) FROM events.event_bus_events GROUP BY created_by",
        )
        # Events stored on the bus that B never handled: their bus ids, and the ids stored
        # just before and after them (a gap in commit order shows as neighbours B did get).
        handled = {record[0] for record in on_b["records"]}
        lost = bus_query(
            args.postgres,
            database,
            "SELECT id, (data_json::json->'payload'->>'n')::int FROM events.event_bus_events"
            " WHERE NOT (data_json::json->'payload'->>'n')::int = ANY($1::int[]) ORDER BY id",
            sorted(handled),
        )
    except BaseException:
        for name in ("b", "a"):
            log = workdir / f"backstage-{name}.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(
                    f"--- Backstage {name.upper()} ({log.name}):", *tail, sep="\n", file=sys.stderr
                )
        raise
    finally:
        for process in reversed(processes):
            stop(process)
        recreate_database(args.postgres, database, create=False)
    found: dict[int, float] = {}
    for n, received_at, _ in on_b["records"]:
        if n in sent:
            found.setdefault(n, received_at - sent[n] * 1000)
    row = summary("backstage", args, [ms for n, ms in found.items() if n >= warmup], errors)
    row["checks"] = {
        "sent": total,
        "handled_on_b": on_b["count"],
        "distinct_on_b": len(found),
        "with_metadata_on_b": on_b["local"],  # delivered in-process, not through the bus
        "handled_on_a": on_a["count"],
        "bus_rows": {creator: count for creator, count in bus},
        "on_bus_not_on_b": [{"bus_id": i, "n": n} for i, n in lost],
    }
    return row


def crossed(row: dict[str, Any]) -> bool:
    """Every event went through the bus to B once (and none was handled on A)."""
    checks = row.get("checks")
    if checks is None:
        return True
    return bool(
        checks["handled_on_b"] == checks["distinct_on_b"] == checks["sent"]
        and checks["with_metadata_on_b"] == 0
        and checks["handled_on_a"] == 0
        and sum(checks["bus_rows"].values()) == checks["sent"]
    )


def measure_kind(
    kind: str, args: argparse.Namespace, workdir: Path, kafka: str, anchor: Path | None
) -> dict[str, Any]:
    """One broker's row, on a store of its own (``kafka``: the run's Tansu, ``host:port``)."""
    if kind == "sqlite":
        return measure(kind, f"sqlite:///{workdir / 'bench.db'}", args, workdir)
    if kind == "postgresql":
        schema = f"callboard_bench_{uuid.uuid4().hex[:12]}"
        sep = "&" if "?" in args.postgres else "?"
        try:
            return measure(kind, f"{args.postgres}{sep}schema={schema}", args, workdir)
        finally:
            drop_schema(args.postgres, schema)
    if kind in ENGINES:
        namespace = Namespace(kind, kafka)
        try:
            return measure(kind, namespace.url, args, workdir)
        finally:
            namespace.close()
    if kind == "backstage" and anchor is not None:
        return measure_backstage(args, workdir, anchor)
    raise SystemExit(
        f"unknown broker {kind!r}: sqlite, postgresql, {', '.join(ENGINES)}, backstage"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--brokers",
        default="sqlite,postgresql",
        help=f"any of sqlite, postgresql, {', '.join(ENGINES)}, backstage",
    )
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=100, help="events sent first, not counted")
    parser.add_argument("--concurrency", type=int, default=1, help="connections sending at once")
    parser.add_argument("--port", type=int, default=7020, help="instance A; B is on port + 1")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server to use (a schema of its own is created and dropped)",
    )
    parser.add_argument(
        "--backstage-port", type=int, default=7030, help="Backstage A; B is on port + 1"
    )
    parser.add_argument(
        "--backstage-database",
        default="backstage_latency",
        help="database for Backstage's bus on the --postgres server (dropped, created, dropped)",
    )
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("CALLBOARD_BENCH_SHARED", ROOT.parent / "shared")),
        help="the folder that holds anchors/backstage (as for bench/run.py)",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    rows = []
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    # Found before anything runs, so a missing anchor is said at once, not after the others.
    anchor = anchor_dir(args.shared) if "backstage" in kinds else None
    for kind in (k for k in kinds if k in ENGINES):
        why = available(kind)
        if why:
            raise SystemExit(f"{kind}: {why} (leave it out of --brokers)")
    with ExitStack() as stack:
        workdir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="callboard-latency-"))
        )
        kafka = stack.enter_context(tansu()) if "kafka" in kinds else ""
        for kind in kinds:
            rows.append(measure_kind(kind, args, workdir, kafka, anchor))
    if args.json:
        print(json.dumps(rows))
    else:
        print(
            f"{time.strftime('%Y-%m-%d %H:%M')}: publish on instance A -> handler on instance B, "
            f"{args.events:,} events, {args.concurrency} connection(s)\n"
        )
        print("| broker | received | errors | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['broker']} | {r['received']} | {r['errors']} | {r['p50_ms']} | "
                f"{r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} | {r['mean_ms']} |"
            )
        for r in rows:
            if "checks" in r:
                c = r["checks"]
                rows_on_bus = ", ".join(f"{n:,} by {who}" for who, n in c["bus_rows"].items())
                print(
                    f"\n{r['broker']}: sent {c['sent']:,} (with the warm-up); B handled "
                    f"{c['handled_on_b']:,} ({c['distinct_on_b']:,} distinct, "
                    f"{c['with_metadata_on_b']} with metadata, i.e. in-process), A handled "
                    f"{c['handled_on_a']}; event_bus_events: {rows_on_bus or 'empty'}"
                    f" -> {'every event crossed the bus once' if crossed(r) else 'NOT ALL CROSSED'}"
                )
                if c["on_bus_not_on_b"]:
                    lost = ", ".join(
                        f"n={x['n']} (bus id {x['bus_id']})" for x in c["on_bus_not_on_b"]
                    )
                    print(f"stored on the bus but never handled on B: {lost}")
    ok = all(r["received"] == args.events and not r["errors"] and crossed(r) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
