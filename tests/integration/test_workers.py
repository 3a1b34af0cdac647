"""``callboard serve --workers 2`` as a real process: one server, two serving processes.

The server loads ``support_modules``, which records each delivery in a file the test reads; its
subscriptions ``A`` and ``B`` run in both workers as competing consumers of one SQLite file or
one PostgreSQL schema of the test's own.

- Webhooks over many connections: every one accepted, both workers answering some, each event
  handled once per subscription, and ``/metrics`` counting every request once, whichever worker
  answers the scrape.
- ``kill -9`` of a worker: it is started again and the server goes on.
- SIGTERM: every worker drains and the server exits 0.
- The memory broker with two workers, and a busy port: refused in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.servers import (
    ROOT,
    Record,
    free_port,
    handled,
    read_records,
    write_config,
)
from tests.services import POSTGRES_URL, drop_postgres_schema, require_service

pytestmark = pytest.mark.slow

EVENTS = 120
CONNECTIONS = 24
SERVE = (sys.executable, "-m", "callboard", "serve")


def command_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("CALLBOARD_CONFIG", None)
    return env


class Workers:
    """One ``callboard serve --workers 2`` process (its workers are its children)."""

    def __init__(self, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*SERVE, "--config", str(config), "--workers", "2", "--port", str(self.port)],
                cwd=workdir,
                env=command_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def readiness(
        self, client: httpx.AsyncClient, timeout: float = 5
    ) -> tuple[int, dict[str, Any]] | None:
        with contextlib.suppress(httpx.TransportError):
            response = await client.get(self.url + "/readyz", timeout=timeout)
            return response.status_code, response.json()
        return None

    async def wait_ready(
        self, client: httpx.AsyncClient, timeout: float = 30, *, not_pid: int | None = None
    ) -> list[int]:
        """Wait until every worker is ready (and none is ``not_pid``); the workers' pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.logs()}")
            answer = await self.readiness(client)
            if answer is not None and answer[0] == 200:
                pids = [int(worker["pid"]) for worker in answer[1]["workers"]]
                if not_pid not in pids:
                    return pids
            await asyncio.sleep(0.1)
        pytest.fail(f"the workers did not become ready:\n{self.logs()}")

    async def samples(self, client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
        """``/metrics`` as (sample name, its labels rendered) -> value."""
        response = await client.get(self.url + "/metrics", timeout=10)
        assert response.status_code == 200
        return {
            (sample.name, ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))): (
                sample.value
            )
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    async def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the server did not exit within {timeout}s of SIGTERM:\n{self.logs()}")
            await asyncio.sleep(0.05)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    async with httpx.AsyncClient(limits=limits) as http:
        yield http


@pytest.fixture
def servers() -> Iterator[list[Workers]]:
    started: list[Workers] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.kill()


