"""One measured serving session: a server on a fresh store, driven by wrk, checked to the event.

``measure(server, store, options)`` starts the server (``callboard serve``, with ``--workers N``
or not, or callboard's application under granian, see ``granian_app.py``) on a store of its own
(a new SQLite file, a new PostgreSQL schema, or the memory broker), waits until it is ready,
warms it up, then drives it with wrk (``bench/run.py``'s signed push on the topic ``plain``) and
waits until the counting subscriber has every accepted event. It returns:

- requests/s, p50 and p99 as wrk saw them, and wrk's errors,
- the CPU time the server's processes (parent and workers) spent per request accepted in the
  measured window, accepting and delivering (``tally.tree_cpu``),
- the check that every event accepted during the session (warm-up included) reached the
  subscription exactly once (``tally.exactly_once``),
- on PostgreSQL, the CPU time the database server's backends spent for the whole session (the
  backends of the benchmark's own database, ``callboard_bench``, read from ``/proc`` just before
  the server stops), and the transactions committed in that database over the session
  (``pg_stat_database.xact_commit`` before the server starts and once its backends have exited,
  since a backend reports its counts only now and then, and when it exits): per accepted request
  and per commit. The session's start (the schema's creation) is in them, a small share. Commits
  are every transaction (``xact_commit``): publishes, claims and acknowledgements alike. Beside
  them, the CPU of every process of the database server over the measured window, per request:
  an upper bound (the WAL writer's and checkpointer's share, and any other user's work), and the
  WAL it wrote (``pg_current_wal_lsn``), per request.

The PostgreSQL figures need the database server on this machine (its backends' ``/proc``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from run import (
    BODY,
    CALLBOARD_PORT,
    SECRET,
    callboard_config,
    cpu_seconds,
    get,
    metric,
    run_wrk,
    start,
    stop,
    wait_for,
    wrk_script,
)
from tally import Deliveries, cpu_spent, exactly_once, tree_cpu

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
#: The benchmark's own PostgreSQL database: its commits and backends are the benchmark's alone.
PG_SERVER = os.environ.get("CALLBOARD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
PG_DATABASE = "callboard_bench"
STORES = ("memory", "sqlite", "postgresql")


@dataclass(frozen=True)
class Server:
    """How to serve: ``uvicorn`` (``callboard serve``) or ``granian``, with ``workers`` processes."""

    http: str = "uvicorn"
    workers: int = 1

    @property
    def label(self) -> str:
        workers = "1 worker" if self.workers == 1 else f"{self.workers} workers"
        return f"{self.http}, {workers}"

    def command(self, config: Path) -> list[str]:
        if self.http == "uvicorn":
            serve = [PYTHON, "-m", "callboard", "serve", "--config", str(config)]
            return serve if self.workers == 1 else [*serve, "--workers", str(self.workers)]
        return [
            PYTHON,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(CALLBOARD_PORT),
            "--workers",
            str(self.workers),
            "--runtime-threads",
            "1",
            "--loop",
            "uvloop",  # as uvicorn's "auto" picks when uvloop is installed
            "--http",
            "1",
            "--no-ws",
            "--log-level",
            "warning",
            "granian_app:create",
        ]


@dataclass(frozen=True)
class Options:
    seconds: int = 10
    warmup: int = 1
    connections: int = 32


@dataclass(frozen=True)
class Postgres:
    """The database server's share of a session: its backends' CPU and the commits."""

    cpu_seconds: float
    commits: int
    #: Every process of the database server (all databases' backends, the WAL writer, the
    #: checkpointer...) in the measured window: an upper bound, other users' work included.
    server_cpu_seconds: float | None
    #: WAL the database server wrote in the measured window (anyone's, as the line above).
    wal_bytes: int
    #: Connections the server held to the database at the end of the load.
    backends: int


@dataclass(frozen=True)
class Measured:
    server: Server
    store: str
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: Requests accepted in the measured window (``/metrics``), and the CPU per one of them.
    accepted: int
    cpu_us: float | None
    #: Requests accepted over the whole session, warm-up included (the PostgreSQL figures').
    session_accepted: int
    deliveries: Deliveries
    postgres: Postgres | None

    @property
    def pg_cpu_us(self) -> float | None:
        if self.postgres is None or not self.session_accepted:
            return None
        return self.postgres.cpu_seconds / self.session_accepted * 1e6

    @property
    def pg_server_cpu_us(self) -> float | None:
        if self.postgres is None or self.postgres.server_cpu_seconds is None or not self.accepted:
            return None
        return self.postgres.server_cpu_seconds / self.accepted * 1e6

    @property
    def wal_bytes_per_request(self) -> float | None:
        if self.postgres is None or not self.accepted:
            return None
        return self.postgres.wal_bytes / self.accepted

    @property
    def requests_per_commit(self) -> float | None:
        if self.postgres is None or not self.postgres.commits:
            return None
        return self.session_accepted / self.postgres.commits

    @property
    def pg_cpu_us_per_commit(self) -> float | None:
        if self.postgres is None or not self.postgres.commits:
            return None
        return self.postgres.cpu_seconds / self.postgres.commits * 1e6


def pg_fetch(query: str, *, database: str = "postgres") -> list[Any]:
    """The rows of one statement (no parameters), on a connection of its own, through asyncpg."""
    import asyncpg

    async def run() -> list[Any]:
        connection = await asyncpg.connect(f"{PG_SERVER}/{database}")
        try:
            return list(await connection.fetch(query))
        finally:
            await connection.close()

    return asyncio.run(run())


def create_pg_database() -> None:
    if not pg_fetch(f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"):
        pg_fetch(f'CREATE DATABASE "{PG_DATABASE}"')


def drop_pg_database() -> None:
    pg_fetch(f'DROP DATABASE IF EXISTS "{PG_DATABASE}" WITH (FORCE)')


_OTHER_BACKENDS = (
    "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


def _pg_backends_cpu() -> tuple[float, int]:
    """CPU seconds the backends of the benchmark's database have spent so far, and how many."""
    rows = pg_fetch(f"SELECT pid {_OTHER_BACKENDS}", database=PG_DATABASE)
    return sum(cpu_seconds(row[0]) or 0.0 for row in rows), len(rows)


