from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, MutableMapping, Sequence
from typing import Any

import httpx
import orjson
import pytest

from callboard import (
    DELIVERY_ID,
    BrokerUnavailable,
    Event,
    MediaType,
    ModuleContext,
    Rejection,
    WebhookRequest,
    build,
    load_config,
    module,
)
from callboard.errors import InvalidEventError, MalformedBodyError
from callboard.ingress.asgi import DEFAULT_BODY_LIMIT, DEFAULT_METADATA_LIMIT, IngressApp
from callboard.ingress.types import Ingress
from callboard.metrics import Metrics
from callboard.testing import RecordingEventsService


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://hooks")


def ingress_app(events: RecordingEventsService, *ingresses: Ingress, **options: Any) -> IngressApp:
    return IngressApp(events.publish, ingresses or [Ingress("github")], **options)


@pytest.fixture
async def client(events: RecordingEventsService) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(ingress_app(events, Ingress("github"), Ingress("plain.text"))) as c:
        yield c


def assert_error(response: httpx.Response, status: int, name: str, url: str = "") -> str:
    """Check callboard's error shape; return the message."""
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    body = response.json()
    assert set(body) == {"error", "request", "response"}
    assert body["error"]["name"] == name
    assert body["response"] == {"statusCode": status}
    assert body["request"]["method"] == response.request.method
    if url:
        assert body["request"]["url"] == url
    message = body["error"]["message"]
    assert isinstance(message, str)
    return message


async def test_a_webhook_is_accepted_and_published(
    client: httpx.AsyncClient, events: RecordingEventsService
) -> None:
    response = await client.post(
        "/github",
        content=b'{"ref": "main"}',
        headers={"Content-Type": "application/json", "X-GitHub-Event": "push"},
    )
    assert response.status_code == 202
    assert response.json() == {"status": "accepted"}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))

    [event] = events.published
    assert event.topic == "github"
    assert event.payload == {"ref": "main"}
    assert event.metadata["x-github-event"] == "push"
    assert event.metadata["content-type"] == "application/json"
    assert all(name == name.lower() for name in event.metadata)


async def test_topics_with_dots_are_served(
    client: httpx.AsyncClient, events: RecordingEventsService
) -> None:
    response = await client.post("/plain.text", json=[1, 2])
    assert response.status_code == 202
    assert events.published[0].topic == "plain.text"
    assert events.published[0].payload == [1, 2]


async def test_an_accepted_webhook_reaches_subscribers(
    client: httpx.AsyncClient, events: RecordingEventsService
) -> None:
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    await events.subscribe("s", "github", handler)
    await client.post("/github", json={"n": 1})
    await events.drain()
    assert [e.payload for e in got] == [{"n": 1}]


async def test_credential_headers_are_left_out_of_metadata(
    client: httpx.AsyncClient, events: RecordingEventsService
) -> None:
    headers = {
        "Authorization": "Bearer secret",
        "Cookie": "session=1",
        "Proxy-Authorization": "Basic eA==",
        "X-Kept": "yes",
    }
    assert (await client.post("/github", json={}, headers=headers)).status_code == 202
    metadata = events.published[0].metadata
    assert metadata["x-kept"] == "yes"
    assert not {"authorization", "cookie", "proxy-authorization"} & set(metadata)


async def test_validators_still_see_credential_headers(events: RecordingEventsService) -> None:
    seen: list[str | None] = []

    async def validator(request: WebhookRequest) -> Rejection | None:
        seen.append(request.header("authorization"))
        return None

    async with client_for(ingress_app(events, Ingress("github", validator))) as client:
        await client.post("/github", json={}, headers={"Authorization": "token t"})
    assert seen == ["token t"]
    assert "authorization" not in events.published[0].metadata


async def test_the_answer_waits_for_the_broker(events: RecordingEventsService) -> None:
    accepted = asyncio.Event()
    exchange = Exchange([b"{}"])

    async def publish(event: Event) -> bool:
        await accepted.wait()
        return True

    app = IngressApp(publish, [Ingress("github")])
    request = asyncio.create_task(app(scope("/github"), exchange.receive, exchange.send))
    for _ in range(20):  # let the request run as far as it can
        await asyncio.sleep(0)
    assert exchange.messages == []
    accepted.set()
    await asyncio.wait_for(request, 5)
    assert exchange.status == 202


