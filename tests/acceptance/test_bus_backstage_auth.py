"""A Backstage backend's plugins on the bus, authenticated with their plugin tokens.

A fake Backstage serves each plugin's keys over real HTTP, as Backstage serves them at
``/api/<pluginId>/.backstage/auth/v1/jwks.json``; callboard fetches them from there to verify the
tokens Backstage's events client sends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from callboard.app import CallboardApp, create_app
from callboard.config import parse_config
from tests.backstage_plugins import SigningKey, jwks, plugin_token

BUS = "http://callboard/api/events/bus/v1"
STATIC = "static-bus-token-1"


class FakeBackstage:
    """Backstage plugins publishing their keys over HTTP, on a free port."""

    def __init__(self) -> None:
        self.keys: dict[str, list[SigningKey]] = {}
        self.fetches: list[str] = []
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.socket = sock
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = Starlette(routes=[Route("/api/{plugin}/.backstage/auth/v1/jwks.json", self._jwks)])
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)

    async def _jwks(self, request: Request) -> Response:
        plugin = request.path_params["plugin"]
        self.fetches.append(plugin)
        if plugin not in self.keys:
            return Response(status_code=404)
        return JSONResponse(jwks(*self.keys[plugin]))

    def add(self, plugin_id: str) -> SigningKey:
        key = SigningKey()
        self.keys.setdefault(plugin_id, []).append(key)
        return key

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeBackstage]:
        task = asyncio.create_task(self.server.serve(sockets=[self.socket]))
        try:
            for _ in range(500):
                if self.server.started:
                    break
                await asyncio.sleep(0.01)
            yield self
        finally:
            self.server.should_exit = True
            await task
            self.socket.close()


@pytest.fixture
async def backstage() -> AsyncIterator[FakeBackstage]:
    async with FakeBackstage().running() as fake:
        yield fake


def _config(backstage: FakeBackstage | None, **section: Any) -> dict[str, Any]:
    events: dict[str, Any] = {"notifyTimeoutMs": 200}
    if backstage is not None:
        events["bus"] = {"backstage": {"baseUrl": backstage.base_url, **section}}
    return {
        "backend": {
            "auth": {
                "externalAccess": [
                    {"type": "static", "options": {"token": STATIC, "subject": "ops"}}
                ]
            }
        },
        "events": events,
    }


@asynccontextmanager
async def serve(config: dict[str, Any]) -> AsyncIterator[tuple[CallboardApp, httpx.AsyncClient]]:
    app = create_app(parse_config(config), use_entry_points=False)
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BUS) as client:
            yield app, client


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_backstage_plugins_subscribe_publish_and_read_with_plugin_tokens(
    backstage: FakeBackstage, caplog: pytest.LogCaptureFixture
) -> None:
    bench, events = backstage.add("bench"), backstage.add("events")
    async with serve(_config(backstage)) as (_, client):
        # What a stock Backstage's events client does: PUT, publish, read, with plugin tokens.
        as_bench = _bearer(plugin_token(bench, "bench"))
        with caplog.at_level(logging.INFO, logger="callboard.bus"):
            put = await client.put(
                "/subscriptions/bench.bench-subscriber",
                json={"topics": ["plain"]},
                headers=as_bench,
            )
        assert put.status_code == 201
        assert "for service=plugin:bench" in caplog.text
        published = await client.post(
            "/events",
            json={"event": {"topic": "plain", "payload": {"n": 1}}, "notifiedSubscribers": []},
            headers=_bearer(plugin_token(events, "events")),
        )
        assert published.status_code == 201
        read = await client.get("/subscriptions/bench.bench-subscriber/events", headers=as_bench)
        assert read.status_code == 200
        assert [e["payload"] for e in read.json()["events"]] == [{"n": 1}]
        listed = await client.get("/subscriptions", headers=as_bench)
        assert [s["id"] for s in listed.json()["subscriptions"]] == ["bench.bench-subscriber"]
        # Static tokens keep working beside plugin tokens, and see only their own subscriptions.
        listed = await client.get("/subscriptions", headers=_bearer(STATIC))
        assert listed.status_code == 200
        assert listed.json()["subscriptions"] == []
    assert sorted(backstage.fetches) == ["bench", "events"]  # once per plugin, then cached


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda k: plugin_token(k, "bench", audience="catalog"), "wrong audience"),
        (lambda k: plugin_token(k, "bench", issued=0), "expired"),
        (lambda k: plugin_token(k, "bench", typ="JWT"), "Invalid token: only Backstage"),
        (lambda k: plugin_token(SigningKey(), "bench"), "unknown signing key"),
        (lambda k: plugin_token(SigningKey(), "bench", kid=k.kid), "signature does not match"),
        (lambda k: plugin_token(k, "be nch"), "forbidden subject format"),
        (lambda k: plugin_token(k, "catalog"), "the keys of plugin 'catalog' cannot be fetched"),
        (lambda k: "abc.def.ghi", "Invalid token"),
        (lambda k: "not-the-token", "Invalid token"),
    ],
)
async def test_bad_tokens_are_refused_with_401(
    backstage: FakeBackstage, make: Any, message: str
) -> None:
    key = backstage.add("bench")
    token = make(key)
    async with serve(_config(backstage)) as (_, client):
        response = await client.get("/subscriptions", headers=_bearer(token))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["name"] == "AuthenticationError"
    assert message in error["message"]
    assert token not in response.text


async def test_a_rotated_key_is_fetched_when_first_seen(backstage: FakeBackstage) -> None:
    first = backstage.add("bench")
    async with serve(_config(backstage)) as (app, client):
        ok = await client.get("/subscriptions", headers=_bearer(plugin_token(first, "bench")))
        assert ok.status_code == 200
        second = backstage.add("bench")  # Backstage makes a new key every hour
        # Keys are fetched again for an unknown kid once a cooldown since the last fetch passed.
        app.bus.auth.plugin_tokens.keys.refresh_cooldown = 0  # type: ignore[attr-defined]
        again = await client.get("/subscriptions", headers=_bearer(plugin_token(second, "bench")))
        assert again.status_code == 200
    assert backstage.fetches == ["bench", "bench"]


async def test_an_allow_list_limits_the_calling_plugins(backstage: FakeBackstage) -> None:
    catalog, bench = backstage.add("catalog"), backstage.add("bench")
    async with serve(_config(backstage, plugins=["catalog"])) as (_, client):
        allowed = await client.get("/subscriptions", headers=_bearer(plugin_token(catalog)))
        refused = await client.get("/subscriptions", headers=_bearer(plugin_token(bench, "bench")))
    assert allowed.status_code == 200
    assert refused.status_code == 401
    assert "plugin 'bench' may not call the events bus" in refused.json()["error"]["message"]
    assert backstage.fetches == ["catalog"]


async def test_without_the_backstage_section_plugin_tokens_are_refused() -> None:
    async with serve(_config(None)) as (_, client):
        token = plugin_token(SigningKey(), "bench")
        refused = await client.get("/subscriptions", headers=_bearer(token))
        static = await client.get("/subscriptions", headers=_bearer(STATIC))
    assert refused.status_code == 401
    assert "events.bus.backstage is not configured" in refused.json()["error"]["message"]
    assert static.status_code == 200


async def test_the_default_auth_policy_still_decides_about_anonymous_calls(
    backstage: FakeBackstage,
) -> None:
    key = backstage.add("bench")
    config = _config(backstage)
    async with serve(config) as (_, client):
        assert (await client.get("/subscriptions")).status_code == 401
    config["backend"]["auth"]["dangerouslyDisableDefaultAuthPolicy"] = True
    async with serve(config) as (_, client):
        assert (await client.get("/subscriptions")).status_code == 200
        expired = plugin_token(key, "bench", issued=0)
        assert (await client.get("/subscriptions", headers=_bearer(expired))).status_code == 401


async def test_callboard_publishes_no_keys_of_its_own() -> None:
    # Backstage only asks a plugin for its keys to verify a token that plugin issued, and
    # callboard issues none: its own jwks.json is a 404, as for a plugin without plugin tokens.
    async with serve(_config(None)) as (app, _):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://callboard") as client:
            response = await client.get("/api/events/.backstage/auth/v1/jwks.json")
    assert response.status_code == 404
