from __future__ import annotations

from pathlib import Path

import pytest

from callboard import Config, ConfigError, build, load_config
from callboard.config import merge, parse_config, substitute


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_the_defaults() -> None:
    config = load_config()
    assert config == Config()
    assert config.backend.listen.host == "127.0.0.1"
    assert config.backend.listen.port == 7007
    assert config.events.broker == "memory://"
    assert config.events.http.topics == ()
    assert config.events.http.body_limit == 5 * 1024 * 1024
    assert config.events.http.keep_credential_headers is False
    assert config.events.notify_timeout_ms == 55_000
    assert config.events.use_event_bus == "auto"
    assert config.logging.format == "text"


def test_backstage_keys_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "app-config.yaml",
        """
app:
  title: Backstage
backend:
  baseUrl: http://localhost:7007
  listen:
    port: 7100
  database:
    client: pg
catalog:
  rules: []
events:
  http:
    topics: [github, gitlab, bitbucketCloud]
    bodyLimit: 1mb
    keepCredentialHeaders: true
  notifyTimeoutMs: 30000
  useEventBus: never
  modules:
    github:
      webhookSecret: s3cret
    gitlab:
  delivery:
    attempts: 7
    initialDelayMs: 50
logging:
  format: json
""",
    )
    config = load_config([path])
    assert config.backend.listen.port == 7100
    assert config.events.http.topics == ("github", "gitlab", "bitbucketCloud")
    assert config.events.http.body_limit == 1024 * 1024
    assert config.events.http.keep_credential_headers is True
    assert config.events.notify_timeout_ms == 30_000
    assert config.events.use_event_bus == "never"
    assert config.events.modules == {"github": {"webhookSecret": "s3cret"}, "gitlab": {}}
    assert config.events.delivery.attempts == 7
    assert config.events.delivery.initial_delay_ms == 50
    assert config.logging.format == "json"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1000, 1000),
        ("1000", 1000),
        ("512b", 512),
        ("100kb", 102_400),
        ("2 MB", 2 * 1024**2),
        ("1gb", 1024**3),
    ],
)
def test_body_limit_sizes(size: object, expected: int) -> None:
    config = load_config(overrides={"events": {"http": {"bodyLimit": size}}})
    assert config.events.http.body_limit == expected


def test_later_files_win_and_mappings_merge(tmp_path: Path) -> None:
    base = write(
        tmp_path / "base.yaml",
        "backend:\n  listen:\n    host: 0.0.0.0\n    port: 7007\n"
        "events:\n  http:\n    topics: [a, b]\n    bodyLimit: 100\n",
    )
    local = write(
        tmp_path / "local.yaml",
        "backend:\n  listen:\n    port: 8000\nevents:\n  http:\n    topics: [c]\n",
    )
    config = load_config([base, local])
    assert config.backend.listen.host == "0.0.0.0"
    assert config.backend.listen.port == 8000
    assert config.events.http.topics == ("c",)  # lists are replaced, not appended
    assert config.events.http.body_limit == 100
    assert load_config([local, base]).backend.listen.port == 7007


def test_merge() -> None:
    assert merge({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"c": [2]}, "e": 2}) == {
        "a": {"b": 1, "c": [2]},
        "d": 1,
        "e": 2,
    }
    assert merge({"a": {"b": 1}}, {"a": None}) == {"a": None}


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config([write(tmp_path / "empty.yaml", "")]) == Config()


def test_environment_variables_are_substituted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        """
backend:
  listen:
    port: ${PORT}
events:
  broker: postgresql://${DB_USER}@localhost/${DB_NAME}
  http:
    topics: ["${TOPIC}", "literal-$${TOPIC}"]
  modules:
    github:
      webhookSecret: $${NOT_A_VAR}
""",
    )
    env = {"PORT": "7200", "DB_USER": "cb", "DB_NAME": "events", "TOPIC": "github"}
    config = load_config([path], env=env)
    assert config.backend.listen.port == 7200
    assert config.events.broker == "postgresql://cb@localhost/events"
    assert config.events.http.topics == ("github", "literal-${TOPIC}")
    assert config.events.modules["github"]["webhookSecret"] == "${NOT_A_VAR}"


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBOARD_TEST_TOPIC", "from-env")
    config = parse_config({"events": {"http": {"topics": ["${CALLBOARD_TEST_TOPIC}"]}}})
    assert config.events.http.topics == ("from-env",)


