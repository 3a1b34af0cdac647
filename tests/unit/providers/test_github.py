from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from callboard import Event
from callboard.providers import github
from callboard.testing import sign_github
from tests.unit.providers.harness import error_of, load_fixture, running

SECRET = "gh-secret-5Jp"


@pytest.mark.parametrize(
    ("fixture", "topic"), [("pull_request", "github.pull_request"), ("ping", "github.ping")]
)
async def test_fixtures_are_routed(fixture: str, topic: str) -> None:
    async with running({"github": {"webhookSecret": SECRET}}) as hub:
        routed = await hub.record("github.>")
        headers, body = load_fixture("github", fixture)
        response = await hub.post("github", body, sign_github(body, SECRET) | headers)
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in routed] == [topic]


async def test_form_encoded_delivery() -> None:
    _, document = load_fixture("github", "push")
    body = urlencode({"payload": json.dumps(json.loads(document))}).encode()
    headers = sign_github(body, SECRET, content_type="application/x-www-form-urlencoded")
    async with running({"github": {"webhookSecret": SECRET}}) as hub:
        routed = await hub.record("github.push")
        response = await hub.post("github", body, headers)
        await hub.drain()
    assert response.status_code == 202
    assert routed[0].payload == json.loads(document)


async def test_github_app_secrets() -> None:
    config = {
        "apps": [
            {"appId": 1234, "webhookSecret": "app-secret"},
            {"appId": 99, "webhookSecret": ["b", "c"]},
        ]
    }
    _, body = load_fixture("github", "push")
    async with running({"github": config}) as hub:
        from_app = await hub.post("github", body, sign_github(body, "app-secret", app_id=1234))
        rotated = await hub.post("github", body, sign_github(body, "c", app_id=99))
        from_repo = await hub.post("github", body, sign_github(body, "app-secret"))
        wrong = await hub.post("github", body, sign_github(body, "nope", app_id=1234))
    assert (from_app.status_code, rotated.status_code, from_repo.status_code) == (202, 202, 202)
    assert wrong.status_code == 403


async def test_legacy_sha1_signature_alone_is_refused() -> None:
    _, body = load_fixture("github", "push")
    headers = sign_github(body, SECRET)
    del headers["X-Hub-Signature-256"]
    async with running({"github": {"webhookSecret": SECRET}}) as hub:
        response = await hub.post("github", body, headers)
    assert response.status_code == 403
    assert error_of(response)[0] == "SignatureMissingError"


def test_verify_is_pure() -> None:
    _, body = load_fixture("github", "push")
    headers = {k.lower(): v for k, v in sign_github(body, SECRET).items()}
    assert github.verify(headers, body, [SECRET]) is None
    assert github.verify(headers, body, [b"other", SECRET.encode()]) is None
    assert github.verify(headers, body + b" ", [SECRET]) == github.FAILURES.mismatch
    assert github.verify({}, body, [SECRET]) == github.FAILURES.missing
    repeated: dict[str, str | list[str]] = dict(headers)
    repeated["x-hub-signature-256"] = [headers["x-hub-signature-256"], "x"]
    assert github.verify(repeated, body, [SECRET]) is None


def test_app_id_and_secret_order() -> None:
    assert (
        github.app_id(
            {
                "x-github-hook-installation-target-type": "integration",
                "x-github-hook-installation-target-id": "7",
            }
        )
        == "7"
    )
    assert (
        github.app_id(
            {
                "x-github-hook-installation-target-type": "repository",
                "x-github-hook-installation-target-id": "7",
            }
        )
        is None
    )
    everything, per_app = github.secrets_in_order(["g"], {"1": ["a1"], "2": ["b1", "b2"]})
    assert everything == (b"g", b"a1", b"b1", b"b2")
    assert per_app["2"] == (b"b1", b"b2", b"g", b"a1")


def test_sub_topic_and_delivery_id() -> None:
    assert github.sub_topic(Event(topic="github", metadata={"x-github-event": "push"})) == "push"
    assert github.sub_topic(Event(topic="github")) is None


async def test_event_type_that_is_not_a_topic_segment_is_not_routed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    headers, body = load_fixture("github", "push")
    headers["X-GitHub-Event"] = "not a segment"
    async with running({"github": {"webhookSecret": SECRET}}) as hub:
        generic = await hub.record("github")
        routed = await hub.record("github.>")
        response = await hub.post("github", body, sign_github(body, SECRET) | headers)
        await hub.drain()
    assert response.status_code == 202
    assert len(generic) == 1
    assert routed == []
    assert "not a valid topic segment" in caplog.text
