"""Bitbucket, Azure DevOps, Gerrit and Gitea specifics."""

from __future__ import annotations

import json

import pytest

from callboard.ingress.parsers import parse_json
from callboard.ingress.types import MediaType, WebhookRequest
from callboard.providers import azure, bitbucket, gerrit, gitea
from callboard.testing import (
    basic_auth,
    sign_azure_devops,
    sign_bitbucket_cloud,
    sign_bitbucket_server,
    sign_gerrit,
    sign_gitea,
)
from tests.unit.providers.harness import error_of, load_fixture, running

SECRET = "shared-secret-2Tn"


@pytest.mark.parametrize(
    ("fixture", "topic"),
    [
        ("repo_refs_changed", "bitbucketServer.repo:refs_changed"),
        ("pr_opened", "bitbucketServer.pr:opened"),
        ("diagnostics_ping", "bitbucketServer.diagnostics:ping"),
    ],
)
async def test_bitbucket_server_events(fixture: str, topic: str) -> None:
    headers, body = load_fixture("bitbucketServer", fixture)
    async with running({"bitbucketServer": {"webhookSecret": SECRET}}) as hub:
        routed = await hub.record("bitbucketServer.>")
        response = await hub.post(
            "bitbucketServer", body, sign_bitbucket_server(body, SECRET) | headers
        )
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in routed] == [topic]
    assert routed[0].delivery_id == headers["X-Request-Id"]


async def test_bitbucket_cloud_pull_request() -> None:
    headers, body = load_fixture("bitbucketCloud", "pullrequest_created")
    async with running({"bitbucketCloud": {"webhookSecret": SECRET}}) as hub:
        routed = await hub.record("bitbucketCloud.>")
        response = await hub.post(
            "bitbucketCloud", body, sign_bitbucket_cloud(body, SECRET) | headers
        )
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in routed] == ["bitbucketCloud.pullrequest:created"]


async def test_both_bitbucket_flavours_side_by_side() -> None:
    _, body = load_fixture("bitbucketCloud", "repo_push")
    config = {
        "bitbucketCloud": {"webhookSecret": "cloud"},
        "bitbucketServer": {"webhookSecret": "server"},
    }
    async with running(config) as hub:
        cloud = await hub.post("bitbucketCloud", body, sign_bitbucket_cloud(body, "cloud"))
        crossed = await hub.post("bitbucketServer", body, sign_bitbucket_server(body, "cloud"))
    assert (cloud.status_code, crossed.status_code) == (202, 403)
    assert "events.modules.bitbucketServer.webhookSecret" in error_of(crossed)[1]


def test_bitbucket_verify_is_pure() -> None:
    body = b'{"test": true}'
    headers = {"x-hub-signature": sign_bitbucket_server(body, SECRET)["X-Hub-Signature"]}
    assert bitbucket.verify(headers, body, [SECRET]) is None
    assert bitbucket.verify(headers, body, ["x"], failures=bitbucket.SERVER_FAILURES) == (
        bitbucket.SERVER_FAILURES.mismatch
    )


async def test_azure_basic_auth() -> None:
    headers, body = load_fixture("azureDevOps", "git_pullrequest_created")
    config = {"basicAuth": {"username": "callboard", "password": "pw-4Lq"}}
    async with running({"azureDevOps": config}) as hub:
        routed = await hub.record("azureDevOps.>")
        good = await hub.post(
            "azureDevOps",
            body,
            headers | sign_azure_devops(username="callboard", password="pw-4Lq"),
        )
        bad = await hub.post(
            "azureDevOps", body, headers | {"Authorization": basic_auth("callboard", "no")}
        )
        malformed = await hub.post("azureDevOps", body, headers | {"Authorization": "Basic %%%"})
        missing = await hub.post("azureDevOps", body, headers)
        await hub.drain()
    assert good.status_code == 202
    assert [event.topic for event in routed] == ["azureDevOps.git.pullrequest.created"]
    assert "authorization" not in routed[0].metadata
    assert error_of(bad)[0] == "CredentialsMismatchError"
    assert error_of(malformed)[0] == "CredentialsMalformedError"
    assert error_of(missing)[0] == "CredentialsMissingError"
    assert "pw-4Lq" not in bad.text + malformed.text + missing.text