async def test_credential_headers_can_be_kept(events: RecordingEventsService) -> None:
    async with client_for(ingress_app(events, keep_credentials=True)) as client:
        await client.post("/github", json={}, headers={"Authorization": "Bearer x", "Cookie": "c"})
    metadata = events.published[0].metadata
    assert metadata["authorization"] == "Bearer x"
    assert metadata["cookie"] == "c"


async def test_an_ingress_may_redact_more_headers(events: RecordingEventsService) -> None:
    ingress = Ingress("gitlab", redact_headers=frozenset({"x-gitlab-token"}))
    async with client_for(ingress_app(events, ingress, keep_credentials=True)) as client:
        await client.post("/gitlab", json={}, headers={"X-Gitlab-Token": "t", "Cookie": "c"})
    metadata = events.published[0].metadata
    assert "x-gitlab-token" not in metadata
    assert metadata["cookie"] == "c"


async def test_repeated_headers_become_lists(events: RecordingEventsService) -> None:
    async with client_for(ingress_app(events)) as client:
        await client.post(
            "/github", json={}, headers=[("X-Many", "a"), ("X-Many", "b"), ("X-Many", "c")]
        )
    assert events.published[0].metadata["x-many"] == ["a", "b", "c"]


async def test_the_delivery_id_reader_marks_the_event(events: RecordingEventsService) -> None:
    ingress = Ingress("github", delivery_id=lambda request: request.header("x-github-delivery"))
    async with client_for(ingress_app(events, ingress)) as client:
        for _ in range(2):
            response = await client.post("/github", json={}, headers={"X-GitHub-Delivery": "d-1"})
            assert response.status_code == 202
        await client.post("/github", json={})
    assert [e.metadata.get(DELIVERY_ID) for e in events.published] == ["d-1", "d-1", None]


async def test_unknown_topic_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/gitlab?x=1", json={})
    message = assert_error(response, 404, "NotFoundError", "/gitlab?x=1")
    assert "'gitlab'" in message
    assert "events.http.topics" in message
    assert_error(await client.post("/", json={}), 404, "NotFoundError")
    assert_error(await client.get("/github/extra"), 404, "NotFoundError")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(client: httpx.AsyncClient, method: str) -> None:
    response = await client.request(method, "/github")
    message = assert_error(response, 405, "MethodNotAllowedError")
    assert response.headers["allow"] == "POST"
    assert method in message


@pytest.mark.parametrize(
    ("content_type", "hint"),
    [
        ("text/plain", "Unsupported media type: text/plain"),
        ("application/xml; charset=utf-8", "Unsupported media type: application/xml"),
        ("", "no Content-Type"),
        (None, "no Content-Type"),
    ],
)
async def test_unsupported_media_types_are_415(
    client: httpx.AsyncClient, content_type: str | None, hint: str
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = await client.post("/github", content=b"hello", headers=headers)
    message = assert_error(response, 415, "UnsupportedMediaTypeError")
    assert hint in message
    assert "context.ingress.add_body_parser" in message


async def test_an_unsupported_charset_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/github", content=b"{}", headers={"Content-Type": "application/json; charset=nope"}
    )
    message = assert_error(response, 415, "UnsupportedMediaTypeError")
    assert "Unsupported charset: nope" in message
    assert "add_body_parser" in message


@pytest.mark.parametrize(
    ("content_type", "body", "problem"),
    [
        ("application/json", b"{not json", "not valid JSON"),
        ("application/json", b"", "empty"),
        ("application/json; charset=utf-8", b"\xff\xfe", "not valid JSON"),
        ("application/json; charset=ascii", "é".encode(), "not valid ascii"),
        ("application/x-www-form-urlencoded", b"payload=%7Bbad", "'payload' is not valid JSON"),
        ("application/x-www-form-urlencoded", b"a=1&&=", "not valid form data"),
    ],
)
async def test_malformed_bodies_are_400(
    client: httpx.AsyncClient,
    events: RecordingEventsService,
    content_type: str,
    body: bytes,
    problem: str,
) -> None:
    response = await client.post("/github", content=body, headers={"Content-Type": content_type})
    assert problem in assert_error(response, 400, "MalformedBodyError")
    assert events.published == []


