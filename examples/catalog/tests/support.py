"""A running callboard with the catalog module, signed deliveries, and a fake fetcher."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from callboard import Callboard, MemoryBroker, create_app
from callboard.config import parse_config
from callboard.testing import sign_github, sign_gitlab
from catalog_provider import CatalogModule, CatalogRecord, CatalogStore, FetchError, Repository

HERE = Path(__file__).resolve().parent
#: The example's own deliveries (repository and project events), then callboard's (pushes).
FIXTURE_FOLDERS = (HERE / "fixtures", HERE.parents[2] / "tests" / "fixtures" / "providers")
GITHUB_SECRET = "catalog-gh-secret"
GITLAB_TOKEN = "catalog-gl-token"
INGRESS = "/api/events/http/"

GITHUB_REPO = "github:79929171"
GITLAB_REPO = "gitlab:15"
#: The commits the two push fixtures leave their default branch at.
GITHUB_PUSH_HEAD = "059bcfbd4f2b0f0c2dd0b7f0c5b9fd29cb1a8a9e"
GITLAB_PUSH_HEAD = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"


def load(provider: str, name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """A delivery's unsigned headers and its payload, from the first folder that has it."""
    for folder in FIXTURE_FOLDERS:
        body = folder / provider / f"{name}.body.json"
        if body.exists():
            headers = json.loads((folder / provider / f"{name}.headers.json").read_text())
            return headers, json.loads(body.read_text())
    raise FileNotFoundError(f"no fixture {provider}/{name}")


def descriptor(name: str, owner: str = "team-a") -> str:
    """A catalog-info.yaml declaring one component."""
    return (
        "apiVersion: backstage.io/v1alpha1\n"
        "kind: Component\n"
        f"metadata:\n  name: {name}\n"
        f"spec:\n  type: service\n  lifecycle: production\n  owner: {owner}\n"
    )


@dataclass
class FakeFetcher:
    """Serves descriptor texts by ``(repository key, ref)``; records every call.

    ``failures``: the number of calls that raise ``FetchError`` before the others answer.
    """

    files: dict[tuple[str, str | None], str] = field(default_factory=dict)
    failures: int = 0
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)

    async def fetch(self, repository: Repository, path: str, ref: str | None) -> str | None:
        self.calls.append((repository.key, path, ref))
        if self.failures:
            self.failures -= 1
            raise FetchError(f"{repository.slug} is unreachable (fake)")
        return self.files.get((repository.key, ref))


@dataclass
class Running:
    board: Callboard
    client: httpx.AsyncClient
    database: Path

    async def post(
        self,
        provider: str,
        name: str,
        *,
        payload: Mapping[str, Any] | None = None,
        delivery: str | None = None,
        secret: str | None = None,
    ) -> httpx.Response:
        """Sign and post a fixture (its payload replaced by ``payload`` if given), then wait
        until every subscriber has handled what it published."""
        headers, document = load(provider, name)
        body = json.dumps(document if payload is None else payload).encode()
        if provider == "github":
            signed = sign_github(body, secret or GITHUB_SECRET) | headers
            if delivery is not None:
                signed["X-GitHub-Delivery"] = delivery
        else:
            signed = sign_gitlab(body, token=secret or GITLAB_TOKEN) | headers
            if delivery is not None:
                signed["Idempotency-Key"] = delivery
        response = await self.client.post(INGRESS + provider, content=body, headers=signed)
        await self.drain()
        return response

    async def drain(self) -> None:
        broker = self.board.events.broker
        assert isinstance(broker, MemoryBroker)
        await broker.drain()

    def get(self, key: str) -> CatalogRecord | None:
        """The repository as a reader of the catalog file sees it."""
        with CatalogStore(self.database) as store:
            return store.get(key)

    def repositories(self) -> list[CatalogRecord]:
        with CatalogStore(self.database) as store:
            return store.repositories()


def configuration(database: Path, broker: str = "memory://") -> dict[str, Any]:
    return {
        "events": {
            "broker": broker,
            "delivery": {"attempts": 3, "initialDelayMs": 0, "maxDelayMs": 0},
            "modules": {
                "github": {"webhookSecret": GITHUB_SECRET},
                "gitlab": {"webhookSecret": GITLAB_TOKEN},
                "catalog": {"database": str(database)},
            },
        }
    }


@asynccontextmanager
async def running(database: Path, fetcher: FakeFetcher) -> AsyncIterator[Running]:
    """callboard with the GitHub, GitLab and catalog modules, started, and an HTTP client."""
    config = parse_config(configuration(database))
    app = create_app(config, modules=[CatalogModule(fetcher=fetcher)], use_entry_points=False)
    async with (
        app.board.lifespan(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://callboard.test"
        ) as client,
    ):
        yield Running(app.board, client, database)
