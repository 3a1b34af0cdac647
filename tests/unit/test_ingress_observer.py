"""Ingress observers: told of every answer; the request log of refusals."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from callboard import Event, Rejection, WebhookRequest
from callboard.errors import BrokerUnavailable
from callboard.ingress.asgi import IngressApp
from callboard.ingress.request_log import RequestLog
from callboard.ingress.types import Ingress, IngressOutcome
from callboard.testing import RecordingEventsService, sign_github
from tests.unit.providers.harness import running

SECRET = "gh-secret-observed"


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[IngressOutcome] = []

    def request(self, outcome: IngressOutcome) -> None:
        self.outcomes.append(outcome)


def github_delivery(request: WebhookRequest) -> str | None:
    return request.header("x-github-delivery")


async def refuse_unsigned(request: WebhookRequest) -> Rejection | None:
    if request.header("x-signature") == "good":
        return None
    return Rejection(
        401, {"error": {"name": "AuthenticationError", "message": "the signature is wrong"}}
    )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(
    events: RecordingEventsService, recorder: Recorder
) -> AsyncIterator[httpx.AsyncClient]:
    app = IngressApp(
        events.publish,
        [
            Ingress("github", validator=refuse_unsigned, delivery_id=github_delivery),
            Ingress("plain"),
        ],
        body_limit=64,
        observers=[recorder],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as c:
        yield c


async def test_an_accepted_request_is_observed_with_its_delivery_id(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    headers = {"X-Signature": "good", "X-GitHub-Delivery": "d-1"}
    response = await client.post("/github", json={}, headers=headers)
    assert response.status_code == 202
    [outcome] = recorder.outcomes
    assert (outcome.topic, outcome.status, outcome.reason, outcome.delivery_id) == (
        "github",
        202,
        None,
        "d-1",
    )
    assert outcome.at > 0


async def test_refusals_are_observed_with_status_reason_and_delivery_id(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    delivery = {"X-GitHub-Delivery": "d-2"}
    await client.post("/github", json={}, headers={**delivery, "X-Signature": "bad"})
    await client.post("/github", content=b"x" * 65, headers={**delivery, "X-Signature": "good"})
    await client.get("/github", headers=delivery)
    malformed = {**delivery, "X-Signature": "good", "Content-Type": "application/json"}
    await client.post("/github", content=b"{", headers=malformed)
    await client.post("/nowhere", json={})
    await client.post("/plain", content=b"a", headers={"Content-Type": "text/x-odd"})
    seen = [(o.topic, o.status, o.delivery_id) for o in recorder.outcomes]
    assert seen == [
        ("github", 401, "d-2"),
        ("github", 413, "d-2"),
        ("github", 405, "d-2"),
        ("github", 400, "d-2"),
        ("<unknown>", 404, None),
        ("plain", 415, None),
    ]
    reasons = [o.reason or "" for o in recorder.outcomes]
    assert reasons[0] == "the signature is wrong"
    assert "events.http.bodyLimit" in reasons[1]
    assert "'nowhere'" in reasons[4]
    assert "text/x-odd" in reasons[5]


async def test_an_unavailable_broker_is_observed() -> None:
    async def publish(event: Event) -> bool:
        raise BrokerUnavailable("the store is down")

    recorder = Recorder()
    app = IngressApp(publish, [Ingress("plain")], observers=[recorder])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as client:
        assert (await client.post("/plain", json={})).status_code == 503
    [outcome] = recorder.outcomes
    assert outcome.status == 503
    assert "the store is down" in (outcome.reason or "")


async def test_a_delivery_id_read_from_the_body_is_not_read_from_a_refused_body(
    events: RecordingEventsService,
) -> None:
    def from_body(request: WebhookRequest) -> str | None:
        return str(request.body["id"])

    def body_hash(request: WebhookRequest) -> str | None:
        return f"len:{len(request.raw_body)}"

    recorder = Recorder()
    app = IngressApp(
        events.publish,
        [
            Ingress("parsed", validator=refuse_unsigned, delivery_id=from_body),
            Ingress("hashed", delivery_id=body_hash),
        ],
        body_limit=64,
        observers=[recorder],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as client:
        await client.post("/parsed", json={"id": 7})  # refused by its validator: body unread
        await client.post("/parsed", json={"id": 8}, headers={"X-Signature": "good"})
        await client.post("/hashed", content=b"x" * 65)  # refused before the body was kept
    assert [(o.status, o.delivery_id) for o in recorder.outcomes] == [
        (401, None),
        (202, "8"),
        (413, None),
    ]


async def test_a_failing_observer_changes_no_answer(
    events: RecordingEventsService, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def request(self, outcome: IngressOutcome) -> None:
            raise RuntimeError("observer bug")

    app = IngressApp(events.publish, [Ingress("plain")], observers=[Broken()])
    app.add_observer(recorder)
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.ERROR, "callboard.ingress"):
        async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as client:
            assert (await client.post("/plain", json={})).status_code == 202
    assert len(events.published) == 1
    assert [o.status for o in recorder.outcomes] == [202]
    assert "an ingress observer failed" in caplog.text


def refusal(status: int, reason: str = "why", delivery_id: str | None = None) -> IngressOutcome:
    return IngressOutcome("github", status, reason, delivery_id, 0.0)


def test_the_request_log_leaves_accepted_requests_out(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "callboard.ingress"):
        RequestLog().request(IngressOutcome("github", 202, None, "d", 0.0))
    assert caplog.records == []


@pytest.mark.parametrize(
    ("status", "level"),
    [
        (401, logging.WARNING),
        (403, logging.WARNING),
        (404, logging.WARNING),
        (413, logging.WARNING),
        (415, logging.WARNING),
        (400, logging.INFO),
        (405, logging.INFO),
        (503, logging.INFO),
    ],
)
def test_the_request_log_levels(status: int, level: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, "callboard.ingress"):
        RequestLog().request(refusal(status, "the reason", "d-9"))
    [record] = caplog.records
    assert record.levelno == level
    assert record.getMessage() == (
        f"refused a webhook for topic 'github' with {status}: the reason (delivery d-9)"
    )
    fields: dict[str, Any] = record.__dict__
    assert (fields["topic"], fields["status"], fields["delivery_id"]) == ("github", status, "d-9")


def test_the_request_log_escapes_what_a_sender_wrote(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "callboard.ingress"):
        RequestLog().request(refusal(404, "no topic 'a\nINFO forged line'" + "x" * 600))
    message = caplog.records[0].getMessage()
    assert "\n" not in message
    assert "a\\nINFO forged line" in message
    assert message.endswith("…")


async def test_a_server_logs_a_refused_github_webhook_without_its_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = b'{"zen": "hi"}'
    headers = sign_github(body, "not-the-secret", delivery="72d3162e-cc78-11e3")
    signature = headers["X-Hub-Signature-256"]
    with caplog.at_level(logging.INFO, "callboard.ingress"):
        async with running({"github": {"webhookSecret": SECRET}}) as hub:
            response = await hub.post("github", body, headers)
    assert response.status_code == 403
    [record] = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "topic 'github' with 403" in message
    assert "(delivery 72d3162e-cc78-11e3)" in message
    assert signature not in caplog.text
    assert signature.removeprefix("sha256=") not in caplog.text
    assert SECRET not in caplog.text


async def test_an_observer_of_refusals_only_is_told_of_nothing_else(
    events: RecordingEventsService,
) -> None:
    class Refusals(Recorder):
        refusals_only = True

    refusals, everything = Refusals(), Recorder()
    app = IngressApp(events.publish, [Ingress("plain")], observers=[refusals, everything])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as client:
        await client.post("/plain", json={})
        await client.get("/plain")
    assert [o.status for o in refusals.outcomes] == [405]
    assert [o.status for o in everything.outcomes] == [202, 405]
