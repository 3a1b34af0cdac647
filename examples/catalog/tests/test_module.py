"""The module as `callboard serve` loads it: configuration, the example's file, the listing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import GITHUB_PUSH_HEAD, GITHUB_REPO, FakeFetcher, descriptor, running

from callboard import ConfigError, MemoryBroker, build, load_config
from callboard.config import parse_config
from catalog_provider import CatalogModule, HttpFetcher
from catalog_provider.__main__ import main

EXAMPLE = Path(__file__).resolve().parents[1]


def test_the_example_configuration_loads_the_module() -> None:
    env = {"GITHUB_WEBHOOK_SECRET": "s", "GITLAB_WEBHOOK_SECRET": "t"}
    config = load_config([EXAMPLE / "catalog.yaml"], env=env, strict=True)
    assert config.events.load == ("catalog_provider.module:module",)
    board = build(config, broker=MemoryBroker(), use_entry_points=False)
    assert [context.name for context in board.contexts] == ["catalog", "github", "gitlab"]
    [catalog] = [context for context in board.contexts if context.name == "catalog"]
    assert len(catalog.lifecycle.start_hooks) == 1


def test_a_wrong_key_names_its_path() -> None:
    config = parse_config({"events": {"modules": {"catalog": {"databse": "x.db"}}}})
    with pytest.raises(ConfigError) as raised:
        build(config, modules=[CatalogModule(fetcher=HttpFetcher())], use_entry_points=False)
    assert raised.value.path == "events.modules.catalog.databse"


async def test_the_catalog_outlives_the_server(tmp_path: Path) -> None:
    database = tmp_path / "catalog.db"
    fetcher = FakeFetcher({(GITHUB_REPO, None): descriptor("octo")})
    async with running(database, fetcher) as first:
        await first.post("github", "repository_created")
    async with running(database, fetcher) as second:
        record = second.get(GITHUB_REPO)
        assert record is not None
        assert record.slug == "octo-org/octo-repo"
        await second.post("github", "repository_renamed")
    assert [r.slug for r in second.repositories()] == ["octo-org/octo-service"]


async def test_the_listing_shows_where_each_entity_lives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "catalog.db"
    fetcher = FakeFetcher({(GITHUB_REPO, GITHUB_PUSH_HEAD): descriptor("octo")})
    async with running(database, fetcher) as catalog:
        await catalog.post("github", "push")
        await catalog.post("github", "repository_renamed")

    assert main(["--database", str(database), "--entities"]) == 0
    [entity] = json.loads(capsys.readouterr().out)
    assert entity["metadata"]["name"] == "octo"
    assert entity["metadata"]["annotations"]["backstage.io/managed-by-location"] == (
        f"url:https://github.com/octo-org/octo-service/blob/{GITHUB_PUSH_HEAD}/catalog-info.yaml"
    )

    assert main(["--database", str(database)]) == 0
    [repository] = json.loads(capsys.readouterr().out)
    assert (repository["key"], repository["slug"], repository["archived"]) == (
        GITHUB_REPO,
        "octo-org/octo-service",
        False,
    )