async def test_github_form_webhooks_are_accepted(
    client: httpx.AsyncClient, events: RecordingEventsService
) -> None:
    document = {"ref": "refs/heads/main"}
    response = await client.post("/github", data={"payload": json.dumps(document)})
    assert response.status_code == 202
    assert events.published[0].payload == document


async def test_a_json_body_in_another_charset(
    client: httpx.AsyncClient, events: RecordingEventsService
) -> None:
    response = await client.post(
        "/github",
        content='{"who": "Zoë"}'.encode("utf-16"),
        headers={"Content-Type": "application/json; charset=UTF-16"},
    )
    assert response.status_code == 202
    assert events.published[0].payload == {"who": "Zoë"}


# --- size limit, checked with a raw ASGI receive callable ------------------------------------


class Exchange:
    """One request driven by hand: counts the body chunks the app asked for."""

    def __init__(self, chunks: Sequence[bytes] | None, *, endless: bytes = b"") -> None:
        self._chunks = list(chunks or [])
        self._endless = endless
        self.consumed = 0
        self.messages: list[MutableMapping[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.consumed += 1
        if self._endless:
            return {"type": "http.request", "body": self._endless, "more_body": True}
        if not self._chunks:
            return {"type": "http.disconnect"}
        chunk = self._chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(self._chunks)}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        status = self.messages[0]["status"]
        assert isinstance(status, int)
        return status

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> Any:
        return json.loads(self.messages[1]["body"])


def scope(path: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), *headers],
    }


async def test_a_declared_length_over_the_limit_is_413_before_reading(
    events: RecordingEventsService,
) -> None:
    app = ingress_app(events, body_limit=1024)
    exchange = Exchange([b"{}"])
    await app(scope("/github", [(b"content-length", b"1025")]), exchange.receive, exchange.send)
    assert exchange.status == 413
    assert exchange.consumed == 0
    assert exchange.body["error"]["name"] == "PayloadTooLargeError"
    assert "events.http.bodyLimit" in exchange.body["error"]["message"]
    assert "1025" in exchange.body["error"]["message"]
    assert exchange.headers[b"content-length"] == str(len(exchange.messages[1]["body"])).encode()
    assert events.published == []


async def test_a_streamed_body_over_the_limit_is_refused_without_reading_it_all(
    events: RecordingEventsService,
) -> None:
    app = ingress_app(events, body_limit=4096)
    exchange = Exchange(None, endless=b"x" * 1000)  # a body that never ends
    await app(scope("/github"), exchange.receive, exchange.send)
    assert exchange.status == 413
    assert exchange.consumed == 5
    assert "more than" in exchange.body["error"]["message"]
    assert events.published == []


async def test_a_body_at_the_limit_is_accepted(events: RecordingEventsService) -> None:
    app = ingress_app(events, body_limit=12)
    exchange = Exchange([b'{"a":', b' "bcd"}'])  # 12 bytes in two chunks
    await app(scope("/github"), exchange.receive, exchange.send)
    assert exchange.status == 202
    assert exchange.consumed == 2
    assert events.published[0].payload == {"a": "bcd"}

    single = Exchange([b'{"a": "bcde"}'])  # 13 bytes in one message
    await app(scope("/github"), single.receive, single.send)
    assert single.status == 413


async def test_the_default_limit_is_5_mb(client: httpx.AsyncClient) -> None:
    assert DEFAULT_BODY_LIMIT == 5 * 1024 * 1024
    big = b'"' + b"x" * DEFAULT_BODY_LIMIT + b'"'
    response = await client.post(
        "/github", content=big, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 413, "PayloadTooLargeError")


