"""Push signatures, checked by the Standard Webhooks verifier of callboard's own ingress."""

from __future__ import annotations

import time

import pytest

from callboard.providers import standard_webhooks
from callboard.push.signing import signature, signed_headers, signing_key
from callboard.testing import new_standard_webhooks_secret


def test_a_signed_request_passes_the_ingress_verifier() -> None:
    secret = new_standard_webhooks_secret()
    body = b'{"amount": 12}'
    now = int(time.time())
    headers = signed_headers((signing_key(secret),), "evt_1", now, body)
    assert headers["webhook-id"] == "evt_1"
    assert headers["webhook-timestamp"] == str(now)
    assert standard_webhooks.verify(headers, body, [secret]) is None


def test_a_changed_body_or_another_secret_fails() -> None:
    secret, other = new_standard_webhooks_secret(), new_standard_webhooks_secret()
    headers = signed_headers((signing_key(secret),), "evt_1", int(time.time()), b"{}")
    assert standard_webhooks.verify(headers, b'{"x":1}', [secret]) == standard_webhooks.MISMATCH
    assert standard_webhooks.verify(headers, b"{}", [other]) == standard_webhooks.MISMATCH


def test_while_rotating_each_secret_signs_and_either_verifies() -> None:
    old, new = new_standard_webhooks_secret(), new_standard_webhooks_secret()
    keys = (signing_key(old), signing_key(new))
    header = signature(keys, "evt_2", int(time.time()), b"[]")
    assert len(header.split()) == 2
    assert all(entry.startswith("v1,") for entry in header.split())
    headers = signed_headers(keys, "evt_2", int(time.time()), b"[]")
    assert standard_webhooks.verify(headers, b"[]", [old]) is None
    assert standard_webhooks.verify(headers, b"[]", [new]) is None


def test_the_prefix_is_optional_and_the_key_is_the_decoded_part() -> None:
    secret = new_standard_webhooks_secret()
    assert signing_key(secret) == signing_key(secret.removeprefix("whsec_"))
    assert signing_key(secret) == standard_webhooks.decode_secret(secret)


@pytest.mark.parametrize("secret", ["whsec_s3cr3t value!", "s3cr3t%%", "whsec_"])
def test_a_bad_secret_is_refused_without_repeating_it(secret: str) -> None:
    with pytest.raises(ValueError, match="signing secret") as caught:
        signing_key(secret)
    assert "s3cr3t" not in str(caught.value)
