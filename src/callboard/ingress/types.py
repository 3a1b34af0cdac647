"""What an HTTP ingress is made of: the request a validator sees, rejections, parsers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

Headers: TypeAlias = Mapping[str, str | list[str]]


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
    """One received webhook as validators see it."""

    topic: str
    #: Request headers under lower-cased names; repeated headers become lists.
    headers: Headers
    #: The exact bytes received, for signature checks.
    raw_body: bytes
    #: The body as its parser turned it into a payload.
    body: Any
    media_type: MediaType

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


#: Accepts a request by returning ``None``, or refuses it with a ``Rejection``.
Validator = Callable[[WebhookRequest], Awaitable[Rejection | None]]
#: Turns the raw body into the event payload; raises ``MalformedBodyError`` or
#: ``UnsupportedMediaTypeError``. Arguments: raw body, media type, topic.
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
