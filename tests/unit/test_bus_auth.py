from __future__ import annotations

import pytest

from callboard.bus.auth import (
    ANONYMOUS,
    Principal,
    Refusal,
    StaticToken,
    StaticTokenAuth,
    static_tokens,
)
from callboard.config import parse_config
from callboard.errors import ConfigError

TOKENS = (StaticToken("first-token-1", "backstage"), StaticToken("second-token-2", "worker"))


def test_a_configured_token_names_its_subject() -> None:
    auth = StaticTokenAuth(TOKENS)
    assert auth.authenticate("Bearer second-token-2") == Principal("service", "worker")
    assert auth.authenticate("bearer   first-token-1 ") == Principal("service", "backstage")
    assert Principal("service", "worker").created_by == "service=worker"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Missing credentials"),
        ("", "Missing credentials"),
        ("Bearer wrong-token-0", "Invalid token"),
        ("Bearer first-token", "Invalid token"),
        ("Bearer first-token-1x", "Invalid token"),
        ("Basic Zmlyc3QtdG9rZW4tMQ==", "Unsupported authorization scheme"),
        ("Bearer", "Unsupported authorization scheme"),
    ],
)
def test_missing_or_wrong_credentials_are_refused(header: str | None, message: str) -> None:
    verdict = StaticTokenAuth(TOKENS).authenticate(header)
    assert isinstance(verdict, Refusal)
    assert verdict.message.startswith(message)
    assert "token-1" not in verdict.message


def test_disabled_default_policy_admits_anonymous_but_not_wrong_tokens() -> None:
    auth = StaticTokenAuth(TOKENS, allow_anonymous=True)
    assert auth.authenticate(None) == ANONYMOUS
    assert isinstance(auth.authenticate("Bearer nope-nope-nope"), Refusal)
    assert auth.authenticate("Bearer first-token-1") == Principal("service", "backstage")


def test_no_tokens_refuses_everyone() -> None:
    auth = StaticTokenAuth(())
    assert isinstance(auth.authenticate("Bearer anything-at-all"), Refusal)


def test_static_entries_are_read_like_backstage() -> None:
    entries = [
        {"type": "static", "options": {"token": "events-token-1", "subject": "a"}},
        {"type": "legacy", "options": {"secret": "c2VjcmV0", "subject": "b"}},
        {
            "type": "static",
            "options": {"token": "catalog-token-1", "subject": "c"},
            "accessRestrictions": [{"plugin": "catalog"}],
        },
        {
            "type": "static",
            "options": {"token": "events-token-2", "subject": "d"},
            "accessRestrictions": [{"plugin": "catalog"}, {"plugin": "events"}],
        },
    ]
    assert [t.subject for t in static_tokens(entries)] == ["a", "d"]


def test_tokens_never_show_in_reprs() -> None:
    assert "first-token-1" not in repr(TOKENS[0])


def test_configuration_reads_backend_auth() -> None:
    config = parse_config(
        {
            "backend": {
                "baseUrl": "http://localhost:7007",
                "auth": {
                    "keys": [{"secret": "kept"}],
                    "dangerouslyDisableDefaultAuthPolicy": True,
                    "externalAccess": [
                        {"type": "static", "options": {"token": "abcdefgh12", "subject": "bs"}},
                        {"type": "jwks", "options": {"url": "https://example.com/jwks"}},
                    ],
                },
            }
        }
    )
    auth = config.backend.auth
    assert auth.dangerously_disable_default_auth_policy is True
    assert [entry.type for entry in auth.external_access] == ["static", "jwks"]


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"token": "short", "subject": "bs"}, "backend.auth.externalAccess.0.options.token"),
        ({"token": "has space in", "subject": "bs"}, "backend.auth.externalAccess.0.options.token"),
        ({"token": "long-enough-token"}, "backend.auth.externalAccess.0.options.subject"),
    ],
)
def test_bad_static_entries_name_the_key_and_hide_the_token(
    options: dict[str, str], path: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"backend": {"auth": {"externalAccess": [{"type": "static", "options": options}]}}}
        )
    assert caught.value.path == path
    assert options["token"] not in str(caught.value)
