"""What the provider modules share when they plug into callboard: secret settings, the
secure-by-default validator, and sub-topic routing."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from callboard.errors import InvalidTopicError
from callboard.events import Event
from callboard.extensions import ModuleContext
from callboard.ingress.types import DeliveryIdReader, Rejection, Validator, WebhookRequest
from callboard.providers._signatures import Failure
from callboard.topics import join

logger = logging.getLogger("callboard.providers")

ALLOW_UNAUTHENTICATED = "dangerouslyAllowUnauthenticatedEvents"
_MAX_CACHED_TOPICS = 1024


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

Check = Callable[[WebhookRequest], Failure | None]
SubTopic = Callable[[Event], str | None]


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
    check: Check | None,
    *,
    allow_unauthenticated: bool,
    keys: str,
    allow_key: str | None = None,
) -> Validator | None:
    """The validator of a provider topic, secure by default.

    With a ``check`` (a secret is configured) every request must pass it. Without one the
    topic refuses every request with 403, unless unauthenticated events are allowed; both of
    these cases are logged once, here, when the module registers.
    """
    allow_key = allow_key or f"events.modules.{context.name}.{ALLOW_UNAUTHENTICATED}"
    if check is not None:
        return _validator(check)
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


def _validator(check: Check) -> Validator:
    async def validate(request: WebhookRequest) -> Rejection | None:
        failure = check(request)
        return None if failure is None else failure.rejection()

    return validate


def add_provider(
    context: ModuleContext,
    topic: str,
    *,
    validator: Validator | None,
    delivery_id: DeliveryIdReader | None,
    sub_topic: SubTopic | None,
    router_id: str,
    redact_headers: tuple[str, ...] = (),
) -> None:
    """Add the provider's ingress topic and, given ``sub_topic``, its router."""
    context.ingress.add_ingress(
        topic, validator=validator, delivery_id=delivery_id, redact_headers=redact_headers
    )
    if sub_topic is not None:
        context.subscribers.add_router(
            id=router_id, topics=topic, destination=sub_topic_destination(router_id, sub_topic)
        )


def sub_topic_destination(router_id: str, sub_topic: SubTopic) -> Callable[[Event], str | None]:
    """Route ``<topic>`` to ``<topic>.<sub_topic(event)>``; drop events with no sub-topic."""
    known: dict[tuple[str, str], str] = {}

    def destination(event: Event) -> str | None:
        sub = sub_topic(event)
        if not sub:
            return None
        key = (event.topic, sub)
        topic = known.get(key)
        if topic is None:
            try:
                topic = join(event.topic, sub)
            except InvalidTopicError:
                logger.warning(
                    "router %r left event %s on %r: %r is not a valid topic segment",
                    router_id,
                    event.id,
                    event.topic,
                    sub,
                )
                return None
            if len(known) < _MAX_CACHED_TOPICS:
                known[key] = topic
        return topic

    return destination


def header_sub_topic(name: str) -> SubTopic:
    """The sub-topic is the value of a metadata (header) entry."""

    def sub_topic(event: Event) -> str | None:
        return event.header(name) or None

    return sub_topic


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
