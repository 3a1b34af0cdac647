"""The webhook ingress as a raw ASGI application: ``POST /{topic}`` under its mount point.

Per request: look up the topic, check the method and size, read the body (refusing it as soon
as it passes the limit), let the topic's validator accept or reject the raw request, parse the
body by media type, publish the event and answer ``202`` once the broker has accepted it.

Verifying comes before parsing: an unauthenticated request is answered with the validator's
refusal (``403``) whatever its body or media type, and no parser ever reads what such a sender
wrote. Input that can never be stored is ``400`` (``InvalidEventError``), never ``503``: a
``503`` tells the sender to try again, which only helps when the store is unavailable.

A CloudEvent (binary mode: a ``ce-specversion`` header on a body that is no event format;
structured mode: ``application/cloudevents+json``, or ``application/cloudevents-batch+json`` for
several, whatever ``ce-*`` headers come with it) is read
by ``callboard.cloud_events`` once the validator accepted it: its data becomes the payload, its
attributes ``ce-*`` metadata and its source and id the delivery id. A request that is no
CloudEvent pays one header lookup and one media-type lookup for this.

Every refusal is JSON in one shape,
``{"error": {"name", "message"}, "request": {...}, "response": {"statusCode"}}``.

Observers (``IngressObserver``) are told of every answer once it is sent: the topic, status,
reason and delivery id, never a header's or the body's content. Without observers nothing is
built for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import orjson
from starlette.types import Message, Receive, Scope, Send

from callboard.cloud_events import DATA_BASE64, MEDIA_TYPES, binary_mode, read_http
from callboard.errors import (
    BrokerError,
    InvalidEventError,
    PayloadTooLargeError,
    RequestRejected,
    ServiceClosedError,
    UnsupportedMediaTypeError,
)
from callboard.events import DELIVERY_ID, Event
from callboard.http_errors import error_body
from callboard.ingress.parsers import CLOUD_EVENT_PARSERS, DEFAULT_PARSERS, parse_cloud_data
from callboard.ingress.types import (
    BodyParser,
    Headers,
    Ingress,
    IngressObserver,
    IngressOutcome,
    MediaType,
    Rejection,
    WebhookRequest,
)
from callboard.metrics import Metrics
from callboard.spans import Tracer

logger = logging.getLogger("callboard.ingress")

Publish = Callable[[Event], Awaitable[bool]]

CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
DEFAULT_BODY_LIMIT = 5 * 1024 * 1024
#: What the headers copied into an event's metadata may add up to (names and values).
DEFAULT_METADATA_LIMIT = 16 * 1024

_ACCEPTED = b'{"status":"accepted"}'
_CONTENT_TYPE = (b"content-type", b"application/json")
_ACCEPTED_HEADERS = [_CONTENT_TYPE, (b"content-length", str(len(_ACCEPTED)).encode())]
_UNKNOWN_TOPIC = "<unknown>"


class IngressApp:
    """ASGI app serving ``POST /{topic}`` for each registered ingress."""

    def __init__(
        self,
        publish: Publish,
        ingresses: Iterable[Ingress],
        *,
        parsers: Mapping[str, BodyParser] | None = None,
        body_limit: int = DEFAULT_BODY_LIMIT,
        max_metadata_bytes: int = DEFAULT_METADATA_LIMIT,
        keep_credentials: bool = False,
        detect_redeliveries: bool = True,
        metrics: Metrics | None = None,
        observers: Sequence[IngressObserver] = (),
    ) -> None:
        self._publish = publish
        self.ingresses = {ingress.topic: ingress for ingress in ingresses}
        self.parsers = {**DEFAULT_PARSERS, **CLOUD_EVENT_PARSERS, **(parsers or {})}
        self.body_limit = body_limit
        self.max_metadata_bytes = max_metadata_bytes
        self._keep_credentials = keep_credentials
        self._detect_redeliveries = detect_redeliveries
        self._metrics = metrics if metrics is not None else Metrics()
        self._media_types: dict[str, MediaType] = {}
        #: Told of every answer; empty: no outcome is built at all.
        self._observers: tuple[IngressObserver, ...] = ()
        #: Those told of accepted requests too (not ``refusals_only``).
        self._accepted_observers: tuple[IngressObserver, ...] = ()
        for observer in observers:
            self.add_observer(observer)
        self._redacted = {
            topic: ingress.redact_headers
            | (frozenset() if keep_credentials else CREDENTIAL_HEADERS)
            for topic, ingress in self.ingresses.items()
        }

    def add_observer(self, observer: IngressObserver) -> None:
        """Tell ``observer`` of every request answered from now on (of refusals only when it
        has a true ``refusals_only`` attribute)."""
        self._observers = (*self._observers, observer)
        if not getattr(observer, "refusals_only", False):
            self._accepted_observers = (*self._accepted_observers, observer)

    @property
    def observers(self) -> tuple[IngressObserver, ...]:
        return self._observers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        topic = path[1:] if path.startswith("/") else path
        ingress = self.ingresses.get(topic)
        if ingress is None:
            await self._error(
                scope,
                send,
                _UNKNOWN_TOPIC,
                404,
                "NotFoundError",
                f"no HTTP ingress for topic {topic!r}; add it to events.http.topics",
            )
            return
        if scope["method"] != "POST":
            await self._error(
                scope,
                send,
                topic,
                405,
                "MethodNotAllowedError",
                f"{scope['method']} is not allowed; webhooks are delivered with POST",
                extra_headers=[(b"allow", b"POST")],
            )
            return
        try:
            await self._accept(scope, receive, send, ingress)
        except RequestRejected as error:
            await self._error(
                scope, send, topic, error.status_code, type(error).__name__, error.message
            )
        except InvalidEventError as error:
            await self._error(scope, send, topic, 400, "InvalidEventError", error.message)
        except (BrokerError, ServiceClosedError) as error:
            logger.warning("ingress %r could not publish: %s", topic, error)
            await self._error(
                scope,
                send,
                topic,
                503,
                "ServiceUnavailableError",
                f"the event could not be stored, try again later: {error}",
                extra_headers=[(b"retry-after", b"1")],
            )
        except Exception:
            logger.exception("ingress %r failed on a request", topic)
            await self._error(
                scope,
                send,
                topic,
                500,
                "InternalServerError",
                "the request could not be handled; the server log has the details",
            )

    async def _accept(self, scope: Scope, receive: Receive, send: Send, ingress: Ingress) -> None:
        topic = ingress.topic
        headers, header_bytes = _request_headers(scope)
        length = headers.get("content-length")
        if isinstance(length, str) and length.isdigit() and int(length) > self.body_limit:
            raise PayloadTooLargeError(self._too_large(int(length)))
        raw = await self._read_body(receive)

        content_type = headers.get("content-type")
        media_type, parser = self._parser_for(content_type)
        binary = binary_mode(headers, media_type.type)  # a CloudEvent in binary mode
        if binary and not isinstance(content_type, list):
            parser = parse_cloud_data
        request = WebhookRequest(topic, headers, raw, media_type, parser)
        if ingress.validator is not None:
            rejection = await ingress.validator(request)
            if rejection is not None:
                await self._reject(scope, send, ingress, request, rejection)
                return
        payload = request.body  # parsed now, or already by a validator that read it
        redacted = self._redacted[topic]
        if header_bytes <= self.max_metadata_bytes:
            metadata = {k: v for k, v in headers.items() if k not in redacted}
        else:
            metadata = self._bounded_metadata(topic, headers, redacted)
        if binary or media_type.type in MEDIA_TYPES:
            await self._accept_cloud_events(send, ingress, request, metadata)
            return
        delivery_id = None
        if ingress.delivery_id is not None and self._detect_redeliveries:
            delivery_id = ingress.delivery_id(request)
            if delivery_id:
                metadata[DELIVERY_ID] = delivery_id
        await self._publish(Event.from_owned(topic, payload, metadata))
        self._metrics.count_ingress(topic, 202)
        await send({"type": "http.response.start", "status": 202, "headers": _ACCEPTED_HEADERS})
        await send({"type": "http.response.body", "body": _ACCEPTED})
        if self._accepted_observers:
            if delivery_id is None and ingress.delivery_id is not None:
                delivery_id = ingress.delivery_id(request)
            outcome = IngressOutcome(topic, 202, None, delivery_id or None, time.time())
            self._tell(outcome, self._accepted_observers)

    async def _accept_cloud_events(
        self, send: Send, ingress: Ingress, request: WebhookRequest, metadata: dict[str, Any]
    ) -> None:
        """Publish the CloudEvents of a request, each as an event of the topic with its
        attributes in the metadata, and answer ``202`` once the broker accepted them all.

        The ``ce-*`` headers as sent are left out of the metadata: in binary mode the attributes
        replace them decoded, and structured mode ignores them, as the specification says. A
        batch is published in its order; should one fail, the sender's retry of the whole batch
        is recognised as redelivery for those already stored (by their source and id).
        """
        topic = ingress.topic
        received = read_http(request.headers, request.body)
        common = {
            name: value
            for name, value in metadata.items()
            if not name.startswith("ce-") and name != DATA_BASE64
        }
        for cloud in received:
            size = sum(len(name) + len(value) for name, value in cloud.metadata.items())
            if size > self.max_metadata_bytes:
                raise InvalidEventError(
                    f"the attributes of the CloudEvent {cloud.delivery_id[:200]} add up to {size} "
                    f"bytes, over the limit of {self.max_metadata_bytes} bytes "
                    "(events.http.maxMetadataBytes)"
                )
        for cloud in received:
            kept = {**common, **cloud.metadata}
            if self._detect_redeliveries:
                kept[DELIVERY_ID] = cloud.delivery_id
            await self._publish(Event.from_owned(topic, cloud.payload, kept))
        self._metrics.count_ingress(topic, 202)
        await send({"type": "http.response.start", "status": 202, "headers": _ACCEPTED_HEADERS})
        await send({"type": "http.response.body", "body": _ACCEPTED})
        if self._accepted_observers:
            delivery_id = received[0].delivery_id if len(received) == 1 else None
            outcome = IngressOutcome(topic, 202, None, delivery_id, time.time())
            self._tell(outcome, self._accepted_observers)

    def _bounded_metadata(
        self, topic: str, headers: Mapping[str, str | list[str]], redacted: frozenset[str]
    ) -> dict[str, str | list[str]]:
        """The metadata headers that fit in ``max_metadata_bytes``, in the order received.

        A header that does not fit is left out of the metadata (validators saw it); the drop is
        logged with the header names, never their values.
        """
        budget = self.max_metadata_bytes
        metadata: dict[str, str | list[str]] = {}
        dropped: list[str] = []
        for name, value in headers.items():
            if name in redacted:
                continue
            size = len(name) + (len(value) if isinstance(value, str) else sum(map(len, value)))
            if size > budget:
                dropped.append(name)
                continue
            budget -= size
            metadata[name] = value
        if dropped:
            logger.warning(
                "ingress %r left %d header(s) out of an event's metadata, over the %d bytes of "
                "events.http.maxMetadataBytes: %s",
                topic,
                len(dropped),
                self.max_metadata_bytes,
                ", ".join(repr(name[:64]) for name in dropped[:10]),
            )
        return metadata

    def _parser_for(self, content_type: str | list[str] | None) -> tuple[MediaType, BodyParser]:
        """The media type of the request and its parser.

        Nothing is refused here: the validator decides first. Without a parser for the media
        type, the parser returned refuses the body with 415 when it is read.
        """
        if isinstance(content_type, list):
            return _NO_MEDIA_TYPE, _refusing(
                f"the request has {len(content_type)} Content-Type headers; send exactly one"
            )
        if not content_type or not content_type.strip():
            return _NO_MEDIA_TYPE, _refusing(
                "the request has no Content-Type header; send application/json or "
                "application/x-www-form-urlencoded, or add a body parser for your media type "
                "in a module (context.ingress.add_body_parser)"
            )
        media_type = self._media_types.get(content_type)
        if media_type is None:
            media_type = MediaType.parse(content_type)
            if len(self._media_types) < 256:  # senders use a handful of spellings
                self._media_types[content_type] = media_type
        parser = self.parsers.get(media_type.type)
        if parser is None:
            return media_type, _refusing(
                f"Unsupported media type: {media_type.type[:100]}. Add a body parser for it in "
                "a module (context.ingress.add_body_parser), or send one of: "
                + ", ".join(sorted(self.parsers))
            )
        return media_type, parser

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.body_limit
        message = await receive()
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise PayloadTooLargeError(self._too_large(len(body)))
            return body
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejected("the client disconnected before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(self._too_large(size, partial=True))
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int, *, partial: bool = False) -> str:
        told = "more than " if partial else ""
        return (
            f"the body is {told}{size} bytes, over the limit of {self.body_limit} bytes "
            "(events.http.bodyLimit)"
        )

    async def _reject(
        self,
        scope: Scope,
        send: Send,
        ingress: Ingress,
        request: WebhookRequest,
        rejection: Rejection,
    ) -> None:
        topic = ingress.topic
        self._metrics.count_ingress(topic, rejection.status)
        body = rejection.body
        if isinstance(body, dict) and "error" in body and "request" not in body:
            # A validator that answers in callboard's error shape gets the request part too.
            body = {**body, "request": {"method": scope["method"], "url": scope["path"]}}
        await _send_json(send, rejection.status, orjson.dumps(body))
        if self._observers:
            delivery_id = _refused_delivery_id(ingress, request)
            reason = _reason(rejection.body)
            self._tell(IngressOutcome(topic, rejection.status, reason, delivery_id, time.time()))

    async def _error(
        self,
        scope: Scope,
        send: Send,
        topic: str,
        status: int,
        name: str,
        message: str,
        *,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self._metrics.count_ingress(topic, status)
        body = error_body(scope, status, name, message)
        await _send_json(send, status, body, extra_headers)
        if self._observers:
            ingress = self.ingresses.get(topic)
            delivery_id = None
            if ingress is not None and ingress.delivery_id is not None:
                delivery_id = _header_delivery_id(ingress, _headers_of(scope))
            self._tell(IngressOutcome(topic, status, message, delivery_id, time.time()))

    def _tell(
        self, outcome: IngressOutcome, observers: tuple[IngressObserver, ...] | None = None
    ) -> None:
        for observer in self._observers if observers is None else observers:
            try:
                observer.request(outcome)
            except Exception:
                logger.exception("an ingress observer failed on a request to %r", outcome.topic)


class TracedIngressApp(IngressApp):
    """The ingress with a span around every request (``backend.tracing``).

    A class of its own, so the ingress without tracing pays nothing for it. The span is the
    current one while the request is handled: the publish span is its child.
    """

    def __init__(self, publish: Publish, ingresses: Iterable[Ingress], **options: Any) -> None:
        self._tracer: Tracer = options.pop("tracer")
        super().__init__(publish, ingresses, **options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        root: str = scope.get("root_path", "")
        path: str = scope["path"]
        topic = path[len(root) :] if root and path.startswith(root) else path
        topic = topic[1:] if topic.startswith("/") else topic
        route = f"{root}/{topic if topic in self.ingresses else '{topic}'}"
        with self._tracer.request(scope["method"], route, scope["headers"]) as answered:

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    answered(message["status"])
                await send(message)

            await super().__call__(scope, receive, sending)


_NO_MEDIA_TYPE = MediaType("")


def _no_body(raw: bytes, media_type: MediaType, topic: str) -> NoReturn:
    raise UnsupportedMediaTypeError("the body of a refused request is not read")


def _refused_delivery_id(ingress: Ingress, request: WebhookRequest) -> str | None:
    """The delivery id of a refused request, read without parsing what its sender wrote."""
    reader = ingress.delivery_id
    if reader is None:
        return None
    unparsed = WebhookRequest(
        request.topic, request.headers, request.raw_body, request.media_type, _no_body
    )
    try:
        return reader(unparsed) or None
    except Exception:  # a reader that needs the body: the request was refused before that
        return None


def _header_delivery_id(ingress: Ingress, headers: Headers) -> str | None:
    """The delivery id of a request refused before its body was kept, when its topic reads the
    id from a header: a reader that derives it from the body gives none here."""
    probes = (
        _refused_delivery_id(
            ingress, WebhookRequest(ingress.topic, headers, raw, _NO_MEDIA_TYPE, _no_body)
        )
        for raw in (b"", b"-")
    )
    first = next(probes)
    return first if first == next(probes) else None


def _request_headers(scope: Scope) -> tuple[dict[str, str | list[str]], int]:
    """The request headers under lower-cased names (a repeated one as a list), and the bytes
    they add up to."""
    headers: dict[str, str | list[str]] = {}
    header_bytes = 0
    for raw_name, raw_value in scope["headers"]:
        header_bytes += len(raw_name) + len(raw_value)
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        known = headers.get(name)
        if known is None:
            headers[name] = value
        elif isinstance(known, list):
            known.append(value)
        else:
            headers[name] = [known, value]
    return headers, header_bytes


def _headers_of(scope: Scope) -> Headers:
    """The first value of each request header, for reading a delivery id."""
    headers: dict[str, str | list[str]] = {}
    for raw_name, raw_value in scope["headers"]:
        headers.setdefault(raw_name.decode("latin-1").lower(), raw_value.decode("latin-1"))
    return headers


def _reason(body: Any) -> str:
    """The message of a validator's refusal, from callboard's error shape when it has it."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return "refused by the topic's validator"


def _refusing(message: str) -> BodyParser:
    """A parser that refuses every body with 415 and ``message``."""

    def refuse(raw: bytes, media_type: MediaType, topic: str) -> NoReturn:
        raise UnsupportedMediaTypeError(message)

    return refuse


async def _send_json(
    send: Send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [_CONTENT_TYPE, (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
