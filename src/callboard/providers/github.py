"""GitHub webhooks: topic ``github``, routed to ``github.<X-GitHub-Event>``.

GitHub signs the raw body with HMAC-SHA256 and sends ``X-Hub-Signature-256: sha256=<hex>``
(https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries). The legacy
SHA-1 ``X-Hub-Signature`` is not accepted. A delivery's id is ``X-GitHub-Delivery``, the same
when a delivery is redelivered. Deliveries from a GitHub App name the app in
``X-GitHub-Hook-Installation-Target-ID`` (target type ``integration``), which picks the app's
secret to try first.

Configuration, ``events.modules.github``::

    webhookSecret: <secret>            # or a list of secrets, all accepted (rotation)
    apps:
      - appId: 123456
        webhookSecret: <secret>        # or a list
    dangerouslyAllowUnauthenticatedEvents: false
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import Field

from callboard.ingress.types import Headers
from callboard.providers._signatures import (
    Failure,
    HmacScheme,
    HmacSignature,
    Secret,
    SignatureFailures,
    as_keys,
    first,
)
from callboard.providers._wiring import (
    ProviderModule,
    ProviderSpec,
    Secrets,
    WebhookSecretSettings,
    header_delivery_id,
    header_route,
)
from callboard.settings import Section

TOPIC = "github"
ROUTER_ID = "GithubEventRouter"
SIGNATURE_HEADER = "x-hub-signature-256"
EVENT_HEADER = "x-github-event"
DELIVERY_HEADER = "x-github-delivery"
TARGET_TYPE_HEADER = "x-github-hook-installation-target-type"
TARGET_ID_HEADER = "x-github-hook-installation-target-id"

SIGNATURE = HmacSignature(
    SIGNATURE_HEADER,
    HmacScheme("sha256", "sha256=", "hex"),
    SignatureFailures.for_header(
        "X-Hub-Signature-256",
        "'sha256=' followed by 64 hex digits",
        "events.modules.github (webhookSecret, apps[].webhookSecret)",
    ),
)
SCHEME = SIGNATURE.scheme
FAILURES = SIGNATURE.failures


class GithubApp(Section):
    app_id: int | str = Field(alias="appId")
    webhook_secret: Secrets = Field(alias="webhookSecret")


class GithubSettings(WebhookSecretSettings):
    apps: tuple[GithubApp, ...] = ()


@dataclass(frozen=True, slots=True)
class GithubSecrets:
    """The secrets to try: ``default`` for a delivery from no known app, ``per_app`` by app id."""

    default: tuple[Secret, ...]
    per_app: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)

    def for_delivery(self, headers: Headers) -> tuple[Secret, ...]:
        """The secrets in the order to try them for a delivery with ``headers``."""
        app = app_id(headers)
        return self.default if app is None else self.per_app.get(app, self.default)


def check(headers: Headers, raw_body: bytes, secrets: GithubSecrets) -> Failure | None:
    """GitHub's scheme: ``X-Hub-Signature-256`` under the secrets the delivery's app picks."""
    keys = secrets.for_delivery(headers) if secrets.per_app else secrets.default
    return SIGNATURE.check(headers, raw_body, keys)


def verify(
    headers: Headers,
    raw_body: bytes,
    secrets: Sequence[Secret],
    *,
    apps: Mapping[str, Sequence[Secret]] | None = None,
) -> Failure | None:
    """``None`` when ``X-Hub-Signature-256`` is the HMAC of ``raw_body`` under one of ``secrets``
    (or of a GitHub App's secrets in ``apps``, by app id)."""
    if apps:
        default, per_app = secrets_in_order(secrets, apps)
        return check(headers, raw_body, GithubSecrets(default, per_app))
    return check(headers, raw_body, GithubSecrets(tuple(secrets)))


def app_id(headers: Headers) -> str | None:
    """The GitHub App a delivery comes from, when it comes from one."""
    if first(headers, TARGET_TYPE_HEADER) == "integration":
        return first(headers, TARGET_ID_HEADER)
    return None


def secrets_in_order(
    generic: Sequence[Secret], apps: Mapping[str, Sequence[Secret]]
) -> tuple[tuple[bytes, ...], dict[str, tuple[bytes, ...]]]:
    """Every secret as a key, ordered for each app: that app's first, then the others.

    Returns the order for deliveries from no known app and the order per app id.
    """
    generic_keys = as_keys(generic)
    app_keys = {str(app): as_keys(secrets) for app, secrets in apps.items()}
    everything = generic_keys + tuple(k for keys in app_keys.values() for k in keys)
    per_app = {
        app: keys + tuple(k for k in everything if k not in keys) for app, keys in app_keys.items()
    }
    return everything, per_app


def credentials(settings: GithubSettings) -> GithubSecrets | None:
    """The configured secrets, ``webhookSecret`` and every app's; ``None`` when there is none."""
    default, per_app = secrets_in_order(
        settings.webhook_secret, {str(app.app_id): app.webhook_secret for app in settings.apps}
    )
    return GithubSecrets(default, per_app) if default else None


#: Every ``X-GitHub-Event`` value is a sub-topic (``push``, ``pull_request``, ``ping``).
sub_topic = header_route(EVENT_HEADER)
delivery_id = header_delivery_id(DELIVERY_HEADER)

SPEC = ProviderSpec(
    topic=TOPIC,
    settings=GithubSettings,
    check=check,
    credentials=credentials,
    secret_keys="events.modules.github.webhookSecret (or apps[].webhookSecret)",
    router_id=ROUTER_ID,
    sub_topic=sub_topic,
    delivery_id=delivery_id,
)
module = ProviderModule(SPEC)
