"""Standard Webhooks, the generic HMAC check, and the ``webhooks`` module's configuration."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from callboard import build
from callboard.config import parse_config
from callboard.errors import CallboardError
from callboard.providers import generic_hmac, standard_webhooks
from callboard.providers._signatures import HmacScheme
from callboard.testing import new_standard_webhooks_secret, sign_hmac, sign_standard_webhooks
from tests.unit.providers.harness import error_of, running

SECRET = new_standard_webhooks_secret()
BODY = b'{"type": "invoice.paid", "data": {"kind": "card"}}'
NOW = 1_715_670_761


def lowered(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def signed(**options: Any) -> dict[str, str]:
    return lowered(sign_standard_webhooks(BODY, SECRET, timestamp=NOW, **options))


def test_standard_webhooks_accepts_the_spec_example() -> None:
    # The worked example of the Standard Webhooks specification.
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }
    body = b'{"test": 2432232314}'
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert standard_webhooks.verify(headers, body, [secret], now=1614265330) is None


def test_standard_webhooks_timestamp_tolerance() -> None:
    headers = signed()
    assert standard_webhooks.verify(headers, BODY, [SECRET], now=NOW + 299) is None
    late = standard_webhooks.verify(headers, BODY, [SECRET], now=NOW + 301)
    early = standard_webhooks.verify(headers, BODY, [SECRET], now=NOW - 301)
    assert late is not None
    assert late.name == "TimestampOutOfToleranceError"
    assert early == late
    assert standard_webhooks.verify(headers, BODY, [SECRET], now=NOW + 900, tolerance=1000) is None


def test_standard_webhooks_several_signatures_one_valid() -> None:
    headers = signed()
    headers["webhook-signature"] = "v1a,ZmFrZQ== v1,bm90LXRoaXM= " + headers["webhook-signature"]
    assert standard_webhooks.verify(headers, BODY, [SECRET], now=NOW) is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"webhook-id": ""}, standard_webhooks.MISSING),
        ({"webhook-timestamp": "12.5"}, standard_webhooks.MALFORMED_TIMESTAMP),
        ({"webhook-signature": "v1a,abc"}, standard_webhooks.MALFORMED_SIGNATURE),
        ({"webhook-signature": "v1,%%%"}, standard_webhooks.MALFORMED_SIGNATURE),
        ({"webhook-id": "msg_other"}, standard_webhooks.MISMATCH),
        ({"webhook-id": "☃"}, standard_webhooks.MALFORMED_ID),
    ],
)
def test_standard_webhooks_failures(change: dict[str, str], expected: object) -> None:
    headers = signed() | change
    assert standard_webhooks.verify(headers, BODY, [SECRET], now=NOW) == expected


def test_standard_webhooks_secret_decoding() -> None:
    raw = base64.b64decode(SECRET.removeprefix("whsec_"))
    assert standard_webhooks.decode_secret(SECRET) == raw
    assert standard_webhooks.decode_secret(SECRET.removeprefix("whsec_")) == raw
    for bad in ("whsec_", "whsec_%%%"):
        with pytest.raises(ValueError, match="signing secret") as caught:
            standard_webhooks.decode_secret(bad)
        assert "%%%" not in str(caught.value)
    assert standard_webhooks.verify(signed(), BODY, [raw], now=NOW) is None


def test_generic_hmac_verify() -> None:
    scheme = HmacScheme("sha1", "", "hex")
    headers = lowered(sign_hmac(BODY, "k", header="X-Sig", algorithm="sha1"))
    assert generic_hmac.verify(headers, BODY, ["k"], header="X-Sig", scheme=scheme) is None
    failure = generic_hmac.verify(headers, BODY, ["z"], header="X-Sig", scheme=scheme)
    assert failure is not None
    assert "X-Sig" in failure.message
    missing = generic_hmac.verify({}, BODY, ["k"], header="X-Sig", scheme=scheme)
    assert missing is not None
    assert missing.name == "SignatureMissingError"


async def test_nested_field_sub_topic_and_redacted_headers() -> None:
    config = {
        "topics": {
            "billing": {
                "standardWebhooks": {"secret": SECRET},
                "subTopic": {"field": "data.kind"},
                "redactHeaders": ["X-Api-Key"],
            }
        }
    }
    async with running({"webhooks": config}) as hub:
        routed = await hub.record("billing.>")
        headers = sign_standard_webhooks(BODY, SECRET) | {"X-Api-Key": "k-77"}
        response = await hub.post("billing", BODY, headers)
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in routed] == ["billing.card"]
    assert "x-api-key" not in routed[0].metadata


async def test_topic_without_a_scheme_names_its_keys() -> None:
    async with running({"webhooks": {"topics": {"plain": {}}}}) as hub:
        response = await hub.post("plain", BODY, {"Content-Type": "application/json"})
    assert response.status_code == 403
    name, message = error_of(response)
    assert name == "WebhookSecretNotConfiguredError"
    assert "events.modules.webhooks.topics.plain.standardWebhooks.secret" in message
    assert "events.modules.webhooks.topics.plain.dangerouslyAllowUnauthenticatedEvents" in message


async def test_stale_delivery_is_refused_over_http() -> None:
    config = {"topics": {"billing": {"standardWebhooks": {"secret": SECRET}}}}
    async with running({"webhooks": config}) as hub:
        response = await hub.post(
            "billing", BODY, sign_standard_webhooks(BODY, SECRET, timestamp=NOW)
        )
    assert response.status_code == 403
    assert error_of(response)[0] == "TimestampOutOfToleranceError"


@pytest.mark.parametrize(
    ("topic_config", "key"),
    [
        (
            {"standardWebhooks": {"secret": SECRET}, "hmac": {"header": "x", "secret": "s"}},
            "topics.t",
        ),
        ({"subTopic": {"header": "a", "field": "b"}}, "topics.t.subTopic"),
        ({"standardWebhooks": {"secret": "whsec_%%"}}, "topics.t.standardWebhooks.secret"),
        ({"hmac": {"header": "x", "algorithm": "md5"}}, "topics.t.hmac.algorithm"),
    ],
)
def test_configuration_errors_name_the_key(topic_config: dict[str, Any], key: str) -> None:
    with pytest.raises(CallboardError, match=re.escape(f"events.modules.webhooks.{key}")):
        build(
            parse_config({"events": {"modules": {"webhooks": {"topics": {"t": topic_config}}}}}),
            use_entry_points=False,
        )


def test_invalid_topic_name_is_refused() -> None:
    with pytest.raises(CallboardError, match=re.escape("events.modules.webhooks.topics")):
        build(
            parse_config({"events": {"modules": {"webhooks": {"topics": {"a b": {}}}}}}),
            use_entry_points=False,
        )