async def test_a_client_gone_mid_body_publishes_nothing(events: RecordingEventsService) -> None:
    app = ingress_app(events)
    exchange = Exchange([])

    async def receive() -> dict[str, Any]:
        exchange.consumed += 1
        if exchange.consumed == 1:
            return {"type": "http.request", "body": b"{", "more_body": True}
        return {"type": "http.disconnect"}

    await app(scope("/github"), receive, exchange.send)
    assert exchange.status == 400
    assert events.published == []


async def test_other_scopes_are_ignored(events: RecordingEventsService) -> None:
    exchange = Exchange([])
    await ingress_app(events)({"type": "lifespan"}, exchange.receive, exchange.send)
    assert exchange.messages == []


# --- validators -------------------------------------------------------------------------------


async def test_a_validator_sees_headers_parsed_body_and_raw_bytes(
    events: RecordingEventsService,
) -> None:
    seen: list[WebhookRequest] = []

    async def validator(request: WebhookRequest) -> Rejection | None:
        seen.append(request)
        return None

    raw = b'{"zen": "Keep it logically awesome.",  "hook_id": 1}'
    async with client_for(ingress_app(events, Ingress("github", validator))) as client:
        response = await client.post(
            "/github",
            content=raw,
            headers={"Content-Type": "application/json; charset=utf-8", "X-Hub-Signature-256": "s"},
        )
    assert response.status_code == 202
    [request] = seen
    assert request.topic == "github"
    assert request.raw_body == raw
    assert request.body == {"zen": "Keep it logically awesome.", "hook_id": 1}
    assert request.header("x-hub-signature-256") == "s"
    assert request.header("X-Missing") is None
    assert request.media_type == MediaType("application/json", {"charset": "utf-8"})
    assert len(events.published) == 1


@pytest.mark.parametrize(
    ("rejection", "status", "body"),
    [
        (Rejection(), 403, {}),
        (
            Rejection(status=401, body={"message": "bad signature"}),
            401,
            {"message": "bad signature"},
        ),
        (Rejection(status=400, body=["x"]), 400, ["x"]),
    ],
)
async def test_a_validator_may_reject(
    events: RecordingEventsService, rejection: Rejection, status: int, body: object
) -> None:
    async def validator(request: WebhookRequest) -> Rejection | None:
        return rejection

    metrics = Metrics()
    app = ingress_app(events, Ingress("github", validator), metrics=metrics)
    async with client_for(app) as client:
        response = await client.post("/github", json={})
    assert response.status_code == status
    assert response.json() == body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    assert events.published == []
    assert (
        metrics.registry.get_sample_value(
            "callboard_ingress_requests_total", {"topic": "github", "status": str(status)}
        )
        == 1
    )


async def test_a_validator_may_refuse_with_an_error(events: RecordingEventsService) -> None:
    async def validator(request: WebhookRequest) -> Rejection | None:
        raise MalformedBodyError("the push has no ref")

    async with client_for(ingress_app(events, Ingress("github", validator))) as client:
        response = await client.post("/github", json={})
    assert assert_error(response, 400, "MalformedBodyError") == "the push has no ref"


async def test_a_failing_validator_is_a_500_in_the_same_shape(
    events: RecordingEventsService, caplog: pytest.LogCaptureFixture
) -> None:
    async def validator(request: WebhookRequest) -> Rejection | None:
        raise KeyError("bug")

    async with client_for(ingress_app(events, Ingress("github", validator))) as client:
        response = await client.post("/github", json={})
    message = assert_error(response, 500, "InternalServerError")
    assert "bug" not in message
    assert "ingress 'github' failed" in caplog.text


# --- the broker refusing ----------------------------------------------------------------------


async def test_a_closed_events_service_is_503(events: RecordingEventsService) -> None:
    app = ingress_app(events)
    await events.close()
    async with client_for(app) as client:
        response = await client.post("/github", json={})
    assert_error(response, 503, "ServiceUnavailableError")
    assert response.headers["retry-after"] == "1"


async def test_an_unavailable_broker_is_503() -> None:
    async def publish(event: Event) -> bool:
        raise BrokerUnavailable("database is down")

    async with client_for(IngressApp(publish, [Ingress("github")])) as client:
        response = await client.post("/github", json={})
    assert "database is down" in assert_error(response, 503, "ServiceUnavailableError")


