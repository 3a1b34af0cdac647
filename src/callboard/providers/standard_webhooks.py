"""Standard Webhooks 1.0 signatures (https://www.standardwebhooks.com/), symmetric ``v1``.

The sender signs ``{webhook-id}.{webhook-timestamp}.{raw body}`` with HMAC-SHA256 under the
base64-decoded part of a ``whsec_...`` secret and sends ``webhook-signature: v1,<base64>``,
several space-separated entries during a key rotation. ``webhook-timestamp`` is Unix seconds;
a request too far from the receiver's clock is refused so a captured request cannot be
replayed later. ``webhook-id`` stays the same across retries and is the delivery id.
Asymmetric ``v1a`` (ed25519) signatures are not supported.

Svix, Outpost and GitLab's signing tokens use this scheme. The ``webhooks`` module
(``callboard.providers.webhooks``) lets any topic use it from configuration alone.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass

from callboard.ingress.types import Headers
from callboard.providers._signatures import Failure, Secret, first, wire_bytes
from callboard.providers._wiring import header_delivery_id

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
#: How far ``webhook-timestamp`` may be from the receiver's clock, in seconds (the spec's example).
DEFAULT_TOLERANCE = 300

MISSING = Failure(
    "SignatureMissingError",
    "the request lacks a Standard Webhooks header: webhook-id, webhook-timestamp and "
    "webhook-signature are all required",
)
MALFORMED_TIMESTAMP = Failure(
    "SignatureMalformedError", "the webhook-timestamp header is not a whole number of seconds"
)
MALFORMED_ID = Failure(
    "SignatureMalformedError", "the webhook-id header holds characters that cannot be signed"
)
MALFORMED_SIGNATURE = Failure(
    "SignatureMalformedError",
    "the webhook-signature header holds no 'v1,<base64 HMAC-SHA256>' entry",
)
MISMATCH = Failure(
    "SignatureMismatchError",
    "no webhook-signature entry matches the request for any configured signing secret",
)
_DIGEST_SIZE = 32


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional).

    Raises ``ValueError`` with a message that does not repeat the secret.
    """
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError("a signing secret must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key


def stale(tolerance: int) -> Failure:
    return Failure(
        "TimestampOutOfToleranceError",
        f"the webhook-timestamp header is more than {tolerance} seconds away from the server's "
        "clock; a delivery that old (or from a clock that wrong) could be a replay",
    )


def verify(
    headers: Headers,
    raw_body: bytes,
    secrets: Sequence[Secret],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> Failure | None:
    """``None`` when a ``v1`` entry of ``webhook-signature`` is right for one of ``secrets``.

    A ``str`` secret is a ``whsec_...`` secret; a ``bytes`` one is the HMAC key itself.
    """
    msg_id = first(headers, ID_HEADER)
    timestamp = first(headers, TIMESTAMP_HEADER)
    signature = first(headers, SIGNATURE_HEADER)
    if not msg_id or not timestamp or not signature:
        return MISSING
    if not (timestamp.isascii() and timestamp.isdigit()):
        return MALFORMED_TIMESTAMP
    clock = time.time() if now is None else now
    if abs(clock - int(timestamp)) > tolerance:
        return stale(tolerance)
    given = _signatures(signature)
    if not given:
        return MALFORMED_SIGNATURE
    prefix = wire_bytes(f"{msg_id}.{timestamp}.")
    if prefix is None:
        return MALFORMED_ID
    signed = prefix + raw_body
    for secret in secrets:
        key = secret if isinstance(secret, bytes) else decode_secret(secret)
        expected = hmac.digest(key, signed, "sha256")
        for candidate in given:
            if hmac.compare_digest(expected, candidate):
                return None
    return MISMATCH


def _signatures(header: str) -> list[bytes]:
    found = []
    for entry in header.split():
        version, sep, value = entry.partition(",")
        if not sep or version != "v1":
            continue
        try:
            digest = base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            continue
        if len(digest) == _DIGEST_SIZE:
            found.append(digest)
    return found


@dataclass(frozen=True, slots=True)
class SigningSecrets:
    """Decoded signing keys and how far ``webhook-timestamp`` may be from the clock."""

    keys: tuple[bytes, ...]
    tolerance: int = DEFAULT_TOLERANCE


def check(headers: Headers, raw_body: bytes, secrets: SigningSecrets) -> Failure | None:
    """The scheme as a provider spec names it: ``verify`` under configured secrets."""
    return verify(headers, raw_body, secrets.keys, tolerance=secrets.tolerance)


#: ``webhook-id`` stays the same across retries.
delivery_id = header_delivery_id(ID_HEADER)
