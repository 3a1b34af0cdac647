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
    HmacSignature,
    Secret,
    SignatureFailures,
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
    return signature(header, scheme, "the configured secrets", failures).check(
        headers, raw_body, secrets
    )


def signature(
    header: str, scheme: HmacScheme, where: str, failures: SignatureFailures | None = None
) -> HmacSignature:
    """The scheme of a sender that writes ``scheme``'s HMAC in ``header`` (any case);
    ``where`` names the secret's key in refusals unless ``failures`` are given."""
    return HmacSignature(header.lower(), scheme, failures or failures_for(header, scheme, where))
