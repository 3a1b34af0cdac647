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

from callboard.ingress.types import DeliveryIdReader, Headers
from callboard.providers._signatures import (
    Failure,
    HmacScheme,
    HmacSignature,
    Secret,
    SignatureFailures,
)
from callboard.providers._wiring import (
    ProviderModule,
    ProviderSpec,
    WebhookSecretSettings,
    header_delivery_id,
    header_route,
    webhook_secret_spec,
)

CLOUD_TOPIC = "bitbucketCloud"
SERVER_TOPIC = "bitbucketServer"
SIGNATURE_HEADER = "x-hub-signature"
EVENT_HEADER = "x-event-key"
CLOUD_DELIVERY_HEADER = "x-request-uuid"
SERVER_DELIVERY_HEADER = "x-request-id"
#: The event key of Bitbucket Server's "Test connection" button.
PING = "diagnostics:ping"

SCHEME = HmacScheme("sha256", "sha256=", "hex")


def failures(topic: str) -> SignatureFailures:
    return SignatureFailures.for_header(
        "X-Hub-Signature",
        "'sha256=' followed by 64 hex digits",
        f"events.modules.{topic}.webhookSecret",
    )


CLOUD_FAILURES = failures(CLOUD_TOPIC)
SERVER_FAILURES = failures(SERVER_TOPIC)


def verify(
    headers: Headers,
    raw_body: bytes,
    secrets: Sequence[Secret],
    *,
    failures: SignatureFailures = CLOUD_FAILURES,
) -> Failure | None:
    """``None`` when ``X-Hub-Signature`` is the HMAC-SHA256 of ``raw_body`` under a secret."""
    return HmacSignature(SIGNATURE_HEADER, SCHEME, failures).check(headers, raw_body, secrets)


#: Every ``X-Event-Key`` value is a sub-topic (``repo:push``, ``pr:opened``).
sub_topic = header_route(EVENT_HEADER)
cloud_delivery_id = header_delivery_id(CLOUD_DELIVERY_HEADER)
server_delivery_id = header_delivery_id(SERVER_DELIVERY_HEADER)


def spec(
    topic: str, router_id: str, delivery_id: DeliveryIdReader
) -> ProviderSpec[WebhookSecretSettings, tuple[bytes, ...]]:
    """Either flavour: they differ in topic, router id and delivery id header only."""
    check = HmacSignature(SIGNATURE_HEADER, SCHEME, failures(topic)).check
    return webhook_secret_spec(
        topic, check, router_id=router_id, sub_topic=sub_topic, delivery_id=delivery_id
    )


CLOUD_SPEC = spec(CLOUD_TOPIC, "BitbucketCloudEventRouter", cloud_delivery_id)
SERVER_SPEC = spec(SERVER_TOPIC, "BitbucketServerEventRouter", server_delivery_id)
cloud_module = ProviderModule(CLOUD_SPEC)
server_module = ProviderModule(SERVER_SPEC)