async def test_azure_secret_header_is_kept_out_of_metadata() -> None:
    headers, body = load_fixture("azureDevOps", "git_push")
    async with running({"azureDevOps": {"webhookSecret": SECRET}}) as hub:
        routed = await hub.record("azureDevOps.>")
        await hub.post("azureDevOps", body, headers | sign_azure_devops(SECRET))
        await hub.drain()
    assert "x-ado-webhook-secret" not in routed[0].metadata
    assert SECRET not in repr(routed[0])


def azure_request(body: object) -> WebhookRequest:
    raw = json.dumps(body).encode()
    return WebhookRequest("azureDevOps", {}, raw, MediaType("application/json"), parse_json)


def test_azure_delivery_id() -> None:
    assert azure.delivery_id(azure_request({"subscriptionId": "s", "notificationId": 4})) == "s:4"
    assert azure.delivery_id(azure_request({"notificationId": 4})) == "4"
    assert azure.delivery_id(azure_request({"id": "x"})) is None
    assert azure.delivery_id(azure_request([1])) is None


def test_azure_verify_is_pure() -> None:
    credential = azure.basic_credential("u", "p")
    assert (
        azure.verify({"authorization": basic_auth("u", "p")}, [], credentials=[credential]) is None
    )
    assert azure.verify({"x-ado-webhook-secret": SECRET}, [SECRET]) is None
    assert azure.verify({"x-ado-webhook-secret": SECRET}, [], credentials=[credential]) == (
        azure.SECRET_FAILURES.mismatch
    )
    assert azure.verify({"authorization": "Bearer abc"}, [], credentials=[credential]) == (
        azure.BASIC_MALFORMED
    )


async def test_gerrit_custom_secret_header_and_merge_event() -> None:
    headers, body = load_fixture("gerrit", "change_merged")
    config = {"webhookSecret": SECRET, "secretHeader": "X-Proxy-Auth"}
    async with running({"gerrit": config}) as hub:
        routed = await hub.record("gerrit.>")
        good = await hub.post("gerrit", body, headers | sign_gerrit(SECRET, header="X-Proxy-Auth"))
        default_header = await hub.post("gerrit", body, headers | sign_gerrit(SECRET))
        await hub.drain()
    assert good.status_code == 202
    assert [event.topic for event in routed] == ["gerrit.change-merged"]
    assert "x-proxy-auth" not in routed[0].metadata
    assert default_header.status_code == 403
    assert "x-proxy-auth" in error_of(default_header)[1]


async def test_gerrit_without_body_deduplication() -> None:
    headers, body = load_fixture("gerrit", "patchset_created")
    config = {"webhookSecret": SECRET, "deduplicateByBody": False}
    async with running({"gerrit": config}) as hub:
        routed = await hub.record("gerrit.>")
        for _ in range(2):
            await hub.post("gerrit", body, headers | sign_gerrit(SECRET))
        await hub.drain()
    assert len(routed) == 2
    assert routed[0].delivery_id is None


def test_gerrit_verify_is_pure() -> None:
    assert gerrit.verify({"x-webhook-secret": SECRET}, [SECRET]) is None
    assert gerrit.verify({"x-other": SECRET}, [SECRET], header="x-other") is None
    assert gerrit.verify({}, [SECRET]) is not None


async def test_gitea_pull_request() -> None:
    headers, body = load_fixture("gitea", "pull_request")
    async with running({"gitea": {"webhookSecret": SECRET}}) as hub:
        routed = await hub.record("gitea.>")
        response = await hub.post("gitea", body, sign_gitea(body, SECRET) | headers)
        await hub.drain()
    assert response.status_code == 202
    assert [event.topic for event in routed] == ["gitea.pull_request"]


def test_gitea_verify_is_pure() -> None:
    body = b"{}"
    signature = sign_gitea(body, SECRET)["X-Gitea-Signature"]
    assert gitea.verify({"x-gitea-signature": signature}, body, [SECRET]) is None
    assert gitea.verify({"x-gitea-signature": "sha256=" + signature}, body, [SECRET]) == (
        gitea.FAILURES.malformed
    )
