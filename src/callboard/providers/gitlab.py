"""GitLab webhooks: topic ``gitlab``, routed to ``gitlab.<event_name or object_kind>``.

GitLab authenticates a webhook in one of two ways
(https://docs.gitlab.com/user/project/integrations/webhooks/):

- the secret token, sent as it is in ``X-Gitlab-Token``, compared here in constant time;
- a signing token (``whsec_...``), with which GitLab signs each request by the Standard
  Webhooks scheme (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``).

A request that carries ``webhook-signature`` is checked against the signing tokens when some
are configured; otherwise ``X-Gitlab-Token`` is checked against the secret tokens. The delivery
id is ``Idempotency-Key`` (GitLab 17.4 and later, kept on retries), else ``webhook-id``, else
``X-Gitlab-Event-UUID``.

Configuration, ``events.modules.gitlab``::

    webhookSecret: <secret token>          # or a list, all accepted (rotation)
    signingToken: whsec_...                # or a list
    timestampToleranceSeconds: 300
    dangerouslyAllowUnauthenticatedEvents: false
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, field_validator

from callboard.events import Event
from callboard.extensions import FunctionModule, ModuleContext
from callboard.ingress.types import Headers, WebhookRequest
from callboard.providers import standard_webhooks
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

TOPIC = "gitlab"
ROUTER_ID = "GitlabEventRouter"
TOKEN_HEADER = "x-gitlab-token"
IDEMPOTENCY_HEADER = "idempotency-key"
EVENT_UUID_HEADER = "x-gitlab-event-uuid"

TOKEN_FAILURES = SignatureFailures(
    Failure(
        "TokenMissingError",
        "the request has no X-Gitlab-Token header; set the webhook's secret token in GitLab",
    ),
    Failure("TokenMalformedError", "the X-Gitlab-Token header holds characters outside Latin-1"),
    Failure(
        "TokenMismatchError",
        "the X-Gitlab-Token header matches no secret in events.modules.gitlab.webhookSecret",
    ),
)
SIGNATURE_MISSING = Failure(
    "SignatureMissingError",
    "the request has no webhook-signature header; set the webhook's signing token in GitLab "
    "(events.modules.gitlab.signingToken is configured, webhookSecret is not)",
)


class GitlabSettings(Section):
    webhook_secret: Secrets = Field(default=(), alias="webhookSecret")
    signing_token: Secrets = Field(default=(), alias="signingToken")
    timestamp_tolerance_seconds: int = Field(
        default=standard_webhooks.DEFAULT_TOLERANCE, alias="timestampToleranceSeconds", ge=1
    )
    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )

    @field_validator("signing_token")
    @classmethod
    def _decodable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for token in value:
            standard_webhooks.decode_secret(token)
        return value


def verify(
    headers: Headers,
    raw_body: bytes,
    secrets: Sequence[Secret],
    *,
    signing_keys: Sequence[Secret] = (),
    tolerance: int = standard_webhooks.DEFAULT_TOLERANCE,
    now: float | None = None,
) -> Failure | None:
    """``None`` when the request carries a valid signature or one of the secret tokens.

    ``secrets`` are secret tokens (``X-Gitlab-Token``); ``signing_keys`` are signing tokens,
    ``whsec_...`` strings or decoded keys as ``bytes``.
    """
    if signing_keys and (
        first(headers, standard_webhooks.SIGNATURE_HEADER) is not None or not secrets
    ):
        if first(headers, standard_webhooks.SIGNATURE_HEADER) is None:
            return SIGNATURE_MISSING
        return standard_webhooks.verify(
            headers, raw_body, signing_keys, tolerance=tolerance, now=now
        )
    return check_token(first(headers, TOKEN_HEADER), secrets, TOKEN_FAILURES)


def sub_topic(event: Event) -> str | None:
    """``event_name`` when the payload has one (as Backstage routes), else ``object_kind``.

    Push and system hooks carry ``event_name``; merge request, issue, note, pipeline and job
    hooks carry only ``object_kind``.
    """
    return payload_field(event.payload, "event_name") or payload_field(event.payload, "object_kind")


def delivery_id(request: WebhookRequest) -> str | None:
    return (
        request.header(IDEMPOTENCY_HEADER)
        or request.header(standard_webhooks.ID_HEADER)
        or request.header(EVENT_UUID_HEADER)
        or None
    )


def register(context: ModuleContext) -> None:
    settings = context.settings(GitlabSettings)
    tokens = as_keys(settings.webhook_secret)
    signing_keys = tuple(standard_webhooks.decode_secret(t) for t in settings.signing_token)
    tolerance = settings.timestamp_tolerance_seconds
    check = None
    if tokens or signing_keys:

        def check(request: WebhookRequest) -> Failure | None:
            return verify(
                request.headers,
                request.raw_body,
                tokens,
                signing_keys=signing_keys,
                tolerance=tolerance,
            )

    validator = secured_validator(
        context,
        TOPIC,
        check,
        allow_unauthenticated=settings.dangerously_allow_unauthenticated_events,
        keys="events.modules.gitlab.webhookSecret (or signingToken)",
    )
    add_provider(
        context,
        TOPIC,
        validator=validator,
        delivery_id=delivery_id,
        sub_topic=sub_topic,
        router_id=ROUTER_ID,
        redact_headers=(TOKEN_HEADER,),
    )


module = FunctionModule(TOPIC, register)
