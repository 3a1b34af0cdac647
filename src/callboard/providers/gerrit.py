"""Gerrit webhooks: topic ``gerrit``, routed to ``gerrit.<type>``.

Gerrit's webhooks plugin posts stream events (``patchset-created``, ``change-merged``,
``comment-added``, ``ref-updated``...) as JSON and signs nothing
(https://gerrit.googlesource.com/plugins/webhooks/+/refs/heads/master/src/main/resources/Documentation/config.md).
callboard checks a shared secret in a header, which a reverse proxy in front of callboard adds
(or any sender able to set headers); without one, set
``dangerouslyAllowUnauthenticatedEvents`` and rely on network controls.

Gerrit sends no delivery id; the plugin retries a failed post up to ``maxTries`` times with
the same body. The delivery id is therefore the SHA-256 of the body (``sha256:<hex>``), so a
retry within the broker's window is published once; ``deduplicateByBody: false`` turns it off.

Configuration, ``events.modules.gerrit``::

    webhookSecret: <secret>            # or a list, all accepted (rotation)
    secretHeader: x-webhook-secret
    deduplicateByBody: true
    dangerouslyAllowUnauthenticatedEvents: false
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from pydantic import Field, field_validator

from callboard.events import Event
from callboard.extensions import FunctionModule, ModuleContext
from callboard.ingress.types import Headers, WebhookRequest
from callboard.providers._signatures import (
    Failure,
    Secret,
    SignatureFailures,
    as_keys,
    check_token,
    first,
)
from callboard.providers._wiring import Secrets, add_provider, payload_field, secured_validator
from callboard.settings import Section

TOPIC = "gerrit"
ROUTER_ID = "GerritEventRouter"
DEFAULT_SECRET_HEADER = "x-webhook-secret"


def failures(header: str) -> SignatureFailures:
    return SignatureFailures(
        Failure("CredentialsMissingError", f"the request has no {header} header"),
        Failure("CredentialsMalformedError", f"the {header} header holds non-Latin-1 characters"),
        Failure(
            "CredentialsMismatchError",
            f"the {header} header matches no secret in events.modules.gerrit.webhookSecret",
        ),
    )


class GerritSettings(Section):
    webhook_secret: Secrets = Field(default=(), alias="webhookSecret")
    secret_header: str = Field(default=DEFAULT_SECRET_HEADER, alias="secretHeader", min_length=1)
    deduplicate_by_body: bool = Field(default=True, alias="deduplicateByBody")
    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )

    @field_validator("secret_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


def verify(
    headers: Headers, secrets: Sequence[Secret], *, header: str = DEFAULT_SECRET_HEADER
) -> Failure | None:
    """``None`` when the ``header`` holds one of ``secrets``."""
    return check_token(first(headers, header), secrets, failures(header))


def sub_topic(event: Event) -> str | None:
    """The payload's ``type`` (``patchset-created``, ``change-merged``)."""
    return payload_field(event.payload, "type")


def delivery_id(request: WebhookRequest) -> str | None:
    return "sha256:" + hashlib.sha256(request.raw_body).hexdigest()


def register(context: ModuleContext) -> None:
    settings = context.settings(GerritSettings)
    secrets = as_keys(settings.webhook_secret)
    header = settings.secret_header
    header_failures = failures(header)
    check = None
    if secrets:

        def check(request: WebhookRequest) -> Failure | None:
            return check_token(request.header(header), secrets, header_failures)

    validator = secured_validator(
        context,
        TOPIC,
        check,
        allow_unauthenticated=settings.dangerously_allow_unauthenticated_events,
        keys="events.modules.gerrit.webhookSecret",
    )
    add_provider(
        context,
        TOPIC,
        validator=validator,
        delivery_id=delivery_id if settings.deduplicate_by_body else None,
        sub_topic=sub_topic,
        router_id=ROUTER_ID,
        redact_headers=(header,),
    )


module = FunctionModule(TOPIC, register)
