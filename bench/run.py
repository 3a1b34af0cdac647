#!/usr/bin/env python3
"""Webhook ingest benchmark: callboard beside the Backstage anchor and a bare Starlette route.

Starts, on loopback:
- the Backstage events backend anchor on port 7007 (``<shared>/anchors/backstage/start.sh``),
- ``callboard serve`` on port 7010 with the topic ``plain`` (and the GitHub module when the
  scenario asks for it) and a counting subscriber (``bench/counter.py``),
- a bare Starlette route on port 7012 that only parses the JSON (and checks the HMAC),
then drives them with wrk (one target after the other, round after round, so a drift of the
machine hits all alike; medians of the rounds) and checks that every request callboard accepted
reached its subscriber exactly once (the counting subscriber writes the id of every event it
handles, ``bench/tally.py``: every accepted event once, none twice). It also prints the CPU time
the callboard server spent per accepted request, accepting and delivering, summed over its
processes (Linux's ``/proc``).

    python bench/run.py --no-anchor            # callboard and the bare route only
    python bench/run.py                        # plain topic, memory broker
    python bench/run.py --scenario github      # signed GitHub pushes through the GitHub module
    python bench/run.py --broker sqlite:///bench.db
    python bench/run.py --broker sqlite:///bench.db --workers 2    # callboard serve --workers 2
    python bench/run.py --anchor-config app-config.pg.yaml \
        --broker 'postgresql://postgres@127.0.0.1:5432/postgres?schema=callboard_bench'

Every request is the same signed GitHub push (``BODY`` below, 414 bytes). A PostgreSQL schema
whose name starts with ``callboard_bench`` is dropped at the end, so every run starts from an
empty store. With ``--workers N`` callboard runs as ``callboard serve --workers N``: the CPU is
the parent's and every worker's, and the memory broker, which callboard refuses with several
workers, is skipped with a note.

Only the Backstage anchor lives outside the repository: ``<shared>`` is the folder that holds
``anchors/backstage``, by default ``../shared`` beside the repository (``--shared`` or
``CALLBOARD_BENCH_SHARED`` to change it). With ``--no-anchor`` nothing outside the repository
is needed but wrk (the Debian package ``wrk``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tally import cpu_spent, exactly_once, tree_cpu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CALLBOARD_PORT = 7010
BARE_PORT = 7012
ANCHOR_PORT = 7007

# The request every target gets: a GitHub push, as the Backstage anchor's github_push.json.
PUSH = {
    "ref": "refs/heads/main",
    "before": "0" * 40,
    "after": "1" * 40,
    "repository": {
        "id": 1,
        "name": "demo",
        "full_name": "acme/demo",
        "html_url": "https://github.com/acme/demo",
        "default_branch": "main",
    },
    "pusher": {"name": "octo"},
    "commits": [
        {
            "id": "1" * 40,
            "message": "fix",
            "added": ["catalog-info.yaml"],
            "removed": [],
            "modified": [],
        }
    ],
}
BODY = json.dumps(PUSH, separators=(",", ":")).encode()
SECRET = b"bench-secret"  # the GitHub module's webhookSecret, here and in the anchor
# One delivery id on every request: the benchmark measures ingest, not redelivery detection.
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"


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


def wrk_script(body: bytes, secret: bytes) -> str:
    """wrk's Lua script: POST the signed body; print requests, errors, p50 and p99 at the end."""
    signature = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    errors = " + ".join(
        f"summary.errors.{kind}" for kind in ("status", "connect", "read", "write", "timeout")
    )
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body.decode()}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["X-GitHub-Event"] = "push"\n'
        f'wrk.headers["X-GitHub-Delivery"] = "{DELIVERY}"\n'
        f'wrk.headers["X-Hub-Signature-256"] = "{signature}"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("RESULT %d %d %d %d\\n", summary.requests, '
        f"{errors}, latency:percentile(50), latency:percentile(99)))\n"
        "end\n"
    )


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, float]:
    """One wrk run against ``url``: requests/s, errors, and p50 and p99 in microseconds."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+)", out)
    if rate is None or result is None:
        raise SystemExit(f"wrk printed no result for {url}:\n{out}")
    _, errors, p50, p99 = (int(x) for x in result.groups())
    return {"req_per_s": float(rate.group(1)), "errors": errors, "p50": p50, "p99": p99}


def drive(
    targets: list[tuple[str, str]], script: Path, *, seconds: int, rounds: int, connections: int
) -> list[dict[str, Any]]:
    """Every target in turn, round after round; each target's medians and its errors."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in targets}
    for _ in range(rounds):
        for name, url in targets:
            runs[name].append(run_wrk(url, script, seconds, connections))
    first = statistics.median(r["req_per_s"] for r in runs[targets[0][0]])
    rows: list[dict[str, Any]] = []
    for name, _ in targets:
        rate = statistics.median(r["req_per_s"] for r in runs[name])
        rows.append(
            {
                "target": name,
                "req_per_s": round(rate, 1),
                "errors": int(sum(r["errors"] for r in runs[name])),
                # wrk reports latency in microseconds
                "p50_ms": round(statistics.median(r["p50"] for r in runs[name]) / 1000, 2),
                "p99_ms": round(statistics.median(r["p99"] for r in runs[name]) / 1000, 2),
                "ratio_to_first": round(rate / first, 2) if first else None,
            }
        )
    return rows


