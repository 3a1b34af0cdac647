"""Who may see and change which push target over the API: owners, grants, configured targets
and callers without credentials, through the whole application on the in-memory broker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from callboard.app import create_app
from callboard.config import parse_config
from callboard.testing import new_standard_webhooks_secret

SECRET = new_standard_webhooks_secret()
BASE = "/api/events/bus/v1/push"
TOKENS = {"ops": "ops-token-0123456", "team": "team-token-0123456", "audit": "audit-token-012345"}
OPS, TEAM, AUDIT = ({"authorization": f"Bearer {TOKENS[s]}"} for s in ("ops", "team", "audit"))
TARGET = {"url": "https://crm.example.com/hooks", "topics": ["crm.*"], "secret": SECRET}


def config(store: Path, **bus: Any) -> dict[str, Any]:
    static = [
        {"type": "static", "options": {"token": token, "subject": subject}}
        for subject, token in TOKENS.items()
    ]
    return {
        "backend": {"auth": {"externalAccess": static}},
        "events": {
            "pushStorePath": str(store),
            "push": {"billing": {**TARGET, "url": "https://billing.example.com/hooks"}},
            "bus": {"grants": [{"subject": "audit", "subscriptions": ["push.crm*"]}], **bus},
        },
    }


@asynccontextmanager
async def client(data: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(parse_config(data), use_entry_points=False)
    async with (
        app.board.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cb") as http,
    ):
        yield http


async def names(http: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
    listed = await http.get(BASE, headers=headers)
    assert listed.status_code == 200, listed.text
    return [target["name"] for target in listed.json()["push"]]


async def test_a_target_is_seen_and_changed_by_its_maker_only(tmp_path: Path) -> None:
    async with client(config(tmp_path / "push.json")) as http:
        assert (await http.put(f"{BASE}/crm", json=TARGET, headers=OPS)).status_code == 201
        assert await names(http, OPS) == ["crm"]
        assert await names(http, TEAM) == []
        assert (await http.get(f"{BASE}/crm", headers=TEAM)).status_code == 404
        taken = await http.put(
            f"{BASE}/crm", json={**TARGET, "url": "http://10.0.0.1/"}, headers=TEAM
        )
        assert taken.status_code == 403
        assert taken.json()["error"]["name"] == "NotAllowedError"
        message = taken.json()["error"]["message"]
        assert "events.bus.grants" in message
        assert "'push.crm'" in message
        assert "service=ops" not in message  # the owner is not told to others
        assert (await http.delete(f"{BASE}/crm", headers=TEAM)).status_code == 403
        mine = await http.get(f"{BASE}/crm", headers=OPS)
        assert mine.json()["url"] == TARGET["url"]  # the refused PUT changed nothing
        assert (await http.put(f"{BASE}/crm", json=TARGET, headers=OPS)).status_code == 200
        assert (await http.put(f"{BASE}/team", json=TARGET, headers=TEAM)).status_code == 201
        assert await names(http, TEAM) == ["team"]
        assert (await http.delete(f"{BASE}/crm", headers=OPS)).status_code == 204
        # Gone: anyone may make it again, and then it is theirs.
        assert (await http.put(f"{BASE}/crm", json=TARGET, headers=TEAM)).status_code == 201
        assert (await http.get(f"{BASE}/crm", headers=OPS)).status_code == 404


async def test_grants_give_an_owners_rights_by_the_id_push_name(tmp_path: Path) -> None:
    async with client(config(tmp_path / "push.json")) as http:
        for name in ("crm", "crm-eu", "sales"):
            assert (await http.put(f"{BASE}/{name}", json=TARGET, headers=OPS)).status_code == 201
        # audit is granted push.crm*: matched as the bus matches subscription ids.
        assert await names(http, AUDIT) == ["crm", "crm-eu"]
        assert (await http.get(f"{BASE}/sales", headers=AUDIT)).status_code == 404
        assert (await http.delete(f"{BASE}/sales", headers=AUDIT)).status_code == 403
        replaced = await http.put(
            f"{BASE}/crm", json={**TARGET, "topics": ["crm.>"]}, headers=AUDIT
        )
        assert replaced.status_code == 200
        # Replacing does not take the target over: its maker still has it.
        assert (await http.get(f"{BASE}/crm", headers=OPS)).json()["topics"] == ["crm.>"]
        assert (await http.delete(f"{BASE}/crm-eu", headers=AUDIT)).status_code == 204
        assert await names(http, OPS) == ["crm", "sales"]


async def test_configured_targets_are_listed_to_granted_callers_and_never_changed(
    tmp_path: Path,
) -> None:
    data = config(tmp_path / "push.json")
    data["events"]["bus"]["grants"].append({"subject": "ops", "subscriptions": ["push.billing"]})
    async with client(data) as http:
        assert await names(http, OPS) == ["billing"]
        assert await names(http, TEAM) == []
        assert (await http.get(f"{BASE}/billing", headers=TEAM)).status_code == 404
        assert (await http.put(f"{BASE}/billing", json=TARGET, headers=TEAM)).status_code == 403
        for refused in (
            await http.put(f"{BASE}/billing", json=TARGET, headers=OPS),
            await http.delete(f"{BASE}/billing", headers=OPS),
        ):
            assert refused.status_code == 409
            assert "configured in events.push" in refused.json()["error"]["message"]
        assert (await http.get(f"{BASE}/billing", headers=OPS)).json()["source"] == "config"


async def test_owners_are_kept_over_a_restart(tmp_path: Path) -> None:
    data = config(tmp_path / "push.json")
    async with client(data) as http:
        assert (await http.put(f"{BASE}/crm", json=TARGET, headers=OPS)).status_code == 201
    async with client(data) as http:
        assert await names(http, OPS) == ["crm"]
        assert await names(http, TEAM) == []
        assert (await http.delete(f"{BASE}/crm", headers=TEAM)).status_code == 403


async def test_a_target_stored_without_an_owner_is_managed_by_granted_callers_only(
    tmp_path: Path,
) -> None:
    store = tmp_path / "push.json"
    # As the file was written before owners were kept.
    store.write_text(json.dumps({"version": 1, "push": {"crm": TARGET, "sales": TARGET}}))
    async with client(config(store)) as http:
        assert await names(http, OPS) == []
        assert (await http.put(f"{BASE}/sales", json=TARGET, headers=OPS)).status_code == 403
        assert await names(http, AUDIT) == ["crm"]
        assert (await http.delete(f"{BASE}/crm", headers=AUDIT)).status_code == 204


async def test_callers_without_credentials_are_refused_unless_allowed(tmp_path: Path) -> None:
    data = config(tmp_path / "push.json")
    data["backend"]["auth"]["dangerouslyDisableDefaultAuthPolicy"] = True
    async with client(data) as http:
        for refused in (
            await http.get(BASE),
            await http.put(f"{BASE}/crm", json=TARGET),
            await http.delete(f"{BASE}/crm"),
        ):
            assert refused.status_code == 403
            message = refused.json()["error"]["message"]
            assert "backend.auth" in message
            assert "events.bus.anonymousPush" in message
        assert (await http.put(f"{BASE}/crm", json=TARGET, headers=OPS)).status_code == 201
    data["events"]["bus"]["anonymousPush"] = True
    async with client(data) as http:
        assert (await http.put(f"{BASE}/mine", json=TARGET)).status_code == 201
        assert await names(http, {}) == ["mine"]
        # Still the owner rule: the anonymous caller is a caller like any other.
        assert (await http.delete(f"{BASE}/crm")).status_code == 403


async def test_a_method_not_allowed_names_the_allowed_ones(tmp_path: Path) -> None:
    async with client(config(tmp_path / "push.json")) as http:
        listed = await http.post(BASE, json=TARGET, headers=OPS)
        one = await http.post(f"{BASE}/crm", json=TARGET, headers=OPS)
    assert (listed.status_code, listed.headers.get("allow")) == (405, "GET")
    assert (one.status_code, one.headers.get("allow")) == (405, "GET, PUT, DELETE")
    assert one.json()["error"]["name"] == "MethodNotAllowedError"


async def test_a_stored_target_that_cannot_be_read_is_shown_broken_to_its_owner_only(
    tmp_path: Path,
) -> None:
    store = tmp_path / "push.json"
    data = config(store)
    async with client(data) as http:
        assert (await http.put(f"{BASE}/crm", json=TARGET, headers=OPS)).status_code == 201
    document = json.loads(store.read_text())
    document["push"]["crm"]["topics"] = []  # no longer a target
    store.write_text(json.dumps(document))
    async with client(data) as http:
        listed = (await http.get(BASE, headers=OPS)).json()["push"]
        assert [(t["name"], t["source"]) for t in listed] == [("crm", "api")]
        assert "push.crm.topics" in listed[0]["broken"]
        one = await http.get(f"{BASE}/crm", headers=OPS)
        assert one.json()["broken"] == listed[0]["broken"]
        assert await names(http, TEAM) == []
        taken = await http.put(f"{BASE}/crm", json=TARGET, headers=TEAM)
        assert taken.status_code == 403
        fixed = await http.put(f"{BASE}/crm", json=TARGET, headers=OPS)
        assert fixed.status_code == 200
        assert "broken" not in fixed.json()


async def test_the_urls_credentials_are_not_shown(tmp_path: Path) -> None:
    async with client(config(tmp_path / "push.json")) as http:
        url = "https://ops:hunter2@crm.example.com/hooks"
        made = await http.put(f"{BASE}/crm", json={**TARGET, "url": url}, headers=OPS)
        assert made.status_code == 201
        assert made.json()["url"] == "https://***@crm.example.com/hooks"
        assert "hunter2" not in (await http.get(BASE, headers=OPS)).text
