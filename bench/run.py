#!/usr/bin/env python3
"""Webhook ingest benchmark: callboard beside the Backstage anchor and a bare Starlette route.

Starts, on loopback:
- the Backstage events backend anchor on port 7007 (``<shared>/anchors/backstage/start.sh``),
- ``callboard serve`` on port 7010 with the topic ``plain`` (and the GitHub module when the
  scenario asks for it) and a counting subscriber (``bench/counter.py``),
- a bare Starlette route on port 7012 that only parses the JSON (and checks the HMAC),
then drives all three with ``<shared>/bench/ingest_compare.py`` (wrk, rounds in turn) and checks
that every request callboard accepted reached its subscriber. It also prints the CPU time the
callboard process spent per accepted request, accepting and delivering (Linux's ``/proc``).

    python bench/run.py                        # plain topic, memory broker
    python bench/run.py --scenario github      # signed GitHub pushes through the GitHub module
    python bench/run.py --broker sqlite:///bench.db
    python bench/run.py --anchor-config app-config.pg.yaml \
        --broker 'postgresql://postgres@127.0.0.1:5432/postgres?schema=callboard_bench'

A PostgreSQL schema whose name starts with ``callboard_bench`` is dropped at the end, so every
run starts from an empty store.

``<shared>`` is the folder that holds the anchor and the driver, by default ``../shared``
beside the repository (``--shared`` or ``CALLBOARD_BENCH_SHARED`` to change it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CALLBOARD_PORT = 7010
BARE_PORT = 7012
ANCHOR_PORT = 7007


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {seconds:.0f}s")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: install the Debian package 'wrk'")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; ``None`` without Linux's ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def callboard_config(scenario: str, broker: str) -> str:
    lines = [
        "backend:",
        f"  listen: {{host: 127.0.0.1, port: {CALLBOARD_PORT}}}",
        "logging: {level: warning}",
        "events:",
        f"  broker: '{broker}'",
        "  load: ['counter:register']",
        "  http:",
        "    topics: [plain]",
        # The driver sends every request with the same X-GitHub-Delivery; this benchmark
        # measures ingest and delivery of every request, not redelivery detection.
        "    detectRedeliveries: false",
    ]
    if scenario == "github":
        lines += [
            "  modules:",
            "    github:",
            "      webhookSecret: bench-secret",
        ]
    return "\n".join(lines) + "\n"


def drop_bench_schema(broker: str) -> None:
    """Drop the benchmark's own PostgreSQL schema (``?schema=callboard_bench...``), if any."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(broker)
    params = dict(parse_qsl(parts.query))
    schema = params.pop("schema", "")
    if not parts.scheme.startswith("postgres") or not schema.startswith("callboard_bench"):
        return
    conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(params)))
    postgres_execute(conninfo, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def postgres_execute(url: str, script: str, *, database: str | None = None) -> None:
    """Run SQL statements (no parameters) on a connection of their own, through asyncpg.

    Imported here: only PostgreSQL runs need it.
    """
    import asyncio

    import asyncpg

    async def run() -> None:
        connection = await asyncpg.connect(url, database=database)
        try:
            await connection.execute(script)
        finally:
            await connection.close()

    asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["plain", "github"], default="plain")
    parser.add_argument("--broker", default="memory://")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--anchor-config", default="app-config.yaml")
    parser.add_argument("--no-anchor", action="store_true", help="leave the Backstage anchor out")
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("CALLBOARD_BENCH_SHARED", ROOT.parent / "shared")),
    )
    args = parser.parse_args()
    ensure_wrk()
    topic = "github" if args.scenario == "github" else "plain"
    delivered_topic = "github.push" if args.scenario == "github" else "plain"
    workdir = Path(tempfile.mkdtemp(prefix="callboard-bench-"))
    python = sys.executable

    drop_bench_schema(args.broker)
    with ExitStack() as stack:
        stack.callback(drop_bench_schema, args.broker)
        targets: list[str] = []
        if not args.no_anchor:
            if port_taken(ANCHOR_PORT):
                raise SystemExit(
                    f"port {ANCHOR_PORT} is taken; the Backstage anchor needs it: stop what "
                    "listens there (a callboard serve on its default port, an old anchor) first"
                )
            subprocess.run(
                [str(args.shared / "anchors/backstage/start.sh"), args.anchor_config], check=True
            )
            anchor_dir = Path(os.environ.get("ANCHOR_DIR", "/tmp/backstage-anchor"))
            pid = int((anchor_dir / "anchor.pid").read_text())
            stack.callback(lambda: os.killpg(os.getpgid(pid), signal.SIGTERM))
            targets.append(f"backstage=http://127.0.0.1:{ANCHOR_PORT}/api/events/http/{topic}")

        config = workdir / "callboard.yaml"
        config.write_text(callboard_config(args.scenario, args.broker))
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE)]))
        env = {**os.environ, "PYTHONPATH": path, "BENCH_TOPICS": delivered_topic}
        server = start(
            [python, "-m", "callboard", "serve", "--config", str(config)],
            workdir / "callboard.log",
            env,
        )
        stack.callback(stop, server)
        bare = start(
            [python, str(HERE / "bare_starlette.py"), str(BARE_PORT)], workdir / "bare.log"
        )
        stack.callback(stop, bare)
        base = f"http://127.0.0.1:{CALLBOARD_PORT}"
        wait_for(f"{base}/readyz")
        cpu_before = cpu_seconds(server.pid)
        time.sleep(1.5)  # the bare app has no health route; give uvicorn a moment
        targets += [
            f"callboard=http://127.0.0.1:{CALLBOARD_PORT}/api/events/http/{topic}",
            f"starlette=http://127.0.0.1:{BARE_PORT}/api/events/http/{topic}",
        ]
        command = [
            python,
            str(args.shared / "bench/ingest_compare.py"),
            "--seconds",
            str(args.seconds),
            "--rounds",
            str(args.rounds),
            "--connections",
            str(args.connections),
            "--json",
        ]
        for target in targets:
            command += ["--target", target]
        rows = json.loads(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout
        )

        # Every request callboard accepted must reach the subscriber.
        accepted = delivered = 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = get(f"{base}/metrics")
            accepted = metric(text, "callboard_ingress_requests_total", topic=topic, status="202")
            delivered = metric(
                text,
                "callboard_events_delivered_total",
                subscription="bench-counter",
                topic=delivered_topic,
            )
            if delivered >= accepted:
                break
            time.sleep(0.5)
        cpu_after = cpu_seconds(server.pid)

    by_name = {row["target"]: row for row in rows}
    ours = by_name["callboard"]
    print(
        f"scenario {args.scenario}, broker {args.broker}, {args.connections} connections, "
        f"{args.rounds} rounds of {args.seconds}s (medians)\n"
    )
    print("| target | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['target']} | {row['req_per_s']:,.0f} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} |"
        )
    print()
    if "backstage" in by_name:
        print(
            f"callboard / backstage: {ours['req_per_s'] / by_name['backstage']['req_per_s']:.1f}x"
        )
    print(
        f"callboard / bare starlette: {ours['req_per_s'] / by_name['starlette']['req_per_s']:.0%}"
    )
    print(f"accepted by callboard: {accepted:,.0f}; delivered to the subscriber: {delivered:,.0f}")
    cpu_per_request = None
    if cpu_before is not None and cpu_after is not None and accepted:
        # Everything the server did for the run, accepting and delivering, per accepted request.
        cpu_per_request = (cpu_after - cpu_before) / accepted * 1e6
        print(f"callboard CPU per accepted request (ingest and delivery): {cpu_per_request:.0f} µs")
    ok = delivered >= accepted > 0
    print("every accepted event delivered" if ok else "MISSING DELIVERIES")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (results / f"{args.scenario}-{stamp}.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": rows,
                "accepted": accepted,
                "delivered": delivered,
                "cpu_us_per_request": cpu_per_request,
            },
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
