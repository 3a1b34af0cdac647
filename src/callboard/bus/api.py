"""The bus API: Backstage's ``/api/events/bus/v1`` routes, plus callboard's acknowledged reads.

Backstage's three routes behave as its own events backend does (status codes, batch of ten,
``202`` held open with the ``backstage-events-notify-timeout`` header, then a 1-10 ms jitter), so a
Backstage backend can use callboard as its events bus. Beside them, ``GET .../deliveries`` hands
events out under a lease that ``POST .../acks`` settles, so a reader gets every event at least
once, and ``DELETE .../subscriptions/{id}`` forgets a subscription nobody reads any more.
``docs/bus-api.md`` describes every route and JSON shape.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from callboard.brokers.base import (
    DEAD_LETTER_PREFIX,
    MAX_NAME_LENGTH,
    Broker,
    BrokerAdmin,
    SubscriptionInfo,
    name_problem,
)
from callboard.bus.access import Access
from callboard.bus.auth import Authenticator, Principal, Refusal
from callboard.bus.feeds import Batch, Feed, Feeds
from callboard.bus.listing import stored_subscriptions, subscription_infos
from callboard.bus.wire import (
    BATCH_SIZE,
    MAX_DEAD_LETTERS,
    NOTIFIED,
    NOTIFY_TIMEOUT_HEADER,
    PUBLISH_RESULT_HEADER,
    AckRequest,
    AckResult,
    PublishRequest,
    SubscriptionRequest,
    check_storable,
    event_from_wire,
    event_to_wire,
)
from callboard.errors import (
    BrokerError,
    InvalidEventError,
    InvalidTopicError,
    MalformedBodyError,
    PayloadTooLargeError,
    RequestRejected,
    ServiceClosedError,
    SubscriptionError,
    UnsupportedMediaTypeError,
)
from callboard.events import Event
from callboard.http_errors import error_body
from callboard.topics import TopicIndex, normalize_patterns, validate_topic

#: Seconds the bus trusts the subscriptions it read when an event has readers among them.
READERS_TTL = 5.0

logger = logging.getLogger("callboard.bus")

Publish = Callable[[Event], Awaitable[bool]]
Handler = Callable[[Request, Principal], Awaitable[Response]]

BODY_LIMIT = 5 * 1024 * 1024
DEFAULT_LEASE_MS = 30_000
MAX_LEASE_MS = 600_000
DEFAULT_MAX_TOPICS = 1_000

_ERROR_NAMES = {
    400: "InputError",
    401: "AuthenticationError",
    403: "NotAllowedError",
    404: "NotFoundError",
    409: "ConflictError",
    413: "PayloadTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
_JSON = "application/json; charset=utf-8"


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON, headers=headers)


def _error(
    scope: Scope, status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    body = error_body(scope, status, _ERROR_NAMES.get(status, "Error"), message)
    return Response(body, status_code=status, media_type=_JSON, headers=headers)


class _Held(Response):
    """A ``202`` whose empty body ends when the subscription has news or the timeout passes."""

    def __init__(self, feed: Feed, timeout_ms: float, released: asyncio.Event) -> None:
        super().__init__(status_code=202, headers={NOTIFY_TIMEOUT_HEADER: str(int(timeout_ms))})
        # No content-length: the empty body is sent chunked, so the client sees the response
        # end only when the hold ends (as Backstage's own bus does), not at once.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._feed = feed
        self._timeout = timeout_ms / 1000
        self._released = released

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": self.raw_headers})
        hold = asyncio.create_task(self._feed.wait(self._timeout))
        gone = asyncio.create_task(_disconnected(receive))
        stop = asyncio.create_task(self._released.wait())
        try:
            await asyncio.wait({hold, gone, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (hold, gone, stop):
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # the 202 is sent: the reader just reads again
                    logger.exception("bus subscription %r: a held read failed", self._feed.id)
        if gone.cancelled():
            # Spread competing readers a little, as Backstage does.
            await asyncio.sleep(random.uniform(0.001, 0.010))
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Batched(Response):
    """A ``200`` with Backstage's batch; the batch is acknowledged once it was sent."""

    def __init__(self, feed: Feed, batch: Batch) -> None:
        events = [event_to_wire(d.event) for d in batch.events()]
        super().__init__(orjson.dumps({"events": events}), media_type=_JSON)
        self._feed = feed
        self._batch = batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = False
        try:
            await super().__call__(scope, receive, send)
            sent = True
        finally:
            await asyncio.shield(self._feed.finish(self._batch, handled=sent))


