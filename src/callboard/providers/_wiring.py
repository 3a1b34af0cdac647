"""The one engine every provider runs on: a provider declares its topic once, in a
``ProviderSpec``, and ``add_topic`` turns it into a secure-by-default validator, an ingress topic
and a sub-topic router.

A spec names the provider's scheme as a function, ``check(headers, raw_body, credentials)``,
and how its settings give the credentials. The provider's public ``verify`` calls that same
function, so a test of ``verify`` runs the code that checks every delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, Field

from callboard.events import Event
from callboard.extensions import ModuleContext, SubTopic
from callboard.ingress.types import DeliveryIdReader, Headers, Rejection, Validator, WebhookRequest
from callboard.providers._signatures import Failure, as_keys
from callboard.settings import Section

logger = logging.getLogger("callboard.providers")

ALLOW_UNAUTHENTICATED = "dangerouslyAllowUnauthenticatedEvents"


def _secret_list(value: Any) -> Any:
    # One secret, or a list of them while a rotation is under way; blanks mean "not set".
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list | tuple):
        return tuple(item for item in value if item != "")
    return value


#: A secret setting: one string, or a list of strings that are all accepted (rotation).
Secrets = Annotated[tuple[str, ...], BeforeValidator(_secret_list), Field(repr=False)]


class ProviderSettings(Section):
    """The setting every provider topic has: whether it runs without a secret."""

    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )


class WebhookSecretSettings(ProviderSettings):
    """A provider whose secret is ``webhookSecret`` (one string or a list, for rotation)."""

    webhook_secret: Secrets = Field(default=(), alias="webhookSecret")


def webhook_secret(settings: WebhookSecretSettings) -> tuple[bytes, ...] | None:
    """The ``webhookSecret`` values as keys; ``None`` when there is none."""
    return as_keys(settings.webhook_secret) or None


S = TypeVar("S", bound=ProviderSettings)
C = TypeVar("C")

#: A provider's scheme: ``None`` when the request is authentic under ``credentials``.
Check = Callable[[Headers, bytes, C], Failure | None]


def header_route(header: str) -> SubTopic:
    """The routing rule of a provider that names the event type in a header (lower-cased name).

    The header is kept in the event's metadata, so the router reads it there.
    """

    def sub_topic(event: Event) -> str | None:
        return event.header(header) or None

    return sub_topic


def payload_route(*fields: str) -> SubTopic:
    """The routing rule of a provider that names the event type in the payload: the first of
    ``fields`` (top-level keys of a JSON object) that holds a non-empty string or a number."""

    def sub_topic(event: Event) -> str | None:
        payload = event.payload
        for name in fields:
            value = payload_field(payload, name)
            if value is not None:
                return value
        return None

    return sub_topic


def header_delivery_id(*headers: str) -> DeliveryIdReader:
    """The delivery id is the first of ``headers`` (lower-cased names) that is set."""
    if len(headers) == 1:
        # One header, the common case, read without a loop: this runs for every request.
        (header,) = headers

        def delivery_id(request: WebhookRequest) -> str | None:
            return request.header(header) or None

        return delivery_id

    def first_set(request: WebhookRequest) -> str | None:
        for name in headers:
            value = request.header(name)
            if value:
                return value
        return None

    return first_set


@dataclass(frozen=True, slots=True)
class ProviderSpec(Generic[S, C]):
    """One provider topic, declared: its name, settings, scheme, headers and routing rule."""

    #: The ingress topic (``github``): ``POST /api/events/http/<topic>``.
    topic: str
    #: The settings model of the topic's configuration section.
    settings: type[S]
    #: The scheme, the same function the provider's ``verify`` calls; ``None``: the topic has
    #: none, so it refuses every request unless unauthenticated events are allowed.
    check: Check[C] | None
    #: The credentials ``check`` compares with, from the settings; ``None`` when none is set.
    credentials: Callable[[S], C | None]
    #: The configuration keys that hold the credentials, named when none is set.
    secret_keys: str
    #: The id of the topic's router.
    router_id: str
    #: The routing rule: the sub-topic of an event (``header_route``, ``payload_route``);
    #: ``None``: the topic is not routed.
    sub_topic: SubTopic | None = None
    #: The sender's own id of a delivery (``header_delivery_id``); ``None``: redeliveries are
    #: not recognised.
    delivery_id: DeliveryIdReader | None = None
    #: Headers that carry a secret as it is, kept out of event metadata.
    redact_headers: tuple[str, ...] = ()
    #: The key of ``dangerouslyAllowUnauthenticatedEvents``; ``None``: the module's own.
    allow_key: str | None = None

    def checked(self, settings: S) -> Validator | None:
        """The validator that runs the scheme under the credentials of ``settings``; ``None``
        when they configure none."""
        check = self.check
        credentials = self.credentials(settings)
        if check is None or credentials is None:
            return None

        async def validate(request: WebhookRequest) -> Rejection | None:
            failure = check(request.headers, request.raw_body, credentials)
            return None if failure is None else failure.rejection()

        return validate


def webhook_secret_spec(
    topic: str,
    check: Check[tuple[bytes, ...]],
    *,
    router_id: str,
    sub_topic: SubTopic,
    delivery_id: DeliveryIdReader,
) -> ProviderSpec[WebhookSecretSettings, tuple[bytes, ...]]:
    """The spec of a provider configured by ``webhookSecret`` alone (Gitea, Bitbucket)."""
    return ProviderSpec(
        topic=topic,
        settings=WebhookSecretSettings,
        check=check,
        credentials=webhook_secret,
        secret_keys=f"events.modules.{topic}.webhookSecret",
        router_id=router_id,
        sub_topic=sub_topic,
        delivery_id=delivery_id,
    )


def add_topic(context: ModuleContext, spec: ProviderSpec[S, Any], settings: S) -> None:
    """Wire one provider topic: its validator, its ingress and, with a routing rule, its router."""
    validator = secured_validator(
        context,
        spec.topic,
        spec.checked(settings),
        allow_unauthenticated=settings.dangerously_allow_unauthenticated_events,
        keys=spec.secret_keys,
        allow_key=spec.allow_key,
    )
    context.ingress.add_ingress(
        spec.topic,
        validator=validator,
        delivery_id=spec.delivery_id,
        redact_headers=spec.redact_headers,
    )
    if spec.sub_topic is not None:
        context.subscribers.add_sub_topic_router(
            id=spec.router_id, topic=spec.topic, sub_topic=spec.sub_topic
        )


@dataclass(frozen=True, slots=True)
class ProviderModule(Generic[S]):
    """The module of a provider with one topic, configured under ``events.modules.<topic>``."""

    spec: ProviderSpec[S, Any]

    @property
    def name(self) -> str:
        return self.spec.topic

    def register(self, context: ModuleContext) -> None:
        add_topic(context, self.spec, context.settings(self.spec.settings))


def not_configured(keys: str, allow_key: str) -> Failure:
    """The refusal of a topic that has no secret: it names the keys that would fix it."""
    return Failure(
        "WebhookSecretNotConfiguredError",
        f"no webhook secret is configured for this topic, so every request is refused; set "
        f"{keys}, or set {allow_key}: true to accept unauthenticated events",
    )


def secured_validator(
    context: ModuleContext,
    topic: str,
    checked: Validator | None,
    *,
    allow_unauthenticated: bool,
    keys: str,
    allow_key: str | None = None,
) -> Validator | None:
    """The validator of a provider topic, secure by default.

    ``checked`` is the spec's validator when a secret is configured, and is returned as it is.
    Without one the topic refuses every request with 403, unless unauthenticated events are
    allowed; both of these cases are logged once, here, when the module registers.
    """
    allow_key = allow_key or f"events.modules.{context.name}.{ALLOW_UNAUTHENTICATED}"
    if checked is not None:
        return checked
    if allow_unauthenticated:
        logger.warning(
            "topic %r accepts unauthenticated webhooks because %s is true; anyone who can reach "
            "the endpoint can publish on it",
            topic,
            allow_key,
        )
        return None
    logger.warning(
        "topic %r refuses every webhook with 403: no secret is configured. Webhook secrets are "
        "required by default; set %s, or set %s: true to accept unauthenticated events",
        topic,
        keys,
        allow_key,
    )
    rejection = not_configured(keys, allow_key).rejection()

    async def refuse(request: WebhookRequest) -> Rejection | None:
        return rejection

    return refuse


def payload_field(payload: Any, name: str) -> str | None:
    """A top-level string (or number) field of a JSON object payload."""
    if not isinstance(payload, dict):
        return None
    value = payload.get(name)
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
