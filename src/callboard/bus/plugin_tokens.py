"""Backstage plugin tokens: what a Backstage backend plugin sends when it calls another plugin.

A stock Backstage backend's events client calls the bus with such a token: a JWT whose protected
header has ``typ: vnd.backstage.plugin``, ``alg`` (``ES256`` unless configured otherwise) and
``kid``, and whose claims are ``sub`` (the calling plugin's id), ``aud`` (the target plugin's id,
here ``events``), ``iat``, ``exp`` and, for a call on behalf of a user, ``obo``. It is signed with
a key the calling plugin publishes at ``<plugin base URL>/.backstage/auth/v1/jwks.json``.

Pure: this module reads and verifies a token against keys it is given; fetching keys is
``callboard.bus.plugin_keys``'s job. Error messages never quote the token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

#: The ``typ`` of Backstage plugin tokens.
PLUGIN_TOKEN_TYPE = "vnd.backstage.plugin"

#: Backstage's rule for a plugin id found in a token's subject.
PLUGIN_ID_PATTERN = re.compile(r"^[a-z0-9_-]+$", re.IGNORECASE)

#: The claims Backstage requires in a plugin token.
REQUIRED_CLAIMS = ("iat", "exp", "sub", "aud")

#: Signature algorithms a published key may be used with; never ``none`` or a shared secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {
        "ES256",
        "ES384",
        "ES512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "EdDSA",
    }
)

#: Clock difference tolerated between the issuing Backstage and callboard, in seconds.
DEFAULT_LEEWAY = 10.0

_LONGEST_ID_SHOWN = 64


class PluginTokenError(Exception):
    """A plugin token was refused; the message is safe to send back and to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid plugin token: {reason}")
        self.reason = reason


class UnknownKeyError(PluginTokenError):
    """The token names a key (``kid``) that is not among the keys it was checked against."""


@dataclass(frozen=True, slots=True)
class PluginTokenHeader:
    """What a plugin token says about itself before its signature is checked."""

    plugin_id: str
    kid: str
    algorithm: str


@dataclass(frozen=True, slots=True)
class PluginClaims:
    """A verified plugin token: the calling plugin, and whether it acts for a user."""

    plugin_id: str
    on_behalf_of_user: bool = False

    @property
    def subject(self) -> str:
        """The subject Backstage gives the caller: ``plugin:<id>``."""
        return f"plugin:{self.plugin_id}"


def shown(plugin_id: str) -> str:
    """A plugin id as messages show it (ids come from unverified tokens, so their length is capped)."""
    if len(plugin_id) <= _LONGEST_ID_SHOWN:
        return plugin_id
    return plugin_id[:_LONGEST_ID_SHOWN] + "..."


def token_type(token: str) -> str | None:
    """The ``typ`` of a token's protected header, or ``None`` if the token is not a JWT."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    typ = header.get("typ")
    return typ if isinstance(typ, str) else None


def is_plugin_token(token: str) -> bool:
    """Whether a token presents itself as a Backstage plugin token (nothing is verified)."""
    return token_type(token) == PLUGIN_TOKEN_TYPE


def read_header(token: str) -> PluginTokenHeader:
    """The calling plugin and the signing key a plugin token names, checked for form only."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise PluginTokenError("malformed token") from None
    if header.get("typ") != PLUGIN_TOKEN_TYPE:
        raise PluginTokenError(f"wrong type (expected '{PLUGIN_TOKEN_TYPE}')")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise PluginTokenError("missing subject")
    if not PLUGIN_ID_PATTERN.match(subject):
        raise PluginTokenError("forbidden subject format")
    kid, algorithm = header.get("kid"), header.get("alg")
    if not isinstance(kid, str) or not kid:
        raise PluginTokenError("the token names no signing key (kid)")
    if algorithm not in ASYMMETRIC_ALGORITHMS:
        raise PluginTokenError("unsupported signature algorithm")
    return PluginTokenHeader(subject, kid, str(algorithm))


def verify_plugin_token(
    token: str,
    keys: Mapping[str, Mapping[str, Any]],
    *,
    audience: str,
    leeway: float = DEFAULT_LEEWAY,
) -> PluginClaims:
    """Verify a plugin token against its plugin's published keys (JWKs by ``kid``).

    Checks what Backstage checks: the ``typ``, a signature by the key the token names, the
    audience (the receiving plugin's id), the required claims, the expiry and the plugin id's
    form. Raises ``UnknownKeyError`` when the token's ``kid`` is not among ``keys`` (fresher keys
    may know it) and ``PluginTokenError`` for every other refusal.
    """
    header = read_header(token)
    jwk = keys.get(header.kid)
    if jwk is None:
        raise UnknownKeyError(f"unknown signing key for plugin '{shown(header.plugin_id)}'")
    key_algorithm = jwk.get("alg")
    if key_algorithm is not None and key_algorithm != header.algorithm:
        raise PluginTokenError("the token's algorithm does not match its key")
    if jwk.get("use", "sig") != "sig":
        raise PluginTokenError("the token's key is not a signing key")
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=header.algorithm)
    except jwt.PyJWTError:
        raise PluginTokenError("the token's key cannot be used with its algorithm") from None
    try:
        decoded = jwt.decode_complete(
            token,
            key,
            algorithms=[header.algorithm],
            audience=audience,
            leeway=leeway,
            options={"require": list(REQUIRED_CLAIMS)},
        )
    except jwt.ExpiredSignatureError:
        raise PluginTokenError("expired") from None
    except jwt.ImmatureSignatureError:
        raise PluginTokenError("issued in the future") from None
    except jwt.InvalidAudienceError:
        raise PluginTokenError(f"wrong audience (expected '{audience}')") from None
    except jwt.MissingRequiredClaimError as error:
        raise PluginTokenError(f"missing claim '{error.claim}'") from None
    except jwt.InvalidSignatureError:
        raise PluginTokenError(
            f"signature does not match the keys of plugin '{shown(header.plugin_id)}'"
        ) from None
    except jwt.PyJWTError:
        raise PluginTokenError("verification failed") from None
    # The header is part of what the signature covers; check it as verified.
    if decoded["header"].get("typ") != PLUGIN_TOKEN_TYPE:
        raise PluginTokenError(f"wrong type (expected '{PLUGIN_TOKEN_TYPE}')")
    payload: dict[str, Any] = decoded["payload"]
    return PluginClaims(header.plugin_id, on_behalf_of_user=bool(payload.get("obo")))
