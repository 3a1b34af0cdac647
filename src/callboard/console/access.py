"""Who may open the console, its session cookie, and the checks on requests that change state.

The console accepts the bus's callers: a token of ``backend.auth`` in an ``Authorization:
Bearer`` header, or a session cookie given in exchange for a static token entered once on the
login page. The cookie holds the caller's subject, an expiry and a MAC keyed by the token itself
(never the token): removing a token from the configuration ends its sessions, on every worker
and across restarts, without any key to keep. Every comparison is made in constant time.

Requests that change state are ``POST``s. A browser's are checked twice: the ``Origin`` (or
``Referer``) must be the console's own, and a form field must repeat the value of the CSRF
cookie (double submit; the cookie is ``SameSite=Strict``). A caller presenting a bearer header
is not a browser riding on a cookie, and skips the CSRF field.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

SESSION_COOKIE = "callboard_session"
CSRF_COOKIE = "callboard_csrf"
#: The form field (or ``X-CSRF-Token`` header) repeating the CSRF cookie.
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
#: How long a session lasts, in seconds.
SESSION_SECONDS = 12 * 3600

_SESSION_LABEL = b"callboard console session v1"


class BearerCheck(Protocol):
    """Who an ``Authorization`` header names, as the bus decides it (``None``: refused)."""

    async def __call__(self, authorization: str | None) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is using the console (``service=<subject>``, or ``anonymous`` when it is open)."""

    name: str
    via: Literal["bearer", "session", "open"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ConsoleAccess:
    """The console's gate: bearer headers, session cookies and the open policy.

    ``tokens`` are the static ``(token, subject)`` pairs of ``backend.auth.externalAccess``: the
    ones the login page accepts. ``bearer`` checks a header as the bus does (static and plugin
    tokens). ``open`` is ``dangerouslyDisableDefaultAuthPolicy``: everyone may use the console.
    """

    def __init__(
        self,
        tokens: Sequence[tuple[str, str]],
        bearer: BearerCheck,
        *,
        open: bool = False,
        session_seconds: int = SESSION_SECONDS,
    ) -> None:
        self._keys = tuple(
            (hmac.new(token.encode(), _SESSION_LABEL, hashlib.sha256).digest(), subject)
            for token, subject in tokens
        )
        self._tokens = tuple((token.encode(), subject) for token, subject in tokens)
        self._bearer = bearer
        self.open = open
        self.session_seconds = session_seconds

    @property
    def can_log_in(self) -> bool:
        """Whether any token can be entered on the login page."""
        return bool(self._tokens)

    async def caller(
        self, authorization: str | None, session: str | None, now: float
    ) -> Caller | None:
        """Who presents this header or cookie, or ``None`` when the console is closed to them."""
        if authorization:
            name = await self._bearer(authorization)
            if name is not None:
                return Caller(name, "bearer")
            return None  # a wrong token is refused even when the console is open
        if session:
            subject = self.session_subject(session, now)
            if subject is not None:
                return Caller(f"service={subject}", "session")
        return Caller("anonymous", "open") if self.open else None

    def log_in(self, token: str, now: float) -> str | None:
        """The session cookie's value for a static token, or ``None`` when it is none of them."""
        presented = token.encode()
        found: int | None = None
        for index, (known, _) in enumerate(self._tokens):
            # Every token is compared, so the time taken tells nothing of which one matched.
            if hmac.compare_digest(presented, known) and found is None:
                found = index
        if found is None:
            return None
        key, subject = self._keys[found]
        expires = str(int(now) + self.session_seconds)
        body = f"{_b64(subject.encode())}.{expires}"
        return f"{body}.{_b64(hmac.new(key, body.encode(), hashlib.sha256).digest())}"

    def session_subject(self, cookie: str, now: float) -> str | None:
        """The subject a session cookie was issued to, while it is valid."""
        body, _, mac = cookie.rpartition(".")
        encoded, _, expires = body.partition(".")
        if not (mac and expires.isascii() and expires.isdigit()) or int(expires) < now:
            return None
        try:
            presented = _unb64(mac)
            subject = _unb64(encoded).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        matched: str | None = None
        for key, token_subject in self._keys:
            expected = hmac.new(key, body.encode(), hashlib.sha256).digest()
            if hmac.compare_digest(presented, expected) and matched is None:
                matched = token_subject
        return matched if matched == subject else None


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(cookie: str | None, submitted: str | None) -> bool:
    """The double-submit check: the form repeats the cookie's value."""
    if not cookie or not submitted:
        return False
    return hmac.compare_digest(cookie.encode(), submitted.encode())


def same_origin(origin: str | None, referer: str | None, own: str) -> bool:
    """Whether a browser request comes from the console's own origin (``scheme://host:port``).

    A request with neither header is not from a browser page (browsers send ``Origin`` with
    every ``POST``), and passes: the CSRF field still has to match.
    """
    if origin:
        return origin == own
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == own
    return True
