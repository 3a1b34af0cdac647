"""The bus API end to end through the ASGI application: Backstage's routes and callboard's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from callboard.app import CallboardApp, create_app
from callboard.brokers import admin
from callboard.brokers.memory import MemoryBroker
from callboard.bus import api
from callboard.bus.api import BusApp
from callboard.bus.auth import StaticToken, StaticTokenAuth
from callboard.bus.client import BusClient
from callboard.config import parse_config
from callboard.deadletters import dead_letter_event
from callboard.errors import SubscriptionError
from callboard.events import Event

TOKEN = "bus-test-token-1"
AUTH = {"authorization": f"Bearer {TOKEN}"}
BUS = "http://callboard/api/events/bus/v1"
SUB = "catalog.github-provider:main"


def _config(notify_ms: float = 5_000, **auth: Any) -> dict[str, Any]:
    return {
        "backend": {
            "auth": {
                "externalAccess": [
                    {"type": "static", "options": {"token": TOKEN, "subject": "backstage"}}
                ],
                **auth,
            }
        },
        "events": {"notifyTimeoutMs": notify_ms},
    }


@asynccontextmanager
async def serve(config: dict[str, Any]) -> AsyncIterator[tuple[CallboardApp, httpx.AsyncClient]]:
    app = create_app(parse_config(config), use_entry_points=False)
    async with app.starlette.router.lifespan_context(app.starlette):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BUS, headers=AUTH) as client:
            yield app, client


@pytest.fixture
async def bus() -> AsyncIterator[tuple[CallboardApp, httpx.AsyncClient]]:
    async with serve(_config()) as running:
        yield running


def _path(id: str) -> str:
    return "/subscriptions/" + quote(id, safe="")


async def _publish(client: httpx.AsyncClient, topic: str, payload: Any, **extra: Any) -> int:
    response = await client.post(
        "/events", json={"event": {"topic": topic, "payload": payload}, **extra}
    )
    return response.status_code


# -- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer not-the-token"}])
async def test_every_route_refuses_missing_or_wrong_tokens(headers: dict[str, str]) -> None:
    async with serve(_config()) as (_, client):
        client.headers.pop("authorization")
        calls = [
            client.post("/events", json={"event": {"topic": "a", "payload": 1}}, headers=headers),
            client.put(_path(SUB), json={"topics": ["a"]}, headers=headers),
            client.get(_path(SUB) + "/events", headers=headers),
            client.get(_path(SUB) + "/deliveries", headers=headers),
            client.post(_path(SUB) + "/acks", json={"ackIds": []}, headers=headers),
            client.delete(_path(SUB), headers=headers),
        ]
        for call in calls:
            response = await call
            assert response.status_code == 401
            body = response.json()
            assert body["error"]["name"] == "AuthenticationError"
            assert body["response"] == {"statusCode": 401}
            assert response.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in response.text


async def test_disabled_default_policy_lets_anonymous_callers_in() -> None:
    async with serve(_config(dangerouslyDisableDefaultAuthPolicy=True)) as (_, client):
        client.headers.pop("authorization")
        assert (await client.put(_path(SUB), json={"topics": ["a"]})).status_code == 201
        wrong = await client.put(
            _path(SUB), json={"topics": ["a"]}, headers={"authorization": "Bearer wrong-one"}
        )
        assert wrong.status_code == 401


# -- Backstage's routes -------------------------------------------------------------------------


async def test_publish_is_stored_only_for_a_subscription_not_yet_notified(bus: Any) -> None:
    _, client = bus
    assert await _publish(client, "github.push", {"n": 0}) == 204
    assert (await client.put(_path(SUB), json={"topics": ["github.push"]})).status_code == 201
    assert await _publish(client, "github.push", {"n": 1}) == 201
    assert await _publish(client, "gitlab.push", {"n": 2}) == 204
    assert await _publish(client, "github.push", {"n": 3}, notifiedSubscribers=[SUB]) == 204
    assert await _publish(client, "github.push", {"n": 4}, notifiedSubscribers=["other"]) == 201
    response = await client.get(_path(SUB) + "/events")
    assert response.status_code == 200
    assert [e["payload"] for e in response.json()["events"]] == [{"n": 1}, {"n": 4}]


async def test_publish_sees_subscriptions_made_elsewhere_at_once(
    bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = bus
    broker = app.board.events.broker
    assert await _publish(client, "github.push", {"n": 0}) == 204
    # Made without the bus (as another process would): the next publish is stored for it.
    consumer = await broker.consume("made.elsewhere", ["github.push"])
    assert await _publish(client, "github.push", {"n": 1}) == 201
    await consumer.close()  # in memory, the group goes with its last consumer
    assert "made.elsewhere" not in {s.name for s in await admin(broker).subscriptions()}
    # A reader read less than READERS_TTL ago is trusted; after that the broker is asked again.
    assert await _publish(client, "github.push", {"n": 2}) == 201
    monkeypatch.setattr(api, "READERS_TTL", 0.0)
    assert await _publish(client, "github.push", {"n": 3}) == 204


async def test_get_returns_backstage_events_with_metadata_and_id(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["github"]})
    event = {"topic": "github", "payload": {"a": 1}, "metadata": {"x-github-event": "push"}}
    created = await client.post("/events", json={"event": event})
    assert created.status_code == 201
    response = await client.get(_path(SUB) + "/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    (got,) = response.json()["events"]
    assert got["topic"] == "github"
    assert got["payload"] == {"a": 1}
    assert got["metadata"] == {"x-github-event": "push"}
    assert got["id"] == created.json()["id"]


async def test_reads_come_in_batches_of_ten_and_move_the_position(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["plain"]})
    for n in range(12):
        assert await _publish(client, "plain", n) == 201
    first = (await client.get(_path(SUB) + "/events")).json()["events"]
    second = (await client.get(_path(SUB) + "/events")).json()["events"]
    assert [e["payload"] for e in first] == list(range(10))
    assert [e["payload"] for e in second] == [10, 11]


async def test_unknown_subscription_is_404(bus: Any) -> None:
    _, client = bus
    response = await client.get(_path("nobody.here") + "/events")
    assert response.status_code == 404
    assert response.json()["error"]["name"] == "NotFoundError"


async def test_put_keeps_the_position_of_an_existing_subscription(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    await _publish(client, "a", 1)
    assert (await client.put(_path(SUB), json={"topics": ["a"]})).status_code == 201
    events = (await client.get(_path(SUB) + "/events")).json()["events"]
    assert [e["payload"] for e in events] == [1]


async def test_put_replaces_the_topics(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    await client.put(_path(SUB), json={"topics": ["b"]})
    assert await _publish(client, "a", 1) == 204
    assert await _publish(client, "b", 2) == 201
    events = (await client.get(_path(SUB) + "/events")).json()["events"]
    assert [e["payload"] for e in events] == [2]


async def test_an_empty_read_is_a_202_with_the_notify_timeout_header() -> None:
    async with serve(_config(notify_ms=50)) as (_, client):
        await client.put(_path(SUB), json={"topics": ["a"]})
        started = time.monotonic()
        response = await client.get(_path(SUB) + "/events")
        assert response.status_code == 202
        assert response.headers["backstage-events-notify-timeout"] == "50"
        # Sent chunked: a content-length of 0 would tell the client the hold is already over.
        assert "content-length" not in response.headers
        assert response.content == b""
        assert time.monotonic() - started >= 0.05


async def test_a_held_read_ends_when_an_event_arrives(bus: Any) -> None:
    _, client = bus  # notify timeout 5 s
    await client.put(_path(SUB), json={"topics": ["a"]})
    started = time.monotonic()
    held = asyncio.create_task(client.get(_path(SUB) + "/events"))
    await asyncio.sleep(0.1)  # let the read find nothing and hold (no event to await here)
    assert not held.done()
    assert await _publish(client, "a", "hello") == 201
    response = await held
    assert response.status_code == 202
    assert response.content == b""  # a 202 never carries events
    assert time.monotonic() - started < 4
    events = (await client.get(_path(SUB) + "/events")).json()["events"]
    assert [e["payload"] for e in events] == ["hello"]


async def test_ids_with_dots_and_colons_and_large_bodies() -> None:
    async with serve(_config(notify_ms=20)) as (_, client):
        assert (await client.put("/subscriptions/a.b:c", json={"topics": ["a"]})).status_code == 201
        assert (await client.get("/subscriptions/a.b%3Ac/events")).status_code in (200, 202)
        big = {"event": {"topic": "a", "payload": "x" * (5 * 1024 * 1024)}}
        response = await client.post("/events", json=big)
        assert response.status_code == 413
        assert (await client.post("/events", json={"event": {"payload": 1}})).status_code == 400
        bad = await client.post(
            "/events", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["name"] == "InputError"


async def test_competing_readers_share_one_subscription() -> None:
    broker = MemoryBroker()
    bus = BusApp(
        broker, StaticTokenAuth([StaticToken(TOKEN, "t")]), batch_size=1, notify_timeout_ms=5000
    )
    app = Starlette(routes=[Mount("/api/events/bus/v1", app=bus)])
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BUS, headers=AUTH) as client:
            await client.put(_path(SUB), json={"topics": ["a"]})
            for n in range(2):
                await _publish(client, "a", n)
            first, second = await asyncio.gather(
                client.get(_path(SUB) + "/events"), client.get(_path(SUB) + "/events")
            )
            got = [e["payload"] for r in (first, second) for e in r.json()["events"]]
            assert sorted(got) == [0, 1]
            assert first.json()["events"] != second.json()["events"]
    finally:
        await bus.close()


async def test_a_subscription_made_on_one_server_is_read_on_another() -> None:
    broker = MemoryBroker()  # one broker behind two servers
    auth = StaticTokenAuth([StaticToken(TOKEN, "t")])
    one, two = BusApp(broker, auth), BusApp(broker, auth)
    clients = [
        httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=Starlette(routes=[Mount("/api/events/bus/v1", app=b)])
            ),
            base_url=BUS,
            headers=AUTH,
        )
        for b in (one, two)
    ]
    try:
        await clients[0].put(_path(SUB), json={"topics": ["a"]})
        assert await _publish(clients[1], "a", "x") == 201
        response = await clients[1].get(_path(SUB) + "/events")
        assert [e["payload"] for e in response.json()["events"]] == ["x"]
    finally:
        for client in clients:
            await client.aclose()
        await two.close()
        await one.close()


# -- callboard's acknowledged reads -------------------------------------------------------------


async def _deliveries(client: httpx.AsyncClient, lease_ms: int = 30_000) -> httpx.Response:
    return await client.get(_path(SUB) + "/deliveries", params={"leaseMs": lease_ms})


async def test_unacknowledged_deliveries_come_back_after_the_lease(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    await _publish(client, "a", "once")
    first = await _deliveries(client, lease_ms=50)
    assert first.status_code == 200
    (delivery,) = first.json()["deliveries"]
    assert delivery["attempt"] == 1
    assert first.json()["leaseMs"] == 50
    # Nothing acknowledged: the held read ends when the lease gives the event back.
    while (again := await _deliveries(client)).status_code == 202:
        pass
    (redelivered,) = again.json()["deliveries"]
    assert redelivered["event"]["id"] == delivery["event"]["id"]
    assert redelivered["attempt"] == 2
    assert redelivered["ackId"] != delivery["ackId"]
    acked = await client.post(_path(SUB) + "/acks", json={"ackIds": [redelivered["ackId"], "x"]})
    assert acked.json() == {"done": [redelivered["ackId"]], "unknown": ["x"]}
    late = await client.post(_path(SUB) + "/acks", json={"ackIds": [delivery["ackId"]]})
    assert late.json() == {"done": [], "unknown": [delivery["ackId"]]}


async def test_acknowledged_deliveries_do_not_come_back() -> None:
    async with serve(_config(notify_ms=200)) as (_, client):
        await client.put(_path(SUB), json={"topics": ["a"]})
        await _publish(client, "a", 1)
        (delivery,) = (await _deliveries(client, lease_ms=50)).json()["deliveries"]
        await client.post(_path(SUB) + "/acks", json={"ackIds": [delivery["ackId"]]})
        # Each empty read is held 200 ms, past the 50 ms lease: an event given back ends it.
        assert (await _deliveries(client)).status_code == 202
        assert (await _deliveries(client)).status_code == 202


async def test_refused_and_renewed_deliveries(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    await _publish(client, "a", 1)
    (delivery,) = (await _deliveries(client)).json()["deliveries"]
    renewed = await client.post(
        _path(SUB) + "/leases", json={"ackIds": [delivery["ackId"]], "leaseMs": 60_000}
    )
    assert renewed.json()["done"] == [delivery["ackId"]]
    refused = await client.post(_path(SUB) + "/nacks", json={"ackIds": [delivery["ackId"]]})
    assert refused.json()["done"] == [delivery["ackId"]]
    while (again := await _deliveries(client)).status_code == 202:
        pass
    assert again.json()["deliveries"][0]["event"]["id"] == delivery["event"]["id"]


async def test_bad_lease_is_a_400(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    assert (await _deliveries(client, lease_ms=0)).status_code == 400
    renew = await client.post(_path(SUB) + "/leases", json={"ackIds": ["x"]})
    assert renew.status_code == 400


# -- deleting a subscription --------------------------------------------------------------------


async def _listed(client: httpx.AsyncClient) -> list[str]:
    response = await client.get("/subscriptions")
    return [item["id"] for item in response.json()["subscriptions"]]


async def test_delete_forgets_the_subscription_then_it_is_404(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    assert await _listed(client) == [SUB]
    deleted = await client.delete(_path(SUB))
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert await _listed(client) == []
    assert await _publish(client, "a", "nobody reads it") == 204
    assert (await client.get(_path(SUB) + "/events")).status_code == 404
    again = await client.delete(_path(SUB))
    assert again.status_code == 404
    body = again.json()
    assert body["error"] == {
        "name": "NotFoundError",
        "message": f"Subscription with ID '{SUB}' not found",
    }
    assert body["request"]["method"] == "DELETE"


async def test_delete_lets_go_of_held_reads_and_leases(bus: Any) -> None:
    _, client = bus  # notify timeout 5 s
    await client.put(_path(SUB), json={"topics": ["a"]})
    await _publish(client, "a", 1)
    (delivery,) = (await _deliveries(client)).json()["deliveries"]
    started = time.monotonic()
    held = asyncio.create_task(client.get(_path(SUB) + "/events"))
    await asyncio.sleep(0.1)  # let the read find nothing and hold (no event to await here)
    assert not held.done()
    assert (await client.delete(_path(SUB))).status_code == 204
    assert (await held).status_code == 202
    assert time.monotonic() - started < 4
    late = await client.post(_path(SUB) + "/acks", json={"ackIds": [delivery["ackId"]]})
    assert late.json() == {"done": [], "unknown": [delivery["ackId"]]}


async def test_delete_is_409_while_the_servers_own_subscribers_read_it(bus: Any) -> None:
    app, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    inside = await app.board.events.broker.consume(SUB, ["a"])  # as a module's subscriber would
    try:
        refused = await client.delete(_path(SUB))
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["name"] == "ConflictError"
        assert SUB in error["message"]
        assert "inside this callboard server" in error["message"]
        assert "read it: " in error["message"]
        # The client of the bus API hands the conflict on as a SubscriptionError.
        bus_client = BusClient("http://callboard", TOKEN, transport=httpx.ASGITransport(app=app))
        try:
            with pytest.raises(SubscriptionError, match="stop them before deleting it"):
                await bus_client.delete_subscription(SUB)
        finally:
            await bus_client.aclose()
        # Still a subscription: the bus reads it again as before.
        assert await _listed(client) == [SUB]
        assert await _publish(client, "a", "still here") == 201
        events = (await client.get(_path(SUB) + "/events")).json()["events"]
        assert [e["payload"] for e in events] == ["still here"]
    finally:
        await inside.close()
    assert (await client.delete(_path(SUB))).status_code == 204
    assert await _listed(client) == []


# -- who may use which subscription ---------------------------------------------------------------

OTHER = "bus-test-token-2"
AS_OTHER = {"authorization": f"Bearer {OTHER}"}


def _two_callers(**bus: Any) -> dict[str, Any]:
    config = _config(notify_ms=50)
    config["backend"]["auth"]["externalAccess"].append(
        {"type": "static", "options": {"token": OTHER, "subject": "intruder"}}
    )
    config["events"]["bus"] = bus
    return config


async def _refused(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["name"] == "NotAllowedError"
    assert SUB in error["message"]
    for word in words:
        assert word in error["message"]


async def test_a_caller_cannot_use_another_callers_subscription() -> None:
    async with serve(_two_callers()) as (app, client):
        assert (await client.put(_path(SUB), json={"topics": ["a"]})).status_code == 201
        await _publish(client, "a", 1)
        await app.board.events.broker.publish(
            dead_letter_event(SUB, Event(topic="a", payload=0), RuntimeError("boom"), 1)
        )
        calls = [
            client.put(_path(SUB), json={"topics": ["a"]}, headers=AS_OTHER),
            client.get(_path(SUB) + "/events", headers=AS_OTHER),
            client.get(_path(SUB) + "/deliveries", headers=AS_OTHER),
            client.post(_path(SUB) + "/acks", json={"ackIds": ["x"]}, headers=AS_OTHER),
            client.get(_path(SUB) + "/dead-letters", headers=AS_OTHER),
            client.post(_path(SUB) + "/dead-letters/take", json={"remove": True}, headers=AS_OTHER),
            client.post(
                _path(SUB) + "/events",
                json={"event": {"topic": "a", "payload": 2}},
                headers=AS_OTHER,
            ),
            client.delete(_path(SUB), headers=AS_OTHER),
        ]
        for call in calls:
            # The answer says who may, without naming the owner's subject.
            await _refused(await call, "service=intruder", "events.bus.grants")
            assert "backstage" not in (await client.get("/subscriptions", headers=AS_OTHER)).text
        assert (await client.get("/subscriptions", headers=AS_OTHER)).json() == {
            "subscriptions": []
        }
        # Its owner still has everything.
        assert await _listed(client) == [SUB]
        events = (await client.get(_path(SUB) + "/events")).json()["events"]
        assert [e["payload"] for e in events] == [1]
        letters = (await client.get(_path(SUB) + "/dead-letters")).json()["deadLetters"]
        assert len(letters) == 1


async def test_the_servers_own_subscriptions_are_never_read_over_the_bus() -> None:
    async with serve(_two_callers(grants=[{"subject": "backstage", "subscriptions": ["*"]}])) as (
        app,
        client,
    ):
        handled: list[Any] = []

        async def handler(event: Event) -> None:
            handled.append(event.payload)

        await app.board.events.subscribe(SUB, ["a"], handler)
        for call in (
            client.get(_path(SUB) + "/events"),
            client.get(_path(SUB) + "/deliveries"),
            client.put(_path(SUB), json={"topics": ["a"]}),
            client.get(_path(SUB) + "/dead-letters"),
            client.delete(_path(SUB)),
        ):
            await _refused(await call, "server's own modules")
        assert await _listed(client) == []
        for n in range(20):
            assert await _publish(client, "a", n) == 201
        await app.board.events.broker.drain()  # type: ignore[attr-defined]
        assert sorted(handled) == list(range(20))


async def test_grants_give_a_subject_an_owners_rights() -> None:
    grants = [{"subject": "intruder", "subscriptions": ["catalog.*"]}]
    async with serve(_two_callers(grants=grants)) as (_, client):
        await client.put(_path(SUB), json={"topics": ["a"]})
        await client.put(_path("other.sub"), json={"topics": ["a"]})
        await _publish(client, "a", 1)
        assert await _listed(client) == [SUB, "other.sub"]
        listed = (await client.get("/subscriptions", headers=AS_OTHER)).json()["subscriptions"]
        assert [item["id"] for item in listed] == [SUB]
        events = (await client.get(_path(SUB) + "/events", headers=AS_OTHER)).json()["events"]
        assert [e["payload"] for e in events] == [1]
        refused = await client.get(_path("other.sub") + "/events", headers=AS_OTHER)
        assert refused.status_code == 403


async def test_a_subscription_without_an_owner_is_claimed_by_its_first_put() -> None:
    async with serve(_two_callers()) as (app, client):
        # As a subscription made before owners were recorded.
        old = await app.board.events.broker.consume(SUB, ["a"])
        try:
            assert (await client.put(_path(SUB), json={"topics": ["a"]})).status_code == 201
            await _refused(await client.put(_path(SUB), json={"topics": ["a"]}, headers=AS_OTHER))
            owners = {s.name: s.owner for s in await app.board.events.broker.subscriptions()}  # type: ignore[attr-defined]
            assert owners[SUB] == "service=backstage"
        finally:
            await old.close()


# -- input that can never succeed is a 400 --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", _path(SUB) + "/dead-letters?limit=99999999999999999999", None),
        ("GET", _path(SUB) + "/dead-letters?limit=0", None),
        ("GET", _path(SUB) + "/dead-letters?limit=%C2%B2", None),
        ("GET", _path(SUB) + "/deliveries?leaseMs=%C2%B2", None),
        ("POST", _path(SUB) + "/dead-letters/take", {"limit": 99999999999999999999}),
        ("POST", _path(SUB) + "/dead-letters/take", {"limit": True}),
        ("PUT", "/subscriptions/%00", {"topics": ["a"]}),
        ("PUT", "/subscriptions/a%01b", {"topics": ["a"]}),
        ("PUT", "/subscriptions/" + "x" * 256, {"topics": ["a"]}),
        ("GET", "/subscriptions/%00/events", None),
        ("PUT", _path(SUB), {"topics": ["a\x00"]}),
        ("POST", "/events", {"event": {"topic": "a\x00", "payload": 1}}),
        ("POST", "/events", {"event": {"topic": "a", "payload": 1, "id": "e\x00"}}),
        ("POST", "/events", {"event": {"topic": "a", "payload": "nul \x00 here"}}),
        ("POST", "/events", {"event": {"topic": "a", "payload": {"k\x00": 1}}}),
        ("POST", "/events", {"event": {"topic": "t" * 256, "payload": 1}}),
        (
            "POST",
            "/events",
            {"event": {"topic": "a", "payload": 1}, "notifiedSubscribers": ["\x00"]},
        ),
    ],
)
async def test_input_that_can_never_succeed_is_a_400(
    bus: Any, method: str, path: str, body: Any
) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    response = await client.request(method, path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["name"] == "InputError"


async def test_json_nested_too_deep_to_store_is_a_400(bus: Any) -> None:
    _, client = bus
    await client.put(_path(SUB), json={"topics": ["a"]})
    deep = "[" * 300 + "]" * 300
    body = '{"event": {"topic": "a", "payload": ' + deep + "}}"
    response = await client.post(
        "/events", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "254 levels" in response.json()["error"]["message"]
    assert await _publish(client, "a", "the subscription still reads") == 201
    events = (await client.get(_path(SUB) + "/events")).json()["events"]
    assert [e["payload"] for e in events] == ["the subscription still reads"]


async def test_topics_per_subscription_are_capped() -> None:
    config = _config()
    config["events"]["bus"] = {"maxTopicsPerSubscription": 3}
    async with serve(config) as (_, client):
        fine = await client.put(_path(SUB), json={"topics": ["a", "b", "c", "a"]})
        assert fine.status_code == 201
        over = await client.put(_path(SUB), json={"topics": ["a", "b", "c", "d"]})
        assert over.status_code == 400
        assert "events.bus.maxTopicsPerSubscription" in over.json()["error"]["message"]