def wait_for_port(port: int, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not port_taken(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on port {port} after {seconds:.0f}s")
        time.sleep(0.1)


def start_anchor(shared: Path, config: str) -> int:
    """Start the Backstage anchor from ``<shared>``; its process id. A clear error without it."""
    script = shared / "anchors/backstage/start.sh"
    if not script.is_file():
        raise SystemExit(
            f"the Backstage anchor is missing: no {script} (set --shared or "
            "CALLBOARD_BENCH_SHARED to the folder that holds anchors/backstage), "
            "or pass --no-anchor to leave it out"
        )
    started = subprocess.run([str(script), config], stderr=subprocess.PIPE, text=True)
    if started.returncode:
        last = (started.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(
            f"the Backstage anchor did not start ({script} {config}: {last}); "
            "pass --no-anchor to leave it out"
        )
    anchor_dir = Path(os.environ.get("ANCHOR_DIR", "/tmp/backstage-anchor"))
    return int((anchor_dir / "anchor.pid").read_text())


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
    parser.add_argument(
        "--workers", type=int, default=1, help="callboard serve --workers N (default 1)"
    )
    parser.add_argument("--anchor-config", default="app-config.yaml")
    parser.add_argument("--no-anchor", action="store_true", help="leave the Backstage anchor out")
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("CALLBOARD_BENCH_SHARED", ROOT.parent / "shared")),
    )
    args = parser.parse_args()
    if args.workers > 1 and args.broker.startswith("memory:"):
        print(
            f"skipped: callboard refuses {args.workers} workers on the memory broker (its events "
            "stay inside one process); give a shared broker (--broker sqlite:///FILE or "
            "postgresql://...) or --workers 1"
        )
        return 0
    ensure_wrk()
    topic = "github" if args.scenario == "github" else "plain"
    delivered_topic = "github.push" if args.scenario == "github" else "plain"
    workdir = Path(tempfile.mkdtemp(prefix="callboard-bench-"))
    python = sys.executable

    drop_bench_schema(args.broker)
    with ExitStack() as stack:
        stack.callback(drop_bench_schema, args.broker)
        targets: list[tuple[str, str]] = []
        if not args.no_anchor:
            if port_taken(ANCHOR_PORT):
                raise SystemExit(
                    f"port {ANCHOR_PORT} is taken; the Backstage anchor needs it: stop what "
                    "listens there (a callboard serve on its default port, an old anchor) first"
                )
            pid = start_anchor(args.shared, args.anchor_config)
            stack.callback(lambda: os.killpg(os.getpgid(pid), signal.SIGTERM))
            targets.append(("backstage", f"http://127.0.0.1:{ANCHOR_PORT}/api/events/http/{topic}"))

        for port, what in ((CALLBOARD_PORT, "callboard serve"), (BARE_PORT, "the bare route")):
            if port_taken(port):
                raise SystemExit(
                    f"port {port} is taken; {what} needs it: stop what listens there "
                    "(another benchmark run?) first"
                )
        config = workdir / "callboard.yaml"
        config.write_text(callboard_config(args.scenario, args.broker))
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE)]))
        deliveries = workdir / "deliveries"
        deliveries.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": path,
            "BENCH_TOPICS": delivered_topic,
            "BENCH_DELIVERIES": str(deliveries),
        }
        serve = [python, "-m", "callboard", "serve", "--config", str(config)]
        server = start(
            [*serve, "--workers", str(args.workers)] if args.workers > 1 else serve,
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
        wait_for_port(BARE_PORT)
        cpu_before = tree_cpu(server.pid)
        targets += [
            ("callboard", f"http://127.0.0.1:{CALLBOARD_PORT}/api/events/http/{topic}"),
            ("starlette", f"http://127.0.0.1:{BARE_PORT}/api/events/http/{topic}"),
        ]
        script = workdir / "push.lua"
        script.write_text(wrk_script(BODY, SECRET))
        rows = drive(
            targets,
            script,
            seconds=args.seconds,
            rounds=args.rounds,
            connections=args.connections,
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
        cpu_after = tree_cpu(server.pid)
        stop(server)  # its processes write the last delivered ids as they exit
        once = exactly_once(deliveries, int(accepted))
        shutil.rmtree(deliveries, ignore_errors=True)

    by_name = {row["target"]: row for row in rows}
    ours = by_name["callboard"]
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    print(
        f"scenario {args.scenario}, broker {args.broker}{workers}, {args.connections} connections, "
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
    spent = cpu_spent(cpu_before, cpu_after)
    if spent is not None and accepted:
        # Everything the server did for the run, accepting and delivering, per accepted request.
        cpu_per_request = spent / accepted * 1e6
        print(f"callboard CPU per accepted request (ingest and delivery): {cpu_per_request:.0f} µs")
    ok = delivered >= accepted > 0 and once.exactly_once
    print("every accepted event delivered" if ok else "MISSING DELIVERIES")
    print(f"delivery to the subscription, by event id: {once.summary()}")
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
                "workers": args.workers,
                "distinct_delivered": once.distinct,
                "delivered_again": once.repeated,
            },
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
