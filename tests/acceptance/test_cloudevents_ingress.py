"""CloudEvents 1.0 through the application's HTTP ingress: binary, structured and batched."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from callboard import (
    DELIVERY_ID,
    CallboardApp,
    Event,
    MemoryBroker,
    ModuleContext,
    Rejection,
    WebhookRequest,
    create_app,
    load_config,
    module,
)
from callboard.cloud_events import MAX_BATCH, delivery_id, to_binary, to_structured
from callboard.ingress.types import IngressOutcome

CONFIG = {"events": {"http": {"topics": ["cloud"]}}}
URL = "/api/events/http/cloud"
TOKEN = "s3cret"
BINARY = {
    "ce-specversion": "1.0",
    "ce-id": "A234-1234-1234",
    "ce-source": "/mycontext/sub%20context",
    "ce-type": "com.example.someevent",
    "ce-time": "2018-04-05T17:31:00Z",
    "ce-comexampleextension1": "value",
    "content-type": "application/json",
}
EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "B234-1234-1234",
    "source": "/mycontext",
    "type": "com.example.someevent",
    "subject": "larger-context",
    "datacontenttype": "application/json",
    "comexampleextension1": "value",
    "data": {"appinfoA": "abc", "appinfoB": 123},
}
STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCH = {"content-type": "application/cloudevents-batch+json"}


class Inbox:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def on_event(self, event: Event) -> None:
        self.events.append(event)


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def app(inbox: Inbox) -> CallboardApp:
    async def token(request: WebhookRequest) -> Rejection | None:
        given = request.header("x-token") or ""
        if hmac.compare_digest(given.encode(), TOKEN.encode()):
            return None
        return Rejection(403, {"error": {"name": "Forbidden", "message": "bad token"}})

    @module("cloud")
    def register(context: ModuleContext) -> None:
        context.ingress.add_ingress("signed", validator=token)
        context.subscribers.add_subscription("inbox", ["cloud", "signed"], inbox.on_event)

    return create_app(load_config(overrides=CONFIG), modules=[register], use_entry_points=False)


@pytest.fixture
async def client(app: CallboardApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.board.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://callboard") as client,
    ):
        yield client


async def drain(app: CallboardApp) -> None:
    broker = app.board.events.broker
    assert isinstance(broker, MemoryBroker)
    await broker.drain()


def accepted(response: httpx.Response) -> None:
    assert response.status_code == 202, response.text
    assert response.json() == {"status": "accepted"}


def refused(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["name"] == "MalformedBodyError"
    assert body["response"] == {"statusCode": status}
    message: str = body["error"]["message"]
    return message


async def test_a_binary_cloud_event_is_accepted(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    accepted(await client.post(URL, content=b'{"a": 1}', headers=BINARY))
    await drain(app)
    [event] = inbox.events
    assert event.topic == "cloud"
    assert event.payload == {"a": 1}
    assert event.metadata["ce-id"] == "A234-1234-1234"
    assert event.metadata["ce-source"] == "/mycontext/sub context"
    assert event.metadata["ce-type"] == "com.example.someevent"
    assert event.metadata["ce-time"] == "2018-04-05T17:31:00Z"
    assert event.metadata["ce-comexampleextension1"] == "value"
    assert event.metadata["ce-datacontenttype"] == "application/json"
    assert event.metadata[DELIVERY_ID] == delivery_id("/mycontext/sub context", "A234-1234-1234")
    # Emitted again, it is the CloudEvent that came in.
    headers, body = to_binary(event, source="/elsewhere")
    assert headers == BINARY
    assert orjson.loads(body) == {"a": 1}


async def test_binary_mode_takes_data_of_any_media_type(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    text = {**BINARY, "content-type": "text/csv", "ce-id": "text"}
    accepted(await client.post(URL, content=b"a,b\n1,2\n", headers=text))
    raw = {**BINARY, "content-type": "application/octet-stream", "ce-id": "raw"}
    accepted(await client.post(URL, content=b"\xff\x00\x01", headers=raw))
    empty = {k: v for k, v in BINARY.items() if k != "content-type"} | {"ce-id": "empty"}
    accepted(await client.post(URL, content=b"", headers=empty))
    await drain(app)
    by_id = {event.metadata["ce-id"]: event for event in inbox.events}
    assert by_id["text"].payload == "a,b\n1,2\n"
    assert by_id["raw"].payload == "/wAB"
    assert by_id["raw"].metadata["callboard-data-base64"] == "true"
    assert to_binary(by_id["raw"], source="/x")[1] == b"\xff\x00\x01"
    assert by_id["empty"].payload is None


async def test_a_structured_cloud_event_is_accepted(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    # ce-* headers beside a structured event are not its attributes.
    headers = {**STRUCTURED, "ce-stray": "header"}
    accepted(await client.post(URL, content=orjson.dumps(EVENT), headers=headers))
    await drain(app)
    [event] = inbox.events
    assert event.payload == EVENT["data"]
    assert event.metadata["ce-subject"] == "larger-context"
    assert event.metadata["ce-specversion"] == "1.0"
    assert "ce-stray" not in event.metadata
    assert "ce-time" not in event.metadata
    assert event.metadata[DELIVERY_ID] == delivery_id("/mycontext", "B234-1234-1234")
    assert orjson.loads(to_structured(event, source="/elsewhere")[1]) == {
        **EVENT,
        "time": event.time.isoformat().replace("+00:00", "Z"),
    }


async def test_a_batch_is_published_in_order(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    batch = [{**EVENT, "id": str(n), "data": n} for n in range(3)]
    accepted(await client.post(URL, content=orjson.dumps(batch), headers=BATCH))
    accepted(await client.post(URL, content=b"[]", headers=BATCH))
    await drain(app)
    assert [(e.metadata["ce-id"], e.payload) for e in inbox.events] == [
        ("0", 0),
        ("1", 1),
        ("2", 2),
    ]


async def test_a_cloud_event_sent_twice_is_delivered_once(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    binary = {**BINARY, "ce-source": "/mycontext", "ce-id": EVENT["id"]}
    accepted(await client.post(URL, content=orjson.dumps(EVENT), headers=STRUCTURED))
    # The same source and id again, in the other mode and within a batch: redeliveries.
    accepted(await client.post(URL, content=orjson.dumps(EVENT["data"]), headers=binary))
    other = {**EVENT, "id": "other"}
    accepted(await client.post(URL, content=orjson.dumps([EVENT, other]), headers=BATCH))
    # The same id from another source is another event.
    elsewhere = {**EVENT, "source": "/elsewhere"}
    accepted(await client.post(URL, content=orjson.dumps(elsewhere), headers=STRUCTURED))
    await drain(app)
    assert [(e.metadata["ce-source"], e.metadata["ce-id"]) for e in inbox.events] == [
        ("/mycontext", "B234-1234-1234"),
        ("/mycontext", "other"),
        ("/elsewhere", "B234-1234-1234"),
    ]


async def test_redelivery_detection_can_be_switched_off(inbox: Inbox) -> None:
    @module("inbox")
    def register(context: ModuleContext) -> None:
        context.subscribers.add_subscription("inbox", ["cloud"], inbox.on_event)

    config = {"events": {"http": {"topics": ["cloud"], "detectRedeliveries": False}}}
    app = create_app(load_config(overrides=config), modules=[register], use_entry_points=False)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.board.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://callboard") as client,
    ):
        for _ in range(2):
            accepted(await client.post(URL, content=orjson.dumps(EVENT), headers=STRUCTURED))
        await drain(app)
    assert len(inbox.events) == 2
    assert all(DELIVERY_ID not in event.metadata for event in inbox.events)


@pytest.mark.parametrize(
    ("headers", "body", "named"),
    [
        ({**BINARY, "ce-id": ""}, b"{}", "id: Attribute 'id' must not be None or empty"),
        (
            {k: v for k, v in BINARY.items() if k != "ce-source"},
            b"{}",
            "lacks the required header ce-source",
        ),
        ({**BINARY, "ce-specversion": "0.3"}, b"{}", "Attribute 'specversion' must be '1.0'"),
        (BINARY, b"{nope", "the body is not valid JSON"),
        (STRUCTURED, b"{nope", "the body is not valid JSON"),
        (STRUCTURED, b"", "the body is empty"),
        (STRUCTURED, orjson.dumps({**EVENT, "specversion": "2.0"}), "specversion"),
        (
            STRUCTURED,
            orjson.dumps({k: v for k, v in EVENT.items() if k != "type"}),
            "lacks the required attribute type",
        ),
        (STRUCTURED, orjson.dumps({**EVENT, "time": "noon"}), "not an RFC 3339 timestamp"),
        (BATCH, orjson.dumps(EVENT), "a JSON array of events"),
        (BATCH, orjson.dumps([EVENT, {"id": "x"}]), "event 1 lacks the required attributes"),
    ],
)
async def test_a_malformed_cloud_event_is_refused_with_400(
    app: CallboardApp,
    client: httpx.AsyncClient,
    inbox: Inbox,
    headers: dict[str, str],
    body: bytes,
    named: str,
) -> None:
    assert named in refused(await client.post(URL, content=body, headers=headers))
    await drain(app)
    assert inbox.events == []


async def test_attributes_over_the_metadata_limit_are_refused(client: httpx.AsyncClient) -> None:
    big = {**EVENT, "big": "x" * 17_000}
    response = await client.post(URL, content=orjson.dumps(big), headers=STRUCTURED)
    assert response.status_code == 400
    assert "events.http.maxMetadataBytes" in response.json()["error"]["message"]


async def test_the_validator_runs_first(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    url = "/api/events/http/signed"
    malformed = {k: v for k, v in BINARY.items() if k != "ce-id"}
    assert (await client.post(url, content=b"{nope", headers=malformed)).status_code == 403
    assert (await client.post(url, content=b"{", headers=STRUCTURED)).status_code == 403
    signed = {**STRUCTURED, "x-token": TOKEN}
    accepted(await client.post(url, content=orjson.dumps(EVENT), headers=signed))
    await drain(app)
    [event] = inbox.events
    assert (event.topic, event.metadata["ce-id"]) == ("signed", EVENT["id"])


async def test_a_plain_webhook_is_not_a_cloud_event(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    headers = {"content-type": "application/json", "ce-id": "not-a-cloud-event"}
    accepted(await client.post(URL, content=b'{"a": 1}', headers=headers))
    await drain(app)
    [event] = inbox.events
    assert event.payload == {"a": 1}
    assert event.metadata["ce-id"] == "not-a-cloud-event"  # a header like any other
    assert DELIVERY_ID not in event.metadata
    assert "ce-specversion" not in event.metadata


async def test_an_event_emitted_by_callboard_comes_back_as_itself(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    original = Event(topic="github.push", payload={"ref": "main"})
    for write in (to_binary, to_structured):
        headers, body = write(original, source="https://callboard.example")
        accepted(await client.post(URL, content=body, headers=headers))
    await drain(app)
    first, *again = inbox.events
    assert again == []  # the second is the same source and id: a redelivery
    assert first.payload == {"ref": "main"}
    assert first.metadata["ce-id"] == original.id
    assert first.metadata["ce-type"] == "github.push"
    assert first.metadata["ce-source"] == "https://callboard.example"


class Outcomes:
    def __init__(self, *, refusals_only: bool) -> None:
        self.refusals_only = refusals_only
        self.statuses: list[int] = []

    def request(self, outcome: IngressOutcome) -> None:
        self.statuses.append(outcome.status)


async def test_an_observer_of_refusals_only_is_not_told_of_accepted_cloud_events(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    refusals, everything = Outcomes(refusals_only=True), Outcomes(refusals_only=False)
    app.board.ingress.add_observer(refusals)
    app.board.ingress.add_observer(everything)
    accepted(await client.post(URL, content=orjson.dumps(EVENT), headers=STRUCTURED))
    accepted(await client.post(URL, content=b'{"a": 1}', headers=BINARY))
    refused(await client.post(URL, content=b"[]", headers=STRUCTURED))
    assert refusals.statuses == [400]
    assert everything.statuses == [202, 202, 400]


async def test_a_batch_over_the_bound_is_refused_with_413(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    events = [{**EVENT, "id": str(n)} for n in range(MAX_BATCH + 1)]
    response = await client.post(URL, content=orjson.dumps(events), headers=BATCH)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["name"] == "PayloadTooLargeError"
    await drain(app)
    assert inbox.events == []


async def test_a_structured_cloud_event_with_stray_ce_headers_stays_structured(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    headers = {**STRUCTURED, "ce-specversion": "1.0", "ce-id": "from-a-header"}
    accepted(await client.post(URL, content=orjson.dumps(EVENT), headers=headers))
    await drain(app)
    [event] = inbox.events
    assert event.payload == EVENT["data"]
    assert event.metadata["ce-id"] == EVENT["id"]
    assert event.metadata[DELIVERY_ID] == delivery_id(EVENT["source"], EVENT["id"])
