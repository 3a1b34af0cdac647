"""A configurable HMAC signature check, for senders that sign the raw body their own way.

The sender puts ``<prefix><digest>`` in one header, the digest being the HMAC of the raw body
under a shared secret, written in hex or base64: ``X-Signature: sha256=<hex>`` (GitHub style),
``X-Shopify-Hmac-Sha256: <base64>``, and so on. The ``webhooks`` module
(``callboard.providers.webhooks``) lets any topic use it from configuration alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from callboard.ingress.types import Headers
from callboard.providers._signatures import (
    Failure,
    HmacScheme,
    Secret,
    SignatureFailures,
    check_hmac,
    first,
)


def failures_for(header: str, scheme: HmacScheme, where: str) -> SignatureFailures:
    """Failures naming ``header``, the form ``scheme`` expects, and the secret's key ``where``."""
    digits = f"{scheme.size * 2} hex digits" if scheme.encoding == "hex" else "base64"
    expected = f"{scheme.prefix!r} followed by {digits}" if scheme.prefix else digits
    return SignatureFailures.for_header(header, f"{expected} ({scheme.algorithm} HMAC)", where)


def verify(
    headers: Headers,
    raw_body: bytes,
    secrets: Sequence[Secret],
    *,
    header: str,
    scheme: HmacScheme,
    failures: SignatureFailures | None = None,
) -> Failure | None:
    """``None`` when ``header`` holds the HMAC of ``raw_body`` under one of ``secrets``."""
    name = header.lower()
    return check_hmac(
        first(headers, name),
        raw_body,
        secrets,
        scheme,
        failures or failures_for(header, scheme, "the configured secrets"),
    )
