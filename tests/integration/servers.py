"""Real ``callboard serve`` processes for multi-instance tests, and a TCP proxy to cut.

Each server runs ``python -m callboard serve`` in a process group of its own, logging to a file
(a pipe nobody reads would fill up and stall it), with ``tests.integration.support_modules``
importable. Everything here is awaitable, so a test can drive servers, HTTP clients and the
proxy from one event loop.
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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from callboard.brokers.base import BrokerHealth
from callboard.errors import BrokerUnavailable

ROOT = Path(__file__).resolve().parents[2]
SUPPORT_MODULE = "tests.integration.support_modules:instance"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(
    directory: Path,
    broker: str,
    *,
    lease: float = 2.0,
    poll: float = 0.1,
    batch_size: int = 8,
    name: str = "callboard.yaml",
) -> Path:
    """A configuration with the ``jobs`` and ``slow`` topics and the support module."""
    path = directory / name
    path.write_text(
        f"""
events:
  broker: "{broker}"
  http:
    topics: [jobs, slow]
  delivery:
    batchSize: {batch_size}
    initialDelayMs: 50
  shutdownTimeoutMs: 3000
  load: ["{SUPPORT_MODULE}"]
  modules:
    instance:
      broker: "{broker}"
      record: "{directory / "deliveries.log"}"
      release: "{directory / "release"}"
      lease: {lease}
      poll: {poll}
""",
        encoding="utf-8",
    )
    return path


class Server:
    """One ``callboard serve`` process."""

    def __init__(self, config: Path, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.pop("CALLBOARD_CONFIG", None)
        command = [sys.executable, "-m", "callboard", "serve", "--config", str(config)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(self.url + "/readyz", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.05)
        pytest.fail(f"{self.name} did not become ready:\n{self.log()}")

    async def post(
        self, client: httpx.AsyncClient, topic: str, n: int, timeout: float = 10
    ) -> httpx.Response:
        return await client.post(
            f"{self.url}/api/events/http/{topic}", json={"n": n}, timeout=timeout
        )

    def kill(self) -> None:
        """``kill -9`` the process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.05)
        return code

    async def terminate(self, timeout: float = 15) -> int:
        """SIGTERM; fails the test unless the process exits within ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = await self.wait_exit(timeout)
        if code is None:
            self.kill()
            await self.wait_exit(5)
            pytest.fail(f"{self.name} did not exit within {timeout}s of SIGTERM:\n{self.log()}")
        return code


class Fleet:
    """The servers of one test; whatever is still running at the end is killed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[Server] = []

    async def start(self, config: Path, client: httpx.AsyncClient, count: int = 2) -> list[Server]:
        started = [
            Server(config, self.workdir, f"server-{len(self.servers) + i}") for i in range(count)
        ]
        self.servers += started
        for server in started:
            await server.wait_ready(client)
        return started

    async def stop_all(self, timeout: float = 15) -> None:
        """SIGTERM every live server at once; each must exit cleanly in time."""
        live = [s for s in self.servers if s.process.poll() is None]
        codes = await asyncio.gather(*(s.terminate(timeout) for s in live))
        for server, code in zip(live, codes, strict=True):
            log = server.log()
            # uvicorn ends by re-raising the signal it handled, so the parent sees SIGTERM.
            assert code in (0, -signal.SIGTERM), f"{server.name} exited with {code}:\n{log}"
            assert "Application shutdown complete." in log, log
            assert "Traceback" not in log, log

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} (pid {s.pid})\n{s.log()}" for s in self.servers)

    def kill_all(self) -> None:
        for server in self.servers:
            if server.process.poll() is None:
                server.kill()
                server.process.wait(10)


@dataclass(frozen=True, slots=True)
class Record:
    subscription: str
    n: int
    pid: int
    phase: str


def read_records(workdir: Path) -> list[Record]:
    path = workdir / "deliveries.log"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        subscription, n, pid, phase = line.split()
        records.append(Record(subscription, int(n), int(pid), phase))
    return records


def handled(records: list[Record], subscription: str) -> Counter[int]:
    """How many times each event was handled to the end by ``subscription``."""
    return Counter(r.n for r in records if r.subscription == subscription and r.phase == "done")


async def wait_for_records(
    workdir: Path,
    expected: dict[str, set[int]],
    fleet: Fleet,
    timeout: float = 20,
) -> list[Record]:
    """Wait until each subscription handled every event it is expected to; the records."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(workdir)
        missing = {
            name: sorted(wanted - set(handled(records, name))) for name, wanted in expected.items()
        }
        if not any(missing.values()):
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"events never handled: {missing}\n{fleet.logs()}")
        await asyncio.sleep(0.05)


async def readiness_becomes(
    client: httpx.AsyncClient, url: str, status: int, within: float
) -> dict[str, Any]:
    """Probe the server's ``/readyz`` until it answers ``status``; its body."""
    deadline = time.monotonic() + within
    while True:
        answer = await client.get(url + "/readyz", timeout=10)
        if answer.status_code == status:
            body: dict[str, Any] = answer.json()
            return body
        assert time.monotonic() < deadline, f"/readyz stayed {answer.status_code}: {answer.text}"
        await asyncio.sleep(0.2)


async def passes_within(broker: BrokerHealth, seconds: float) -> None:
    """Wait until the broker's health check passes; its last error if it never does."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await broker.check()
            return
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class TcpProxy:
    """A TCP proxy to an upstream server that can be cut (an outage) and restored.

    Cutting closes every proxied connection and the listening socket, so new connections are
    refused, as when the upstream server is restarted or down; restoring listens again on the
    same port. Stalling keeps every connection open but moves no byte, as a network partition
    or a frozen server does; flowing again delivers what was held.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for end in (writer, upstream_writer):
                if end is not None:
                    self._writers.discard(end)
                    end.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
