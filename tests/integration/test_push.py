"""Push subscriptions against real HTTP servers in this process: a scripted receiver, and
callboard's own Standard Webhooks ingress (the signature checked end to end)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any

import httpx
import orjson
import pytest

from callboard.app import Callboard, build, create_app
from callboard.config import parse_config
from callboard.events import DELIVERY_ID, Event
from callboard.extensions import ModuleContext, module
from callboard.providers import standard_webhooks
from callboard.testing import new_standard_webhooks_secret
from tests.contract.kits import served

SECRET = new_standard_webhooks_secret()
TOKEN = "push-test-token-0123"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FAST = {"attempts": 3, "initialDelayMs": 10, "maxDelayMs": 10}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A webhook receiver: records every request and answers from a script, then ``204``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self._arrived = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(headers, b"".join(chunks), monotonic()))
        self._arrived.set()
        status, extra = self.script.pop(0) if self.script else (204, {})
        raw = [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": b""})

    async def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.requests


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    app = Receiver()
    async with served(app) as address:  # type: ignore[arg-type]
        yield app, f"{address}/hooks"


def push_config(url: str, delivery: dict[str, Any] | None = None, **target: Any) -> dict[str, Any]:
    section = {"url": url, "topics": ["billing.*"], "secret": SECRET, "concurrency": 1, **target}
    return {"events": {"delivery": delivery or FAST, "push": {"billing": section}}}


@asynccontextmanager
async def running(data: dict[str, Any]) -> AsyncIterator[Callboard]:
    board = build(parse_config(data), use_entry_points=False)
    async with board.lifespan():
        yield board


async def dead_letters(board: Callboard, subscription: str, timeout: float = 10) -> list[Any]:
    async with asyncio.timeout(timeout):
        while True:
            letters = await board.events.dead_letters(subscription)
            if letters:
                return letters
            await asyncio.sleep(0.02)  # dead letters are read from the broker: no event to await


async def test_events_reach_the_receiver_signed(receiver: tuple[Receiver, str]) -> None:
    app, url = receiver
    async with running(push_config(url)) as board:
        events = [Event(topic="billing.paid", payload={"n": n}) for n in range(3)]
        for event in events:
            await board.events.publish(event)
        received = await app.wait_for(3)
    assert [orjson.loads(r.body) for r in received] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [r.headers["webhook-id"] for r in received] == [e.id for e in events]
    for request in received:
        assert standard_webhooks.verify(request.headers, request.body, [SECRET]) is None
        assert request.headers["callboard-topic"] == "billing.paid"


async def test_callboards_own_ingress_takes_what_a_push_sends() -> None:
    """Two callboards: one pushes to the other's ``webhooks`` ingress, which checks the
    Standard Webhooks signature; a push signed with another secret is refused (403) and ends
    among the dead letters."""
    got: asyncio.Queue[Event] = asyncio.Queue()

    @module("recorder")
    def recorder(context: ModuleContext) -> None:
        context.subscribers.add_subscription("record", "billing", got.put)

    ingress = {
        "events": {
            "modules": {
                "webhooks": {"topics": {"billing": {"standardWebhooks": {"secret": SECRET}}}}
            }
        }
    }
    receiving = create_app(parse_config(ingress), modules=[recorder])
    async with served(receiving) as address:
        url = f"{address}/api/events/http/billing"
        data = push_config(url)
        data["events"]["push"]["forged"] = {
            "url": url,
            "topics": ["forged"],
            "secret": new_standard_webhooks_secret(),
        }
        async with running(data) as board:
            event = Event(topic="billing.paid", payload={"invoice": "in_1", "amount": 12})
            await board.events.publish(event)
            arrived = await asyncio.wait_for(got.get(), 10)
            await board.events.publish(Event(topic="forged", payload={"amount": 1_000_000}))
            (letter,) = await dead_letters(board, "push.forged")
    assert arrived.payload == {"invoice": "in_1", "amount": 12}
    assert arrived.metadata[DELIVERY_ID] == event.id  # webhook-id: the event's own id
    assert "answered 403" in letter.error
    assert got.empty()


async def test_a_5xx_is_retried_then_dead_lettered(receiver: tuple[Receiver, str]) -> None:
    app, url = receiver
    app.script = [(500, {})] * 3
    async with running(push_config(url)) as board:
        event = Event(topic="billing.failed", payload={})
        await board.events.publish(event)
        (letter,) = await dead_letters(board, "push.billing")
    assert letter.event.id == event.id
    assert letter.attempts == 3
    assert "answered 500" in letter.error
    assert [r.headers["webhook-id"] for r in app.requests] == [event.id] * 3


@pytest.mark.slow
async def test_retry_after_is_honoured(receiver: tuple[Receiver, str]) -> None:
    app, url = receiver
    app.script = [(503, {"retry-after": "1"})]
    async with running(push_config(url)) as board:
        await board.events.publish(Event(topic="billing.paid", payload={}))
        first, second = await app.wait_for(2)
    assert second.at - first.at >= 0.9  # the policy's own delay is 10 ms
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


@pytest.mark.slow
async def test_the_breaker_opens_then_closes(
    receiver: tuple[Receiver, str], caplog: pytest.LogCaptureFixture
) -> None:
    app, url = receiver
    app.script = [(502, {}), (502, {})]
    breaker = {"failures": 2, "cooldownMs": 400}
    delivery = {"attempts": 6, "initialDelayMs": 10, "maxDelayMs": 10}
    caplog.set_level(logging.INFO, "callboard.push")
    async with running(push_config(url, delivery, circuitBreaker=breaker)) as board:
        await board.events.publish(Event(topic="billing.paid", payload={}))
        requests = await app.wait_for(3)
        await asyncio.sleep(0.1)  # nothing more is sent once it succeeded
        registry = board.metrics.registry
        state = registry.get_sample_value("callboard_push_breaker_state", {"target": "billing"})
        fast = registry.get_sample_value(
            "callboard_push_requests_total", {"target": "billing", "outcome": "circuit_open"}
        )
    assert len(app.requests) == 3
    # While open, nothing went to the endpoint: the trial came after the cool-down.
    assert requests[2].at - requests[1].at >= 0.35
    assert state == 0
    assert fast is not None
    assert fast >= 1
    changes = [
        r.getMessage()
        for r in caplog.records
        if r.name == "callboard.push" and "circuit breaker" in r.getMessage()
    ]
    assert [m.split("circuit breaker ")[1].split(" ")[0].rstrip(",") for m in changes] == [
        "open",
        "half-open",
        "closed",
    ]
    assert SECRET not in caplog.text


def api_config(url: str, store: Path | None, database: Path) -> dict[str, Any]:
    data = push_config(url)
    data["events"]["broker"] = f"sqlite:///{database}"
    if store is not None:
        data["events"]["pushStorePath"] = str(store)
    # The caller may see the configured target, and still not change it (409).
    # The receiver is on loopback, which a target made over the API may reach only so.
    data["events"]["bus"] = {
        "grants": [{"subject": "ops", "subscriptions": ["push.billing"]}],
        "pushPrivateNetworks": True,
    }
    data["backend"] = {
        "auth": {
            "externalAccess": [{"type": "static", "options": {"token": TOKEN, "subject": "ops"}}]
        }
    }
    return data


async def test_push_targets_are_made_listed_and_deleted_through_the_api(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    app, url = receiver
    data = api_config(url, tmp_path / "push.json", tmp_path / "events.db")
    crm_secret = new_standard_webhooks_secret()
    crm = {
        "url": url + "/crm",
        "topics": ["crm.*"],
        "secret": crm_secret,
        "headers": {"Authorization": "Bearer receiver-key"},
        "concurrency": 1,
    }
    server = create_app(parse_config(data), use_entry_points=False)
    async with served(server) as address, httpx.AsyncClient(base_url=address) as client:
        base = "/api/events/bus/v1/push"
        assert (await client.get(base)).status_code == 401
        wrong = {"authorization": "Bearer not-the-token"}
        assert (await client.put(f"{base}/crm", json=crm, headers=wrong)).status_code == 401
        made = await client.put(f"{base}/crm", json=crm, headers=AUTH)
        assert made.status_code == 201, made.text
        assert made.json()["subscription"] == "push.crm"
        again = await client.put(f"{base}/crm", json={**crm, "topics": ["crm.>"]}, headers=AUTH)
        assert again.status_code == 200
        assert again.json()["topics"] == ["crm.>"]
        configured = await client.put(f"{base}/billing", json=crm, headers=AUTH)
        assert configured.status_code == 409
        bad = await client.put(f"{base}/crm2", json={**crm, "url": "ftp://x"}, headers=AUTH)
        assert bad.status_code == 400
        assert "push.crm2.url" in bad.json()["error"]["message"]
        listed = await client.get(base, headers=AUTH)
        assert [(t["name"], t["source"]) for t in listed.json()["push"]] == [
            ("billing", "config"),
            ("crm", "api"),
        ]
        assert crm_secret not in listed.text
        assert SECRET not in listed.text
        assert "receiver-key" not in listed.text
        assert listed.json()["push"][1]["headers"] == ["authorization"]
        await server.board.events.publish(Event(topic="crm.lead.created", payload={"n": 1}))
        (first,) = await app.wait_for(1)
    assert first.headers["authorization"] == "Bearer receiver-key"
    assert standard_webhooks.verify(first.headers, first.body, [crm_secret]) is None

    # A restart: the target made through the API is back, from the store.
    restarted = create_app(parse_config(data), use_entry_points=False)
    async with served(restarted) as address, httpx.AsyncClient(base_url=address) as client:
        one = await client.get(f"{base}/crm", headers=AUTH)
        assert one.status_code == 200
        assert one.json()["topics"] == ["crm.>"]
        await restarted.board.events.publish(Event(topic="crm.lead.won", payload={"n": 2}))
        second = (await app.wait_for(2))[1]
        assert orjson.loads(second.body) == {"n": 2}
        assert (await client.delete(f"{base}/crm", headers=AUTH)).status_code == 204
        assert (await client.get(f"{base}/crm", headers=AUTH)).status_code == 404
        assert (await client.delete(f"{base}/crm", headers=AUTH)).status_code == 404
        assert (await client.delete(f"{base}/billing", headers=AUTH)).status_code == 409
        await restarted.board.events.publish(Event(topic="crm.lead.lost", payload={"n": 3}))
        await restarted.board.events.publish(Event(topic="billing.paid", payload={"n": 4}))
        await app.wait_for(3)
    assert [orjson.loads(r.body) for r in app.requests] == [{"n": 1}, {"n": 2}, {"n": 4}]


async def test_without_a_store_nothing_is_made_at_runtime(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    _, url = receiver
    data = api_config(url, None, tmp_path / "events.db")
    server = create_app(parse_config(data), use_entry_points=False)
    async with served(server) as address, httpx.AsyncClient(base_url=address) as client:
        body = {"url": url, "topics": ["a"], "secret": SECRET}
        refused = await client.put("/api/events/bus/v1/push/a", json=body, headers=AUTH)
        assert refused.status_code == 501
        assert "events.pushStorePath" in refused.json()["error"]["message"]
        listed = await client.get("/api/events/bus/v1/push", headers=AUTH)
        assert [t["name"] for t in listed.json()["push"]] == ["billing"]


async def test_a_store_that_cannot_be_written_is_a_json_503_and_changes_nothing(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    _, url = receiver
    store = tmp_path / "push.json"
    data = api_config(url, store, tmp_path / "events.db")
    server = create_app(parse_config(data), use_entry_points=False)
    async with served(server) as address, httpx.AsyncClient(base_url=address) as client:
        store.mkdir()  # the store's path is now a directory: it cannot be replaced by a file
        body = {"url": url, "topics": ["a"], "secret": SECRET}
        refused = await client.put("/api/events/bus/v1/push/a", json=body, headers=AUTH)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["name"] == "PushStoreError"
        assert "events.pushStorePath" in refused.json()["error"]["message"]
        missing = await client.get("/api/events/bus/v1/push/a", headers=AUTH)
        assert missing.status_code == 404


async def test_a_target_made_over_the_api_does_not_reach_private_addresses(
    receiver: tuple[Receiver, str], tmp_path: Path
) -> None:
    """The receiver listens on loopback: a configured target reaches it; one made over the API
    is refused at once on ``127.0.0.1`` (an IP literal) and dead-lettered on ``localhost`` (a
    name resolved to loopback when connecting), until ``pushPrivateNetworks`` allows it."""
    app, url = receiver
    named = url.replace("127.0.0.1", "localhost")
    data = api_config(named, tmp_path / "push.json", tmp_path / "events.db")
    del data["events"]["bus"]["pushPrivateNetworks"]
    target = {"url": named, "topics": ["crm.*"], "secret": SECRET, "concurrency": 1}
    base = "/api/events/bus/v1/push"
    server = create_app(parse_config(data), use_entry_points=False)
    async with served(server) as address, httpx.AsyncClient(base_url=address) as client:
        literal = await client.put(f"{base}/crm", json={**target, "url": url}, headers=AUTH)
        assert literal.status_code == 400, literal.text
        message = literal.json()["error"]["message"]
        assert "127.0.0.1 is a loopback address" in message
        assert "events.bus.pushPrivateNetworks" in message
        made = await client.put(f"{base}/crm", json=target, headers=AUTH)
        assert made.status_code == 201, made.text
        board = server.board
        await board.events.publish(Event(topic="crm.lead", payload={"n": 1}))
        (letter,) = await dead_letters(board, "push.crm")
        await board.events.publish(Event(topic="billing.paid", payload={"n": 2}))
        (delivered,) = await app.wait_for(1)
    assert letter.attempts == FAST["attempts"]
    assert "not sent to localhost: 127.0.0.1 is a loopback address" in letter.error
    assert "events.bus.pushPrivateNetworks" in letter.error
    assert orjson.loads(delivered.body) == {"n": 2}  # the configured target, same URL

    data["events"]["bus"]["pushPrivateNetworks"] = True
    allowed = create_app(parse_config(data), use_entry_points=False)
    async with served(allowed) as address, httpx.AsyncClient(base_url=address) as client:
        await allowed.board.events.publish(Event(topic="crm.lead", payload={"n": 3}))
        second = (await app.wait_for(2))[1]
    assert orjson.loads(second.body) == {"n": 3}
    assert second.headers["callboard-topic"] == "crm.lead"
