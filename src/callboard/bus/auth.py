"""Bearer-token authentication for the bus API.

Two kinds of callers are accepted: those presenting a static token, configured as Backstage
configures static external access (``backend.auth.externalAccess`` entries of ``type: static``),
and Backstage backend plugins presenting a plugin token (``BusAuth``, with a
``PluginTokenVerifier`` that checks it against the calling plugin's published keys).

No token is ever logged or sent back. A presented token is compared with every configured static
token in constant time (``hmac.compare_digest``), so neither the answer nor its timing tells
which token, or how much of one, matched.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from callboard.bus.plugin_keys import PluginTokenVerifier
from callboard.bus.plugin_tokens import PLUGIN_TOKEN_TYPE, PluginTokenError, token_type

logger = logging.getLogger("callboard.bus.auth")

#: The plugin id Backstage's access restrictions name for the events backend.
PLUGIN_ID = "events"

_SCHEME = "bearer"


@dataclass(frozen=True, slots=True)
class StaticToken:
    """One accepted token and the subject a caller presenting it acts as."""

    token: str
    subject: str

    def __repr__(self) -> str:  # never show the token itself
        return f"StaticToken(subject={self.subject!r})"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``service`` with a token's subject, or ``none`` when auth is off."""

    type: str
    subject: str

    @property
    def created_by(self) -> str:
        """How Backstage records the publisher of an event (``service=<subject>``)."""
        return f"{self.type}={self.subject}"


ANONYMOUS = Principal("none", "anonymous")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was not authenticated; the message is safe to send back."""

    message: str


def _applies_to_events(entry: Mapping[str, Any]) -> bool:
    restrictions = entry.get("accessRestrictions") or ()
    if not restrictions:
        return True
    return any(isinstance(r, Mapping) and r.get("plugin") == PLUGIN_ID for r in restrictions)


def static_tokens(entries: Iterable[Mapping[str, Any]]) -> tuple[StaticToken, ...]:
    """The static tokens among ``backend.auth.externalAccess`` entries that may call events.

    Entries of other types (``legacy``, ``jwks``) are not for this API and are skipped, as are
    static entries whose ``accessRestrictions`` name only other plugins.
    """
    tokens = []
    for entry in entries:
        if entry.get("type") != "static" or not _applies_to_events(entry):
            continue
        options = entry.get("options") or {}
        token, subject = options.get("token"), options.get("subject")
        if isinstance(token, str) and isinstance(subject, str):
            tokens.append(StaticToken(token, subject))
    return tuple(tokens)


class Authenticator(Protocol):
    """What the bus routes ask who a caller is."""

    async def check(self, authorization: str | None) -> Principal | Refusal:
        """The caller for an ``Authorization`` header value (``None`` when absent)."""
        ...


def _credential(authorization: str | None, allow_anonymous: bool) -> str | Principal | Refusal:
    """The bearer credential of a header value, or the verdict when there is none to check."""
    if authorization is None or not authorization.strip():
        return ANONYMOUS if allow_anonymous else Refusal("Missing credentials")
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != _SCHEME or not credential:
        return Refusal("Unsupported authorization scheme; send 'Authorization: Bearer <token>'")
    return credential


class StaticTokenAuth:
    """Accepts ``Authorization: Bearer <token>`` for the configured tokens.

    Without credentials a request is refused, unless ``allow_anonymous`` (Backstage's
    ``backend.auth.dangerouslyDisableDefaultAuthPolicy``) lets it through; a token that is
    presented and wrong is refused either way.
    """

    def __init__(self, tokens: Sequence[StaticToken], *, allow_anonymous: bool = False) -> None:
        self._tokens = tuple((t.token.encode(), t.subject) for t in tokens)
        self.allow_anonymous = allow_anonymous

    @classmethod
    def from_settings(
        cls, external_access: Iterable[Mapping[str, Any]], *, disable_default_policy: bool
    ) -> StaticTokenAuth:
        return cls(static_tokens(external_access), allow_anonymous=disable_default_policy)

    def match(self, credential: str) -> Principal | None:
        """The caller a presented token names, or ``None`` when it is none of the tokens."""
        presented = credential.encode()
        subject: str | None = None
        for token, token_subject in self._tokens:
            # Every token is compared, a match or not, so the time taken tells nothing.
            if hmac.compare_digest(presented, token) and subject is None:
                subject = token_subject
        return None if subject is None else Principal("service", subject)

    def authenticate(self, authorization: str | None) -> Principal | Refusal:
        """The caller for an ``Authorization`` header value (``None`` when absent)."""
        credential = _credential(authorization, self.allow_anonymous)
        if not isinstance(credential, str):
            return credential
        return self.match(credential) or Refusal("Invalid token")

    async def check(self, authorization: str | None) -> Principal | Refusal:
        return self.authenticate(authorization)


class BusAuth:
    """Static tokens, and Backstage plugin tokens when ``plugin_tokens`` is given.

    A token is first compared with the static tokens; one that presents itself as a plugin
    token (``typ: vnd.backstage.plugin``) is then verified, and its caller is
    ``plugin:<pluginId>``, as in Backstage. Anonymous callers are let in or not as ``static``
    says.
    """

    def __init__(
        self, static: StaticTokenAuth, plugin_tokens: PluginTokenVerifier | None = None
    ) -> None:
        self.static = static
        self.plugin_tokens = plugin_tokens

    @property
    def allow_anonymous(self) -> bool:
        return self.static.allow_anonymous

    async def check(self, authorization: str | None) -> Principal | Refusal:
        credential = _credential(authorization, self.static.allow_anonymous)
        if not isinstance(credential, str):
            return credential
        principal = self.static.match(credential)
        if principal is not None:
            return principal
        kind = token_type(credential)
        if kind != PLUGIN_TOKEN_TYPE:
            if kind is None:
                return Refusal("Invalid token")
            return Refusal(
                "Invalid token: only Backstage plugin tokens and configured static tokens "
                "are accepted"
            )
        if self.plugin_tokens is None:
            return Refusal(
                "Backstage plugin tokens are not accepted: events.bus.backstage is not configured"
            )
        try:
            claims = await self.plugin_tokens.verify(credential)
        except PluginTokenError as error:
            logger.warning("refused a plugin token: %s", error.reason)
            return Refusal(str(error))
        return Principal("service", claims.subject)
