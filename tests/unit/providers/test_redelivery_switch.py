"""``events.http.detectRedeliveries``: a redelivered webhook is published once unless switched off."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from callboard import DELIVERY_ID, Event, MemoryBroker, create_app
from callboard.config import parse_config
from callboard.testing import sign_github

BODY = b'{"ref": "refs/heads/main", "repository": {"full_name": "octo/hello"}}'


@asynccontextmanager
async def github(
    detect: bool,
) -> AsyncIterator[tuple[httpx.AsyncClient, list[Event], MemoryBroker]]:
    config = parse_config(
        {
            "events": {
                "broker": "memory://",
                "http": {"detectRedeliveries": detect},
                "modules": {"github": {"webhookSecret": "s3cret"}},
            }
        }
    )
    app = create_app(config, use_entry_points=False)
    seen: list[Event] = []

    async def record(event: Event) -> None:
        seen.append(event)

    async with app.board.lifespan():
        await app.board.events.subscribe("recorder", "github.push", record)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            broker = app.board.events.broker
            assert isinstance(broker, MemoryBroker)
            yield client, seen, broker


def headers() -> dict[str, str]:
    return sign_github(BODY, "s3cret", event="push", delivery="d-1")


async def test_a_redelivery_is_accepted_and_published_once() -> None:
    async with github(detect=True) as (client, seen, broker):
        for _ in range(3):
            response = await client.post("/api/events/http/github", content=BODY, headers=headers())
            assert response.status_code == 202
        await broker.drain()
    assert len(seen) == 1
    assert seen[0].metadata[DELIVERY_ID] == "d-1"


async def test_switched_off_every_delivery_is_published() -> None:
    async with github(detect=False) as (client, seen, broker):
        for _ in range(3):
            response = await client.post("/api/events/http/github", content=BODY, headers=headers())
            assert response.status_code == 202
        await broker.drain()
    assert len(seen) == 3
    assert all(DELIVERY_ID not in event.metadata for event in seen)
    assert all(event.metadata["x-github-delivery"] == "d-1" for event in seen)