def _bounded(raw: str, name: str, low: int, high: int) -> int:
    """A query parameter that must be an integer from ``low`` to ``high``, else a ``400``."""
    # isascii: "²".isdigit() holds, and int() refuses it.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or not (
        low <= int(raw) <= high
    ):
        raise MalformedBodyError(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def _subscription_id(request: Request) -> str:
    """The subscription id of the path, if it can name a subscription on every broker."""
    id: str = request.path_params["id"]
    problem = name_problem(id)
    if problem is not None:
        raise MalformedBodyError(f"{problem} (subscription {id[:MAX_NAME_LENGTH]!r})")
    return id


def _letter_ids(ids: list[str] | None) -> list[str] | None:
    for letter in ids or ():
        problem = name_problem(letter, "a dead letter id")
        if problem is not None:
            raise MalformedBodyError(problem)
    return ids


def _info_to_wire(info: SubscriptionInfo) -> dict[str, Any]:
    return {
        "id": info.name,
        "topics": list(info.topics),
        "inFlight": info.in_flight,
        "backlog": info.backlog,
        "lost": info.lost,
    }


class BusApp:
    """The bus routes as an ASGI application, to be mounted at ``/api/events/bus/v1``."""

    def __init__(
        self,
        broker: Broker,
        auth: Authenticator,
        *,
        publish: Publish | None = None,
        notify_timeout_ms: float = 55_000,
        batch_size: int = BATCH_SIZE,
        grace: float = 0.05,
        hold: float = 5.0,
        access: Access | None = None,
        max_topics: int = DEFAULT_MAX_TOPICS,
    ) -> None:
        self.broker = broker
        #: The operations on the broker (listing, dead letters, delivering to one group), when it
        #: offers them: without, the bus knows only the subscriptions made on this server.
        self.admin: BrokerAdmin | None = broker if isinstance(broker, BrokerAdmin) else None
        self.auth = auth
        self.access = access if access is not None else Access()
        self.max_topics = max_topics
        self.feeds = Feeds(broker, batch_size=batch_size, hold=hold)
        self.notify_timeout_ms = notify_timeout_ms
        self._publish = publish if publish is not None else broker.publish
        self._grace = grace
        self._released = asyncio.Event()
        #: The stored subscriptions by their topic patterns, kept in step with the broker's list.
        self._index: TopicIndex[str] = TopicIndex()
        #: When ``_index`` was last read from the broker (``time.monotonic``).
        self._index_read = -READERS_TTL
        sub = "/subscriptions/{id}"
        self.router = Router(
            routes=[
                Route("/events", self._guard(self._post_event), methods=["POST"]),
                Route("/subscriptions", self._guard(self._list), methods=["GET"]),
                Route(sub, self._guard(self._put_subscription), methods=["PUT"]),
                Route(sub, self._guard(self._delete_subscription), methods=["DELETE"]),
                Route(sub + "/events", self._guard(self._get_events), methods=["GET"]),
                Route(sub + "/events", self._guard(self._deliver_to), methods=["POST"]),
                Route(sub + "/deliveries", self._guard(self._get_deliveries), methods=["GET"]),
                Route(sub + "/acks", self._guard(self._ack), methods=["POST"]),
                Route(sub + "/nacks", self._guard(self._nack), methods=["POST"]),
                Route(sub + "/leases", self._guard(self._renew), methods=["POST"]),
                Route(sub + "/dead-letters", self._guard(self._dead_letters), methods=["GET"]),
                Route(sub + "/dead-letters/take", self._guard(self._take), methods=["POST"]),
            ],
            default=self._not_found,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.router(scope, receive, send)

    def release_held_reads(self) -> None:
        """End every held ``202`` now (the server is stopping); readers simply read again."""
        self._released.set()

    async def close(self) -> None:
        """Leave every subscription; events not acknowledged go back to the broker."""
        await self.feeds.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            verdict = await self.auth.check(request.headers.get("authorization"))
            if isinstance(verdict, Refusal):
                return _error(request.scope, 401, verdict.message, {"www-authenticate": "Bearer"})
            try:
                return await handler(request, verdict)
            except RequestRejected as error:
                return _error(request.scope, error.status_code, error.message)
            except (InvalidTopicError, InvalidEventError) as error:
                return _error(request.scope, 400, str(error))
            except SubscriptionError as error:
                return _error(request.scope, 409, str(error))
            except (BrokerError, ServiceClosedError) as error:
                logger.warning(
                    "bus request %s %s failed: %s", request.method, request.url.path, error
                )
                return _error(
                    request.scope,
                    503,
                    f"the broker cannot take the request now, try again later: {error}",
                    {"retry-after": "1"},
                )
            except Exception:
                logger.exception("bus request %s %s failed", request.method, request.url.path)
                return _error(
                    request.scope, 500, "the request failed; the server log has the details"
                )

        return endpoint

    async def _not_found(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = _error(scope, 404, f"no bus route {scope['method']} {scope['path']}")
            await response(scope, receive, send)

    async def _body(self, request: Request) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > BODY_LIMIT:
            raise PayloadTooLargeError(f"the body is over the limit of {BODY_LIMIT} bytes")
        media = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if media and media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaTypeError(f"send application/json, not {media}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > BODY_LIMIT:
                raise PayloadTooLargeError(f"the body is over the limit of {BODY_LIMIT} bytes")
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks) or b"null")
        except orjson.JSONDecodeError:
            raise MalformedBodyError("the body is not valid JSON") from None

    async def _feed(self, request: Request, principal: Principal) -> Feed:
        """The feed of the path's subscription, once ``principal`` may read it."""
        id = _subscription_id(request)
        feed = self.feeds.local_feed(id)
        if feed is None:
            info = await self._stored(id)
            if info is None:
                raise RequestRejected(f"Subscription with ID '{id}' not found", status_code=404)
            # Checked before a consumer joins: joining would take events from their owner.
            self.access.check(principal, id, info.owner)
            claim = principal.created_by if info.owner is None else info.owner
            feed = await self.feeds.find(id, tuple(info.topics), claim)
            if feed is None:
                raise RequestRejected(f"Subscription with ID '{id}' not found", status_code=404)
        self.access.check(principal, id, feed.owner)
        return feed

    async def _stored(self, id: str) -> SubscriptionInfo | None:
        """The broker's ``SubscriptionInfo`` of ``id``, or ``None`` (none, or no list)."""
        infos = await subscription_infos(self.admin)
        return next((info for info in infos or () if info.name == id), None)

    def _operations(self) -> BrokerAdmin:
        """The broker's operations, or a ``501`` when it offers none."""
        if self.admin is None:
            raise RequestRejected(
                f"the broker {type(self.broker).__name__} keeps no dead letters and cannot "
                "deliver to one subscription (it does not implement BrokerAdmin)",
                status_code=501,
            )
        return self.admin

    async def _check(self, request: Request, principal: Principal) -> str:
        """The path's subscription id, once it exists and ``principal`` may use it."""
        id = _subscription_id(request)
        feed = self.feeds.local_feed(id)
        if feed is not None:
            owner = feed.owner
        else:
            info = await self._stored(id)
            if info is None:
                raise RequestRejected(f"Subscription with ID '{id}' not found", status_code=404)
            owner = info.owner
        self.access.check(principal, id, owner)
        return id

    async def _has_readers(self, topic: str, notified: set[str]) -> bool:
        """Whether a stored subscription not already notified reads ``topic``.

        A reader found in the index read less than ``READERS_TTL`` ago is trusted (the worst a
        stale one does is store an event a deleted subscription would have read); no reader
        there is checked against the broker before the event is skipped, so an event is never
        skipped for a subscription that another process just made.
        """
        if self.admin is None:
            return True
        now = time.monotonic()
        if now - self._index_read < READERS_TTL and self._index(topic) - notified:
            return True
        stored = await stored_subscriptions(self.admin)
        if stored is None:
            return True
        if self._index.entries != stored:
            self._index.update(stored)  # changed where they changed
        self._index_read = now
        return bool(self._index(topic) - notified)

    # -- Backstage's routes --------------------------------------------------------------------

    async def _post_event(self, request: Request, principal: Principal) -> Response:
        published = PublishRequest.from_wire(await self._body(request))
        event, notified = published.event, set(published.notified)
        validate_topic(event.topic)
        check_storable(event)
        dead_letter = event.topic.startswith(DEAD_LETTER_PREFIX)
        if event.topic.startswith("$") and not dead_letter:
            raise InvalidTopicError(event.topic, "topics starting with '$' are callboard's own")
        if not dead_letter and not await self._has_readers(event.topic, notified):
            logger.debug("skipped an event on %r: no subscription left to notify", event.topic)
            return Response(status_code=204, headers={PUBLISH_RESULT_HEADER: "no-readers"})
        if notified:
            event = replace(event, metadata={**event.metadata, NOTIFIED: sorted(notified)})
            check_storable(event)
        # A remote worker's dead letter is stored as the broker keeps dead letters; the events
        # service refuses reserved topics from applications.
        publish = self.broker.publish if dead_letter else self._publish
        if not await publish(event):
            return Response(status_code=204, headers={PUBLISH_RESULT_HEADER: "duplicate"})
        logger.debug("published event %s to %r for %s", event.id, event.topic, principal.created_by)
        return _json({"id": event.id}, 201)

    async def _put_subscription(self, request: Request, principal: Principal) -> Response:
        id = _subscription_id(request)
        wanted = SubscriptionRequest.from_wire(await self._body(request))
        if len(set(wanted.topics)) > self.max_topics:
            raise MalformedBodyError(
                f"subscription {id!r} asks for {len(set(wanted.topics))} topics, over the "
                f"limit of {self.max_topics} (events.bus.maxTopicsPerSubscription)"
            )
        topics = normalize_patterns(wanted.topics)
        if any(topic.startswith("$") for topic in topics):
            raise InvalidTopicError(topics[0], "topics starting with '$' are callboard's own")
        local = self.feeds.local_feed(id)
        info = None if local is not None else await self._stored(id)
        owner = local.owner if local is not None else info.owner if info is not None else None
        self.access.check(principal, id, owner)
        claim = principal.created_by if owner is None else owner
        created = await self.feeds.upsert(id, topics, wanted.start, claim)
        if owner is None:
            await self._confirm_claim(id, principal, claim)
        logger.info(
            "%s subscription %r to %s for %s",
            "created" if created else "updated",
            id,
            list(topics),
            principal.created_by,
        )
        return _json({"id": id, "topics": list(topics)}, 201)

    async def _confirm_claim(self, id: str, principal: Principal, claim: str) -> None:
        """After claiming ``id``: another caller may have claimed it first, elsewhere."""
        info = await self._stored(id)
        feed = self.feeds.local_feed(id)
        if info is None or info.owner in (None, claim) or feed is None:
            return
        feed.owner = info.owner
        if not self.access.may(principal, id, info.owner):
            await self.feeds.leave(id)
            self.access.check(principal, id, info.owner)

    async def _get_events(self, request: Request, principal: Principal) -> Response:
        feed = await self._feed(request, principal)
        batch = await feed.take(self._grace)
        if batch is None:
            return _Held(feed, self.notify_timeout_ms, self._released)
        return _Batched(feed, batch)

    # -- callboard's routes --------------------------------------------------------------------

    async def _get_deliveries(self, request: Request, principal: Principal) -> Response:
        raw = request.query_params.get("leaseMs", str(DEFAULT_LEASE_MS))
        lease_ms = _bounded(raw, "leaseMs", 1, MAX_LEASE_MS)
        raw_max = request.query_params.get("max")
        # More than a batch is read as a batch: a reader asks for what it can take.
        limit = None if raw_max is None else _bounded(raw_max, "max", 1, 1_000_000)
        feed = await self._feed(request, principal)
        batch = await feed.take(self._grace, limit)
        if batch is None:
            return _Held(feed, self.notify_timeout_ms, self._released)
        if await request.is_disconnected():
            # The reader left during the grace: give the batch back now, not when a lease ends.
            await feed.finish(batch, handled=False)
            return Response(status_code=204)
        deliveries = feed.lease(batch, lease_ms / 1000)
        return _json({"deliveries": [d.to_wire() for d in deliveries], "leaseMs": lease_ms})

    async def _settle(self, request: Request, principal: Principal, kind: str) -> Response:
        asked = AckRequest.from_wire(await self._body(request))
        id = _subscription_id(request)
        feed = self.feeds.local_feed(id)
        if feed is None:  # not held here (another server, or before a restart)
            return _json(AckResult((), asked.ack_ids).to_wire())
        self.access.check(principal, id, feed.owner)
        if kind == "ack":
            done, unknown = await feed.ack(asked.ack_ids)
        elif kind == "nack":
            done, unknown = await feed.nack(asked.ack_ids)
        else:
            if asked.lease_ms is None or asked.lease_ms > MAX_LEASE_MS:
                raise MalformedBodyError(f"leaseMs from 1 to {MAX_LEASE_MS} is required")
            done, unknown = feed.renew(asked.ack_ids, asked.lease_ms / 1000)
        return _json(AckResult(tuple(done), tuple(unknown)).to_wire())

    async def _ack(self, request: Request, principal: Principal) -> Response:
        return await self._settle(request, principal, "ack")

    async def _nack(self, request: Request, principal: Principal) -> Response:
        return await self._settle(request, principal, "nack")

    async def _renew(self, request: Request, principal: Principal) -> Response:
        return await self._settle(request, principal, "renew")

    async def _deliver_to(self, request: Request, principal: Principal) -> Response:
        id = await self._check(request, principal)
        body = await self._body(request)
        event = check_storable(
            event_from_wire(body.get("event") if isinstance(body, dict) else None)
        )
        try:
            await self._operations().deliver_to(id, event)
        except SubscriptionError as error:
            raise RequestRejected(str(error), status_code=404) from error
        return _json({"id": event.id}, 201)

    async def _list(self, request: Request, principal: Principal) -> Response:
        infos = await subscription_infos(self.admin)
        may = self.access.may
        if infos is None:
            items = [
                {"id": id, "topics": list(t)}
                for id, t in self.feeds.local().items()
                if may(principal, id, self.feeds.owner(id))
            ]
        else:
            items = [_info_to_wire(i) for i in infos if may(principal, i.name, i.owner)]
        return _json({"subscriptions": items})

    async def _delete_subscription(self, request: Request, principal: Principal) -> Response:
        """Forget a subscription for good: its position, leases and dead letters.

        A ``SubscriptionError`` (the server's own subscribers still read it) becomes the
        ``409`` of ``_guard``.
        """
        id = await self._check(request, principal)
        if not await self.feeds.delete(id):
            raise RequestRejected(f"Subscription with ID '{id}' not found", status_code=404)
        logger.info("deleted subscription %r for %s", id, principal.created_by)
        return Response(status_code=204)

    async def _dead_letters(self, request: Request, principal: Principal) -> Response:
        limit = _bounded(request.query_params.get("limit", "100"), "limit", 1, MAX_DEAD_LETTERS)
        ids = _letter_ids(request.query_params.getlist("id") or None)
        id = await self._check(request, principal)
        letters = await self._operations().take_dead_letters(id, ids=ids, limit=limit)
        return _json({"deadLetters": [event_to_wire(e) for e in letters]})

    async def _take(self, request: Request, principal: Principal) -> Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise MalformedBodyError("the body must be a JSON object")
        ids, limit, remove = body.get("ids"), body.get("limit", 100), body.get("remove", False)
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise MalformedBodyError("ids must be a list of strings")
        if not isinstance(remove, bool):
            raise MalformedBodyError("remove must be a boolean")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not 1 <= limit <= MAX_DEAD_LETTERS
        ):
            raise MalformedBodyError(f"limit must be an integer from 1 to {MAX_DEAD_LETTERS}")
        id = await self._check(request, principal)
        letters = await self._operations().take_dead_letters(
            id, ids=_letter_ids(ids), remove=remove, limit=limit
        )
        return _json({"deadLetters": [event_to_wire(e) for e in letters]})
