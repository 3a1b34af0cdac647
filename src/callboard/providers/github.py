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

TOPIC = "github"
ROUTER_ID = "GithubEventRouter"
SIGNATURE_HEADER = "x-hub-signature-256"
EVENT_HEADER = "x-github-event"
DELIVERY_HEADER = "x-github-delivery"
TARGET_TYPE_HEADER = "x-github-hook-installation-target-type"
TARGET_ID_HEADER = "x-github-hook-installation-target-id"

SCHEME = HmacScheme("sha256", "sha256=", "hex")
FAILURES = SignatureFailures.for_header(
    "X-Hub-Signature-256",
    "'sha256=' followed by 64 hex digits",
    "events.modules.github (webhookSecret, apps[].webhookSecret)",
)
_SIZE = SCHEME.size


class GithubApp(Section):
    app_id: int | str = Field(alias="appId")
    webhook_secret: Secrets = Field(alias="webhookSecret")


class GithubSettings(Section):
    webhook_secret: Secrets = Field(default=(), alias="webhookSecret")
    apps: tuple[GithubApp, ...] = ()
    dangerously_allow_unauthenticated_events: bool = Field(
        default=False, alias="dangerouslyAllowUnauthenticatedEvents"
    )


def verify(headers: Headers, raw_body: bytes, secrets: Sequence[Secret]) -> Failure | None:
    """``None`` when ``X-Hub-Signature-256`` is the HMAC of ``raw_body`` under one of ``secrets``."""
    return check_hmac(
        first(headers, SIGNATURE_HEADER), raw_body, secrets, SCHEME, FAILURES, size=_SIZE
    )


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


def sub_topic(event: Event) -> str | None:
    """Every ``X-GitHub-Event`` value is a sub-topic (``push``, ``pull_request``, ``ping``)."""
    return event.header(EVENT_HEADER) or None


def delivery_id(request: WebhookRequest) -> str | None:
    return request.header(DELIVERY_HEADER) or None


def register(context: ModuleContext) -> None:
    settings = context.settings(GithubSettings)
    default, per_app = secrets_in_order(
        settings.webhook_secret, {str(app.app_id): app.webhook_secret for app in settings.apps}
    )
    check = None
    if default:

        def check(request: WebhookRequest) -> Failure | None:
            headers = request.headers
            keys = default
            if per_app and first(headers, TARGET_TYPE_HEADER) == "integration":
                keys = per_app.get(first(headers, TARGET_ID_HEADER) or "", default)
            return check_hmac(
                first(headers, SIGNATURE_HEADER),
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
        keys="events.modules.github.webhookSecret (or apps[].webhookSecret)",
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
