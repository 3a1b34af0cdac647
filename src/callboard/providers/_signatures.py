"""Pure pieces every provider shares: verdicts, header access and constant-time checks.

Nothing here does I/O or keeps state. Secrets are given as ``str`` (encoded as UTF-8) or
``bytes``; the modules encode them once at start, so the hot path only computes one HMAC per
candidate secret and compares it with ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from callboard.ingress.types import Headers, Rejection

Secret: TypeAlias = str | bytes
Algorithm: TypeAlias = Literal["sha1", "sha256", "sha384", "sha512"]
Encoding: TypeAlias = Literal["hex", "base64"]


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a delivery is refused: an error ``name`` and a sentence for whoever set it up.

    A failure never holds a secret or the signature that was expected.
    """

    name: str
    message: str

    def rejection(self, status: int = 403) -> Rejection:
        """The ingress answer for this failure, in callboard's JSON error shape."""
        return Rejection(
            status,
            {
                "error": {"name": self.name, "message": self.message},
                "response": {"statusCode": status},
            },
        )


@dataclass(frozen=True, slots=True)
class SignatureFailures:
    """The three ways a signature header can be wrong, worded for one provider."""

    missing: Failure
    malformed: Failure
    mismatch: Failure

    @classmethod
    def for_header(cls, header: str, expected: str, where: str) -> SignatureFailures:
        """Failures for ``header``: ``expected`` describes its form, ``where`` the secret's key."""
        return cls(
            Failure("SignatureMissingError", f"the request has no {header} header"),
            Failure("SignatureMalformedError", f"the {header} header is not {expected}"),
            Failure(
                "SignatureMismatchError",
                f"the {header} header does not match the body for any secret in {where}",
            ),
        )


def first(headers: Headers, name: str) -> str | None:
    """The first value of a header (``name`` lower-cased, as the ingress stores headers)."""
    value = headers.get(name)
    if value is None or isinstance(value, str):
        return value
    return value[0] if value else None


def as_key(secret: Secret) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode()


def as_keys(secrets: Sequence[Secret]) -> tuple[bytes, ...]:
    """Secrets as HMAC keys; empty ones are left out."""
    return tuple(as_key(secret) for secret in secrets if secret)


def wire_bytes(value: str) -> bytes | None:
    """A header value as the bytes that were sent (the ingress decodes headers as Latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return None


@dataclass(frozen=True, slots=True)
class HmacScheme:
    """How a provider writes an HMAC into a header: ``<prefix><digest in hex or base64>``."""

    algorithm: Algorithm = "sha256"
    prefix: str = ""
    encoding: Encoding = "hex"

    @property
    def size(self) -> int:
        return hashlib.new(self.algorithm).digest_size

    def decode(self, text: str) -> bytes:
        """The digest written in ``text``; ``ValueError`` when it is not hex or base64."""
        if self.encoding == "hex":
            return bytes.fromhex(text)
        return base64.b64decode(text, validate=True)

    def encode(self, digest: bytes) -> str:
        if self.encoding == "hex":
            return self.prefix + digest.hex()
        return self.prefix + base64.b64encode(digest).decode("ascii")

    def sign(self, secret: Secret, body: bytes) -> str:
        """The header value a sender computes for ``body`` with ``secret``."""
        return self.encode(hmac.digest(as_key(secret), body, self.algorithm))


def check_hmac(
    value: str | None,
    body: bytes,
    secrets: Sequence[Secret],
    scheme: HmacScheme,
    failures: SignatureFailures,
    *,
    size: int | None = None,
) -> Failure | None:
    """Check a signature header's ``value`` against ``body``; ``None`` when a secret matches."""
    if value is None:
        return failures.missing
    prefix = scheme.prefix
    if prefix and not value.startswith(prefix):
        return failures.malformed
    try:
        given = scheme.decode(value[len(prefix) :])
    except (ValueError, binascii.Error):
        return failures.malformed
    if len(given) != (size if size is not None else scheme.size):
        return failures.malformed
    algorithm = scheme.algorithm
    digest = hmac.digest
    for secret in secrets:
        key = secret if isinstance(secret, bytes) else secret.encode()
        if hmac.compare_digest(digest(key, body, algorithm), given):
            return None
    return failures.mismatch


@dataclass(frozen=True, slots=True)
class HmacSignature:
    """A signature scheme: the HMAC of the raw body, written in one header.

    ``header`` is the header's lower-cased name; ``scheme`` says how the digest is computed and
    written (``sha256=<hex>``); ``failures`` word the refusals.
    """

    header: str
    scheme: HmacScheme
    failures: SignatureFailures
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The digest size is looked up once here, not per request.
        object.__setattr__(self, "size", self.scheme.size)

    def check(self, headers: Headers, raw_body: bytes, secrets: Sequence[Secret]) -> Failure | None:
        """``None`` when the header holds the HMAC of ``raw_body`` under one of ``secrets``."""
        return check_hmac(
            first(headers, self.header),
            raw_body,
            secrets,
            self.scheme,
            self.failures,
            size=self.size,
        )


@dataclass(frozen=True, slots=True)
class TokenHeader:
    """A credential scheme: a shared secret sent as it is in one header (lower-cased name)."""

    header: str
    failures: SignatureFailures

    def check(self, headers: Headers, raw_body: bytes, secrets: Sequence[Secret]) -> Failure | None:
        """``None`` when the header holds one of ``secrets``; the body is not covered."""
        return check_token(first(headers, self.header), secrets, self.failures)


def check_token(
    value: str | None, secrets: Sequence[Secret], failures: SignatureFailures
) -> Failure | None:
    """Check a shared secret sent as it is (``X-Gitlab-Token``), in constant time."""
    if value is None:
        return failures.missing
    given = wire_bytes(value)
    if given is None:
        return failures.malformed
    matched = False
    for secret in secrets:
        # Every secret is compared, so the time taken does not tell which one matched.
        matched |= hmac.compare_digest(given, as_key(secret))
    return None if matched else failures.mismatch
