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

from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator, model_validator

from callboard.events import Event
from callboard.extensions import FunctionModule, ModuleContext, SubTopic
from callboard.ingress.types import DeliveryIdReader
from callboard.providers import generic_hmac, standard_webhooks
from callboard.providers._signatures import Algorithm, Encoding, HmacScheme, as_keys
from callboard.providers._wiring import (
    ALLOW_UNAUTHENTICATED,
    Check,
    ProviderSettings,
    ProviderSpec,
    Secrets,
    add_topic,
    header_delivery_id,
    header_route,
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


class TopicSettings(ProviderSettings):
    standard_webhooks: StandardWebhooksSettings | None = Field(
        default=None, alias="standardWebhooks"
    )
    hmac: HmacSettings | None = None
    delivery_id_header: str | None = Field(default=None, alias="deliveryIdHeader")
    sub_topic: SubTopicSettings | None = Field(default=None, alias="subTopic")
    redact_headers: tuple[str, ...] = Field(default=(), alias="redactHeaders")

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


def topic_spec(topic: str, settings: TopicSettings) -> ProviderSpec[TopicSettings, Any]:
    """The spec of one configured topic: its scheme, delivery id and routing rule."""
    base = f"events.modules.{NAME}.topics.{topic}"
    check: Check[Any] | None = None
    credentials: Callable[[TopicSettings], Any] = _no_credentials
    secret_keys = f"{base}.standardWebhooks.secret (or {base}.hmac)"
    delivery_id: DeliveryIdReader | None = None
    if settings.standard_webhooks is not None:
        check = standard_webhooks.check
        credentials = _signing_secrets
        secret_keys = f"{base}.standardWebhooks.secret"
        delivery_id = standard_webhooks.delivery_id
    elif settings.hmac is not None:
        hmac = settings.hmac
        secret_keys = f"{base}.hmac.secret"
        scheme = HmacScheme(hmac.algorithm, hmac.prefix, hmac.encoding)
        check = generic_hmac.signature(hmac.header, scheme, secret_keys).check
        credentials = _hmac_secrets
    if settings.delivery_id_header:
        delivery_id = header_delivery_id(settings.delivery_id_header.lower())
    return ProviderSpec(
        topic=topic,
        settings=TopicSettings,
        check=check,
        credentials=credentials,
        secret_keys=secret_keys,
        router_id=f"{topic}-router",
        sub_topic=_sub_topic(settings.sub_topic),
        delivery_id=delivery_id,
        redact_headers=settings.redact_headers,
        allow_key=f"{base}.{ALLOW_UNAUTHENTICATED}",
    )


def _no_credentials(settings: TopicSettings) -> None:
    return None


def _signing_secrets(settings: TopicSettings) -> standard_webhooks.SigningSecrets | None:
    scheme = settings.standard_webhooks
    if scheme is None or not scheme.secret:
        return None
    keys = tuple(standard_webhooks.decode_secret(secret) for secret in scheme.secret)
    return standard_webhooks.SigningSecrets(keys, scheme.tolerance_seconds)


def _hmac_secrets(settings: TopicSettings) -> tuple[bytes, ...] | None:
    return as_keys(settings.hmac.secret) or None if settings.hmac is not None else None


def _sub_topic(route: SubTopicSettings | None) -> SubTopic | None:
    if route is None:
        return None
    if route.header is not None:
        return header_route(route.header.lower())
    return field_sub_topic(route.field or "")


def register(context: ModuleContext) -> None:
    settings = context.settings(WebhooksSettings)
    for topic, topic_settings in settings.topics.items():
        add_topic(context, topic_spec(topic, topic_settings), topic_settings)


module = FunctionModule(NAME, register)