def _postmaster() -> int | None:
    """The database server's first process (the parent of every backend), if on this machine."""
    rows = pg_fetch("SELECT split_part(pg_read_file('postmaster.pid'), E'\\n', 1)")
    pid = int(rows[0][0])
    return pid if Path(f"/proc/{pid}").is_dir() else None


def _wal_position() -> int:
    return int(pg_fetch("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0])


def _pg_commits(wait: float = 30.0) -> int:
    """Transactions committed in the benchmark's database, once no other backend is left in it."""
    deadline = time.monotonic() + wait
    while pg_fetch(f"SELECT 1 {_OTHER_BACKENDS}", database=PG_DATABASE):
        if time.monotonic() > deadline:
            raise SystemExit(f"connections to {PG_DATABASE} are still open after {wait:.0f}s")
        time.sleep(0.1)
    rows = pg_fetch(
        f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{PG_DATABASE}'",
        database=PG_DATABASE,
    )
    return int(rows[0][0])


@dataclass
class _Store:
    """A fresh store for one session; ``close()`` drops what it made."""

    kind: str
    directory: Path

    def __post_init__(self) -> None:
        self.schema = f"callboard_bench_{uuid.uuid4().hex[:12]}"

    @property
    def url(self) -> str:
        if self.kind == "memory":
            return "memory://"
        if self.kind == "sqlite":
            return f"sqlite:///{self.directory / 'bench.db'}"
        return f"{PG_SERVER}/{PG_DATABASE}?schema={self.schema}"

    def close(self) -> None:
        if self.kind == "postgresql":
            pg_fetch(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE', database=PG_DATABASE)


def _counts(base: str) -> tuple[float, float]:
    """Requests accepted on ``plain`` and events the counting subscription handled, so far."""
    text = get(f"{base}/metrics")
    accepted = metric(text, "callboard_ingress_requests_total", topic="plain", status="202")
    delivered = metric(text, "callboard_events_delivered_total", subscription="bench-counter")
    return accepted, delivered


def _settle(base: str, seconds: float = 60.0) -> float:
    """Wait until the subscriber has every accepted event; the accepted count."""
    deadline = time.monotonic() + seconds
    while True:
        accepted, delivered = _counts(base)
        if delivered >= accepted or time.monotonic() > deadline:
            return accepted
        time.sleep(0.2)


def measure(server: Server, store_kind: str, options: Options) -> Measured:
    """One session of ``server`` on a fresh ``store_kind`` store (see the module's docstring)."""
    workdir = Path(tempfile.mkdtemp(prefix="callboard-bench-"))
    store = _Store(store_kind, workdir)
    config = workdir / "callboard.yaml"
    config.write_text(callboard_config("plain", store.url))
    deliveries = workdir / "deliveries"
    deliveries.mkdir()
    script = workdir / "push.lua"
    script.write_text(wrk_script(BODY, SECRET))
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(HERE)]))
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "BENCH_TOPICS": "plain",
        "BENCH_DELIVERIES": str(deliveries),
        "CALLBOARD_BENCH_CONFIG": str(config),
    }
    base = f"http://127.0.0.1:{CALLBOARD_PORT}"
    url = f"{base}/api/events/http/plain"
    on_postgres = store_kind == "postgresql"
    try:
        commits_before = _pg_commits() if on_postgres else 0
        postmaster = _postmaster() if on_postgres else None
        process = start(server.command(config), workdir / "server.log", env)
        try:
            wait_for(f"{base}/readyz")
            if options.warmup:
                run_wrk(url, script, options.warmup, options.connections)
            accepted_before = _settle(base)
            cpu_before = tree_cpu(process.pid)
            server_before = tree_cpu(postmaster) if postmaster else None
            wal_before = _wal_position() if on_postgres else 0
            load = run_wrk(url, script, options.seconds, options.connections)
            accepted_after = _settle(base)
            cpu_after = tree_cpu(process.pid)
            server_after = tree_cpu(postmaster) if postmaster else None
            wal_after = _wal_position() if on_postgres else 0
            pg_cpu, backends = _pg_backends_cpu() if on_postgres else (0.0, 0)
        except BaseException:
            stop(process)
            log = (workdir / "server.log").read_text(errors="replace")[-2000:]
            print(f"{server.label} on {store_kind} failed; the server's log ends:\n{log}")
            raise
        stop(process)  # its processes write the last delivered ids as they exit
        commits = _pg_commits() - commits_before if on_postgres else 0
    finally:
        store.close()
    once = exactly_once(deliveries, int(accepted_after))
    shutil.rmtree(workdir, ignore_errors=True)  # kept only when the session failed
    accepted = int(accepted_after - accepted_before)
    postgres = None
    if on_postgres:
        server_cpu = cpu_spent(server_before, server_after)
        postgres = Postgres(pg_cpu, commits, server_cpu, wal_after - wal_before, backends)
    spent = cpu_spent(cpu_before, cpu_after)
    return Measured(
        server=server,
        store=store_kind,
        req_per_s=load["req_per_s"],
        p50_ms=load["p50"] / 1000,  # wrk reports microseconds
        p99_ms=load["p99"] / 1000,
        errors=int(load["errors"]),
        accepted=accepted,
        cpu_us=spent / accepted * 1e6 if spent is not None and accepted else None,
        session_accepted=int(accepted_after),
        deliveries=once,
        postgres=postgres,
    )
