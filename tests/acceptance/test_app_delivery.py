"""Delivery as the application configures it: time limits, retries out of line, what a stall
looks like from outside (``/metrics``, ``/readyz``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from callboard import CallboardApp, Event, MemoryBroker, ModuleContext, create_app, load_config
from callboard.extensions import module
from callboard.service import Handler


def app_with(handler: Handler, delivery: dict[str, Any], **options: Any) -> CallboardApp:
    @module("inbox")
    def register(context: ModuleContext) -> None:
        context.subscribers.add_subscription("inbox", "t", handler, **options)

    config = load_config(overrides={"events": {"delivery": delivery}})
    return create_app(config, modules=[register], use_entry_points=False)


@asynccontextmanager
async def running(app: CallboardApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.board.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://callboard") as client,
    ):
        yield client


async def drain(app: CallboardApp) -> None:
    broker = app.board.events.broker
    assert isinstance(broker, MemoryBroker)
    await broker.drain(5)


def oldest(text: str) -> dict[str, float]:
    return {
        sample.labels["subscription"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "callboard_subscription_oldest_unacked_seconds"
    }


async def test_the_configured_time_limit_ends_a_handler_that_never_returns() -> None:
    async def hangs(event: Event) -> None:
        await asyncio.Event().wait()

    app = app_with(hangs, {"attempts": 1, "handlerTimeoutMs": 50})
    async with running(app):
        await app.board.events.publish(Event(topic="t"))
        await drain(app)
        [letter] = await app.board.events.dead_letters("inbox")
    assert "did not finish within 0.05s" in letter.error


async def test_a_module_can_ask_for_no_time_limit() -> None:
    async def slow(event: Event) -> None:
        await asyncio.sleep(0.1)

    app = app_with(slow, {"attempts": 1, "handlerTimeoutMs": 20}, handler_timeout=None)
    async with running(app):
        await app.board.events.publish(Event(topic="t"))
        await drain(app)
        assert await app.board.events.dead_letters("inbox") == []


async def test_retries_out_of_line_from_configuration_and_per_subscription() -> None:
    calls: list[object] = []

    async def fails_once_on_a(event: Event) -> None:
        calls.append(event.payload)
        if event.payload == "a" and calls.count("a") == 1:
            raise RuntimeError("not yet")

    delivery = {"initialDelayMs": 50, "ordered": False}
    for app, expected in (
        (app_with(fails_once_on_a, delivery), ["a", "b", "a"]),
        (app_with(fails_once_on_a, delivery, ordered=True), ["a", "a", "b"]),
    ):
        calls.clear()
        async with running(app):
            for payload in ("a", "b"):
                await app.board.events.publish(Event(topic="t", payload=payload))
            await drain(app)
        assert calls == expected


async def test_a_stalled_handler_shows_in_metrics_and_readiness() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def waits(event: Event) -> None:
        started.set()
        await release.wait()

    app = app_with(waits, {"handlerTimeoutMs": 100}, handler_timeout=None)
    async with running(app) as client:
        idle = await client.get("/metrics")
        assert oldest(idle.text) == {"inbox": 0.0}
        event = Event(topic="t")
        await app.board.events.publish(event)
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.15)
        busy = await client.get("/metrics")
        assert oldest(busy.text)["inbox"] >= 0.1
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        [stall] = ready.json()["stalled"]
        assert stall["subscription"] == "inbox"
        assert stall["event"] == event.id
        assert stall["timeout"] is None
        release.set()
        await drain(app)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert oldest((await client.get("/metrics")).text) == {"inbox": 0.0}
