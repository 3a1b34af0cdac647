"""Brokers for the contract suite: one kit per broker, each test on a store of its own.

A kit opens brokers on its test's store (several, for tests of shared and crashed consumers) and
closes them all at the end. Durable brokers run with short leases and polls so the suite stays
fast; a test that simulates a crash asks for a shorter lease still.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import pytest

from callboard.brokers.base import Broker, RetentionPolicy
from callboard.brokers.memory import MemoryBroker
from tests.services import POSTGRES_URL, postgres_execute, require_service

#: Lease and poll intervals of durable brokers under test, in seconds.
LEASE = 2.0
POLL = 0.05


class _Crashable(Protocol):
    async def abandon(self) -> None: ...


class _Cleanable(Protocol):
    async def clean(self) -> int: ...


class BrokerKit:
    """Opens brokers of one kind on one store."""

    def __init__(self, name: str, factory: Callable[..., Broker]) -> None:
        self.name = name
        self._factory = factory
        self._opened: list[Broker] = []
        self.teardown: list[Callable[[], Awaitable[None]]] = []

    async def open(
        self, *, lease: float = LEASE, retention: RetentionPolicy | None = None
    ) -> Broker:
        """A started broker on this test's store (the same store for every call)."""
        broker = self._factory(lease=lease, retention=retention)
        await broker.start()
        self._opened.append(broker)
        return broker

    async def crash(self, broker: Broker) -> None:
        """Stop ``broker`` as a killed process would (durable brokers only)."""
        crashable: _Crashable = broker  # type: ignore[assignment]
        await crashable.abandon()

    async def clean(self, broker: Broker) -> int:
        """Apply the broker's retention policy now (durable brokers only)."""
        cleanable: _Cleanable = broker  # type: ignore[assignment]
        return await cleanable.clean()

    async def close(self) -> None:
        for broker in reversed(self._opened):
            await broker.close()
        for step in self.teardown:
            await step()


def _memory(tmp_path: Path) -> BrokerKit:
    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return MemoryBroker.from_url("memory://", retention=retention)

    return BrokerKit("memory", factory)


def _sqlite(tmp_path: Path) -> BrokerKit:
    from callboard.brokers.sqlite import SQLiteBroker

    path = str(tmp_path / "callboard.db")

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return SQLiteBroker(
            path, lease=lease, poll_interval=POLL, watch_interval=POLL / 2, retention=retention
        )

    return BrokerKit("sqlite", factory)


def _postgres(tmp_path: Path) -> BrokerKit:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    from callboard.brokers.postgres import PostgresBroker

    schema = f"callboard_test_{uuid.uuid4().hex[:12]}"

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return PostgresBroker(
            POSTGRES_URL, schema=schema, lease=lease, poll_interval=POLL, retention=retention
        )

    kit = BrokerKit("postgresql", factory)

    async def drop_schema() -> None:
        await postgres_execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    kit.teardown.append(drop_schema)
    return kit


KITS: dict[str, Callable[[Path], BrokerKit]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgresql": _postgres,
}


@pytest.fixture(
    params=[
        pytest.param("memory"),
        pytest.param("sqlite"),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BrokerKit]:
    made = KITS[request.param](tmp_path)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def broker(kit: BrokerKit) -> Broker:
    return await kit.open()
