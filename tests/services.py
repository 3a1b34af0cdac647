"""Real services the tests talk to: skipped on a laptop when down, a failure in CI."""

from __future__ import annotations

import asyncio
import os
import socket
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
