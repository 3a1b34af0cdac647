"""Sign test deliveries the way each provider does, for tests of code that receives them.

Each helper returns the headers of one delivery (signature, event type, delivery id and
``Content-Type``) for the exact ``body`` bytes you then send::

    body = b'{"ref": "refs/heads/main"}'
    headers = sign_github(body, "test-secret", event="push")
    await client.post("/api/events/http/github", content=body, headers=headers)

They are written from the providers' documentation with the standard library only, apart
from callboard's own checks, so a test that uses them checks callboard against the format.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid

JSON = "application/json"


def _bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def _hex_hmac(secret: str | bytes, body: bytes, algorithm: str = "sha256") -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, body, algorithm).hexdigest()


def sign_github(
    body: bytes | str,
    secret: str,
    *,
    event: str = "push",
    delivery: str | None = None,
    content_type: str = JSON,
    app_id: int | str | None = None,
) -> dict[str, str]:
    """A GitHub delivery: ``X-Hub-Signature-256`` (and the legacy SHA-1 ``X-Hub-Signature``).

    ``app_id`` marks the delivery as coming from that GitHub App. For form-encoded deliveries
    pass ``content_type="application/x-www-form-urlencoded"`` and a ``payload=...`` body.
    """
    raw = _bytes(body)
    headers = {
        "Content-Type": content_type,
        "User-Agent": "GitHub-Hookshot/7c1f3e2",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "482911077",
        "X-Hub-Signature": "sha1=" + _hex_hmac(secret, raw, "sha1"),
        "X-Hub-Signature-256": "sha256=" + _hex_hmac(secret, raw),
    }
    if app_id is not None:
        headers["X-GitHub-Hook-Installation-Target-Type"] = "integration"
        headers["X-GitHub-Hook-Installation-Target-ID"] = str(app_id)
    else:
        headers["X-GitHub-Hook-Installation-Target-Type"] = "repository"
        headers["X-GitHub-Hook-Installation-Target-ID"] = "35129377"
    return headers


def sign_gitea(
    body: bytes | str, secret: str, *, event: str = "push", delivery: str | None = None
) -> dict[str, str]:
    """A Gitea delivery: ``X-Gitea-Signature`` is the hex HMAC-SHA256, without a prefix."""
    raw = _bytes(body)
    signature = _hex_hmac(secret, raw)
    delivery = delivery or str(uuid.uuid4())
    return {
        "Content-Type": JSON,
        "X-Gitea-Delivery": delivery,
        "X-Gitea-Event": event,
        "X-Gitea-Event-Type": event,
        "X-Gitea-Signature": signature,
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": event,
        "X-Gogs-Delivery": delivery,
        "X-Gogs-Event": event,
        "X-Gogs-Signature": signature,
        "X-Hub-Signature-256": "sha256=" + signature,
    }


def sign_bitbucket_cloud(
    body: bytes | str,
    secret: str,
    *,
    event_key: str = "repo:push",
    request_uuid: str | None = None,
) -> dict[str, str]:
    """A Bitbucket Cloud delivery: ``X-Hub-Signature: sha256=<hex>``."""
    return {
        "Content-Type": JSON,
        "User-Agent": "Bitbucket-Webhooks/2.0",
        "X-Event-Key": event_key,
        "X-Hook-UUID": "{4f1a2b6c-6e3d-4c8a-9d55-0b7e8f2a1c33}",
        "X-Request-UUID": request_uuid or str(uuid.uuid4()),
        "X-Attempt-Number": "1",
        "X-Hub-Signature": "sha256=" + _hex_hmac(secret, _bytes(body)),
    }


def sign_bitbucket_server(
    body: bytes | str,
    secret: str,
    *,
    event_key: str = "repo:refs_changed",
    request_id: str | None = None,
) -> dict[str, str]:
    """A Bitbucket Server / Data Center delivery: ``X-Hub-Signature: sha256=<hex>``."""
    return {
        "Content-Type": "application/json; charset=utf-8",
        "X-Event-Key": event_key,
        "X-Request-Id": request_id or str(uuid.uuid4()),
        "X-Hub-Signature": "sha256=" + _hex_hmac(secret, _bytes(body)),
    }


def sign_standard_webhooks(
    body: bytes | str,
    secret: str,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """A Standard Webhooks delivery signed with a ``whsec_...`` secret (``v1``, HMAC-SHA256)."""
    msg_id = msg_id or "msg_" + uuid.uuid4().hex
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{stamp}.".encode() + _bytes(body)
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "Content-Type": JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": f"v1,{signature}",
    }


def new_standard_webhooks_secret() -> str:
    """A fresh ``whsec_`` secret with a 32-byte key."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign_gitlab(
    body: bytes | str = b"",
    *,
    token: str | None = None,
    signing_token: str | None = None,
    event: str = "Push Hook",
    idempotency_key: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """A GitLab delivery with its secret ``token`` (``X-Gitlab-Token``), its
    ``signing_token`` (Standard Webhooks headers over ``body``), or both."""
    key = idempotency_key or str(uuid.uuid4())
    headers = {
        "Content-Type": JSON,
        "User-Agent": "GitLab/17.6.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "X-Gitlab-Webhook-UUID": "3c5d1bf0-7a1e-4b8e-8f0b-6a51f2e0c9d4",
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "Idempotency-Key": key,
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    if signing_token is not None:
        signed = sign_standard_webhooks(body, signing_token, msg_id=key, timestamp=timestamp)
        del signed["Content-Type"]
        headers.update(signed)
    return headers


def sign_azure_devops(
    secret: str | None = None, *, username: str | None = None, password: str | None = None
) -> dict[str, str]:
    """An Azure DevOps delivery with the ``x-ado-webhook-secret`` header and/or Basic auth."""
    headers = {"Content-Type": "application/json; charset=utf-8"}
    if secret is not None:
        headers["x-ado-webhook-secret"] = secret
    if username is not None or password is not None:
        headers["Authorization"] = basic_auth(username or "", password or "")
    return headers


def basic_auth(username: str, password: str) -> str:
    """An ``Authorization`` header value for Basic authentication."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def sign_gerrit(secret: str, *, header: str = "x-webhook-secret") -> dict[str, str]:
    """A Gerrit delivery with the shared secret in ``header`` (added by a proxy in front)."""
    return {"Content-Type": "application/json; charset=utf-8", header: secret}


def sign_hmac(
    body: bytes | str,
    secret: str,
    *,
    header: str,
    algorithm: str = "sha256",
    prefix: str = "",
    encoding: str = "hex",
) -> dict[str, str]:
    """A delivery for the generic HMAC check: ``header: <prefix><digest>``."""
    digest = hmac.new(secret.encode(), _bytes(body), algorithm).digest()
    written = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    return {"Content-Type": JSON, header: prefix + written}