async def test_requests_are_counted_by_topic_and_status(events: RecordingEventsService) -> None:
    metrics = Metrics()
    async with client_for(ingress_app(events, metrics=metrics)) as client:
        await client.post("/github", json={})
        await client.post("/github", json={})
        await client.post("/github", content=b"{", headers={"Content-Type": "application/json"})
        await client.post("/no-such-topic", json={})

    def count(topic: str, status: str) -> float | None:
        return metrics.registry.get_sample_value(
            "callboard_ingress_requests_total", {"topic": topic, "status": status}
        )

    assert count("github", "202") == 2
    assert count("github", "400") == 1
    # Unknown topics share one label, so strangers cannot grow the metrics without bound.
    assert count("<unknown>", "404") == 1
    assert count("no-such-topic", "404") is None


# --- topics and parsers from configuration and modules ---------------------------------------


def parse_text(raw: bytes, media_type: MediaType, topic: str) -> Any:
    return {"text": raw.decode(media_type.charset or "utf-8"), "topic": topic}


@module("texts")
def texts(context: ModuleContext) -> None:
    context.ingress.add_body_parser("Text/Plain", parse_text)
    context.ingress.add_ingress("notes", redact_headers=["X-Secret"])


async def test_modules_add_topics_and_body_parsers() -> None:
    config = load_config(overrides={"events": {"http": {"topics": ["plain"]}}})
    board = build(config, modules=[texts], use_entry_points=False)
    assert set(board.ingress.ingresses) == {"plain", "notes"}
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    async with board.lifespan(), client_for(board.ingress) as client:
        await board.events.subscribe("s", ["plain", "notes"], handler)
        for topic in ("plain", "notes"):
            response = await client.post(
                f"/{topic}",
                content="héllo".encode("latin-1"),
                headers={"Content-Type": "text/plain; charset=latin-1", "X-Secret": "s"},
            )
            assert response.status_code == 202
        await board.events.broker.drain()  # type: ignore[attr-defined]
    assert [e.payload for e in got] == [
        {"text": "héllo", "topic": "plain"},
        {"text": "héllo", "topic": "notes"},
    ]
    assert "x-secret" in got[0].metadata
    assert "x-secret" not in got[1].metadata


async def test_a_module_may_replace_a_default_parser() -> None:
    @module("lenient-json")
    def lenient(context: ModuleContext) -> None:
        context.ingress.add_body_parser("application/json", lambda raw, mt, topic: raw.decode())

    config = load_config(overrides={"events": {"http": {"topics": ["plain"]}}})
    board = build(config, modules=[lenient], use_entry_points=False)
    async with board.lifespan(), client_for(board.ingress) as client:
        response = await client.post(
            "/plain", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 202


# --- verifying before parsing -----------------------------------------------------------------


async def refuse_all(request: WebhookRequest) -> Rejection | None:
    return Rejection(403, {"error": {"name": "SignatureMissingError", "message": "unsigned"}})


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b"{not json"),
        ("application/json", b""),
        ("application/json", b"[" * 2000),
        ("application/json", b'{"a": "\\u0000"}'),
        ("application/json; charset=base64", b"e30="),
        ("application/json; charset=nope", b"{}"),
        ("text/plain", b"hello"),
        ("", b"{}"),
        (None, b"{}"),
        ("application/x-www-form-urlencoded; charset=unicode_escape", b"a=\\ud800"),
        ("application/x-www-form-urlencoded", b"a=1&&="),
    ],
)
async def test_an_unauthenticated_request_is_refused_before_its_body_is_parsed(
    events: RecordingEventsService, content_type: str | None, body: bytes
) -> None:
    parsed: list[bytes] = []

    def parser(raw: bytes, media_type: MediaType, topic: str) -> Any:
        parsed.append(raw)
        raise MalformedBodyError("unreachable")

    headers = {} if content_type is None else {"Content-Type": content_type}
    app = ingress_app(events, Ingress("github", refuse_all), parsers={"text/plain": parser})
    async with client_for(app) as client:
        response = await client.post("/github", content=body, headers=headers)
    assert response.status_code == 403
    assert response.json()["error"]["name"] == "SignatureMissingError"
    assert parsed == []
    assert events.published == []


