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
from dataclasses import dataclass

from pydantic import Field, field_validator

from callboard.ingress.types import Headers
from callboard.providers import standard_webhooks
from callboard.providers._signatures import (
    Failure,
    Secret,
    SignatureFailures,
    TokenHeader,
    as_keys,
    first,
)
from callboard.providers._wiring import (
    ProviderModule,
    ProviderSpec,
    Secrets,
    WebhookSecretSettings,
    header_delivery_id,
    payload_route,
)

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
TOKEN = TokenHeader(TOKEN_HEADER, TOKEN_FAILURES)
SIGNATURE_MISSING = Failure(
    "SignatureMissingError",
    "the request has no webhook-signature header; set the webhook's signing token in GitLab "
    "(events.modules.gitlab.signingToken is configured, webhookSecret is not)",
)


class GitlabSettings(WebhookSecretSettings):
    signing_token: Secrets = Field(default=(), alias="signingToken")
    timestamp_tolerance_seconds: int = Field(
        default=standard_webhooks.DEFAULT_TOLERANCE, alias="timestampToleranceSeconds", ge=1
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
    return TOKEN.check(headers, raw_body, secrets)


@dataclass(frozen=True, slots=True)
class GitlabCredentials:
    """Secret tokens (``X-Gitlab-Token``), signing keys and the timestamp tolerance."""

    tokens: tuple[Secret, ...]
    signing_keys: tuple[Secret, ...]
    tolerance: int


def check(headers: Headers, raw_body: bytes, credentials: GitlabCredentials) -> Failure | None:
    return verify(
        headers,
        raw_body,
        credentials.tokens,
        signing_keys=credentials.signing_keys,
        tolerance=credentials.tolerance,
    )


def credentials(settings: GitlabSettings) -> GitlabCredentials | None:
    tokens = as_keys(settings.webhook_secret)
    signing_keys = tuple(standard_webhooks.decode_secret(t) for t in settings.signing_token)
    if not tokens and not signing_keys:
        return None
    return GitlabCredentials(tokens, signing_keys, settings.timestamp_tolerance_seconds)


#: ``event_name`` when the payload has one (as Backstage routes), else ``object_kind``: push
#: and system hooks carry ``event_name``; merge request, issue, note, pipeline and job hooks
#: carry only ``object_kind``.
sub_topic = payload_route("event_name", "object_kind")
delivery_id = header_delivery_id(IDEMPOTENCY_HEADER, standard_webhooks.ID_HEADER, EVENT_UUID_HEADER)

SPEC = ProviderSpec(
    topic=TOPIC,
    settings=GitlabSettings,
    check=check,
    credentials=credentials,
    secret_keys="events.modules.gitlab.webhookSecret (or signingToken)",
    router_id=ROUTER_ID,
    sub_topic=sub_topic,
    delivery_id=delivery_id,
    redact_headers=(TOKEN_HEADER,),
)
module = ProviderModule(SPEC)
