"""Gitea webhooks: topic ``gitea``, routed to ``gitea.<X-Gitea-Event>``.

With a secret set on the webhook, Gitea sends ``X-Gitea-Signature: <hex HMAC-SHA256 of the
raw body>``, with no prefix (https://docs.gitea.com/usage/webhooks). The delivery id is
``X-Gitea-Delivery``. Forgejo sends the same headers.

Configuration, ``events.modules.gitea``::

    webhookSecret: <secret>            # or a list, all accepted (rotation)
    dangerouslyAllowUnauthenticatedEvents: false
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from callboard.events import Event
from callboard.extensions import FunctionModule, ModuleContext
from callboard.ingress.types import Headers, WebhookRequest
from callboard.providers._signatures import (
    Failure,
    HmacScheme,
    Secret,
    SignatureFailures,
    as_keys,
    check_hmac,
    first,
)
from callboard.providers._wiring import Secrets, add_provider, secured_validator
from callboard.settings import Section

TOPIC = "gitea"
ROUTER_ID = "GiteaEventRouter"
SIGNATURE_HEADER = "x-gitea-signature"
EVENT_HEADER = "x-gitea-event"
DELIVERY_HEADER = "x-gitea-delivery"

SCHEME = HmacScheme("sha256", "", "hex")
FAILURES = SignatureFailures.for_header(
    "X-Gitea-Signature", "64 hex digits", "events.modules.gitea.webhookSecret"
)
_SIZE = SCHEME.size


class GiteaSettings(Section):
    webhook_secret: Secrets = Field(default=(), alias="webhookSecret")
    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )


def verify(headers: Headers, raw_body: bytes, secrets: Sequence[Secret]) -> Failure | None:
    """``None`` when ``X-Gitea-Signature`` is the HMAC-SHA256 of ``raw_body`` under a secret."""
    return check_hmac(
        first(headers, SIGNATURE_HEADER), raw_body, secrets, SCHEME, FAILURES, size=_SIZE
    )


def sub_topic(event: Event) -> str | None:
    """Every ``X-Gitea-Event`` value is a sub-topic (``push``, ``pull_request``, ``issues``)."""
    return event.header(EVENT_HEADER) or None


def delivery_id(request: WebhookRequest) -> str | None:
    return request.header(DELIVERY_HEADER) or None


def register(context: ModuleContext) -> None:
    settings = context.settings(GiteaSettings)
    keys = as_keys(settings.webhook_secret)
    check = None
    if keys:

        def check(request: WebhookRequest) -> Failure | None:
            return check_hmac(
                request.header(SIGNATURE_HEADER),
                request.raw_body,
                keys,
                SCHEME,
                FAILURES,
                size=_SIZE,
            )

    validator = secured_validator(
        context,
        TOPIC,
        check,
        allow_unauthenticated=settings.dangerously_allow_unauthenticated_events,
        keys="events.modules.gitea.webhookSecret",
    )
    add_provider(
        context,
        TOPIC,
        validator=validator,
        delivery_id=delivery_id,
        sub_topic=sub_topic,
        router_id=ROUTER_ID,
    )


module = FunctionModule(TOPIC, register)
