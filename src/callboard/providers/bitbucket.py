"""Bitbucket webhooks, both flavours, routed to ``<topic>.<X-Event-Key>``.

- Bitbucket Cloud: topic ``bitbucketCloud`` (``bitbucketCloud.repo:push``). With a secret set
  on the webhook, Bitbucket sends ``X-Hub-Signature: sha256=<hex HMAC-SHA256 of the body>``
  (https://support.atlassian.com/bitbucket-cloud/docs/manage-webhooks/). The delivery id is
  ``X-Request-UUID``.
- Bitbucket Server / Data Center: topic ``bitbucketServer``
  (``bitbucketServer.repo:refs_changed``), the same ``X-Hub-Signature`` header
  (https://confluence.atlassian.com/bitbucketserver/manage-webhooks-938025878.html). The
  delivery id is ``X-Request-Id``. "Test connection" sends ``X-Event-Key: diagnostics:ping``
  with the body ``{"test": true}``; it is checked and routed like any other delivery
  (``bitbucketServer.diagnostics:ping``).

Configuration, ``events.modules.bitbucketCloud`` and ``events.modules.bitbucketServer``::

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

CLOUD_TOPIC = "bitbucketCloud"
SERVER_TOPIC = "bitbucketServer"
SIGNATURE_HEADER = "x-hub-signature"
EVENT_HEADER = "x-event-key"
CLOUD_DELIVERY_HEADER = "x-request-uuid"
SERVER_DELIVERY_HEADER = "x-request-id"
#: The event key of Bitbucket Server's "Test connection" button.
PING = "diagnostics:ping"

SCHEME = HmacScheme("sha256", "sha256=", "hex")
_SIZE = SCHEME.size


def failures(topic: str) -> SignatureFailures:
    return SignatureFailures.for_header(
        "X-Hub-Signature",
        "'sha256=' followed by 64 hex digits",
        f"events.modules.{topic}.webhookSecret",
    )


CLOUD_FAILURES = failures(CLOUD_TOPIC)
SERVER_FAILURES = failures(SERVER_TOPIC)


class BitbucketSettings(Section):
    webhook_secret: Secrets = Field(default=(), alias="webhookSecret")
    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )


def verify(
    headers: Headers,
    raw_body: bytes,
    secrets: Sequence[Secret],
    *,
    failures: SignatureFailures = CLOUD_FAILURES,
) -> Failure | None:
    """``None`` when ``X-Hub-Signature`` is the HMAC-SHA256 of ``raw_body`` under a secret."""
    return check_hmac(
        first(headers, SIGNATURE_HEADER), raw_body, secrets, SCHEME, failures, size=_SIZE
    )


def sub_topic(event: Event) -> str | None:
    """Every ``X-Event-Key`` value is a sub-topic (``repo:push``, ``pr:opened``)."""
    return event.header(EVENT_HEADER) or None


def cloud_delivery_id(request: WebhookRequest) -> str | None:
    return request.header(CLOUD_DELIVERY_HEADER) or None


def server_delivery_id(request: WebhookRequest) -> str | None:
    return request.header(SERVER_DELIVERY_HEADER) or None


def _register(context: ModuleContext, topic: str, router_id: str) -> None:
    settings = context.settings(BitbucketSettings)
    keys = as_keys(settings.webhook_secret)
    topic_failures = CLOUD_FAILURES if topic == CLOUD_TOPIC else SERVER_FAILURES
    check = None
    if keys:

        def check(request: WebhookRequest) -> Failure | None:
            return check_hmac(
                request.header(SIGNATURE_HEADER),
                request.raw_body,
                keys,
                SCHEME,
                topic_failures,
                size=_SIZE,
            )

    validator = secured_validator(
        context,
        topic,
        check,
        allow_unauthenticated=settings.dangerously_allow_unauthenticated_events,
        keys=f"events.modules.{topic}.webhookSecret",
    )
    add_provider(
        context,
        topic,
        validator=validator,
        delivery_id=cloud_delivery_id if topic == CLOUD_TOPIC else server_delivery_id,
        sub_topic=sub_topic,
        router_id=router_id,
    )


def register_cloud(context: ModuleContext) -> None:
    _register(context, CLOUD_TOPIC, "BitbucketCloudEventRouter")


def register_server(context: ModuleContext) -> None:
    _register(context, SERVER_TOPIC, "BitbucketServerEventRouter")


cloud_module = FunctionModule(CLOUD_TOPIC, register_cloud)
server_module = FunctionModule(SERVER_TOPIC, register_server)
