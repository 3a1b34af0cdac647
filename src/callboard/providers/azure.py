"""Azure DevOps service hooks: topic ``azureDevOps``, routed to ``azureDevOps.<eventType>``.

Azure DevOps does not sign its Web Hooks; a subscription can send custom HTTP headers and
Basic authentication (https://learn.microsoft.com/azure/devops/service-hooks/services/webhooks).
callboard accepts either, compared in constant time:

- ``x-ado-webhook-secret: <secret>`` set as a custom header of the subscription (as Backstage
  expects);
- ``Authorization: Basic ...`` with a configured user name and password.

The payload's ``eventType`` (``git.push``, ``git.pullrequest.created``, ``build.complete``)
is the sub-topic. The delivery id is ``<subscriptionId>:<notificationId>`` from the payload
(``notificationId`` counts per subscription, so alone it would collide across subscriptions).

Configuration, ``events.modules.azureDevOps``::

    webhookSecret: <secret>            # or a list, all accepted (rotation)
    basicAuth:                         # or a list of these
      username: callboard
      password: <password>
    dangerouslyAllowUnauthenticatedEvents: false
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from callboard.ingress.types import Headers, WebhookRequest
from callboard.providers._signatures import (
    Failure,
    Secret,
    SignatureFailures,
    as_keys,
    check_token,
    first,
    wire_bytes,
)
from callboard.providers._wiring import (
    ProviderModule,
    ProviderSpec,
    WebhookSecretSettings,
    payload_field,
    payload_route,
)
from callboard.settings import Section

TOPIC = "azureDevOps"
ROUTER_ID = "AzureDevOpsEventRouter"
SECRET_HEADER = "x-ado-webhook-secret"
AUTHORIZATION_HEADER = "authorization"

MISSING = Failure(
    "CredentialsMissingError",
    "the request has neither an x-ado-webhook-secret header nor Basic authentication; add "
    "one of them to the Azure DevOps service hook subscription",
)
SECRET_FAILURES = SignatureFailures(
    MISSING,
    Failure(
        "CredentialsMalformedError", "the x-ado-webhook-secret header holds non-Latin-1 characters"
    ),
    Failure(
        "CredentialsMismatchError",
        "the x-ado-webhook-secret header matches no secret in "
        "events.modules.azureDevOps.webhookSecret",
    ),
)
BASIC_MALFORMED = Failure(
    "CredentialsMalformedError",
    "the Authorization header is not 'Basic ' followed by base64 of 'username:password'",
)
BASIC_MISMATCH = Failure(
    "CredentialsMismatchError",
    "the Basic credentials match no entry of events.modules.azureDevOps.basicAuth",
)


class BasicAuth(Section):
    username: str
    password: str = Field(repr=False)


def _one_or_many(value: Any) -> Any:
    return (value,) if isinstance(value, dict) else value


class AzureSettings(WebhookSecretSettings):
    basic_auth: Annotated[tuple[BasicAuth, ...], BeforeValidator(_one_or_many)] = Field(
        default=(), alias="basicAuth"
    )


def basic_credential(username: str, password: str) -> bytes:
    """The bytes a Basic ``Authorization`` header encodes: ``username:password``."""
    return f"{username}:{password}".encode()


def verify(
    headers: Headers,
    secrets: Sequence[Secret],
    *,
    credentials: Sequence[bytes] = (),
) -> Failure | None:
    """``None`` when the request carries a configured secret header or Basic credential.

    ``credentials`` are ``username:password`` as bytes (``basic_credential``).
    """
    secret = first(headers, SECRET_HEADER)
    if secret is not None and secrets:
        return check_token(secret, secrets, SECRET_FAILURES)
    authorization = first(headers, AUTHORIZATION_HEADER)
    if authorization is not None and credentials:
        return _check_basic(authorization, credentials)
    if secret is not None:
        return SECRET_FAILURES.mismatch
    if authorization is not None:
        return BASIC_MISMATCH
    return MISSING


def _check_basic(header: str, credentials: Sequence[bytes]) -> Failure | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return BASIC_MALFORMED
    raw = wire_bytes(encoded.strip())
    if raw is None:
        return BASIC_MALFORMED
    try:
        given = base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        return BASIC_MALFORMED
    matched = False
    for credential in credentials:
        matched |= hmac.compare_digest(given, credential)
    return None if matched else BASIC_MISMATCH


#: The payload's ``eventType``; it may hold dots, giving deeper topics.
sub_topic = payload_route("eventType")


def delivery_id(request: WebhookRequest) -> str | None:
    notification = payload_field(request.body, "notificationId")
    if notification is None:
        return None
    subscription = payload_field(request.body, "subscriptionId")
    return f"{subscription}:{notification}" if subscription else notification


@dataclass(frozen=True, slots=True)
class AzureCredentials:
    """Secrets for ``x-ado-webhook-secret`` and ``username:password`` pairs for Basic."""

    secrets: tuple[Secret, ...]
    basic: tuple[bytes, ...]


def check(headers: Headers, raw_body: bytes, credentials: AzureCredentials) -> Failure | None:
    return verify(headers, credentials.secrets, credentials=credentials.basic)


def credentials(settings: AzureSettings) -> AzureCredentials | None:
    secrets = as_keys(settings.webhook_secret)
    basic = tuple(basic_credential(b.username, b.password) for b in settings.basic_auth)
    return AzureCredentials(secrets, basic) if secrets or basic else None


SPEC = ProviderSpec(
    topic=TOPIC,
    settings=AzureSettings,
    check=check,
    credentials=credentials,
    secret_keys="events.modules.azureDevOps.webhookSecret (or basicAuth)",
    router_id=ROUTER_ID,
    sub_topic=sub_topic,
    delivery_id=delivery_id,
    redact_headers=(SECRET_HEADER, AUTHORIZATION_HEADER),
)
module = ProviderModule(SPEC)