async def test_topics_without_a_validator_still_refuse_malformed_bodies(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/github", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "MalformedBodyError")
    response = await client.post("/github", content=b"{}", headers={"Content-Type": "text/csv"})
    assert_error(response, 415, "UnsupportedMediaTypeError")


@pytest.mark.parametrize(
    ("content_type", "body", "status", "name"),
    [
        ("application/json", b"{not json", 400, "MalformedBodyError"),
        ("text/csv", b"{}", 415, "UnsupportedMediaTypeError"),
        ("application/json; charset=rot13", b"{}", 415, "UnsupportedMediaTypeError"),
        ("application/json", b'["\\u0000"]', 400, "InvalidEventError"),
    ],
)
async def test_a_validator_reading_the_body_gets_the_parsers_refusal(
    events: RecordingEventsService, content_type: str, body: bytes, status: int, name: str
) -> None:
    async def validator(request: WebhookRequest) -> Rejection | None:
        return None if request.body else Rejection()

    async with client_for(ingress_app(events, Ingress("github", validator))) as client:
        response = await client.post(
            "/github", content=body, headers={"Content-Type": content_type}
        )
    assert_error(response, status, name)
    assert events.published == []


async def test_the_body_is_parsed_once_when_the_validator_reads_it(
    events: RecordingEventsService,
) -> None:
    calls: list[str] = []

    def parser(raw: bytes, media_type: MediaType, topic: str) -> Any:
        calls.append(topic)
        return {"text": raw.decode()}

    async def validator(request: WebhookRequest) -> Rejection | None:
        return None if request.body == {"text": "hi"} else Rejection()

    app = ingress_app(events, Ingress("notes", validator), parsers={"text/plain": parser})
    async with client_for(app) as client:
        response = await client.post(
            "/notes", content=b"hi", headers={"Content-Type": "text/plain"}
        )
    assert response.status_code == 202
    assert calls == ["notes"]
    assert events.published[0].payload == {"text": "hi"}


# --- input that can never be stored is 400, not 503 -------------------------------------------


@pytest.mark.parametrize(
    "charset",
    ["base64", "hex", "rot13", "zlib", "punycode", "unicode_escape", "idna", "undefined", "utf-7"],
)
@pytest.mark.parametrize("media_type", ["application/json", "application/x-www-form-urlencoded"])
async def test_a_charset_that_is_not_a_text_encoding_is_415(
    client: httpx.AsyncClient, events: RecordingEventsService, charset: str, media_type: str
) -> None:
    response = await client.post(
        "/github", content=b"a=1", headers={"Content-Type": f"{media_type}; charset={charset}"}
    )
    assert f"Unsupported charset: {charset}" in assert_error(
        response, 415, "UnsupportedMediaTypeError"
    )
    assert events.published == []


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (nested(255), "application/json", "nested more than 250 levels"),
        (nested(1024), "application/json", "nested more than 250 levels"),
        (b'{"a": {"b": "x\\u0000y"}}', "application/json", "NUL"),
        (b'{"k\\\\\\u0000": 1}', "application/json", "NUL"),
        ('{"a": "\\u0000"}'.encode("utf-16"), "application/json; charset=utf-16", "NUL"),
        (b"[18446744073709551616]", "application/json", "integer 18446744073709551616"),
        (b'{"n": -9223372036854775809}', "application/json", "integer -9223372036854775809"),
        (b"1" + b"0" * 300, "application/json", "(301 digits)"),
        (b"a=x%00y", "application/x-www-form-urlencoded", "NUL"),
        (b"payload=%5B%22%5Cu0000%22%5D", "application/x-www-form-urlencoded", "NUL"),
        (
            b"payload=" + nested(300),
            "application/x-www-form-urlencoded",
            "'payload' is nested more than 250 levels",
        ),
    ],
)
async def test_payloads_no_store_can_keep_are_400(
    client: httpx.AsyncClient,
    events: RecordingEventsService,
    body: bytes,
    content_type: str,
    problem: str,
) -> None:
    response = await client.post("/github", content=body, headers={"Content-Type": content_type})
    assert problem in assert_error(response, 400, "InvalidEventError")
    assert "retry-after" not in response.headers
    assert events.published == []


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"a=%ED%A0%80", "application/x-www-form-urlencoded"),
        (b"a=%00%D8", "application/x-www-form-urlencoded; charset=utf-16-le"),
        (b'["\\ud800"]', "application/json"),
    ],
)
async def test_lone_surrogates_are_400(
    client: httpx.AsyncClient, events: RecordingEventsService, body: bytes, content_type: str
) -> None:
    response = await client.post("/github", content=body, headers={"Content-Type": content_type})
    assert_error(response, 400, "MalformedBodyError")
    assert events.published == []


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (nested(250), orjson.loads(nested(250))),
        (b'["a\\\\u0000"]', ["a\\u0000"]),
        (b"[18446744073709551615, -9223372036854775808]", [2**64 - 1, -(2**63)]),
        (b'["12345678901234567890123"]', ["12345678901234567890123"]),
        (b"[9007199254740993, 1.5e300]", [2**53 + 1, 1.5e300]),
    ],
)
async def test_payloads_at_the_edges_are_kept_exactly(
    client: httpx.AsyncClient, events: RecordingEventsService, body: bytes, payload: Any
) -> None:
    response = await client.post(
        "/github", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 202
    assert events.published[0].payload == payload
    assert all(
        type(a) is type(b) for a, b in zip(events.published[0].payload, payload, strict=True)
    )


async def test_an_event_the_broker_can_never_store_is_400_not_503() -> None:
    async def publish(event: Event) -> bool:
        raise InvalidEventError("the topic holds a NUL character")

    async with client_for(IngressApp(publish, [Ingress("github")])) as client:
        response = await client.post("/github", json={})
    assert "NUL" in assert_error(response, 400, "InvalidEventError")
    assert "retry-after" not in response.headers


# --- metadata size ----------------------------------------------------------------------------


async def test_headers_over_the_metadata_limit_are_left_out(
    events: RecordingEventsService, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str | None] = []

    async def validator(request: WebhookRequest) -> Rejection | None:
        seen.append(request.header("x-big"))
        return None

    app = ingress_app(events, Ingress("github", validator), max_metadata_bytes=1024)
    headers = [("X-Small", "s"), ("X-Big", "secret-" + "v" * 2000), ("X-After", "a")]
    async with client_for(app) as client:
        response = await client.post("/github", json={}, headers=headers)
    assert response.status_code == 202
    metadata = events.published[0].metadata
    assert metadata["x-small"] == "s"
    assert metadata["x-after"] == "a"
    assert "x-big" not in metadata
    assert sum(len(k) + len(str(v)) for k, v in metadata.items()) <= 1024
    assert seen == ["secret-" + "v" * 2000]  # the validator saw the whole request
    assert "'x-big'" in caplog.text
    assert "events.http.maxMetadataBytes" in caplog.text
    assert "secret-" not in caplog.text


async def test_the_default_metadata_limit_is_16_kb(events: RecordingEventsService) -> None:
    assert DEFAULT_METADATA_LIMIT == 16 * 1024
    headers = [(f"X-H{i}", "v" * 1000) for i in range(20)]
    async with client_for(ingress_app(events)) as client:
        response = await client.post("/github", json={}, headers=headers)
    assert response.status_code == 202
    metadata = events.published[0].metadata
    assert "x-h0" in metadata
    assert "x-h19" not in metadata
    assert sum(len(k) + len(str(v)) for k, v in metadata.items()) <= 16 * 1024


def test_the_metadata_limit_is_configured() -> None:
    config = load_config(overrides={"events": {"http": {"maxMetadataBytes": "4kb"}}})
    assert config.events.http.max_metadata_bytes == 4096
    assert build(config, use_entry_points=False).ingress.max_metadata_bytes == 4096
    assert load_config().events.http.max_metadata_bytes == 16 * 1024
