"""The console's routes: its pages, the live stream, the actions, the login and the static files.

Mounted at ``/console`` by the standalone application. Every route but the login page and the
static files asks ``ConsoleAccess`` who is calling; a page answers an unknown browser with the
login page, anything else with ``401``. The actions (replay, redrive) are ``POST``s checked for
their origin and CSRF field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from callboard.brokers.base import Broker, BrokerAdmin
from callboard.console import pages
from callboard.console.access import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    Caller,
    ConsoleAccess,
    csrf_matches,
    new_csrf_token,
    same_origin,
)
from callboard.console.ingress_stats import IngressStats
from callboard.console.live import LiveTap
from callboard.console.pages import Refused
from callboard.console.stream import EventStream
from callboard.console.templates import render
from callboard.errors import CallboardError, InvalidTopicError, SubscriptionError
from callboard.service import EventsService
from callboard.topics import normalize_patterns

logger = logging.getLogger("callboard.console")

#: Delivers again to a subscription every event kept since a moment; how many were delivered.
Replay = Callable[[str, datetime], Awaitable[int]]
Page = Callable[[Request, Caller], Awaitable[Response]]

STATIC = Path(__file__).parent / "static"
FORM_LIMIT = 256 * 1024


class ConsoleApp:
    """The console as an ASGI application."""

    def __init__(
        self,
        broker: Broker,
        events: EventsService,
        access: ConsoleAccess,
        *,
        replay: Replay,
        ingress: IngressStats | None = None,
        consumers: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self.broker = broker
        self.admin: BrokerAdmin | None = broker if isinstance(broker, BrokerAdmin) else None
        self.access = access
        self.ingress = ingress
        self.tap = LiveTap(events, broker)
        self._replay = replay
        self._consumers = consumers
        guard = self._guard
        self.router = Router(
            routes=[
                Route("/", self._home, methods=["GET"]),
                Route("/login", self._login_page, methods=["GET"]),
                Route("/login", self._login, methods=["POST"]),
                Route("/logout", self._logout, methods=["POST"]),
                Route("/live", guard(self._live), methods=["GET"]),
                Route("/live/stream", guard(self._stream), methods=["GET"]),
                Route("/events", guard(self._events), methods=["GET"]),
                Route("/events/{id:path}", guard(self._event), methods=["GET"]),
                Route("/subscriptions", guard(self._subscriptions), methods=["GET"]),
                Route("/replay", guard(self._replay_action, post=True), methods=["POST"]),
                Route("/dead-letters", guard(self._dead_letters), methods=["GET"]),
                Route("/redrive", guard(self._redrive, post=True), methods=["POST"]),
                Route("/ingress", guard(self._ingress), methods=["GET"]),
                Mount("/static", app=StaticFiles(directory=STATIC)),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    def end_streams(self) -> None:
        """End every live stream now (the server is stopping)."""
        self.tap.end_watches()

    async def close(self) -> None:
        await self.tap.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _guard(self, page: Page, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            caller = await self.access.caller(
                request.headers.get("authorization"),
                request.cookies.get(SESSION_COOKIE),
                time.time(),
            )
            if caller is None:
                return self._unknown(request)
            try:
                if post:
                    await self._check_post(request, caller)
                return await page(request, caller)
            except Refused as refusal:
                return self._html(
                    request,
                    "message.html",
                    {"caller": caller, "title": "Refused", "message": refusal.message},
                    refusal.status,
                )
            except CallboardError as error:
                logger.warning("console %s %s failed: %s", request.method, request.url.path, error)
                return self._html(
                    request,
                    "message.html",
                    {"caller": caller, "title": "Failed", "message": str(error)},
                    503,
                )

        return endpoint

    def _unknown(self, request: Request) -> Response:
        """An unknown caller: a browser goes to the login page, anything else gets ``401``."""
        bearer = request.headers.get("authorization")
        if bearer or "text/html" not in request.headers.get("accept", ""):
            return Response(
                "the console needs a token of backend.auth: send 'Authorization: Bearer <token>' "
                "or log in at /console/login\n",
                status_code=401,
                media_type="text/plain",
                headers={"www-authenticate": "Bearer"},
            )
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(
            f"{self._root(request)}/login?next={quote(target, safe='')}", status_code=303
        )

    async def _check_post(self, request: Request, caller: Caller) -> None:
        own = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
        if not same_origin(request.headers.get("origin"), request.headers.get("referer"), own):
            raise Refused(403, "this action comes from another site: refused")
        if caller.via == "bearer":
            return  # a header no browser sends by itself: no cookie to ride on
        form = await _form(request)
        submitted = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        if not csrf_matches(request.cookies.get(CSRF_COOKIE), submitted):
            raise Refused(
                403,
                "the form's CSRF token does not match this browser's: reload the page and try "
                "again",
            )

    @staticmethod
    def _root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def _html(
        self, request: Request, template: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        csrf = request.cookies.get(CSRF_COOKIE) or new_csrf_token()
        body = render(template, {"root": self._root(request), "csrf": csrf, **context})
        response = HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(
                CSRF_COOKIE,
                csrf,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=self._root(request) or "/",
            )
        return response

    # -- login ---------------------------------------------------------------------------------

    async def _home(self, request: Request) -> Response:
        return RedirectResponse(f"{self._root(request)}/live", status_code=303)

    async def _login_page(self, request: Request) -> Response:
        return self._html(
            request,
            "login.html",
            {
                "caller": None,
                "next": _local(request.query_params.get("next"), self._root(request)),
                "can_log_in": self.access.can_log_in,
                "error": None,
            },
        )

    async def _login(self, request: Request) -> Response:
        root = self._root(request)
        form = await _form(request)
        own = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
        next_page = _local(form.get("next"), root)
        refused = None
        if not same_origin(request.headers.get("origin"), request.headers.get("referer"), own):
            refused = "This login comes from another site."
        elif not csrf_matches(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            refused = "The form expired: try again."
        else:
            cookie = self.access.log_in(form.get("token", "").strip(), time.time())
            if cookie is not None:
                response = RedirectResponse(next_page, status_code=303)
                response.set_cookie(
                    SESSION_COOKIE,
                    cookie,
                    max_age=self.access.session_seconds,
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                    path=root or "/",
                )
                return response
            refused = "That token is not one of backend.auth's static tokens."
        context = {"caller": None, "next": next_page, "can_log_in": True, "error": refused}
        return self._html(request, "login.html", context, 403)

    async def _logout(self, request: Request) -> Response:
        root = self._root(request)
        form = await _form(request)
        if not csrf_matches(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            return Response("refused: CSRF token mismatch\n", status_code=403)
        response = RedirectResponse(f"{root}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=root or "/")
        return response

    # -- pages ---------------------------------------------------------------------------------

    async def _live(self, request: Request, caller: Caller) -> Response:
        topic = request.query_params.get("topic", "").strip()
        return self._html(request, "live.html", {"caller": caller, "topic": topic, "page": "live"})

    async def _stream(self, request: Request, caller: Caller) -> Response:
        raw = request.query_params.get("topic", "").strip()
        try:
            patterns = normalize_patterns(raw.replace(",", " ").split()) if raw else ()
        except InvalidTopicError as error:
            return Response(str(error) + "\n", status_code=400, media_type="text/plain")
        watcher = await self.tap.watch(patterns)
        return EventStream(self.tap, watcher)

    async def _events(self, request: Request, caller: Caller) -> Response:
        found = await pages.search_events(self.broker, request.query_params)
        return self._html(
            request, "events.html", {"caller": caller, "page": "events", "found": found}
        )

    async def _event(self, request: Request, caller: Caller) -> Response:
        detail = await pages.event_detail(self.broker, request.path_params["id"])
        status = 404 if detail.log and detail.stored is None else 200
        context = {"caller": caller, "page": "events", "detail": detail}
        return self._html(request, "event.html", context, status)

    async def _subscriptions(self, request: Request, caller: Caller) -> Response:
        rows = await pages.subscription_rows(self.admin, self._consumers())
        context = {
            "caller": caller,
            "page": "subscriptions",
            "rows": rows,
            "done": request.query_params.get("done"),
        }
        return self._html(request, "subscriptions.html", context)

    async def _replay_action(self, request: Request, caller: Caller) -> Response:
        form = await _form(request)
        subscription = form.get("subscription", "")
        since = pages.parse_moment(form.get("since", ""), "since")
        if since is None:
            raise Refused(400, "say from when to replay (since)")
        infos = await pages.subscription_rows(self.admin, {})
        row = next((r for r in infos if r.info.name == subscription), None)
        if row is None:
            raise Refused(404, f"no subscription {subscription!r}")
        if form.get("confirm") != "yes":
            estimate = await pages.count_since(self.broker, row.info.topics, since)
            context = {
                "caller": caller,
                "page": "subscriptions",
                "row": row,
                "since": since,
                "since_text": form.get("since", ""),
                "estimate": estimate,
            }
            return self._html(request, "replay.html", context)
        try:
            delivered = await self._replay(subscription, since)
        except SubscriptionError as error:
            raise Refused(409, str(error)) from error
        logger.info(
            "console: %s replayed %d events since %s to %r",
            caller.name,
            delivered,
            since.isoformat(),
            subscription,
        )
        notice = (
            f"replayed {delivered} events since {since:%Y-%m-%d %H:%M:%S} UTC to {subscription}"
        )
        return RedirectResponse(
            f"{self._root(request)}/subscriptions?{urlencode({'done': notice})}", status_code=303
        )

    async def _dead_letters(self, request: Request, caller: Caller) -> Response:
        chosen = request.query_params.get("subscription")
        view = await pages.dead_letter_view(self.admin, chosen)
        context = {
            "caller": caller,
            "page": "dead-letters",
            "view": view,
            "done": request.query_params.get("done"),
        }
        return self._html(request, "dead_letters.html", context)

    async def _redrive(self, request: Request, caller: Caller) -> Response:
        form = await _form(request)
        subscription = form.get("subscription", "")
        ids = _form_list(request, "id")
        if form.get("all") != "yes" and not ids:
            raise Refused(400, "choose the dead letters to redrive, or redrive all")
        if self.admin is None:
            raise Refused(501, pages.NO_OPERATIONS)
        count = await pages.redrive(self.admin, subscription, None if form.get("all") else ids)
        logger.info("console: %s redrove %d dead letters of %r", caller.name, count, subscription)
        query = urlencode({"subscription": subscription, "done": f"redrove {count} dead letters"})
        return RedirectResponse(f"{self._root(request)}/dead-letters?{query}", status_code=303)

    async def _ingress(self, request: Request, caller: Caller) -> Response:
        stats = self.ingress
        context = {
            "caller": caller,
            "page": "ingress",
            "topics": stats.topics() if stats is not None else [],
            "refusals": stats.refusals() if stats is not None else [],
            "minutes": stats.minutes if stats is not None else 60,
        }
        return self._html(request, "ingress.html", context)


_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
    ),
}


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form of a ``POST`` (first value of each field), read once."""
    fields = await _form_fields(request)
    return {name: values[0] for name, values in fields.items() if values}


async def _form_fields(request: Request) -> dict[str, list[str]]:
    cached = request.scope.get("callboard.console.form")
    if cached is not None:
        fields: dict[str, list[str]] = cached
        return fields
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_LIMIT:
            raise Refused(413, f"the form is over {FORM_LIMIT} bytes")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    request.scope["callboard.console.form"] = fields
    return fields


def _form_list(request: Request, name: str) -> list[str]:
    fields: dict[str, list[str]] = request.scope.get("callboard.console.form", {})
    return [value for value in fields.get(name, []) if value]


def _local(target: str | None, root: str) -> str:
    """A page of the console to go to after logging in; never another site."""
    if target and target.startswith(root + "/") and not target.startswith("//"):
        return target
    return f"{root}/live"
