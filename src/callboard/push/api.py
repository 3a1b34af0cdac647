"""Push targets managed over HTTP, beside the bus API and authenticated as it is.

Mounted at ``/api/events/bus/v1/push``:

- ``GET /push``: the targets the caller may see, secrets, header values and the URL's
  credentials left out; a stored target that no longer reads as one is listed with
  ``"broken"``, the reason;
- ``GET /push/{name}``: one (``404`` when unknown or not the caller's to see);
- ``PUT /push/{name}``: create (``201``) or replace (``200``) a target from a JSON object with
  the keys of ``events.push.<name>``; ``400`` for a wrong key, or a URL whose host is a private
  IP address (``push/addresses.py``); ``403`` for another caller's, ``409`` for a configured
  one, ``501`` without a store;
- ``DELETE /push/{name}``: ``204``, ``404`` when unknown, ``403`` and ``409`` as for ``PUT``.

Who may see and change which target is ``push/access.py``'s rule: its owner, and the callers
``events.bus.grants`` gives ``push.<name>``. A caller without credentials (the bus run without
authentication) is refused every route with a ``403`` unless ``anonymous`` is set
(``events.bus.anonymousPush``): a push target makes the server send requests to any URL, which
nobody should be able to do just by reaching its port.

A raw ASGI app, served by the application's routes for ``/push`` and ``/push/{name}`` (the name
comes in the scope's ``path_params``); the application hands it the bus's authentication as a
plain callable, so this package depends on no other implementation. Refusals have callboard's
JSON error shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

from callboard.errors import ConfigError, PushStoreError, RequestRejected, SubscriptionError
from callboard.http_errors import error_body
from callboard.push.access import Caller, may
from callboard.push.registry import PushTargets
from callboard.push.spec import BrokenTarget, PushSpec, name_problem
from callboard.push.urls import redacted

BODY_LIMIT = 64 * 1024
_JSON = [(b"content-type", b"application/json; charset=utf-8")]
_NAMES = {
    400: "InputError",
    401: "AuthenticationError",
    403: "NotAllowedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "PayloadTooLargeError",
    415: "UnsupportedMediaTypeError",
    501: "NotImplementedError",
    503: "PushStoreError",
}


@dataclass(frozen=True, slots=True)
class Refused:
    """Why the caller was not authenticated; safe to send back."""

    message: str


#: The bus's authentication: the caller for an ``Authorization`` header value (``None``: absent).
Authenticate = Callable[[str | None], Awaitable[Caller | Refused]]
# The ASGI types, spelled out: this package imports no web framework.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _Refusal(Exception):
    def __init__(self, status: int, message: str, *, allow: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: The methods of the route, sent with a ``405`` as ``Allow`` (RFC 9110, 15.5.6).
        self.allow = allow


def describe(spec: PushSpec | BrokenTarget) -> dict[str, Any]:
    """A target as the API shows it: no secret, no credentials of the URL, header names only
    (their values may be keys)."""
    if isinstance(spec, BrokenTarget):
        return {
            "name": spec.name,
            "subscription": spec.subscription,
            "source": spec.source,
            "broken": spec.reason,
        }
    limit = spec.rate_limit
    return {
        "name": spec.name,
        "subscription": spec.subscription,
        "source": spec.source,
        "url": redacted(spec.url),
        "topics": list(spec.topics),
        "enabled": spec.enabled,
        "format": spec.format,
        "timeout": round(spec.timeout * 1000),
        "headers": sorted(name for name, _ in spec.headers),
        "rateLimit": None
        if limit is None
        else {"perSecond": limit.per_second, "burst": limit.burst},
        "concurrency": spec.concurrency,
        "circuitBreaker": {
            "failures": spec.breaker.failures,
            "cooldownMs": round(spec.breaker.cooldown * 1000),
        },
        "signed": bool(spec.secrets),
    }


class PushApi:
    """The push routes as an ASGI app, mounted under the bus's path."""

    def __init__(
        self, targets: PushTargets, authenticate: Authenticate, *, anonymous: bool = False
    ) -> None:
        self.targets = targets
        self._authenticate = authenticate
        #: Whether callers without credentials may use the routes (``events.bus.anonymousPush``).
        self.anonymous = anonymous

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            status, body = await self._answer(scope, receive)
        except _Refusal as refusal:
            headers = list(_JSON)
            if refusal.status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            if refusal.allow is not None:
                headers.append((b"allow", refusal.allow))
            name = _NAMES.get(refusal.status, "Error")
            await _send(
                send,
                refusal.status,
                error_body(scope, refusal.status, name, refusal.message),
                headers,
            )
            return
        await _send(send, status, body, _JSON if body else [])

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        authorization = _header(scope, b"authorization")
        verdict = await self._authenticate(authorization)
        if isinstance(verdict, Refused):
            raise _Refusal(401, verdict.message)
        if verdict.anonymous and not self.anonymous:
            raise _Refusal(
                403,
                "push targets are not managed by callers without credentials: a push target "
                "makes this server send requests to any URL. Configure backend.auth."
                "externalAccess tokens and call with one, or set events.bus.anonymousPush: true "
                "if everyone who can reach this server may do that",
            )
        rest: str | None = scope.get("path_params", {}).get("name")
        method = scope["method"]
        if rest is None:
            if method != "GET":
                raise _Refusal(
                    405, f"{method} is not allowed here; GET lists the push targets", allow=b"GET"
                )
            every: list[PushSpec | BrokenTarget] = [
                *self.targets.targets(),
                *self.targets.broken(),
            ]
            every.sort(key=lambda target: target.name)
            shown = [describe(s) for s in every if self._sees(verdict, s)]
            return 200, orjson.dumps({"push": shown})
        problem = name_problem(rest)
        if problem is not None:
            raise _Refusal(400, problem)
        if method == "GET":
            spec = self.targets.get(rest) or self.targets.get_broken(rest)
            # Not the caller's to see: answered as if unknown, as the list leaves it out.
            if spec is None or not self._sees(verdict, spec):
                raise _Refusal(404, f"no push target {rest!r}")
            return 200, orjson.dumps(describe(spec))
        if method == "PUT":
            return await self._put(rest, await _body(scope, receive), verdict)
        if method == "DELETE":
            return await self._delete(rest, verdict)
        raise _Refusal(
            405, f"{method} is not allowed here: GET, PUT or DELETE", allow=b"GET, PUT, DELETE"
        )

    async def _put(self, name: str, section: Any, caller: Caller) -> tuple[int, bytes]:
        if not isinstance(section, dict):
            raise _Refusal(
                400, "the body must be a JSON object with the keys of events.push.<name>"
            )
        self._check_store()
        try:
            spec, created = await self.targets.put(name, section, by=caller)
        except ConfigError as error:
            raise _Refusal(400, str(error)) from None
        except RequestRejected as error:
            raise _Refusal(error.status_code, error.message) from None
        except SubscriptionError as error:
            raise _Refusal(409, str(error)) from None
        except PushStoreError as error:
            raise _Refusal(503, str(error)) from None
        return (201 if created else 200), orjson.dumps(describe(spec))

    async def _delete(self, name: str, caller: Caller) -> tuple[int, bytes]:
        self._check_store()
        try:
            deleted = await self.targets.delete(name, by=caller)
        except RequestRejected as error:
            raise _Refusal(error.status_code, error.message) from None
        except SubscriptionError as error:
            raise _Refusal(409, str(error)) from None
        except PushStoreError as error:
            raise _Refusal(503, str(error)) from None
        if not deleted:
            raise _Refusal(404, f"no push target {name!r}")
        return 204, b""

    def _sees(self, caller: Caller, spec: PushSpec | BrokenTarget) -> bool:
        return may(caller, spec, self.targets.owner(spec.name))

    def _check_store(self) -> None:
        if not self.targets.can_store:
            raise _Refusal(
                501,
                "push targets cannot be created or deleted at runtime here: set "
                "events.pushStorePath, the file that keeps them over a restart",
            )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


async def _body(scope: Scope, receive: Receive) -> Any:
    media = (_header(scope, b"content-type") or "application/json").split(";")[0].strip().lower()
    if media != "application/json":
        raise _Refusal(415, f"send application/json, not {media}")
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_LIMIT:
            raise _Refusal(413, f"the body is over the limit of {BODY_LIMIT} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    try:
        return orjson.loads(b"".join(chunks) or b"null")
    except orjson.JSONDecodeError:
        raise _Refusal(400, "the body is not valid JSON") from None


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
