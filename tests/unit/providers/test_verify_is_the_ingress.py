"""Each provider's public ``verify`` and its registered ingress validator give one verdict.

For every provider, a set of requests (authentic, wrong secret, tampered body, missing or
malformed header, and the provider's own variants) goes both to ``verify`` and to the validator
the module registers; a request one refuses the other refuses with the same answer, and a
request one accepts the other accepts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from callboard import build
from callboard.config import parse_config
from callboard.ingress.parsers import parse_json
from callboard.ingress.types import Headers, MediaType, WebhookRequest
from callboard.providers import (
    HmacScheme,
    azure,
    bitbucket,
    generic_hmac,
    gerrit,
    gitea,
    github,
    gitlab,
    standard_webhooks,
)
from callboard.providers._signatures import Failure
from callboard.testing import (
    basic_auth,
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

SECRET = "current-secret-6Fh"
OTHER = "other-secret-1Xb"
APP_SECRET = "app-secret-4Ns"
WHSEC = new_standard_webhooks_secret()
OTHER_WHSEC = new_standard_webhooks_secret()
BODY = b'{"eventType": "git.push", "type": "patchset-created", "object_kind": "push"}'
ACME = HmacScheme("sha512", "sha512=", "base64")
ACME_WHERE = "events.modules.webhooks.topics.acme.hmac.secret"

Request = tuple[str, Headers, bytes]
Sign = Callable[[bytes, str], dict[str, str]]


def lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def signed_variants(sign: Sign, header: str, malformed: tuple[str, ...]) -> list[Request]:
    """The requests every signing scheme is tried with."""
    header = header.lower()
    good = lowered(sign(BODY, SECRET))
    missing = {name: value for name, value in good.items() if name != header}
    requests: list[Request] = [
        ("authentic", good, BODY),
        ("other secret", lowered(sign(BODY, OTHER)), BODY),
        ("tampered body", good, BODY.replace(b":", b":  ", 1)),
        ("missing header", missing, BODY),
    ]
    requests += [(f"malformed {value!r}", good | {header: value}, BODY) for value in malformed]
    return requests


@dataclass(frozen=True)
class Case:
    id: str
    modules: dict[str, Any]
    topic: str
    verify: Callable[[Headers, bytes], Failure | None]
    requests: list[Request]


def github_requests() -> list[Request]:
    app = lowered(sign_github(BODY, APP_SECRET, app_id=7))
    repeated: dict[str, str | list[str]] = dict(app)
    repeated["x-hub-signature-256"] = [app["x-hub-signature-256"], "x"]
    return [
        *signed_variants(
            lambda body, secret: sign_github(body, secret),
            "X-Hub-Signature-256",
            ("", "sha256=zz", "sha1=" + "0" * 40, "0" * 64, "sha256=é"),
        ),
        ("app secret, from the app", app, BODY),
        ("app secret, from no app", lowered(sign_github(BODY, APP_SECRET)), BODY),
        ("app secret, from another app", lowered(sign_github(BODY, APP_SECRET, app_id=8)), BODY),
        ("generic secret, from the app", lowered(sign_github(BODY, SECRET, app_id=7)), BODY),
        ("other secret, from the app", lowered(sign_github(BODY, OTHER, app_id=7)), BODY),
        ("repeated signature header", repeated, BODY),
    ]


def gitlab_requests() -> list[Request]:
    now = int(time.time())
    return [
        *signed_variants(
            lambda body, secret: sign_gitlab(body, token=secret), "X-Gitlab-Token", ("", "☃")
        ),
        ("signed", lowered(sign_gitlab(BODY, signing_token=WHSEC)), BODY),
        ("signed, other key", lowered(sign_gitlab(BODY, signing_token=OTHER_WHSEC)), BODY),
        (
            "signed, stale",
            lowered(sign_gitlab(BODY, signing_token=WHSEC, timestamp=now - 3600)),
            BODY,
        ),
        (
            "forged signature, good token",
            lowered(sign_gitlab(BODY, token=SECRET, signing_token=OTHER_WHSEC)),
            BODY,
        ),
        ("nothing", {"content-type": "application/json"}, BODY),
    ]


def azure_requests() -> list[Request]:
    return [
        ("secret header", lowered(sign_azure_devops(SECRET)), BODY),
        ("other secret header", lowered(sign_azure_devops(OTHER)), BODY),
        ("basic", lowered(sign_azure_devops(username="callboard", password=SECRET)), BODY),
        ("other basic", {"authorization": basic_auth("callboard", OTHER)}, BODY),
        ("malformed basic", {"authorization": "Basic %%%"}, BODY),
        ("bearer", {"authorization": "Bearer abc"}, BODY),
        ("non-Latin-1 secret", {"x-ado-webhook-secret": "☃"}, BODY),
        ("nothing", {}, BODY),
    ]


def gerrit_requests() -> list[Request]:
    return [
        ("proxy header", lowered(sign_gerrit(SECRET, header="X-Proxy-Auth")), BODY),
        ("other secret", lowered(sign_gerrit(OTHER, header="X-Proxy-Auth")), BODY),
        ("default header", lowered(sign_gerrit(SECRET)), BODY),
        ("non-Latin-1", {"x-proxy-auth": "☃"}, BODY),
        ("nothing", {}, BODY),
    ]


def acme(body: bytes, secret: str) -> dict[str, str]:
    return sign_hmac(
        body,
        secret,
        header="X-Acme-Signature",
        algorithm="sha512",
        prefix="sha512=",
        encoding="base64",
    )


def cases() -> list[Case]:
    """Every provider's case, its requests signed now: signatures with a timestamp (Standard
    Webhooks, GitLab's signing token) go stale minutes after they are made, and a long run of
    the suite starts this test well after its collection."""
    return [
        Case(
            "github",
            {
                "github": {
                    "webhookSecret": SECRET,
                    "apps": [{"appId": 7, "webhookSecret": APP_SECRET}],
                }
            },
            "github",
            lambda headers, body: github.verify(headers, body, [SECRET], apps={"7": [APP_SECRET]}),
            github_requests(),
        ),
        Case(
            "github-without-apps",
            {"github": {"webhookSecret": SECRET}},
            "github",
            lambda headers, body: github.verify(headers, body, [SECRET]),
            github_requests(),
        ),
        Case(
            "gitlab",
            {"gitlab": {"webhookSecret": SECRET, "signingToken": WHSEC}},
            "gitlab",
            lambda headers, body: gitlab.verify(headers, body, [SECRET], signing_keys=[WHSEC]),
            gitlab_requests(),
        ),
        Case(
            "gitlab-signing-only",
            {"gitlab": {"signingToken": WHSEC, "timestampToleranceSeconds": 7200}},
            "gitlab",
            lambda headers, body: gitlab.verify(
                headers, body, [], signing_keys=[WHSEC], tolerance=7200
            ),
            gitlab_requests(),
        ),
        Case(
            "bitbucketCloud",
            {"bitbucketCloud": {"webhookSecret": SECRET}},
            "bitbucketCloud",
            lambda headers, body: bitbucket.verify(headers, body, [SECRET]),
            signed_variants(
                lambda body, secret: sign_bitbucket_cloud(body, secret),
                "X-Hub-Signature",
                ("sha256=abc", "sha1=" + "0" * 40),
            ),
        ),
        Case(
            "bitbucketServer",
            {"bitbucketServer": {"webhookSecret": SECRET}},
            "bitbucketServer",
            lambda headers, body: bitbucket.verify(
                headers, body, [SECRET], failures=bitbucket.SERVER_FAILURES
            ),
            signed_variants(
                lambda body, secret: sign_bitbucket_server(body, secret),
                "X-Hub-Signature",
                ("sha256=abc", "0" * 64),
            ),
        ),
        Case(
            "azureDevOps",
            {
                "azureDevOps": {
                    "webhookSecret": SECRET,
                    "basicAuth": {"username": "callboard", "password": SECRET},
                }
            },
            "azureDevOps",
            lambda headers, body: azure.verify(
                headers, [SECRET], credentials=[azure.basic_credential("callboard", SECRET)]
            ),
            azure_requests(),
        ),
        Case(
            "azureDevOps-basic-only",
            {"azureDevOps": {"basicAuth": {"username": "callboard", "password": SECRET}}},
            "azureDevOps",
            lambda headers, body: azure.verify(
                headers, [], credentials=[azure.basic_credential("callboard", SECRET)]
            ),
            azure_requests(),
        ),
        Case(
            "gerrit",
            {"gerrit": {"webhookSecret": SECRET, "secretHeader": "X-Proxy-Auth"}},
            "gerrit",
            lambda headers, body: gerrit.verify(headers, [SECRET], header="x-proxy-auth"),
            gerrit_requests(),
        ),
        Case(
            "gitea",
            {"gitea": {"webhookSecret": SECRET}},
            "gitea",
            lambda headers, body: gitea.verify(headers, body, [SECRET]),
            signed_variants(
                lambda body, secret: sign_gitea(body, secret),
                "X-Gitea-Signature",
                ("sha256=" + "0" * 64, "zz", ""),
            ),
        ),
        Case(
            "standard-webhooks",
            {"webhooks": {"topics": {"billing": {"standardWebhooks": {"secret": WHSEC}}}}},
            "billing",
            lambda headers, body: standard_webhooks.verify(headers, body, [WHSEC]),
            signed_variants(
                lambda body, secret: sign_standard_webhooks(
                    body, WHSEC if secret == SECRET else OTHER_WHSEC
                ),
                "webhook-signature",
                ("v1,%%%", "v2,abc", "v1a,ZmFrZQ=="),
            ),
        ),
        Case(
            "generic-hmac",
            {
                "webhooks": {
                    "topics": {
                        "acme": {
                            "hmac": {
                                "header": "X-Acme-Signature",
                                "secret": SECRET,
                                "algorithm": "sha512",
                                "prefix": "sha512=",
                                "encoding": "base64",
                            }
                        }
                    }
                }
            },
            "acme",
            lambda headers, body: generic_hmac.verify(
                headers,
                body,
                [SECRET],
                header="X-Acme-Signature",
                scheme=ACME,
                failures=generic_hmac.failures_for("X-Acme-Signature", ACME, ACME_WHERE),
            ),
            signed_variants(acme, "X-Acme-Signature", ("sha512=" + "A" * 12, "sha512=!!", "")),
        ),
    ]


CASE_IDS = [case.id for case in cases()]


@pytest.mark.parametrize("case_id", CASE_IDS)
async def test_verify_and_the_registered_ingress_agree(case_id: str) -> None:
    (case,) = [case for case in cases() if case.id == case_id]
    board = build(parse_config({"events": {"modules": case.modules}}), use_entry_points=False)
    validator = board.ingress.ingresses[case.topic].validator
    assert validator is not None
    verdicts = []
    for name, headers, body in case.requests:
        request = WebhookRequest(
            case.topic, headers, body, MediaType("application/json"), parse_json
        )
        expected = case.verify(headers, body)
        answer = await validator(request)
        assert answer == (None if expected is None else expected.rejection()), name
        verdicts.append(expected is None)
    # Both verdicts are tried: some requests are accepted, some refused.
    assert True in verdicts
    assert False in verdicts
