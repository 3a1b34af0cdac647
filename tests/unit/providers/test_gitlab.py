from __future__ import annotations

import time

from callboard import Event
from callboard.ingress.parsers import parse_json
from callboard.ingress.types import MediaType, WebhookRequest
from callboard.providers import gitlab, standard_webhooks
from callboard.testing import new_standard_webhooks_secret, sign_gitlab
from tests.unit.providers.harness import error_of, load_fixture, running

TOKEN = "gl-token-8Rv"
SIGNING = new_standard_webhooks_secret()


async def test_token_is_kept_out_of_event_metadata() -> None:
    headers, body = load_fixture("gitlab", "push")
    async with running({"gitlab": {"webhookSecret": TOKEN}}) as hub:
        routed = await hub.record("gitlab.push")
        response = await hub.post("gitlab", body, sign_gitlab(body, token=TOKEN) | headers)
        await hub.drain()
    assert response.status_code == 202
    assert "x-gitlab-token" not in routed[0].metadata
    assert routed[0].header("x-gitlab-event") == "Push Hook"


async def test_token_or_signature_when_both_are_configured() -> None:
    headers, body = load_fixture("gitlab", "push")
    config = {"webhookSecret": TOKEN, "signingToken": SIGNING}
    async with running({"gitlab": config}) as hub:
        by_token = await hub.post("gitlab", body, sign_gitlab(body, token=TOKEN) | headers)
        signed = sign_gitlab(body, signing_token=SIGNING, idempotency_key="k2")
        by_signature = await hub.post("gitlab", body, signed)
        forged = sign_gitlab(body, token=TOKEN, signing_token=new_standard_webhooks_secret())
        bad_signature = await hub.post("gitlab", body, forged)
    assert (by_token.status_code, by_signature.status_code) == (202, 202)
    assert bad_signature.status_code == 403


async def test_signing_only_refuses_token_requests() -> None:
    _, body = load_fixture("gitlab", "push")
    async with running({"gitlab": {"signingToken": SIGNING}}) as hub:
        response = await hub.post("gitlab", body, sign_gitlab(body, token=TOKEN))
    assert response.status_code == 403
    name, message = error_of(response)
    assert name == "SignatureMissingError"
    assert "signingToken" in message


async def test_replayed_signature_is_refused() -> None:
    _, body = load_fixture("gitlab", "push")
    old = int(time.time()) - 3600
    config = {"signingToken": SIGNING, "timestampToleranceSeconds": 600}
    async with running({"gitlab": config}) as hub:
        response = await hub.post(
            "gitlab", body, sign_gitlab(body, signing_token=SIGNING, timestamp=old)
        )
    assert response.status_code == 403
    name, message = error_of(response)
    assert name == "TimestampOutOfToleranceError"
    assert "600 seconds" in message


def test_sub_topic_prefers_event_name() -> None:
    assert (
        gitlab.sub_topic(Event(topic="gitlab", payload={"event_name": "project_create"}))
        == "project_create"
    )
    assert gitlab.sub_topic(Event(topic="gitlab", payload={"object_kind": "note"})) == "note"
    both = {"event_name": "tag_push", "object_kind": "tag_push"}
    assert gitlab.sub_topic(Event(topic="gitlab", payload=both)) == "tag_push"
    assert gitlab.sub_topic(Event(topic="gitlab", payload=[1, 2])) is None
    assert gitlab.sub_topic(Event(topic="gitlab", payload={"object_kind": ""})) is None


def request(headers: dict[str, str]) -> WebhookRequest:
    return WebhookRequest("gitlab", headers, b"{}", MediaType("application/json"), parse_json)


def test_delivery_id_order() -> None:
    assert gitlab.delivery_id(request({"idempotency-key": "a", "webhook-id": "b"})) == "a"
    assert gitlab.delivery_id(request({"webhook-id": "b", "x-gitlab-event-uuid": "c"})) == "b"
    assert gitlab.delivery_id(request({"x-gitlab-event-uuid": "c"})) == "c"
    assert gitlab.delivery_id(request({})) is None


def test_verify_is_pure() -> None:
    headers = {k.lower(): v for k, v in sign_gitlab(b"{}", signing_token=SIGNING).items()}
    key = standard_webhooks.decode_secret(SIGNING)
    assert gitlab.verify(headers, b"{}", [], signing_keys=[key]) is None
    assert gitlab.verify(headers, b"{}", [], signing_keys=[SIGNING]) is None
    assert gitlab.verify({"x-gitlab-token": TOKEN}, b"", [TOKEN]) is None
    assert gitlab.verify({}, b"", [TOKEN]) == gitlab.TOKEN_FAILURES.missing
