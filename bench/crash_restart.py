#!/usr/bin/env python3
"""Crash and restart under load: is every event answered ``202`` delivered, and how often twice?

For each broker, one ``callboard serve`` process takes plain webhooks on the topic ``crash``
from ``--clients`` concurrent clients (each request's body ``{"n": <unique number>}``) and
delivers them to a counting subscription (this file, loaded as the module
``crash_restart:register``), which appends each ``n`` it handles to a file with one
``O_APPEND`` write. Every ``--kill-every`` seconds the driver ``kill -9``s the server's process
group and starts it again on the same store; a client that finds the server gone moves on to the
next number (it never resends one, so a number delivered twice is a duplicate by the broker, not
by the client). With ``--restart-postgres`` a PostgreSQL cluster of its own (``initdb`` in a
temporary directory, on ``--postgres-port``) is used instead of ``--postgres``, and every
other kill takes the PostgreSQL server down with ``pg_ctl stop -m immediate`` (its crash) and
starts it again.

After the load the driver waits until every accepted event was delivered, or ``--settle``
seconds (a killed process's leases run out after the broker's lease, 30 s), then prints per
broker: events answered ``202``, events delivered (distinct), lost (answered ``202`` and never
delivered: must be 0), duplicates (deliveries beyond the first of an event), and events
delivered whose ``202`` the client never saw (the server died after storing them).

    python bench/crash_restart.py                                  # sqlite, then postgresql
    python bench/crash_restart.py --brokers sqlite --seconds 30 --kill-every 4
    python bench/crash_restart.py --brokers postgresql --restart-postgres

PostgreSQL without ``--restart-postgres`` uses ``--postgres`` (a schema of its own, dropped
afterwards) and is skipped when that server cannot be reached.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

from run import port_taken, postgres_execute, stop, wait_for

from callboard import Event, ModuleContext, module

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOPIC = "crash"


async def _record(event: Event) -> None:
    line = f"{event.payload['n']}\n".encode()
    descriptor = os.open(os.environ["CRASH_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


@module("crash-counter")
def register(context: ModuleContext) -> None:
    context.subscribers.add_subscription("crash-counter", [TOPIC], _record)


class Load:
    """Clients posting numbered events; what was answered 202, and how many requests failed."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.accepted: set[int] = set()
        self.failed = 0
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _client(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            with self._lock:
                n = next(self._numbers)
            try:
                if connection is None:
                    connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                body = f'{{"n": {n}}}'.encode()
                headers = {"content-type": "application/json"}
                connection.request("POST", f"/api/events/http/{TOPIC}", body, headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 202
            except (OSError, http.client.HTTPException):
                ok = False
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.05)  # the server is down: do not spin
            with self._lock:
                if ok:
                    self.accepted.add(n)
                else:
                    self.failed += 1


class OwnPostgres:
    """A PostgreSQL cluster of the run's own, to crash and restart (run as user ``postgres``)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.data = directory / "pgdata"
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        directory.mkdir(parents=True, exist_ok=True)
        for folder in (directory.parent, directory):
            folder.chmod(0o777)  # the cluster's owner must reach and write it
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    def _run(self, *command: str) -> None:
        subprocess.run([*self._user, *command], check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c fsync=on"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-w", "-l", f"{self.data}/log", "start"
        )

    def crash(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")

    def remove(self) -> None:
        subprocess.run(
            [*self._user, "pg_ctl", "-D", str(self.data), "-m", "fast", "stop"], capture_output=True
        )


def _serve(config: Path, workdir: Path, record: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(HERE), str(ROOT / "src"), env.get("PYTHONPATH")])
    )
    env["CRASH_RECORD"] = str(record)
    env.pop("CALLBOARD_CONFIG", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "callboard", "serve", "--config", str(config)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 9)
        process.wait()


def run_one(
    name: str, broker: str, args: argparse.Namespace, workdir: Path, pg: OwnPostgres | None
) -> dict[str, int]:
    config = workdir / f"{name}.yaml"
    record = workdir / f"{name}.delivered"
    log = workdir / f"{name}.log"
    config.write_text(
        "\n".join(
            [
                "backend:",
                f"  listen: {{host: 127.0.0.1, port: {args.port}}}",
                "logging: {level: warning}",
                "events:",
                f"  broker: '{broker}'",
                "  load: ['crash_restart:register']",
                "  http:",
                f"    topics: [{TOPIC}]",
            ]
        )
        + "\n"
    )
    ready = f"http://127.0.0.1:{args.port}/readyz"
    server = _serve(config, workdir, record, log)
    wait_for(ready)
    load = Load(args.port, args.clients)
    load.start()
    kills = 0
    ends = time.monotonic() + args.seconds
    try:
        while time.monotonic() + args.kill_every < ends:
            time.sleep(args.kill_every)
            _kill(server)
            kills += 1
            if pg is not None and kills % 2 == 0:
                pg.crash()
                pg.start()
            server = _serve(config, workdir, record, log)
            wait_for(ready)
        time.sleep(max(0.0, ends - time.monotonic()))
    finally:
        load.stop()
    accepted = load.accepted
    deadline = time.monotonic() + args.settle
    delivered: Counter[int] = Counter()
    while time.monotonic() < deadline:
        delivered = (
            Counter(int(n) for n in record.read_text().split()) if record.exists() else Counter()
        )
        if accepted <= set(delivered):
            time.sleep(1.0)  # let late duplicates show
            delivered = Counter(int(n) for n in record.read_text().split())
            break
        time.sleep(0.5)
    stop(server)
    return {
        "kills": kills,
        "answered 202": len(accepted),
        "delivered": len(delivered),
        "lost": len(accepted - set(delivered)),
        "duplicates": sum(count - 1 for count in delivered.values()),
        "delivered, 202 not seen": len(set(delivered) - accepted),
        "requests failed": load.failed,
    }


def _reachable(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 1):
            return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="sqlite,postgresql")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--settle", type=float, default=120.0)
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--restart-postgres", action="store_true")
    parser.add_argument("--postgres-port", type=int, default=55432)
    args = parser.parse_args()
    if port_taken(args.port):
        raise SystemExit(f"port {args.port} is taken; pass --port")
    results: dict[str, dict[str, int]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="callboard-crash-"))
    try:
        for name in args.brokers.split(","):
            if name == "sqlite":
                results[name] = run_one(
                    name, f"sqlite:///{workdir / 'events.db'}", args, workdir, None
                )
                continue
            pg = OwnPostgres(workdir / "pg", args.postgres_port) if args.restart_postgres else None
            url = pg.url if pg is not None else args.postgres
            if not _reachable(url):
                print(f"postgresql: {url} unreachable, skipped")
                continue
            schema = f"callboard_bench_{uuid.uuid4().hex[:8]}"
            try:
                label = "postgresql (restarted)" if pg is not None else name
                results[label] = run_one(name, f"{url}?schema={schema}", args, workdir, pg)
            finally:
                if pg is not None:
                    pg.remove()
                else:
                    postgres_execute(url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    columns = [
        "kills",
        "answered 202",
        "delivered",
        "lost",
        "duplicates",
        "delivered, 202 not seen",
        "requests failed",
    ]
    print(f"{'broker':<24}" + "".join(f"{c:>{len(c) + 2}}" for c in columns))
    for name, row in results.items():
        print(f"{name:<24}" + "".join(f"{row[c]:>{len(c) + 2}}" for c in columns))
    return 1 if any(row["lost"] for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
