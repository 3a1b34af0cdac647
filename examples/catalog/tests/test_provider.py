"""The provider under at-least-once delivery: events handled twice, late or out of order."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import GITHUB_PUSH_HEAD, GITHUB_REPO, FakeFetcher, descriptor, load

from callboard import Event
from catalog_provider import CatalogProvider, CatalogStore

T0 = datetime(2024, 5, 14, 7, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CatalogStore]:
    with CatalogStore(tmp_path / "catalog.db") as opened:
        yield opened


def github(name: str, minutes: int, topic: str | None = None) -> Event:
    """A fixture's payload as the routed event, published ``minutes`` after ``T0``."""
    headers, payload = load("github", name)
    routed = topic or f"github.{headers['X-GitHub-Event']}"
    return Event(topic=routed, payload=payload, time=T0 + timedelta(minutes=minutes))


def state(store: CatalogStore) -> list[Any]:
    return [(r.slug, r.archived, r.entities, r.commit_ref) for r in store.repositories()]


async def test_each_event_handled_twice_gives_the_same_catalog(store: CatalogStore) -> None:
    fetcher = FakeFetcher({(GITHUB_REPO, None): descriptor("a")})
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = descriptor("b")
    provider = CatalogProvider(store, fetcher)
    events = [
        github("repository_created", 0),
        github("push", 1),
        github("repository_renamed", 2),
        github("repository_archived", 3),
    ]
    once = []
    for event in events:
        await provider.on_event(event)
        once.append(state(store))
        await provider.on_event(event)
        assert state(store) == once[-1]
    assert once[-1] == [("octo-org/octo-service", True, (_entity("b"),), GITHUB_PUSH_HEAD)]


async def test_a_late_push_refreshes_entities_but_keeps_the_newer_name(
    store: CatalogStore,
) -> None:
    provider = CatalogProvider(
        store, FakeFetcher({(GITHUB_REPO, GITHUB_PUSH_HEAD): descriptor("b")})
    )
    await provider.on_event(github("repository_renamed", 5))
    await provider.on_event(github("push", 1))
    [record] = store.repositories()
    assert (record.slug, record.entities) == ("octo-org/octo-service", (_entity("b"),))


async def test_an_older_refresh_does_not_replace_a_newer_one(store: CatalogStore) -> None:
    fetcher = FakeFetcher({(GITHUB_REPO, None): descriptor("old")})
    fetcher.files[(GITHUB_REPO, GITHUB_PUSH_HEAD)] = descriptor("new")
    provider = CatalogProvider(store, fetcher)
    await provider.on_event(github("push", 5))
    await provider.on_event(github("repository_created", 0))  # redelivered late
    [record] = store.repositories()
    assert (record.slug, record.entities) == ("octo-org/octo-repo", (_entity("new"),))
    assert [ref for _, _, ref in fetcher.calls] == [GITHUB_PUSH_HEAD]


async def test_nothing_older_than_a_deletion_brings_a_repository_back(
    store: CatalogStore,
) -> None:
    fetcher = FakeFetcher({(GITHUB_REPO, GITHUB_PUSH_HEAD): descriptor("b")})
    provider = CatalogProvider(store, fetcher)
    await provider.on_event(github("repository_deleted", 10))
    await provider.on_event(github("push", 1))
    await provider.on_event(github("repository_created", 0))
    assert store.repositories() == []
    assert fetcher.calls == []


async def test_a_payload_without_what_the_catalog_needs_is_skipped(
    store: CatalogStore, caplog: pytest.LogCaptureFixture
) -> None:
    provider = CatalogProvider(store, FakeFetcher())
    await provider.on_event(Event(topic="github.repository", payload={"action": "created"}))
    await provider.on_event(Event(topic="gitlab.project_create", payload={"project_id": 3}))
    assert store.repositories() == []
    assert "the payload has no repository" in caplog.text


def _entity(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": name},
        "spec": {"type": "service", "lifecycle": "production", "owner": "team-a"},
    }
