"""What an HTTP ingress is made of: the request a validator sees, rejections, parsers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

Headers: TypeAlias = Mapping[str, str | list[str]]

_UNPARSED: Any = object()


@dataclass(frozen=True, slots=True)
class MediaType:
    """A parsed ``Content-Type``: ``application/json; charset=utf-8``."""

    type: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def charset(self) -> str | None:
        return self.params.get("charset")

    @classmethod
    def parse(cls, value: str) -> MediaType:
        kind, _, rest = value.partition(";")
        params: dict[str, str] = {}
        if rest:
            for item in rest.split(";"):
                key, sep, raw = item.partition("=")
                if sep:
                    params[key.strip().lower()] = raw.strip().strip('"')
        return cls(kind.strip().lower(), params)


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """One received webhook as validators see it.

    A validator runs before the body is parsed: a signature is checked over ``raw_body``, so a
    request that is not authentic is refused with the validator's answer whatever its body
    holds, and nothing an unauthenticated sender wrote reaches a parser. ``body`` parses the raw
    bytes on first use and keeps the result; the ingress publishes that same payload once the
    validator accepted.
    """

    topic: str
    #: Request headers under lower-cased names; repeated headers become lists.
    headers: Headers
    #: The exact bytes received, for signature checks.
    raw_body: bytes
    #: The ``Content-Type`` as sent; ``MediaType("")`` when there is no single one.
    media_type: MediaType
    #: The topic's parser for the media type, which ``body`` calls.
    parser: BodyParser = field(repr=False, compare=False)
    _body: Any = field(default=_UNPARSED, init=False, repr=False, compare=False)

    @property
    def body(self) -> Any:
        """The body as its parser turns it into a payload, parsed on first use.

        Raises what the parser raises (``MalformedBodyError`` for 400,
        ``UnsupportedMediaTypeError`` for 415, ``InvalidEventError`` for 400), which the
        ingress answers as it does for a topic without a validator.
        """
        body = self._body
        if body is _UNPARSED:
            body = self.parser(self.raw_body, self.media_type, self.topic)
            # Frozen for callers; the cache is the one field set after construction.
            object.__setattr__(self, "_body", body)
        return body

    def header(self, name: str) -> str | None:
        """The first value of a header, or ``None``."""
        value = self.headers.get(name)
        if isinstance(value, list):
            return value[0] if value else None
        return value


@dataclass(frozen=True, slots=True)
class Rejection:
    """A validator's refusal: the status and JSON body to answer with."""

    status: int = 403
    body: Any = field(default_factory=dict)


#: Accepts a request by returning ``None``, or refuses it with a ``Rejection``. It runs before
#: the body is parsed: check ``raw_body``; read ``body`` only when the decision needs it.
Validator = Callable[[WebhookRequest], Awaitable[Rejection | None]]
#: Turns the raw body into the event payload; raises ``MalformedBodyError`` (400),
#: ``UnsupportedMediaTypeError`` (415) or ``InvalidEventError`` (400, a payload no broker can
#: keep). Arguments: raw body, media type, topic. Called only once the topic's validator
#: accepted the request (or when the validator itself reads ``WebhookRequest.body``).
BodyParser = Callable[[bytes, MediaType, str], Any]
#: The sender's own id of a delivery, to recognise redeliveries.
DeliveryIdReader = Callable[[WebhookRequest], str | None]


@dataclass(frozen=True, slots=True)
class Ingress:
    """An HTTP ingress topic: ``POST /api/events/http/{topic}``."""

    topic: str
    validator: Validator | None = None
    delivery_id: DeliveryIdReader | None = None
    #: Headers never copied into event metadata (shared secrets sent as headers).
    redact_headers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class IngressOutcome:
    """How the ingress answered one request, accepted or refused, for ``IngressObserver``.

    It never holds a header value other than the delivery id, nor any part of the body: no
    secret or signature reaches an observer.
    """

    #: The ingress topic; ``"<unknown>"`` for a path that names no configured topic (``reason``
    #: then names the path asked for).
    topic: str
    #: The HTTP status answered: ``202`` when accepted.
    status: int
    #: Why the request was refused (the message of the answer); ``None`` when accepted.
    reason: str | None
    #: The sender's own id of the delivery (e.g. ``X-GitHub-Delivery``), when its topic reads
    #: one and the request carried it.
    delivery_id: str | None
    #: When the answer was sent, in seconds since the epoch (``time.time()``).
    at: float


class IngressObserver(Protocol):
    """Told of every request the HTTP ingress answered, once its answer is sent.

    Called on the event loop of the request, so it must be quick and must not block: keep or
    count what it needs, and leave any slow work to a task of its own. An observer that raises
    is logged and does not change the answer.

    An observer with a true ``refusals_only`` attribute is told of refused requests only, and
    the accepted path then builds no outcome for it.
    """

    def request(self, outcome: IngressOutcome) -> None: ...
