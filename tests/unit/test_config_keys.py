"""Keys that look wrong: warnings with the closest known key, errors that speak of lists."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from callboard import build
from callboard.config import load_config, parse_config
from callboard.errors import ConfigError


def test_a_misspelt_section_is_a_warning_naming_the_closest_one() -> None:
    config = parse_config({"evnets": {"http": {"topics": ["github"]}}})
    assert config.warnings == (
        "evnets: callboard does not read this key; did you mean 'events'? "
        "See docs/configuration.md",
    )
    assert config.events.http.topics == ()


def test_top_level_sections_of_backstage_are_left_alone() -> None:
    config = parse_config({"app": {"title": "x"}, "catalog": {}, "auth": {}, "integrations": {}})
    assert config.warnings == ()


def test_an_unknown_events_key_is_left_out_with_a_warning() -> None:
    config = parse_config({"events": {"htpp": {"topics": ["a"]}, "http": {"topics": ["b"]}}})
    assert config.warnings == (
        "events.htpp: unknown key, ignored; did you mean 'http'? See docs/configuration.md",
    )
    assert config.events.http.topics == ("b",)


def test_an_unknown_events_key_without_a_close_one() -> None:
    [warning] = parse_config({"events": {"zzz": 1}}).warnings
    assert warning == "events.zzz: unknown key, ignored; see docs/configuration.md"


def test_a_key_in_another_case_is_suggested() -> None:
    [warning] = parse_config({"events": {"NotifyTimeoutMs": 5}}).warnings
    assert "did you mean 'notifyTimeoutMs'?" in warning


def test_strict_makes_the_warnings_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"Events": {}, "events": {"lod": []}}, strict=True)
    assert caught.value.path == "Events"
    assert "did you mean 'events'?" in str(caught.value)
    assert "\nevents.lod: unknown key, ignored; did you mean 'load'?" in str(caught.value)


def test_load_config_is_strict_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("backnd:\n  listen:\n    port: 1\n")
    assert load_config([path]).warnings
    with pytest.raises(ConfigError, match="did you mean 'backend'"):
        load_config([path], strict=True)


def test_the_warnings_survive_a_copy() -> None:
    config = parse_config({"evnets": {}})
    assert config.model_copy(update={"logging": config.logging}).warnings == config.warnings


def test_building_logs_the_warnings(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({"events": {"brokr": "memory://"}})
    with caplog.at_level(logging.WARNING, "callboard.config"):
        build(config, use_entry_points=False)
    [record] = caplog.records
    assert record.getMessage().startswith("events.brokr: unknown key, ignored; did you mean")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"events": {"http": {"topics": "github"}}},
            "events.http.topics: Input should be a list (got 'github'); see docs/configuration.md",
        ),
        (
            {"events": {"load": "pkg:mod"}},
            "events.load: Input should be a list (got 'pkg:mod'); see docs/configuration.md",
        ),
        (
            {"events": {"bus": {"grants": [{"subject": "s", "subscriptions": "x"}]}}},
            "events.bus.grants.0.subscriptions: Input should be a list (got 'x'); "
            "see docs/configuration.md",
        ),
    ],
)
def test_a_list_key_given_something_else_speaks_of_a_list(
    data: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert str(caught.value) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"events": {"http": {"tpoics": []}}},
            "events.http.tpoics: unknown key; did you mean 'topics'?",
        ),
        (
            {"events": {"bus": {"grants": [{"subjet": "s", "subscriptions": ["x"]}]}}},
            "events.bus.grants.0.subjet: unknown key; did you mean 'subject'?",
        ),
        (
            {"backend": {"server": {"maxConnection": 5}}},
            "backend.server.maxConnection: unknown key; did you mean 'maxConnections'?",
        ),
        ({"logging": {"formt": "json"}}, "logging.formt: unknown key; did you mean 'format'?"),
        ({"logging": {"zzz": 1}}, "logging.zzz: unknown key; see docs/configuration.md"),
    ],
)
def test_an_unknown_key_inside_a_section_is_an_error_naming_the_closest(
    data: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert expected in str(caught.value)


def test_a_module_key_points_to_the_providers_doc() -> None:
    config = parse_config({"events": {"modules": {"github": {"webhookSecrte": "x"}}}})
    with pytest.raises(ConfigError) as caught:
        build(config, use_entry_points=False)
    assert str(caught.value) == (
        "events.modules.github.webhookSecrte: unknown key; did you mean 'webhookSecret'? "
        "See docs/providers.md"
    )
