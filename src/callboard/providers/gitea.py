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

from callboard.ingress.types import Headers
from callboard.providers._signatures import (
    Failure,
    HmacScheme,
    HmacSignature,
    Secret,
    SignatureFailures,
)
from callboard.providers._wiring import (
    ProviderModule,
    header_delivery_id,
    header_route,
    webhook_secret_spec,
)

TOPIC = "gitea"
ROUTER_ID = "GiteaEventRouter"
SIGNATURE_HEADER = "x-gitea-signature"
EVENT_HEADER = "x-gitea-event"
DELIVERY_HEADER = "x-gitea-delivery"

SIGNATURE = HmacSignature(
    SIGNATURE_HEADER,
    HmacScheme("sha256", "", "hex"),
    SignatureFailures.for_header(
        "X-Gitea-Signature", "64 hex digits", "events.modules.gitea.webhookSecret"
    ),
)
SCHEME = SIGNATURE.scheme
FAILURES = SIGNATURE.failures


def verify(headers: Headers, raw_body: bytes, secrets: Sequence[Secret]) -> Failure | None:
    """``None`` when ``X-Gitea-Signature`` is the HMAC-SHA256 of ``raw_body`` under a secret."""
    return SIGNATURE.check(headers, raw_body, secrets)


#: Every ``X-Gitea-Event`` value is a sub-topic (``push``, ``pull_request``, ``issues``).
sub_topic = header_route(EVENT_HEADER)
delivery_id = header_delivery_id(DELIVERY_HEADER)

SPEC = webhook_secret_spec(
    TOPIC, SIGNATURE.check, router_id=ROUTER_ID, sub_topic=sub_topic, delivery_id=delivery_id
)
module = ProviderModule(SPEC)
