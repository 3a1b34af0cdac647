"""OpenTelemetry tracing: a webhook, its publish and each handler call, one trace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from callboard import Callboard, Event, build
from callboard.app import CallboardApp
from callboard.config import parse_config
from callboard.errors import BrokerUnavailable
from callboard.ingress.asgi import IngressApp, TracedIngressApp
from callboard.ingress.types import Ingress
from callboard.testing import sign_github
from callboard.tracing import OpenTelemetryTracer

INGRESS = "/api/events/http/"
#: A sender's trace: version, trace id, parent span id, flags (sampled).
SENDER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SENDER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{SENDER_TRACE}-{SENDER_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> OpenTelemetryTracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryTracer(provider)


@asynccontextmanager
async def serving(board: Callboard) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=CallboardApp(board))
    async with (
        board.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://callboard.test") as client,
    ):
        yield client


def received(count: int = 1) -> tuple[list[Event], Any, asyncio.Event]:
    seen: list[Event] = []
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        seen.append(event)
        if len(seen) >= count:
            done.set()

    return seen, handler, done


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


async def test_webhook_publish_and_handler_spans_form_one_trace(
    tracer: OpenTelemetryTracer, exporter: InMemorySpanExporter
) -> None:
    config = parse_config({"events": {"http": {"topics": ["plain"]}}})
    board = build(config, use_entry_points=False, tracer=tracer)
    seen, handler, done = received()
    async with serving(board) as client:
        await board.events.subscribe("reader", "plain", handler)
        response = await client.post(
            INGRESS + "plain", json={"n": 1}, headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 202
        await asyncio.wait_for(done.wait(), 10)
    spans = exporter.get_finished_spans()
    request = one(spans, "POST /api/events/http/plain")
    publish = one(spans, "publish plain")
    process = one(spans, "process plain")

    assert request.kind is SpanKind.SERVER
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 202
    # The webhook's own traceparent: the request span continues the sender's trace.
    assert hex_id(request.context.trace_id, 32) == SENDER_TRACE
    assert parent_of(request) == int(SENDER_SPAN, 16)
    assert publish.kind is SpanKind.PRODUCER
    assert parent_of(publish) == request.context.span_id
    assert process.kind is SpanKind.CONSUMER
    assert parent_of(process) == publish.context.span_id
    assert {s.context.trace_id for s in (request, publish, process)} == {request.context.trace_id}
    assert process.attributes is not None
    assert process.attributes["messaging.consumer.group.name"] == "reader"
    assert process.attributes["messaging.message.id"] == seen[0].id

    # The event carries the publish span's context to whichever process handles it.
    [event] = seen
    assert event.metadata["traceparent"] == (
        f"00-{SENDER_TRACE}-{hex_id(publish.context.span_id, 16)}-01"
    )


async def test_each_delivery_attempt_is_a_span_and_a_failure_is_marked(
    tracer: OpenTelemetryTracer, exporter: InMemorySpanExporter
) -> None:
    config = parse_config(
        {"events": {"http": {"topics": ["plain"]}, "delivery": {"initialDelayMs": 0}}}
    )
    board = build(config, use_entry_points=False, tracer=tracer)
    calls: list[int] = []
    done = asyncio.Event()

    async def flaky(event: Event) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the first attempt fails")
        done.set()

    async with serving(board) as client:
        await board.events.subscribe("flaky", "plain", flaky)
        assert (await client.post(INGRESS + "plain", json={})).status_code == 202
        await asyncio.wait_for(done.wait(), 10)
    spans = exporter.get_finished_spans()
    publish = one(spans, "publish plain")
    attempts = [s for s in spans if s.name == "process plain"]
    assert len(attempts) == 2
    assert [s.status.status_code for s in attempts] == [StatusCode.ERROR, StatusCode.UNSET]
    assert all(parent_of(s) == publish.context.span_id for s in attempts)
    assert any(e.name == "exception" for e in attempts[0].events)
    # No traceparent on the webhook: the request span starts the trace.
    assert parent_of(one(spans, "POST /api/events/http/plain")) is None


async def test_a_router_keeps_the_trace_to_the_routed_topic(
    tracer: OpenTelemetryTracer, exporter: InMemorySpanExporter
) -> None:
    config = parse_config({"events": {"modules": {"github": {"webhookSecret": "s3cret-x"}}}})
    board = build(config, use_entry_points=False, tracer=tracer)
    seen, handler, done = received()
    body = b'{"ref": "main"}'
    async with serving(board) as client:
        await board.events.subscribe("pushes", "github.push", handler)
        response = await client.post(
            INGRESS + "github", content=body, headers=sign_github(body, "s3cret-x")
        )
        assert response.status_code == 202
        await asyncio.wait_for(done.wait(), 10)
    spans = exporter.get_finished_spans()
    request = one(spans, "POST /api/events/http/github")
    handled = one(spans, "process github.push")
    chain = {s.context.span_id: s for s in spans}
    ancestors = []
    span: ReadableSpan | None = handled
    while span is not None:
        ancestors.append(span.name)
        span = chain.get(parent_of(span) or 0)
    assert ancestors == [
        "process github.push",
        "publish github.push",
        "process github",
        "publish github",
        "POST /api/events/http/github",
    ]
    assert handled.context.trace_id == request.context.trace_id
    routed = one(spans, "publish github.push")
    assert hex_id(routed.context.span_id, 16) in str(seen[0].metadata["traceparent"])


async def test_refusals_are_spans_and_a_server_failure_is_an_error(
    tracer: OpenTelemetryTracer, exporter: InMemorySpanExporter
) -> None:
    async def down(event: Event) -> bool:
        raise BrokerUnavailable("the store is away")

    app = TracedIngressApp(down, [Ingress("plain")], tracer=tracer)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as client:
        assert (await client.post("/nowhere", json={})).status_code == 404
        assert (await client.post("/plain", json={})).status_code == 503
    unknown, failed = exporter.get_finished_spans()[0], exporter.get_finished_spans()[-1]
    assert unknown.name == "POST /{topic}"  # unknown topics share one name
    assert unknown.status.status_code is StatusCode.UNSET
    assert failed.name == "POST /plain"
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["http.response.status_code"] == 503


async def test_the_trace_crosses_instances_over_the_sqlite_broker(
    tracer: OpenTelemetryTracer, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    receiving = build(parse_config({"events": {"broker": url}}), tracer=tracer)
    config = parse_config({"events": {"broker": url, "http": {"topics": ["plain"]}}})
    ingesting = build(config, use_entry_points=False, tracer=tracer)
    seen, handler, done = received()
    async with receiving.lifespan(), serving(ingesting) as client:
        await receiving.events.subscribe("elsewhere", "plain", handler, start="beginning")
        headers = {"traceparent": TRACEPARENT}
        assert (await client.post(INGRESS + "plain", json={}, headers=headers)).status_code == 202
        await asyncio.wait_for(done.wait(), 30)
    spans = exporter.get_finished_spans()
    publish = one(spans, "publish plain")
    process = one(spans, "process plain")
    assert parent_of(process) == publish.context.span_id
    assert hex_id(process.context.trace_id, 32) == SENDER_TRACE
    assert hex_id(publish.context.span_id, 16) in str(seen[0].metadata["traceparent"])


def test_tracing_is_switched_on_by_configuration() -> None:
    on = build(parse_config({"backend": {"tracing": {"enabled": True}}}), use_entry_points=False)
    assert isinstance(on.ingress, TracedIngressApp)
    assert isinstance(on.events.tracer, OpenTelemetryTracer)
    off = build(parse_config({}), use_entry_points=False)
    assert type(off.ingress) is IngressApp
    assert off.events.tracer is None
    assert "publish" not in vars(off.events)  # the class's own publish, untouched


def test_without_tracing_opentelemetry_is_never_imported(tmp_path: Path) -> None:
    script = """
import asyncio, sys
import httpx
from callboard import create_app
from callboard.config import parse_config

async def main():
    app = create_app(parse_config({"events": {"http": {"topics": ["plain"]}}}))
    transport = httpx.ASGITransport(app=app)
    async with app.board.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.post("/api/events/http/plain", json={})).status_code == 202

asyncio.run(main())
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
