"""Standard Webhooks signatures, the sending side (https://www.standardwebhooks.com/).

A request carries ``webhook-id`` (the event's id, the same on every retry), ``webhook-timestamp``
(Unix seconds) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>`` under
the base64-decoded part of a ``whsec_...`` secret, one space-separated entry per secret while a
secret is rotated. ``callboard.providers.standard_webhooks`` verifies them on the receiving side;
the two are kept apart (push subscriptions and providers are independent layers) and the tests
check each against the other.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional).

    Raises ``ValueError`` with a message that does not repeat the secret.
    """
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("a signing secret must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key


def signature(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: a ``v1`` entry per key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode("ascii") for key in keys
    )


def signed_headers(
    keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers of one request."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(keys, msg_id, timestamp, body),
    }
