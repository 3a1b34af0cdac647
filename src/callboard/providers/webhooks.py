"""The ``webhooks`` module: signed ingress topics from configuration alone.

Each entry under ``events.modules.webhooks.topics`` adds an ingress topic checked by Standard
Webhooks signatures or by a configurable HMAC, optionally routed to a sub-topic taken from a
header or a payload field::

    events:
      modules:
        webhooks:
          topics:
            billing:
              standardWebhooks:
                secret: whsec_...                # or a list, all accepted (rotation)
                toleranceSeconds: 300
              subTopic: {field: type}            # billing.invoice.paid
            acme:
              hmac:
                header: X-Acme-Signature
                secret: <secret>                 # or a list
                algorithm: sha256                # sha1 | sha256 | sha384 | sha512
                prefix: "sha256="
                encoding: hex                    # hex | base64
              deliveryIdHeader: X-Acme-Delivery
              subTopic: {header: X-Acme-Event}   # acme.<event>

A topic with neither refuses every request unless ``dangerouslyAllowUnauthenticatedEvents``
is true for it.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from callboard.events import Event
from callboard.extensions import FunctionModule, ModuleContext
from callboard.ingress.types import DeliveryIdReader, WebhookRequest
from callboard.providers import generic_hmac, standard_webhooks
from callboard.providers._signatures import Algorithm, Encoding, Failure, HmacScheme, as_keys
from callboard.providers._wiring import (
    ALLOW_UNAUTHENTICATED,
    Check,
    Secrets,
    SubTopic,
    add_provider,
    header_sub_topic,
    secured_validator,
)
from callboard.settings import Section
from callboard.topics import validate_topic

NAME = "webhooks"


class StandardWebhooksSettings(Section):
    secret: Secrets = ()
    tolerance_seconds: int = Field(
        default=standard_webhooks.DEFAULT_TOLERANCE, alias="toleranceSeconds", ge=1
    )

    @field_validator("secret")
    @classmethod
    def _decodable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for secret in value:
            standard_webhooks.decode_secret(secret)
        return value


class HmacSettings(Section):
    header: str = Field(min_length=1)
    secret: Secrets = ()
    algorithm: Algorithm = "sha256"
    prefix: str = ""
    encoding: Encoding = "hex"


class SubTopicSettings(Section):
    header: str | None = None
    field: str | None = None

    @model_validator(mode="after")
    def _one(self) -> SubTopicSettings:
        if (self.header is None) == (self.field is None):
            raise ValueError("set exactly one of 'header' and 'field'")
        return self


class TopicSettings(Section):
    standard_webhooks: StandardWebhooksSettings | None = Field(
        default=None, alias="standardWebhooks"
    )
    hmac: HmacSettings | None = None
    delivery_id_header: str | None = Field(default=None, alias="deliveryIdHeader")
    sub_topic: SubTopicSettings | None = Field(default=None, alias="subTopic")
    redact_headers: tuple[str, ...] = Field(default=(), alias="redactHeaders")
    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )

    @model_validator(mode="after")
    def _one_scheme(self) -> TopicSettings:
        if self.standard_webhooks is not None and self.hmac is not None:
            raise ValueError("set one of 'standardWebhooks' and 'hmac', not both")
        return self


class WebhooksSettings(Section):
    topics: dict[str, TopicSettings] = {}

    @field_validator("topics")
    @classmethod
    def _topic_names(cls, value: dict[str, TopicSettings]) -> dict[str, TopicSettings]:
        for topic in value:
            validate_topic(topic)
        return value


def field_sub_topic(path: str) -> SubTopic:
    """The sub-topic is a payload field; ``data.type`` reads a nested one."""
    parts = path.split(".")

    def sub_topic(event: Event) -> str | None:
        value: Any = event.payload
        for part in parts:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value if isinstance(value, str) and value else None

    return sub_topic


def header_delivery_id(name: str) -> DeliveryIdReader:
    def delivery_id(request: WebhookRequest) -> str | None:
        return request.header(name) or None

    return delivery_id


def _standard_check(settings: StandardWebhooksSettings) -> Check | None:
    keys = tuple(standard_webhooks.decode_secret(secret) for secret in settings.secret)
    if not keys:
        return None
    tolerance = settings.tolerance_seconds

    def check(request: WebhookRequest) -> Failure | None:
        return standard_webhooks.verify(
            request.headers, request.raw_body, keys, tolerance=tolerance
        )

    return check


def _hmac_check(settings: HmacSettings, where: str) -> Check | None:
    keys = as_keys(settings.secret)
    if not keys:
        return None
    header = settings.header.lower()
    scheme = HmacScheme(settings.algorithm, settings.prefix, settings.encoding)
    failures = generic_hmac.failures_for(settings.header, scheme, where)

    def check(request: WebhookRequest) -> Failure | None:
        return generic_hmac.verify(
            request.headers, request.raw_body, keys, header=header, scheme=scheme, failures=failures
        )

    return check


def _add_topic(context: ModuleContext, topic: str, settings: TopicSettings) -> None:
    base = f"events.modules.{NAME}.topics.{topic}"
    check: Check | None = None
    delivery_id: DeliveryIdReader | None = None
    if settings.standard_webhooks is not None:
        check = _standard_check(settings.standard_webhooks)
        delivery_id = standard_webhooks.delivery_id
        keys = f"{base}.standardWebhooks.secret"
    elif settings.hmac is not None:
        check = _hmac_check(settings.hmac, f"{base}.hmac.secret")
        keys = f"{base}.hmac.secret"
    else:
        keys = f"{base}.standardWebhooks.secret (or {base}.hmac)"
    if settings.delivery_id_header:
        delivery_id = header_delivery_id(settings.delivery_id_header.lower())
    validator = secured_validator(
        context,
        topic,
        check,
        allow_unauthenticated=settings.dangerously_allow_unauthenticated_events,
        keys=keys,
        allow_key=f"{base}.{ALLOW_UNAUTHENTICATED}",
    )
    route = settings.sub_topic
    sub_topic: SubTopic | None = None
    if route is not None:
        sub_topic = (
            header_sub_topic(route.header.lower())
            if route.header is not None
            else field_sub_topic(route.field or "")
        )
    add_provider(
        context,
        topic,
        validator=validator,
        delivery_id=delivery_id,
        sub_topic=sub_topic,
        router_id=f"{topic}-router",
        redact_headers=settings.redact_headers,
    )


def register(context: ModuleContext) -> None:
    settings = context.settings(WebhooksSettings)
    for topic, topic_settings in settings.topics.items():
        _add_topic(context, topic, topic_settings)


module = FunctionModule(NAME, register)
