"""The standalone application and an embedded callboard, end to end over ASGI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from callboard import (
    CallboardApp,
    Event,
    EventsService,
    MemoryBroker,
    ModuleContext,
    build,
    create_app,
    load_config,
    module,
)

CONFIG = {
    "events": {
        "http": {"topics": ["github", "plain"]},
        "delivery": {"attempts": 2, "initialDelayMs": 0},
    }
}


class Inbox:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def on_event(self, event: Event) -> None:
        if event.payload == {"fail": True}:
            raise RuntimeError("refused")
        self.events.append(event)


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def app(inbox: Inbox) -> CallboardApp:
    @module("inbox")
    def register(context: ModuleContext) -> None:
        context.subscribers.add_subscription("inbox", ["github", "plain"], inbox.on_event)

    return create_app(load_config(overrides=CONFIG), modules=[register], use_entry_points=False)


@pytest.fixture
async def client(app: CallboardApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://callboard") as client:
        yield client


async def drain(app: CallboardApp) -> None:
    broker = app.board.events.broker
    assert isinstance(broker, MemoryBroker)
    await broker.drain()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


async def test_health_and_readiness_follow_the_lifespan(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    before = await client.get("/readyz")
    assert before.status_code == 503
    async with app.board.lifespan():
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready"}
    after = await client.get("/readyz")
    assert after.status_code == 503
    assert (await client.get("/healthz")).status_code == 200


async def test_a_webhook_reaches_its_subscriber(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    async with app.board.lifespan():
        response = await client.post(
            "/api/events/http/github",
            json={"ref": "main"},
            headers={"X-GitHub-Event": "push", "Authorization": "token t"},
        )
        assert response.status_code == 202
        assert response.json() == {"status": "accepted"}
        await drain(app)
    [event] = inbox.events
    assert event.topic == "github"
    assert event.payload == {"ref": "main"}
    assert event.metadata["x-github-event"] == "push"
    assert "authorization" not in event.metadata


async def test_ingress_errors_through_the_app(app: CallboardApp, client: httpx.AsyncClient) -> None:
    async with app.board.lifespan():
        unknown = await client.post("/api/events/http/gitlab", json={})
        assert unknown.status_code == 404
        assert unknown.json()["request"]["url"] == "/api/events/http/gitlab"
        assert (await client.get("/api/events/http/github")).status_code == 405
        assert (await client.get("/no/such/route")).status_code == 404
    stopped = await client.post("/api/events/http/github", json={})
    assert stopped.status_code == 503
    assert stopped.json()["error"]["name"] == "ServiceUnavailableError"


async def test_metrics(app: CallboardApp, client: httpx.AsyncClient) -> None:
    async with app.board.lifespan():
        for body in ({"n": 1}, {"n": 2}, {"fail": True}):
            assert (await client.post("/api/events/http/github", json=body)).status_code == 202
        await client.post(
            "/api/events/http/github", content=b"{", headers={"content-type": "application/json"}
        )
        await drain(app)
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)

    def value(name: str, **labels: str) -> float | None:
        return found.get((name, frozenset(labels.items())))

    assert value("callboard_ingress_requests_total", topic="github", status="202") == 3
    assert value("callboard_ingress_requests_total", topic="github", status="400") == 1
    assert value("callboard_events_published_total", topic="github") == 3
    assert value("callboard_events_delivered_total", subscription="inbox", topic="github") == 2
    assert value("callboard_handler_failures_total", subscription="inbox", topic="github") == 2
    assert value("callboard_delivery_retries_total", subscription="inbox") == 1
    assert value("callboard_dead_letters_total", subscription="inbox") == 1
    assert value("callboard_delivery_latency_seconds_count", subscription="inbox") == 2
    assert value("callboard_deliveries_in_flight") == 0
    assert value("callboard_broker_up") == 1
    assert value("callboard_subscription_backlog", subscription="inbox") == 0
    assert value("callboard_subscription_lost", subscription="inbox") == 0
    assert value("callboard_subscription_running", subscription="inbox") == 1


async def test_a_subscription_whose_group_is_gone_makes_the_instance_not_ready(
    app: CallboardApp, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from callboard import SubscriptionError
    from callboard.brokers.memory import MemoryConsumer

    async def gone(self: MemoryConsumer, max_count: int) -> list[Any]:
        raise SubscriptionError("subscription 'inbox' no longer exists")

    async with app.board.lifespan():
        assert (await client.get("/readyz")).status_code == 200
        # What a SQL broker's consumer raises once another process deleted its group.
        monkeypatch.setattr(MemoryConsumer, "fetch", gone)
        await app.board.events.broker.publish(Event(topic="plain", payload=1))  # wakes it
        [subscription] = app.board.events.subscriptions
        await asyncio.wait_for(asyncio.gather(*subscription.tasks), 5)
        ready = await client.get("/readyz")
        found = samples((await client.get("/metrics")).text)
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "not ready",
        "stopped": [{"subscription": "inbox", "reason": "subscription 'inbox' no longer exists"}],
    }
    assert found[("callboard_subscription_running", frozenset({("subscription", "inbox")}))] == 0


async def test_metrics_report_a_broker_that_does_not_answer(
    app: CallboardApp, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from callboard import BrokerUnavailable

    async def down() -> list[Any]:
        raise BrokerUnavailable("the store is down")

    async with app.board.lifespan():
        monkeypatch.setattr(app.board.events.broker, "subscriptions", down)
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert samples(response.text)[("callboard_broker_up", frozenset())] == 0


async def test_dead_letters_from_the_app_can_be_redriven(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    async with app.board.lifespan():
        await client.post("/api/events/http/plain", json={"fail": True})
        await drain(app)
        [letter] = await app.board.events.dead_letters("inbox")
        assert letter.event.topic == "plain"
        assert letter.error == "RuntimeError: refused"
        assert letter.attempts == 2


# --- embedding -------------------------------------------------------------------------------


def embedded(started: list[EventsService]) -> Starlette:
    @module("probe")
    def probe(context: ModuleContext) -> None:
        async def on_start(events: EventsService) -> None:
            started.append(events)

        context.lifecycle.on_start(on_start)

    board = build(
        load_config(overrides={"events": {"http": {"topics": ["github"]}}}),
        modules=[probe],
        use_entry_points=False,
    )

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse(f"ready={board.ready}")

    app = Starlette(
        routes=[Route("/", home), Mount("/api/events/http", app=board.ingress)],
        lifespan=board.lifespan,
    )
    app.state.board = board
    return app


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Run an ASGI app's lifespan as a server does, with a client for its routes."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    running = asyncio.create_task(app(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await from_app.get())["type"] == "lifespan.startup.complete"
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        assert (await from_app.get())["type"] == "lifespan.shutdown.complete"
        await running


async def test_the_ingress_mounts_under_a_starlette_app() -> None:
    started: list[EventsService] = []
    app = embedded(started)
    board = app.state.board
    async with serving(app) as client:
        assert started == [board.events]
        assert (await client.get("/")).text == "ready=True"
        response = await client.post("/api/events/http/github", json={"a": 1})
        assert response.status_code == 202
        assert response.json() == {"status": "accepted"}
        missing = await client.post("/api/events/http/gitlab", json={})
        assert missing.status_code == 404
        assert missing.json()["error"]["name"] == "NotFoundError"
    assert not board.ready


async def test_the_standalone_app_runs_its_own_lifespan(app: CallboardApp, inbox: Inbox) -> None:
    async with serving(app) as client:
        assert (await client.get("/readyz")).status_code == 200
        await client.post("/api/events/http/github", json={"n": 1})
        await drain(app)
    assert not app.board.ready
    assert [e.payload for e in inbox.events] == [{"n": 1}]


async def test_the_embedded_ingress_delivers() -> None:
    board = build(
        load_config(overrides={"events": {"http": {"topics": ["github"]}}}), use_entry_points=False
    )
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    app = Starlette(routes=[Mount("/hooks", app=board.ingress)])
    transport = httpx.ASGITransport(app=app)
    async with (
        board.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://x") as client,
    ):
        await board.events.subscribe("s", "github", handler)
        assert (await client.post("/hooks/github", json=[1])).status_code == 202
        assert isinstance(board.events.broker, MemoryBroker)
        await board.events.broker.drain()
    assert [e.payload for e in got] == [[1]]


class SlowToList(MemoryBroker):
    """A broker whose figures take until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def subscriptions(self) -> list[Any]:
        await self.gate.wait()
        return await super().subscriptions()


def gauge(text: str, name: str) -> dict[str, float]:
    return {
        sample.labels.get("subscription", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_a_slow_broker_is_not_reported_down_and_its_figures_come_later() -> None:
    broker = SlowToList()
    board = build(load_config(overrides=CONFIG), broker=broker, use_entry_points=False)
    async with board.lifespan():
        await board.events.subscribe("s", "plain", lambda event: asyncio.sleep(0))
        board.metrics.broker_up.set(1)
        await board.observe_broker(timeout=0.01)  # the figures are late: the scrape answers
        text = board.metrics.exposition()[0].decode()
        assert gauge(text, "callboard_broker_up") == {"": 1.0}
        assert "s" not in gauge(text, "callboard_subscription_backlog")
        broker.gate.set()
        await board.observe_broker(timeout=5)  # the same reading ends, its figures are served
        text = board.metrics.exposition()[0].decode()
        assert gauge(text, "callboard_subscription_backlog")["s"] == 0.0
        assert gauge(text, "callboard_broker_up") == {"": 1.0}
