"""Brokers are found by URL scheme among the ``callboard.brokers`` entry points."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from importlib import metadata

import pytest

from callboard.brokers import (
    ENTRY_POINT_GROUP,
    admin,
    broker_entry_points,
    open_broker,
)
from callboard.brokers.base import Capabilities, Consumer, RetentionPolicy, Start
from callboard.brokers.memory import MemoryBroker
from callboard.errors import ConfigError
from callboard.events import Event


class ThirdPartyBroker:
    """A broker another package provides: the ``Broker`` contract and no operations."""

    def __init__(self, url: str, retention: RetentionPolicy | None) -> None:
        self.url = url
        self.retention = retention
        self._inner = MemoryBroker()

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> ThirdPartyBroker:
        return cls(url, retention)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()

    async def publish(self, event: Event) -> bool:
        return await self._inner.publish(event)

    async def consume(
        self, group: str, topics: Sequence[str], *, start: Start = "end", owner: str | None = None
    ) -> Consumer:
        return await self._inner.consume(group, topics, start=start, owner=owner)


def _entry(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name, value, ENTRY_POINT_GROUP)


@pytest.fixture
def declared(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[metadata.EntryPoint]]:
    """Entry points to add to those installed, as another package would declare them."""
    added: list[metadata.EntryPoint] = []
    installed = metadata.entry_points

    def entry_points(**select: str) -> metadata.EntryPoints:
        found = list(installed(**select))
        if select.get("group") == ENTRY_POINT_GROUP:
            found += added
        return metadata.EntryPoints(found)

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    broker_entry_points.cache_clear()
    yield added
    broker_entry_points.cache_clear()


def test_callboard_declares_its_brokers_as_entry_points() -> None:
    declared = broker_entry_points()
    builtin = {"memory", "sqlite", "postgresql", "postgres", "callboard+http", "callboard+https"}
    assert builtin <= set(declared)
    for scheme in builtin:
        (entry,) = declared[scheme]
        assert entry.dist is not None
        assert entry.dist.name == "callboard"
    assert [entry.extras for entry in declared["postgresql"]] == [["postgres"]]
    assert [entry.extras for entry in declared["callboard+https"]] == [["remote"]]


def test_the_builtin_schemes_open_their_brokers() -> None:
    from callboard.brokers.sqlite import SQLiteBroker

    assert isinstance(open_broker("memory://"), MemoryBroker)
    assert isinstance(open_broker("SQLITE:///:memory:"), SQLiteBroker)


async def test_a_broker_of_another_package_is_opened_by_its_url(
    declared: list[metadata.EntryPoint],
) -> None:
    declared.append(_entry("thirdparty", f"{__name__}:ThirdPartyBroker.from_url"))
    policy = RetentionPolicy(max_count=5)
    broker = open_broker("thirdparty://somewhere/db", retention=policy)
    assert isinstance(broker, ThirdPartyBroker)
    assert (broker.url, broker.retention) == ("thirdparty://somewhere/db", policy)
    await broker.start()
    consumer = await broker.consume("g", ["t"])
    assert await broker.publish(Event(topic="t", payload=1))
    assert [d.event.payload for d in await consumer.fetch(5)] == [1]
    await broker.close()


def test_an_unknown_scheme_names_the_known_ones(declared: list[metadata.EntryPoint]) -> None:
    declared.append(_entry("thirdparty", f"{__name__}:ThirdPartyBroker.from_url"))
    for url in ("nosuch://x", "memory", ""):
        with pytest.raises(ConfigError) as caught:
            open_broker(url, key="events.modules.x.broker")
        assert caught.value.path == "events.modules.x.broker"
        message = str(caught.value)
        assert "memory://..." in message
        assert "thirdparty://..." in message
        assert ENTRY_POINT_GROUP in message


def test_callboard_run_without_its_metadata_says_to_install_it(
    monkeypatch: pytest.MonkeyPatch, declared: list[metadata.EntryPoint]
) -> None:
    monkeypatch.setattr(metadata, "entry_points", lambda **select: metadata.EntryPoints([]))
    broker_entry_points.cache_clear()
    with pytest.raises(ConfigError, match="not even callboard's own: install callboard"):
        open_broker("memory://")


def test_a_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if asyncpg were not installed: the PostgreSQL broker's modules cannot be imported.
    for name in [m for m in sys.modules if m.startswith("callboard.brokers.postgres")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigError) as caught:
        open_broker("postgresql://db/events")
    assert caught.value.path == "events.broker"
    assert "the postgresql broker cannot be loaded" in str(caught.value)
    assert "install it with: pip install 'callboard[postgres]'" in str(caught.value)


def test_a_missing_module_of_another_package_names_its_extra(
    declared: list[metadata.EntryPoint],
) -> None:
    declared.append(_entry("gone", "no_such_broker_package.broker:Broker.from_url [fast]"))
    with pytest.raises(ConfigError, match=r"install the extra \[fast\]"):
        open_broker("gone://x")


def test_an_entry_point_naming_nothing_is_a_clear_error(
    declared: list[metadata.EntryPoint],
) -> None:
    declared.append(_entry("typo", f"{__name__}:ThirdPartyBroker.from_ulr"))
    declared.append(_entry("data", f"{__name__}:__doc__"))
    with pytest.raises(ConfigError, match="names nothing"):
        open_broker("typo://x")
    with pytest.raises(ConfigError, match="names no broker factory"):
        open_broker("data://x")


def test_a_scheme_two_packages_declare_is_refused(declared: list[metadata.EntryPoint]) -> None:
    declared.append(_entry("memory", f"{__name__}:ThirdPartyBroker.from_url"))
    with pytest.raises(ConfigError, match="declared by several installed packages"):
        open_broker("memory://")
    # The same declaration seen twice (a package found twice on the path) is one.
    declared[:] = [_entry("thirdparty", f"{__name__}:ThirdPartyBroker.from_url")] * 2
    broker_entry_points.cache_clear()
    assert isinstance(open_broker("thirdparty://"), ThirdPartyBroker)


def test_a_broker_without_operations_says_so(declared: list[metadata.EntryPoint]) -> None:
    declared.append(_entry("thirdparty", f"{__name__}:ThirdPartyBroker.from_url"))
    with pytest.raises(ConfigError, match="ThirdPartyBroker offers no operations"):
        admin(open_broker("thirdparty://"))
    memory = open_broker("memory://")
    assert admin(memory) is memory
