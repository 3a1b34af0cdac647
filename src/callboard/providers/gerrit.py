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

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator

from callboard.extensions import FunctionModule, ModuleContext
from callboard.ingress.types import Headers, WebhookRequest
from callboard.providers._signatures import (
    Failure,
    Secret,
    SignatureFailures,
    TokenHeader,
    as_keys,
)
from callboard.providers._wiring import (
    ProviderSpec,
    WebhookSecretSettings,
    add_topic,
    payload_route,
)

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


def token_header(header: str) -> TokenHeader:
    """Gerrit's scheme: a shared secret in ``header``, which a proxy in front adds."""
    return TokenHeader(header, failures(header))


class GerritSettings(WebhookSecretSettings):
    secret_header: str = Field(default=DEFAULT_SECRET_HEADER, alias="secretHeader", min_length=1)
    deduplicate_by_body: bool = Field(default=True, alias="deduplicateByBody")

    @field_validator("secret_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


@dataclass(frozen=True, slots=True)
class GerritCredentials:
    """The header the secret is sent in and the secrets it may hold."""

    token: TokenHeader
    secrets: tuple[Secret, ...]


def check(headers: Headers, raw_body: bytes, credentials: GerritCredentials) -> Failure | None:
    return credentials.token.check(headers, raw_body, credentials.secrets)


def verify(
    headers: Headers, secrets: Sequence[Secret], *, header: str = DEFAULT_SECRET_HEADER
) -> Failure | None:
    """``None`` when the ``header`` holds one of ``secrets``."""
    return check(headers, b"", GerritCredentials(token_header(header), tuple(secrets)))


def credentials(settings: GerritSettings) -> GerritCredentials | None:
    secrets = as_keys(settings.webhook_secret)
    return GerritCredentials(token_header(settings.secret_header), secrets) if secrets else None


#: The payload's ``type`` (``patchset-created``, ``change-merged``).
sub_topic = payload_route("type")


def delivery_id(request: WebhookRequest) -> str | None:
    return "sha256:" + hashlib.sha256(request.raw_body).hexdigest()


SPEC = ProviderSpec(
    topic=TOPIC,
    settings=GerritSettings,
    check=check,
    credentials=credentials,
    secret_keys="events.modules.gerrit.webhookSecret",
    router_id=ROUTER_ID,
    sub_topic=sub_topic,
    delivery_id=delivery_id,
    redact_headers=(DEFAULT_SECRET_HEADER,),
)


def register(context: ModuleContext) -> None:
    settings = context.settings(GerritSettings)
    spec = dataclasses.replace(
        SPEC,
        # The secret header is configurable, and so is the body's digest as the delivery id.
        redact_headers=(settings.secret_header,),
        delivery_id=SPEC.delivery_id if settings.deduplicate_by_body else None,
    )
    add_topic(context, spec, settings)


module = FunctionModule(TOPIC, register)
