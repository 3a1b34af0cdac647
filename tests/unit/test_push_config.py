"""``events.push.<name>``: defaults, and errors that name the key and never echo a secret."""

from __future__ import annotations

from typing import Any

import pytest

from callboard.config import parse_config, parse_push_target
from callboard.errors import ConfigError
from callboard.push.spec import BreakerPolicy, RateLimit
from callboard.testing import new_standard_webhooks_secret

SECRET = new_standard_webhooks_secret()


def target(**keys: Any) -> dict[str, Any]:
    return {"url": "https://hooks.example.com/in", "topics": ["github.*"], "secret": SECRET, **keys}


def push(name: str = "billing", **keys: Any) -> dict[str, Any]:
    return {"events": {"push": {name: target(**keys)}}}


def test_the_defaults() -> None:
    (spec,) = parse_config(push()).events.push_specs()
    assert spec.name == "billing"
    assert spec.subscription == "push.billing"
    assert spec.topics == ("github.*",)
    assert spec.secrets == (SECRET,)
    assert spec.timeout == 10.0
    assert spec.rate_limit is None
    assert spec.enabled
    assert spec.format == "json"
    assert spec.concurrency == 8
    assert spec.breaker == BreakerPolicy(5, 30.0)
    assert spec.max_retry_after == 300.0
    assert spec.source == "config"
    assert SECRET not in repr(spec)


def test_every_key() -> None:
    (spec,) = parse_config(
        push(
            topics="billing",
            secret=[SECRET, new_standard_webhooks_secret()],
            timeout=2500,
            headers={"Authorization": "Bearer abc"},
            rateLimit={"perSecond": 5, "burst": 10},
            enabled=False,
            format="cloudevents",
            cloudEvents={"mode": "binary", "source": "/billing"},
            concurrency=1,
            circuitBreaker={"failures": 2, "cooldownMs": 500},
            maxRetryAfterMs=60_000,
        )
    ).events.push_specs()
    assert spec.topics == ("billing",)
    assert len(spec.secrets) == 2
    assert spec.timeout == 2.5
    assert spec.headers == (("authorization", "Bearer abc"),)
    assert spec.rate_limit == RateLimit(5, 10)
    assert not spec.enabled
    assert (spec.format, spec.cloud_events_mode, spec.cloud_events_source) == (
        "cloudevents",
        "binary",
        "/billing",
    )
    assert spec.concurrency == 1
    assert spec.breaker == BreakerPolicy(2, 0.5)
    assert spec.max_retry_after == 60.0
    assert "Bearer abc" not in repr(spec)


def test_a_rate_limit_as_a_number_is_per_second_with_a_second_of_burst() -> None:
    (spec,) = parse_config(push(rateLimit=20)).events.push_specs()
    assert spec.rate_limit == RateLimit(20, 20)


@pytest.mark.parametrize(
    ("keys", "path", "words"),
    [
        ({"url": "ftp://x.example.com"}, "events.push.billing.url", "http:// or https://"),
        ({"url": "http://"}, "events.push.billing.url", "http:// or https://"),
        ({"topics": []}, "events.push.billing.topics", "at least 1"),
        ({"topics": ["a..b"]}, "events.push.billing.topics", "not a topic pattern"),
        ({"timout": 5}, "events.push.billing.timout", "did you mean 'timeout'"),
        ({"rateLimit": {"perSecnd": 1}}, "events.push.billing.rateLimit", "perSecond"),
        ({"rateLimit": 0}, "events.push.billing.rateLimit.perSecond", "greater than 0"),
        ({"format": "xml"}, "events.push.billing.format", "'json' or 'cloudevents'"),
        ({"headers": {"webhook-id": "x"}}, "events.push.billing.headers", "set by callboard"),
        ({"concurrency": 0}, "events.push.billing.concurrency", "greater than or equal to 1"),
        (
            {"circuitBreaker": {"failures": 0}},
            "events.push.billing.circuitBreaker.failures",
            "equal to 1",
        ),
    ],
)
def test_a_wrong_key_names_its_path(keys: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(push(**keys))
    assert str(caught.value).startswith(path)
    assert words in str(caught.value)
    assert "docs/bridges.md" in str(caught.value)


def test_a_missing_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"events\.push\.billing\.secret: Field required"):
        parse_config({"events": {"push": {"billing": {"url": "http://x", "topics": ["a"]}}}})


@pytest.mark.parametrize(
    "keys",
    [
        {"secret": "whsec_s3cr3t not base64"},
        {"headers": {"Authorization": "Bearer s3cr3t\n"}},
        {"headers": {"Authorization": "Bearer s3cr3t\x00"}},
        {"headers": {"Authorization": "Bearer s3cr3t\x7f"}},
    ],
)
def test_secrets_and_header_values_are_never_echoed(keys: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(push(**keys))
    assert "s3cr3t" not in str(caught.value)


def test_a_bad_name_is_refused_without_echoing_its_section() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(push(name="bad name", secret="whsec_czNjcjN0"))
    assert caught.value.path == "events.push.bad name"
    assert "cannot name a push target" in str(caught.value)
    assert "czNjcjN0" not in str(caught.value)


def test_a_misspelt_push_section_is_reported() -> None:
    config = parse_config({"events": {"psuh": {}}})
    assert any("did you mean 'push'" in warning for warning in config.warnings)


def test_a_target_from_the_api_is_checked_the_same_way() -> None:
    spec = parse_push_target("crm", target())
    assert spec.source == "api"
    with pytest.raises(ConfigError, match=r"^push\.crm\.url"):
        parse_push_target("crm", target(url="mailto:x"))
    with pytest.raises(ConfigError, match="cannot name a push target"):
        parse_push_target("../x", target())
