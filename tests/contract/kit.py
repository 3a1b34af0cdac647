"""``BrokerKit``: what the contract suite needs of a broker, and what a broker's author builds.

A kit opens brokers of one kind on one store (several per test, for shared and crashed
consumers) and closes them at the end; each test gets a kit of its own, on a store of its own.
The suite asks a kit for three things beyond the ``Broker`` contract:

- ``open(lease=..., retention=...)``: a started broker. Durable brokers run with the short
  ``lease`` given, so tests of leases and crashes stay fast.
- ``crash(broker)``: stop ``broker`` as a killed process would (leases neither handed back nor
  renewed). Only the kit knows how; a kit without ``crash`` skips the crash tests.
- ``admin(broker)``: the broker's ``BrokerAdmin`` operations.
- ``event_log(broker)``: reading the broker's stored events (``EventLog``); a broker that keeps
  no history to read (it does not implement it) skips those tests.

Where a broker knowingly departs from the contract, its kit says so and why (``deviations``,
keyed by the names below), and the tests of that point are skipped with the reason.

A broker's own package builds one with ``BrokerKit(name, factory)`` or ``BrokerKit.from_url``
and runs the suite with ``pytest tests/contract --broker-kit package.module:function``
(``docs/brokers.md``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

import pytest

from callboard.brokers import admin, open_broker
from callboard.brokers.base import Broker, BrokerAdmin, EventLog, RetentionPolicy

#: Lease and poll intervals of durable brokers under test, in seconds.
LEASE = 2.0
POLL = 0.05

#: The broker records another owner than the one ``consume`` is given.
OWNER = "owner"
#: Publishes made concurrently are not stored in the order they were called in.
CALL_ORDER = "call-order"
#: A reader of a group deleted by another broker instance does not find it gone.
DELETED_GROUP = "deleted-group"
#: Retention's ``max_count`` counts the events of each group, not every event stored.
RETENTION_COUNT = "retention-count"
DEVIATIONS = frozenset({OWNER, CALL_ORDER, DELETED_GROUP, RETENTION_COUNT})


class KitFactory(Protocol):
    """Builds a broker (not started) on the kit's store, with the lease a test asks for."""

    def __call__(self, *, lease: float, retention: RetentionPolicy | None) -> Broker: ...


class BrokerKit:
    """Opens brokers of one kind on one store."""

    def __init__(
        self,
        name: str,
        factory: KitFactory,
        *,
        crash: Callable[[Broker], Awaitable[None]] | None = None,
        deviations: Mapping[str, str] | None = None,
    ) -> None:
        unknown = set(deviations or ()) - DEVIATIONS
        if unknown:
            raise ValueError(f"unknown deviations {sorted(unknown)}; known: {sorted(DEVIATIONS)}")
        self.name = name
        self._factory = factory
        self._crash = crash
        self._deviations = dict(deviations or {})
        self._opened: list[Broker] = []
        #: Run after every broker is closed, last added first: drop the store.
        self.teardown: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def from_url(cls, name: str, url: str, tmp_path: Path) -> BrokerKit:
        """A kit whose brokers ``open_broker(url)`` builds, through the entry points.

        ``{tmp_path}`` in ``url`` is the test's own directory and ``{unique}`` a name no other
        test uses (a database, a key prefix). The broker's own lease applies: crash tests are
        skipped.
        """
        resolved = url.format(tmp_path=tmp_path, unique=f"cb_{uuid.uuid4().hex[:12]}")

        def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
            return open_broker(resolved, retention=retention)

        return cls(name, factory)

    async def open(
        self, *, lease: float = LEASE, retention: RetentionPolicy | None = None
    ) -> Broker:
        """A started broker on this test's store (the same store for every call)."""
        broker = self._factory(lease=lease, retention=retention)
        self._opened.append(broker)
        await broker.start()
        return broker

    async def crash(self, broker: Broker) -> None:
        """Stop ``broker`` as a killed process would."""
        if self._crash is None:
            pytest.skip(f"the {self.name} kit cannot stop a broker as a killed process would")
        await self._crash(broker)

    def require(self, point: str) -> None:
        """Skip the test unless the broker meets the contract on ``point`` (``DEVIATIONS``)."""
        reason = self._deviations.get(point)
        if reason is not None:
            pytest.skip(f"the {self.name} broker departs from the contract ({point}): {reason}")

    def admin(self, broker: Broker) -> BrokerAdmin:
        """The operations on ``broker``."""
        return admin(broker)

    def event_log(self, broker: Broker) -> EventLog:
        """Reading ``broker``'s stored events; skips the test when it keeps none to read."""
        if not isinstance(broker, EventLog):
            pytest.skip(f"the {self.name} broker keeps no history of events to read (EventLog)")
        return broker

    async def clean(self, broker: Broker) -> int:
        """Apply the broker's retention policy now."""
        return await self.admin(broker).clean()

    async def close(self) -> None:
        try:
            for broker in reversed(self._opened):
                await broker.close()
        finally:
            for step in reversed(self.teardown):
                await step()
