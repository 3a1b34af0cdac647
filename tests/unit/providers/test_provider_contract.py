"""Every provider, end to end over HTTP: the same eight situations, one case per provider."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from callboard.testing import (
    new_standard_webhooks_secret,
    sign_azure_devops,
    sign_bitbucket_cloud,
    sign_bitbucket_server,
    sign_gerrit,
    sign_gitea,
    sign_github,
    sign_gitlab,
    sign_hmac,
    sign_standard_webhooks,
)
from tests.unit.providers.harness import error_of, load_fixture, running

Headers = dict[str, str]
Sign = Callable[[bytes, str], Headers]
EventChange = Callable[[Headers, bytes, str | None], tuple[Headers, bytes]]


def header_event(name: str) -> EventChange:
    def change(headers: Headers, body: bytes, event: str | None) -> tuple[Headers, bytes]:
        changed = dict(headers)
        if event is None:
            del changed[name]
        else:
            changed[name] = event
        return changed, body

    return change


def payload_event(key: str) -> EventChange:
    def change(headers: Headers, body: bytes, event: str | None) -> tuple[Headers, bytes]:
        document = json.loads(body)
        if event is None:
            del document[key]
        else:
            document[key] = event
        return headers, json.dumps(document).encode()

    return change


def gitlab_event(headers: Headers, body: bytes, event: str | None) -> tuple[Headers, bytes]:
    document = json.loads(body)
    document.pop("event_name", None)
    if event is None:
        del document["object_kind"]
    else:
        document["object_kind"] = event
    return headers, json.dumps(document).encode()


@dataclass(frozen=True)
class Case:
    id: str
    module: str
    topic: str
    fixture: tuple[str, str]
    routed_to: str
    #: The module's configuration for these secrets (the first is the current one).
    config: Callable[[list[str]], dict[str, Any]]
    sign: Sign
    signature_header: str
    malformed: str
    change_event: EventChange
    delivery_id: Callable[[Headers, bytes], str | None]
    secrets: tuple[str, str, str] = (
        "current-secret-7Qz",
        "previous-secret-3Kd",
        "retired-secret-9Wm",
    )
    #: False when the scheme is a shared token that does not cover the body.
    signs_body: bool = True
    #: The header naming the event type, for providers that route by a header.
    event_header: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def delivery(self, secret: str | None = None) -> tuple[Headers, bytes]:
        headers, body = load_fixture(*self.fixture)
        return self.signed(headers, body, secret or self.secrets[0]), body

    def signed(self, headers: Headers, body: bytes, secret: str) -> Headers:
        signed = {**self.sign(body, secret), **headers}
        if self.event_header is not None and self.event_header not in headers:
            # The signing helpers add an event header; keep it out when the test removed it.
            signed.pop(self.event_header, None)
        return signed


def secret_config(secrets: list[str]) -> dict[str, Any]:
    return {"webhookSecret": secrets[0] if len(secrets) == 1 else secrets}


WHSEC = (
    new_standard_webhooks_secret(),
    new_standard_webhooks_secret(),
    new_standard_webhooks_secret(),
)

CASES = [
    Case(
        id="github",
        module="github",
        topic="github",
        fixture=("github", "push"),
        routed_to="github.push",
        config=secret_config,
        sign=lambda body, secret: sign_github(body, secret),
        signature_header="X-Hub-Signature-256",
        malformed="sha256=not-hex-at-all",
        change_event=header_event("X-GitHub-Event"),
        event_header="X-GitHub-Event",
        delivery_id=lambda headers, body: headers["X-GitHub-Delivery"],
    ),
    Case(
        id="gitlab",
        module="gitlab",
        topic="gitlab",
        fixture=("gitlab", "merge_request"),
        routed_to="gitlab.merge_request",
        config=secret_config,
        sign=lambda body, secret: sign_gitlab(body, token=secret),
        signature_header="X-Gitlab-Token",
        malformed="",
        change_event=gitlab_event,
        delivery_id=lambda headers, body: headers["Idempotency-Key"],
        signs_body=False,
    ),
    Case(
        id="gitlab-signing-token",
        module="gitlab",
        topic="gitlab",
        fixture=("gitlab", "push"),
        routed_to="gitlab.push",
        config=lambda secrets: {"signingToken": secrets},
        sign=lambda body, secret: sign_gitlab(body, signing_token=secret),
        signature_header="webhook-signature",
        malformed="v1,%%%not-base64",
        change_event=gitlab_event,
        delivery_id=lambda headers, body: headers["Idempotency-Key"],
        secrets=WHSEC,
    ),
    Case(
        id="bitbucketCloud",
        module="bitbucketCloud",
        topic="bitbucketCloud",
        fixture=("bitbucketCloud", "repo_push"),
        routed_to="bitbucketCloud.repo:push",
        config=secret_config,
        sign=lambda body, secret: sign_bitbucket_cloud(body, secret),
        signature_header="X-Hub-Signature",
        malformed="sha1=0123456789abcdef0123456789abcdef01234567",
        change_event=header_event("X-Event-Key"),
        event_header="X-Event-Key",
        delivery_id=lambda headers, body: headers["X-Request-UUID"],
    ),
    Case(
        id="bitbucketServer",
        module="bitbucketServer",
        topic="bitbucketServer",
        fixture=("bitbucketServer", "repo_refs_changed"),
        routed_to="bitbucketServer.repo:refs_changed",
        config=secret_config,
        sign=lambda body, secret: sign_bitbucket_server(body, secret),
        signature_header="X-Hub-Signature",
        malformed="sha256=abc",
        change_event=header_event("X-Event-Key"),
        event_header="X-Event-Key",
        delivery_id=lambda headers, body: headers["X-Request-Id"],
    ),
    Case(
        id="azureDevOps",
        module="azureDevOps",
        topic="azureDevOps",
        fixture=("azureDevOps", "git_push"),
        routed_to="azureDevOps.git.push",
        config=secret_config,
        sign=lambda body, secret: sign_azure_devops(secret),
        signature_header="x-ado-webhook-secret",
        malformed="",
        change_event=payload_event("eventType"),
        delivery_id=lambda headers, body: "{subscriptionId}:{notificationId}".format(
            **json.loads(body)
        ),
        signs_body=False,
    ),
    Case(
        id="gerrit",
        module="gerrit",
        topic="gerrit",
        fixture=("gerrit", "patchset_created"),
        routed_to="gerrit.patchset-created",
        config=secret_config,
        sign=lambda body, secret: sign_gerrit(secret),
        signature_header="x-webhook-secret",
        malformed="",
        change_event=payload_event("type"),
        delivery_id=lambda headers, body: "sha256:" + hashlib.sha256(body).hexdigest(),
        signs_body=False,
    ),
    Case(
        id="gitea",
        module="gitea",
        topic="gitea",
        fixture=("gitea", "push"),
        routed_to="gitea.push",
        config=secret_config,
        sign=lambda body, secret: sign_gitea(body, secret),
        signature_header="X-Gitea-Signature",
        malformed="sha256=" + "0" * 64,
        change_event=header_event("X-Gitea-Event"),
        event_header="X-Gitea-Event",
        delivery_id=lambda headers, body: headers["X-Gitea-Delivery"],
    ),
    Case(
        id="standard-webhooks",
        module="webhooks",
        topic="billing",
        fixture=("webhooks", "invoice_paid"),
        routed_to="billing.invoice.paid",
        config=lambda secrets: {
            "topics": {
                "billing": {"standardWebhooks": {"secret": secrets}, "subTopic": {"field": "type"}}
            }
        },
        sign=lambda body, secret: sign_standard_webhooks(
            body, secret, msg_id="msg_2fQp1cX8bV0mJ3kR7tY9wZ4aN6e"
        ),
        signature_header="webhook-signature",
        malformed="v2,abc",
        change_event=payload_event("type"),
        delivery_id=lambda headers, body: headers["webhook-id"],
        secrets=WHSEC,
    ),
    Case(
        id="generic-hmac",
        module="webhooks",
        topic="acme",
        fixture=("webhooks", "acme_order"),
        routed_to="acme.order_created",
        config=lambda secrets: {
            "topics": {
                "acme": {
                    "hmac": {
                        "header": "X-Acme-Signature",
                        "secret": secrets,
                        "algorithm": "sha512",
                        "prefix": "sha512=",
                        "encoding": "base64",
                    },
                    "deliveryIdHeader": "X-Acme-Delivery",
                    "subTopic": {"header": "X-Acme-Event"},
                }
            }
        },
        sign=lambda body, secret: sign_hmac(
            body,
            secret,
            header="X-Acme-Signature",
            algorithm="sha512",
            prefix="sha512=",
            encoding="base64",
        ),
        signature_header="X-Acme-Signature",
        malformed="sha512=" + "A" * 12,
        change_event=header_event("X-Acme-Event"),
        event_header="X-Acme-Event",
        delivery_id=lambda headers, body: headers["X-Acme-Delivery"],
    ),
]


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    result: Case = request.param
    return result


def assert_no_secret(case: Case, text: str) -> None:
    for secret in case.secrets:
        assert secret not in text
        assert secret.removeprefix("whsec_") not in text


async def test_good_delivery_is_routed_to_its_sub_topic(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        generic = await hub.record(case.topic)
        routed = await hub.record(f"{case.topic}.>")
        headers, body = case.delivery()
        response = await hub.post(case.topic, body, headers)
        await hub.drain()
    assert response.status_code == 202, response.text
    assert response.json() == {"status": "accepted"}
    assert [event.topic for event in generic] == [case.topic]
    assert [event.topic for event in routed] == [case.routed_to]
    event = routed[0]
    assert event.payload == json.loads(body)
    assert event.delivery_id == case.delivery_id(headers, body)
    assert_no_secret(case, repr(dict(event.metadata)))


async def test_bad_signature_is_refused(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        seen = await hub.record(f"{case.topic}", f"{case.topic}.>")
        headers, body = case.delivery(secret=case.secrets[2])
        response = await hub.post(case.topic, body, headers)
        await hub.drain()
    assert response.status_code == 403
    name, _ = error_of(response)
    assert name.endswith("MismatchError")
    assert_no_secret(case, response.text)
    assert seen == []


async def test_missing_signature_header_is_refused(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        headers, body = case.delivery()
        del headers[case.signature_header]
        response = await hub.post(case.topic, body, headers)
    assert response.status_code == 403
    name, message = error_of(response)
    assert name.endswith("MissingError")
    assert case.signature_header.lower() in message.lower()


async def test_malformed_signature_header_is_403_not_500(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        headers, body = case.delivery()
        headers[case.signature_header] = case.malformed
        response = await hub.post(case.topic, body, headers)
    assert response.status_code == 403
    name, _ = error_of(response)
    assert name.endswith(("MalformedError", "MismatchError"))
    assert_no_secret(case, response.text)


async def test_no_secret_configured_refuses_everything(case: Case) -> None:
    async with running({case.module: case.config([])}) as hub:
        headers, body = case.delivery()
        response = await hub.post(case.topic, body, headers)
    assert response.status_code == 403
    name, message = error_of(response)
    assert name == "WebhookSecretNotConfiguredError"
    assert "events.modules." + case.module in message
    assert "dangerouslyAllowUnauthenticatedEvents" in message


async def test_previous_secret_is_accepted_during_rotation(case: Case) -> None:
    config = case.config([case.secrets[0], case.secrets[1]])
    async with running({case.module: config}) as hub:
        routed = await hub.record(f"{case.topic}.>")
        old_headers, old_body = case.delivery(secret=case.secrets[1])
        retired_headers, retired_body = case.delivery(secret=case.secrets[2])
        accepted = await hub.post(case.topic, old_body, old_headers)
        refused = await hub.post(case.topic, retired_body, retired_headers)
        await hub.drain()
    assert accepted.status_code == 202
    assert refused.status_code == 403
    assert [event.topic for event in routed] == [case.routed_to]


async def test_tampered_body(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        headers, body = case.delivery()
        # One more space after the first colon: the same JSON, different bytes.
        tampered = body.replace(b":", b":  ", 1)
        assert tampered != body
        response = await hub.post(case.topic, tampered, headers)
    if case.signs_body:
        assert response.status_code == 403
        assert error_of(response)[0] == "SignatureMismatchError"
    else:
        # A shared token authenticates the sender only; the body is not covered.
        assert response.status_code == 202


async def test_unknown_event_type_is_published_and_routed_by_name(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        generic = await hub.record(case.topic)
        routed = await hub.record(f"{case.topic}.>")
        headers, body = load_fixture(*case.fixture)
        headers, body = case.change_event(headers, body, "made_up_event")
        response = await hub.post(case.topic, body, case.signed(headers, body, case.secrets[0]))
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in generic] == [case.topic]
    assert [event.topic for event in routed] == [f"{case.topic}.made_up_event"]


async def test_delivery_without_event_type_stays_on_its_topic(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        generic = await hub.record(case.topic)
        routed = await hub.record(f"{case.topic}.>")
        headers, body = load_fixture(*case.fixture)
        headers, body = case.change_event(headers, body, None)
        response = await hub.post(case.topic, body, case.signed(headers, body, case.secrets[0]))
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in generic] == [case.topic]
    assert routed == []


async def test_redelivery_is_accepted_and_published_once(case: Case) -> None:
    async with running({case.module: case.config([case.secrets[0]])}) as hub:
        generic = await hub.record(case.topic)
        routed = await hub.record(f"{case.topic}.>")
        headers, body = case.delivery()
        first = await hub.post(case.topic, body, headers)
        again = await hub.post(case.topic, body, headers)
        await hub.drain()
    assert (first.status_code, again.status_code) == (202, 202)
    assert len(generic) == 1
    assert [event.topic for event in routed] == [case.routed_to]


async def test_unauthenticated_events_when_dangerously_allowed(case: Case) -> None:
    config = case.config([])
    if case.module == "webhooks":
        config["topics"][case.topic]["dangerouslyAllowUnauthenticatedEvents"] = True
    else:
        config["dangerouslyAllowUnauthenticatedEvents"] = True
    async with running({case.module: config}) as hub:
        routed = await hub.record(f"{case.topic}.>")
        headers, body = load_fixture(*case.fixture)
        response = await hub.post(case.topic, body, headers)
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in routed] == [case.routed_to]