@pytest.fixture
def postgres_schema(servers: list[Workers]) -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    pytest.importorskip("asyncpg")
    name = f"callboard_workers_{uuid.uuid4().hex[:12]}"
    yield name
    for server in servers:
        if server.process.poll() is None:
            server.kill()
    drop_postgres_schema(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    schema = request.getfixturevalue("postgres_schema")
    return urlunsplit(urlsplit(POSTGRES_URL)._replace(query=f"schema={schema}"))


async def post_all(
    server: Workers, client: httpx.AsyncClient, numbers: range
) -> list[httpx.Response]:
    gate = asyncio.Semaphore(CONNECTIONS)  # as many requests at once as connections

    async def post(n: int) -> httpx.Response:
        async with gate:
            return await client.post(f"{server.url}/api/events/http/jobs", json={"n": n})

    return await asyncio.gather(*(post(n) for n in numbers))


async def wait_handled(
    workdir: Path, wanted: set[int], server: Workers, timeout: float = 30
) -> list[Record]:
    """Wait until subscriptions ``A`` and ``B`` both handled every event of ``wanted``."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(workdir)
        missing = {name: wanted - set(handled(records, name)) for name in ("A", "B")}
        if not any(missing.values()):
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"events never handled: {missing}\n{server.logs()}")
        await asyncio.sleep(0.05)


def stopped_cleanly(server: Workers, code: int) -> None:
    log = server.logs()
    assert code == 0, log
    assert log.count("Application shutdown complete.") >= 2, log
    assert "all workers stopped (SIGTERM)" in log, log
    assert "Traceback" not in log, log


async def test_two_workers_share_the_webhooks_and_deliver_each_event_once(
    tmp_path: Path, broker_url: str, client: httpx.AsyncClient, servers: list[Workers]
) -> None:
    server = Workers(write_config(tmp_path, broker_url), tmp_path)
    servers.append(server)
    pids = await server.wait_ready(client)

    responses = await post_all(server, client, range(EVENTS))

    assert [r.status_code for r in responses] == [202] * EVENTS
    everything = set(range(EVENTS))
    records = await wait_handled(tmp_path, everything, server)
    for subscription in ("A", "B"):
        assert set(handled(records, subscription).values()) == {1}, subscription
    assert {record.pid for record in records} <= set(pids)
    # A handler records an event just before its delivery is counted: wait for the counts.
    delivered = [("callboard_events_delivered_total", f"subscription={s},topic=jobs") for s in "AB"]
    deadline = time.monotonic() + 10
    while [(await server.samples(client)).get(key) for key in delivered] != [EVENTS, EVENTS]:
        assert time.monotonic() < deadline, await server.samples(client)
        await asyncio.sleep(0.05)
    for _ in range(3):  # whichever worker answers the scrape, the figures are the server's
        samples = await server.samples(client)
        assert samples["callboard_ingress_requests_total", "status=202,topic=jobs"] == EVENTS
        assert samples["callboard_events_delivered_total", "subscription=A,topic=jobs"] == EVENTS
        assert samples["callboard_events_delivered_total", "subscription=B,topic=jobs"] == EVENTS
        per_worker = [
            samples["callboard_worker_ingress_requests_total", f"worker={w}"] for w in (0, 1)
        ]
        assert sum(per_worker) == EVENTS
        assert min(per_worker) > 0, f"one worker answered every request: {per_worker}"
        assert samples["callboard_subscription_backlog", "subscription=A"] == 0

    stopped_cleanly(server, await server.terminate())
    assert set(handled(read_records(tmp_path), "A").values()) == {1}


async def test_a_killed_worker_is_started_again(
    tmp_path: Path, client: httpx.AsyncClient, servers: list[Workers]
) -> None:
    server = Workers(write_config(tmp_path, f"sqlite:///{tmp_path / 'events.db'}"), tmp_path)
    servers.append(server)
    victim, survivor = await server.wait_ready(client)

    os.kill(victim, signal.SIGKILL)
    pids = await server.wait_ready(client, not_pid=victim)

    assert survivor in pids
    assert f"worker 0 (pid {victim}) exited with signal SIGKILL; starting it again" in server.logs()
    responses = await post_all(server, client, range(20))
    assert [r.status_code for r in responses] == [202] * 20
    await wait_handled(tmp_path, set(range(20)), server)
    stopped_cleanly(server, await server.terminate())


async def test_readiness_names_a_worker_that_is_not_ready(
    tmp_path: Path, client: httpx.AsyncClient, servers: list[Workers]
) -> None:
    server = Workers(write_config(tmp_path, f"sqlite:///{tmp_path / 'events.db'}"), tmp_path)
    servers.append(server)
    victim, _ = await server.wait_ready(client)

    os.kill(victim, signal.SIGSTOP)  # alive, holding its socket, answering nobody
    try:
        # A connection the kernel gives the stopped worker hangs: try another one. The worker
        # answering asks its stopped sibling, which does not answer within 2 seconds.
        answer = await server.readiness(client, timeout=4)
        while answer is None:
            answer = await server.readiness(client, timeout=4)
    finally:
        os.kill(victim, signal.SIGCONT)

    status, body = answer
    assert status == 503
    assert body["status"] == "not ready"
    assert {"worker": 0, "status": "not answering"} in body["workers"]
    stopped_cleanly(server, await server.terminate())


def run_serve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, *args],
        cwd=cwd,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_memory_broker_with_two_workers_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "callboard.yaml"
    config.write_text('events:\n  broker: "memory://"\n', encoding="utf-8")

    done = run_serve("--config", str(config), "--workers", "2", "--port", "0", cwd=tmp_path)

    assert done.returncode == 2
    line = done.stderr.strip()
    assert "\n" not in line, done.stderr
    assert line.startswith("callboard: backend.workers: 2 workers (--workers) need a broker")
    assert "memory:// keeps its events inside one process" in line


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "callboard.yaml"
    config.write_text(f'events:\n  broker: "sqlite:///{tmp_path / "e.db"}"\n', encoding="utf-8")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_serve(
            "--config", str(config), "--workers", "2", "--port", str(port), cwd=tmp_path
        )

    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"callboard: backend.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
