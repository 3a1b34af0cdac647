"""The bus API under random requests: never a 5xx, and never one caller in another's subscription.

Each example runs a short random session of two callers against a fresh bus on the memory and
the SQLite broker: routes, subscription ids (NUL, other control characters, unicode, long ones),
query strings and JSON bodies. The first caller owns ``owned`` before the session starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount

from callboard.brokers.base import Broker
from callboard.brokers.memory import MemoryBroker
from callboard.brokers.sqlite import SQLiteBroker
from callboard.bus.api import BusApp
from callboard.bus.auth import StaticToken, StaticTokenAuth

BUS = "http://callboard/api/events/bus/v1"
OWNER = {"authorization": "Bearer owner-token"}
OTHER = {"authorization": "Bearer other-token"}
OWNED = "owned"

_IDS = st.one_of(
    st.sampled_from([OWNED, "mine", "a.b:c", "\x00", "x" * 256, "é", "%00"]),
    st.text(max_size=40),
    st.text(min_size=250, max_size=300),
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_TOPICS = st.one_of(st.sampled_from(["a", "a.b", ">", "*.b", "$x", "a\x00"]), st.text(max_size=12))
_BODIES = st.one_of(
    _JSON,
    st.fixed_dictionaries({"topics": st.lists(_TOPICS, max_size=4)}),
    st.fixed_dictionaries(
        {"event": st.fixed_dictionaries({"topic": _TOPICS, "payload": _JSON})},
        optional={"notifiedSubscribers": st.lists(_IDS, max_size=2)},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "ackIds": st.lists(st.text(max_size=10), max_size=3),
            "leaseMs": st.integers(),
            "limit": st.one_of(st.integers(), _JSON),
            "ids": st.one_of(st.lists(_IDS, max_size=2), _JSON),
            "remove": _JSON,
        },
    ),
)
_ROUTES = st.sampled_from(
    [
        ("POST", "/events"),
        ("GET", "/subscriptions"),
        ("PUT", "/subscriptions/{id}"),
        ("DELETE", "/subscriptions/{id}"),
        ("GET", "/subscriptions/{id}/events"),
        ("POST", "/subscriptions/{id}/events"),
        ("GET", "/subscriptions/{id}/deliveries"),
        ("POST", "/subscriptions/{id}/acks"),
        ("POST", "/subscriptions/{id}/nacks"),
        ("POST", "/subscriptions/{id}/leases"),
        ("GET", "/subscriptions/{id}/dead-letters"),
        ("POST", "/subscriptions/{id}/dead-letters/take"),
        ("PATCH", "/subscriptions/{id}"),
    ]
)
_QUERIES = st.dictionaries(
    st.sampled_from(["limit", "leaseMs", "id"]),
    st.one_of(st.text(max_size=25), st.integers().map(str)),
    max_size=2,
)
_REQUESTS = st.tuples(st.booleans(), _ROUTES, _IDS, _QUERIES, _BODIES)


@asynccontextmanager
async def _bus(kind: str) -> AsyncIterator[httpx.AsyncClient]:
    broker: Broker = MemoryBroker() if kind == "memory" else SQLiteBroker(":memory:")
    await broker.start()
    auth = StaticTokenAuth(
        [StaticToken("owner-token", "owner"), StaticToken("other-token", "other")]
    )
    bus = BusApp(broker, auth, notify_timeout_ms=5, grace=0.001, hold=0.5)
    app = Starlette(routes=[Mount("/api/events/bus/v1", app=bus)])
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BUS
        ) as client:
            yield client
    finally:
        await bus.close()
        await broker.close()


async def _session(kind: str, requests: list[tuple[bool, Any, str, Any, Any]]) -> None:
    async with _bus(kind) as client:
        put = await client.put(f"/subscriptions/{OWNED}", json={"topics": ["a"]}, headers=OWNER)
        assert put.status_code == 201
        for by_owner, (method, route), id, query, body in requests:
            path = route.replace("{id}", quote(id, safe=""))
            headers = OWNER if by_owner else OTHER
            async with asyncio.timeout(5):
                response = await client.request(
                    method, path, params=query, json=body, headers=headers
                )
            assert response.status_code < 500, (method, path, query, body, response.text)
            if not by_owner and "{id}" in route and id == OWNED:
                assert response.status_code in (400, 403, 404, 405, 413, 415), response.text
            if not by_owner and route == "/subscriptions":
                assert OWNED not in [s["id"] for s in response.json()["subscriptions"]]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(requests=st.lists(_REQUESTS, min_size=1, max_size=8))
def test_random_requests_never_fail_the_server_nor_cross_owners(
    kind: str, requests: list[tuple[bool, Any, str, Any, Any]]
) -> None:
    asyncio.run(_session(kind, requests))
