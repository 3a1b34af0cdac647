"""``/readyz`` and the broker's health check (``BrokerHealth``): ``503`` naming the problem while
the broker's engine does not answer, ``200`` again by itself once it does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from callboard import BrokerHealth, BrokerUnavailable, CallboardApp, MemoryBroker, create_app
from callboard.app import BrokerCheck
from callboard.brokers.sqlite import SQLiteBroker
from callboard.config import Config, load_config
from callboard.peers import Peers

CONFIG = {"events": {"http": {"topics": ["plain"]}}}


class FlakyBroker(MemoryBroker):
    """The memory broker with a health check the test makes fail, hang or pass."""

    def __init__(self) -> None:
        super().__init__()
        self.problem: str | None = None
        self.gate: asyncio.Event | None = None
        self.checks = 0
        self.asked = asyncio.Event()

    async def check(self) -> None:
        self.checks += 1
        self.asked.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.problem is not None:
            raise BrokerUnavailable(self.problem)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def config() -> Config:
    return load_config(overrides=CONFIG)


def with_clock(app: CallboardApp, clock: Clock, **options: float) -> FlakyBroker:
    """The app's health check on ``clock``, as ``CallboardApp`` makes it otherwise."""
    broker = app.board.events.broker
    assert isinstance(broker, FlakyBroker)
    metrics = app.board.metrics
    app.health = BrokerCheck(
        broker, lambda up: metrics.broker_up.set(1 if up else 0), clock=clock, **options
    )
    return broker


def broker_up(app: CallboardApp) -> float:
    text = app.board.metrics.exposition()[0].decode()
    [value] = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "callboard_broker_up"
    ]
    return value


@pytest.fixture
def app() -> CallboardApp:
    return create_app(config(), broker=FlakyBroker(), use_entry_points=False)


@pytest.fixture
async def client(app: CallboardApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://callboard") as client:
        yield client


def test_a_broker_with_a_check_is_broker_health_and_the_memory_broker_is_not() -> None:
    assert isinstance(FlakyBroker(), BrokerHealth)
    assert not isinstance(MemoryBroker(), BrokerHealth)
    assert isinstance(SQLiteBroker(":memory:"), BrokerHealth)
    assert create_app(config(), use_entry_points=False).health is None


async def test_readyz_is_503_naming_the_broker_while_its_check_fails_then_200_by_itself(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    clock = Clock()
    broker = with_clock(app, clock)
    async with app.board.lifespan():
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert broker_up(app) == 1

        broker.problem = "Redis at redis://cache:6379/0 did not answer PING within 2s"
        clock.now += 1.0
        down = await client.get("/readyz")
        assert down.status_code == 503
        assert down.json() == {
            "status": "not ready",
            "broker": "Redis at redis://cache:6379/0 did not answer PING within 2s",
        }
        assert broker_up(app) == 0

        broker.problem = None  # the engine is back; the broker was not restarted
        clock.now += 1.0
        up = await client.get("/readyz")
        assert up.status_code == 200
        assert up.json() == {"status": "ready"}
        assert broker_up(app) == 1


async def test_a_verdict_answers_probes_for_a_second_and_concurrent_probes_share_a_check(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    clock = Clock()
    broker = with_clock(app, clock)
    async with app.board.lifespan():
        broker.gate = asyncio.Event()
        probes = [asyncio.create_task(client.get("/readyz")) for _ in range(20)]
        await asyncio.wait_for(broker.asked.wait(), 2)
        await asyncio.sleep(0.1)  # the other probes arrive meanwhile, and wait for that check
        assert broker.checks == 1
        broker.gate.set()
        assert {(await probe).status_code for probe in probes} == {200}

        broker.problem = "down"
        clock.now += 0.5  # within the second: the last verdict answers
        assert (await client.get("/readyz")).status_code == 200
        assert broker.checks == 1
        clock.now += 0.6
        assert (await client.get("/readyz")).status_code == 503
        assert broker.checks == 2


async def test_a_check_that_hangs_is_not_ready_within_the_timeout(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    broker = with_clock(app, Clock(), timeout=0.05)
    async with app.board.lifespan():
        broker.gate = asyncio.Event()  # never set: the engine does not answer
        async with asyncio.timeout(2):
            down = await client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["broker"] == (
        "the broker (FlakyBroker) did not answer its health check within 0.05s"
    )


async def test_a_broker_whose_check_has_a_bug_is_not_ready_and_says_so(
    app: CallboardApp, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> None:
        raise KeyError("oops")

    async with app.board.lifespan():
        monkeypatch.setattr(app.board.events.broker, "check", broken)
        down = await client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["broker"] == "the broker's health check failed: KeyError('oops')"


async def test_before_the_service_starts_it_is_not_ready_and_the_broker_is_not_asked(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    broker = app.board.events.broker
    assert isinstance(broker, FlakyBroker)
    assert (await client.get("/readyz")).json() == {"status": "not ready"}
    assert broker.checks == 0


async def test_a_broker_without_a_check_is_ready() -> None:
    app = create_app(config(), use_entry_points=False)
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://callboard") as client,
        app.board.lifespan(),
    ):
        ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_one_worker_whose_broker_is_down_makes_the_server_not_ready(tmp_path: Path) -> None:
    apps = [
        create_app(
            config(), peers=Peers(tmp_path, index, 2), broker=FlakyBroker(), use_entry_points=False
        )
        for index in range(2)
    ]
    second = apps[1].board.events.broker
    assert isinstance(second, FlakyBroker)
    second.problem = "PostgreSQL is unreachable (no connection within 3.0s)"
    transport = httpx.ASGITransport(app=apps[0])
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://callboard") as client,
        apps[0]._lifespan(),
        apps[1]._lifespan(),
    ):
        answer = await client.get("/readyz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "not ready"
    assert [(w["worker"], w["status"]) for w in body["workers"]] == [
        (0, "ready"),
        (1, "not ready"),
    ]
    assert body["workers"][1]["broker"] == "PostgreSQL is unreachable (no connection within 3.0s)"


async def test_the_sqlite_broker_answers_while_started_and_not_once_closed(tmp_path: Path) -> None:
    broker = SQLiteBroker(str(tmp_path / "callboard.db"))
    with pytest.raises(BrokerUnavailable, match="is not running"):
        await broker.check()
    await broker.start()
    try:
        await broker.check()
    finally:
        await broker.close()
    with pytest.raises(BrokerUnavailable, match=r"the SQLite broker on .*callboard\.db"):
        await broker.check()
