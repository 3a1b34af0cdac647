"""Run a callboard with provider modules in-process and post webhooks to it over HTTP."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from callboard import Callboard, Event, MemoryBroker, create_app
from callboard.config import parse_config

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "providers"
INGRESS = "/api/events/http/"

_recorders = itertools.count()


def load_fixture(provider: str, name: str) -> tuple[dict[str, str], bytes]:
    """A recorded-style delivery: its headers (no signature) and its exact body bytes."""
    folder = FIXTURES / provider
    headers = json.loads((folder / f"{name}.headers.json").read_text(encoding="utf-8"))
    body = (folder / f"{name}.body.json").read_bytes()
    return headers, body


@dataclass
class Harness:
    board: Callboard
    client: httpx.AsyncClient

    async def record(self, *patterns: str) -> list[Event]:
        """Every event published from now on to one of ``patterns``."""
        seen: list[Event] = []

        async def handler(event: Event) -> None:
            seen.append(event)

        await self.board.events.subscribe(f"recorder-{next(_recorders)}", patterns, handler)
        return seen

    async def post(self, topic: str, body: bytes, headers: Mapping[str, str]) -> httpx.Response:
        return await self.client.post(INGRESS + topic, content=body, headers=dict(headers))

    async def drain(self) -> None:
        broker = self.board.events.broker
        assert isinstance(broker, MemoryBroker)
        await broker.drain()


@asynccontextmanager
async def running(modules: Mapping[str, Any]) -> AsyncIterator[Harness]:
    """A callboard whose ``events.modules`` is ``modules``, started, with an HTTP client."""
    config = parse_config({"events": {"broker": "memory://", "modules": dict(modules)}})
    app = create_app(config, use_entry_points=False)
    board = app.board
    async with (
        board.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://callboard.test"
        ) as client,
    ):
        yield Harness(board, client)


def error_of(response: httpx.Response) -> tuple[str, str]:
    """The error name and message of a refusal."""
    body = response.json()
    return body["error"]["name"], body["error"]["message"]