def test_a_missing_variable_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        substitute({"events": {"http": {"topics": ["a", "${NOPE}"]}}}, {})
    assert caught.value.path == "events.http.topics.1"
    assert "NOPE" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_config({"events": {"modules": {"github": {"webhookSecret": "${SECRET}"}}}}, env={})
    assert caught.value.path == "events.modules.github.webhookSecret"
    assert "environment variable SECRET is not set" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"events": {"http": {"tpoics": []}}}, "events.http.tpoics", "did you mean 'topics'?"),
        ({"events": {"http": {"topic": ["a"]}}}, "events.http.topic", "unknown key"),
        ({"events": {"http": {"bodyLimit": "lots"}}}, "events.http.bodyLimit", "expected a size"),
        ({"events": {"http": {"bodyLimit": 0}}}, "events.http.bodyLimit", "greater than 0"),
        ({"events": {"http": {"topics": "github"}}}, "events.http.topics", "should be a list"),
        (
            {"events": {"http": {"topics": ["ok", "no good"]}}},
            "events.http.topics.1",
            "not a valid topic",
        ),
        (
            {"events": {"http": {"topics": ["github.*"]}}},
            "events.http.topics.0",
            "not a valid topic",
        ),
        ({"events": {"http": {"topics": [""]}}}, "events.http.topics.0", "not a valid topic"),
        (
            {"events": {"http": {"keepCredentialHeaders": "maybe"}}},
            "events.http.keepCredentialHeaders",
            "boolean",
        ),
        (
            {"events": {"useEventBus": "sometimes"}},
            "events.useEventBus",
            "'never', 'always' or 'auto'",
        ),
        ({"events": {"notifyTimeoutMs": -1}}, "events.notifyTimeoutMs", "greater than 0"),
        (
            {"events": {"delivery": {"attempts": 0}}},
            "events.delivery.attempts",
            "greater than or equal to 1",
        ),
        ({"events": {"load": "pkg:mod"}}, "events.load", "should be a list"),
        ({"events": {"modules": {"github": 3}}}, "events.modules.github", "valid dictionary"),
        ({"backend": {"listen": {"port": 70000}}}, "backend.listen.port", "65535"),
        ({"backend": {"listen": {"port": "high"}}}, "backend.listen.port", "valid integer"),
        ({"logging": {"level": "loud"}}, "logging.level", "'debug'"),
        ({"events": None}, "events", "valid dictionary"),
    ],
)
def test_errors_name_the_key_and_what_was_expected(
    data: dict[str, object], path: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_every_wrong_key_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"events": {"http": {"bodyLimit": "x", "extra": 1}, "broker": 5}}, env={})
    message = str(caught.value)
    for path in ("events.http.bodyLimit", "events.http.extra", "events.broker"):
        assert path in message


def test_sections_callboard_does_not_own_are_left_alone() -> None:
    config = parse_config({"app": {"anything": [1]}, "backend": {"cors": {"origin": "*"}}}, env={})
    assert config.backend.listen.port == 7007


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read configuration file .*missing\.yaml"):
        load_config([tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config([write(tmp_path / "bad.yaml", "events: [unclosed\n")])
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping"):
        load_config([write(tmp_path / "list.yaml", "- a\n- b\n")])


def test_an_unknown_broker_url_names_its_key() -> None:
    config = parse_config({"events": {"broker": "carrier-pigeon://coop"}}, env={})
    with pytest.raises(ConfigError) as caught:
        build(config, use_entry_points=False)
    assert caught.value.path == "events.broker"
    assert "carrier-pigeon://coop" in str(caught.value)


def test_config_is_immutable() -> None:
    config = load_config()
    with pytest.raises(ValueError, match="frozen"):
        config.events.broker = "x"
