#!/usr/bin/env python3
"""Cross-instance latency: from a publish on one ``callboard serve`` to the handler on another.

For each broker, two ``callboard serve`` processes share one store: instance A (the ingress
only) and instance B (the ingress and a subscription whose handler records, for each event,
the time since the client sent it). The driver POSTs ``--events`` webhooks to A's ingress, one
at a time per connection (``--concurrency`` connections), each with its send time in a header;
the event goes through the store to B, which is woken by the broker (PostgreSQL: LISTEN/NOTIFY;
SQLite: watching the file's data version) and hands it to the handler. The figure is therefore
client send -> A accepts and commits -> B's handler, on one machine's clock.

    python bench/latency.py                                   # sqlite and postgresql
    python bench/latency.py --brokers postgresql --events 5000 --concurrency 4
    python bench/latency.py --postgres postgresql://postgres@127.0.0.1:5432/postgres

SQLite uses a file in a temporary directory; PostgreSQL a schema of its own
(``callboard_bench_<random>``), dropped afterwards. Ports: ``--port`` and ``--port + 1``.

This file is also the subscriber module B loads (``events.load: ['latency:register']``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from run import stop, wait_for  # the ingest benchmark's process helpers

from callboard import Event, ModuleContext, module

HERE = Path(__file__).resolve().parent
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


def send(port: int, numbers: list[int], errors: list[str]) -> None:
    """POST one event per number to the ingress, one at a time, on one kept-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    path = f"/api/events/http/{TOPIC}"
    for n in numbers:
        body = json.dumps({"n": n}).encode()
        headers = {"Content-Type": "application/json", SENT_AT: repr(time.time())}
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        response.read()
        if response.status != 202:
            errors.append(f"{n}: HTTP {response.status}")
    connection.close()


def drive(port: int, first: int, count: int, concurrency: int) -> list[str]:
    errors: list[str] = []
    numbers = list(range(first, first + count))
    threads = [
        threading.Thread(target=send, args=(port, numbers[i::concurrency], errors))
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


def measure(kind: str, url: str, args: argparse.Namespace, workdir: Path) -> dict[str, object]:
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
    import psycopg

    with psycopg.connect(postgres, autocommit=True) as connection:
        connection.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="sqlite,postgresql")
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=100, help="events sent first, not counted")
    parser.add_argument("--concurrency", type=int, default=1, help="connections sending at once")
    parser.add_argument("--port", type=int, default=7020, help="instance A; B is on port + 1")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL server to use (a schema of its own is created and dropped)",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="callboard-latency-") as tmp:
        workdir = Path(tmp)
        for kind in [k.strip() for k in args.brokers.split(",") if k.strip()]:
            if kind == "sqlite":
                rows.append(measure(kind, f"sqlite:///{workdir / 'bench.db'}", args, workdir))
            elif kind == "postgresql":
                schema = f"callboard_bench_{uuid.uuid4().hex[:12]}"
                sep = "&" if "?" in args.postgres else "?"
                try:
                    url = f"{args.postgres}{sep}schema={schema}"
                    rows.append(measure(kind, url, args, workdir))
                finally:
                    drop_schema(args.postgres, schema)
            else:
                raise SystemExit(f"unknown broker {kind!r}: sqlite or postgresql")
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
    ok = all(r["received"] == args.events and not r["errors"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
