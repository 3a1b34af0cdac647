"""Backstage plugin tokens on the bus: verification, the key cache, and the bus's authentication."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import orjson
import pytest

from callboard.bus.auth import ANONYMOUS, BusAuth, Principal, Refusal, StaticToken, StaticTokenAuth
from callboard.bus.plugin_keys import (
    KeyFetchError,
    PluginKeys,
    PluginTokenVerifier,
    fetch_url,
    parse_jwks,
    plugin_base_urls,
)
from callboard.bus.plugin_tokens import (
    PluginTokenError,
    UnknownKeyError,
    is_plugin_token,
    read_header,
    verify_plugin_token,
)
from callboard.config import parse_config
from callboard.errors import ConfigError
from tests.backstage_plugins import SigningKey, jwks, plugin_token

BACKSTAGE = "http://backstage:7007"
STATIC = StaticToken("static-token-1", "ops")


class FakeBackstage:
    """Backstage's plugins publishing keys, served through an httpx mock transport."""

    def __init__(self) -> None:
        self.keys: dict[str, list[SigningKey]] = {}
        self.status = 200
        self.requests: list[str] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._handle))

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        parts = request.url.path.split("/")  # "", "api", pluginId, ".backstage", ...
        if self.status != 200:
            return httpx.Response(self.status)
        if request.url.path.endswith("/.backstage/auth/v1/jwks.json") and parts[2] in self.keys:
            return httpx.Response(200, json=jwks(*self.keys[parts[2]]))
        return httpx.Response(404, json={"error": {"name": "NotFoundError"}})

    async def fetch(self, url: str, timeout: float) -> bytes:
        response = await self.client.get(url, timeout=timeout)
        if response.status_code != 200:
            raise KeyFetchError(f"GET {url} answered {response.status_code}")
        return response.content

    def add(self, plugin_id: str, key: SigningKey | None = None) -> SigningKey:
        key = key or SigningKey()
        self.keys.setdefault(plugin_id, []).append(key)
        return key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def backstage() -> Any:
    fake = FakeBackstage()
    yield fake
    await fake.client.aclose()


def _keys(backstage: FakeBackstage, clock: Clock | None = None, **options: Any) -> PluginKeys:
    return PluginKeys(
        plugin_base_urls(base_url=BACKSTAGE),
        fetch=backstage.fetch,
        clock=clock or Clock(),
        **options,
    )


def _auth(backstage: FakeBackstage, *, plugins: tuple[str, ...] = (), **options: Any) -> BusAuth:
    verifier = PluginTokenVerifier(_keys(backstage, **options), audience="events", plugins=plugins)
    return BusAuth(StaticTokenAuth([STATIC]), verifier)


def _tampered(token: str, other: str) -> str:
    """``token`` with the claims of ``other``: a valid signature over other claims."""
    header, _, signature = token.split(".")
    return ".".join((header, other.split(".")[1], signature))


def _by_kid(*keys: SigningKey) -> dict[str, dict[str, Any]]:
    return {key.kid: key.jwk for key in keys}


# -- verification alone -----------------------------------------------------------------------


def test_a_plugin_token_verifies_with_its_plugins_key() -> None:
    key = SigningKey()
    claims = verify_plugin_token(plugin_token(key), _by_kid(key), audience="events")
    assert claims.plugin_id == "catalog"
    assert claims.subject == "plugin:catalog"
    assert not claims.on_behalf_of_user
    both = plugin_token(key, audience=["search", "events"], obo="limited-user-token")
    assert verify_plugin_token(both, _by_kid(key), audience="events").on_behalf_of_user


def test_the_header_is_read_without_trusting_it() -> None:
    key = SigningKey()
    header = read_header(plugin_token(key, "bench"))
    assert (header.plugin_id, header.kid, header.algorithm) == ("bench", key.kid, "ES256")
    assert is_plugin_token(plugin_token(key))
    assert not is_plugin_token(plugin_token(key, typ="vnd.backstage.user"))
    assert not is_plugin_token("static-token-1")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda k: plugin_token(k, audience="catalog"), "wrong audience (expected 'events')"),
        (lambda k: plugin_token(k, issued=time.time() - 7200), "expired"),
        (lambda k: plugin_token(k, issued=time.time() + 600), "issued in the future"),
        (lambda k: plugin_token(k, typ="JWT"), "wrong type"),
        (lambda k: plugin_token(k, typ="vnd.backstage.user"), "wrong type"),
        (lambda k: plugin_token(k, "cat/alog"), "forbidden subject format"),
        (lambda k: plugin_token(k, "../../admin"), "forbidden subject format"),
        (lambda k: plugin_token(k, ""), "missing subject"),
        (lambda k: plugin_token(k, leave_out=("sub",)), "missing subject"),
        (lambda k: plugin_token(k, leave_out=("iat",)), "missing claim 'iat'"),
        (lambda k: plugin_token(k, leave_out=("exp",)), "missing claim 'exp'"),
        (lambda k: plugin_token(k, leave_out=("aud",)), "missing claim 'aud'"),
        (lambda k: plugin_token(SigningKey(), kid=k.kid), "signature does not match"),
        (lambda k: "not.a.token", "malformed token"),
        (lambda k: "", "malformed token"),
        (lambda k: plugin_token(k) + ".extra", "malformed token"),
        (
            lambda k: _tampered(plugin_token(k), plugin_token(k, "bench")),
            "signature does not match",
        ),
    ],
)
def test_a_bad_plugin_token_is_refused(make: Any, reason: str) -> None:
    key = SigningKey()
    token = make(key)
    with pytest.raises(PluginTokenError) as raised:
        verify_plugin_token(token, _by_kid(key), audience="events")
    assert raised.value.reason.startswith(reason)
    assert not isinstance(raised.value, UnknownKeyError)
    if token:
        assert token not in str(raised.value)


def test_an_unknown_key_is_reported_as_such() -> None:
    with pytest.raises(UnknownKeyError):
        verify_plugin_token(plugin_token(SigningKey()), _by_kid(SigningKey()), audience="events")


def test_only_asymmetric_algorithms_and_matching_keys_are_used() -> None:
    key = SigningKey()
    header = {"typ": "vnd.backstage.plugin", "kid": key.kid}
    claims = {"sub": "catalog", "aud": "events", "iat": int(time.time()), "exp": 2**40}
    for token in (
        jwt.encode(claims, "a shared secret of 32 characters", algorithm="HS256", headers=header),
        jwt.encode(claims, None, algorithm="none", headers=header),
    ):
        with pytest.raises(PluginTokenError, match="unsupported signature algorithm"):
            verify_plugin_token(token, _by_kid(key), audience="events")
    wrong_alg = {key.kid: {**key.jwk, "alg": "ES384"}}
    with pytest.raises(PluginTokenError, match="does not match its key"):
        verify_plugin_token(plugin_token(key), wrong_alg, audience="events")


def test_jwks_documents_keep_only_public_signing_keys() -> None:
    key = SigningKey()
    body = orjson.dumps(
        {
            "keys": [
                key.jwk,
                {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
                {**SigningKey().jwk, "kid": None},
                {**SigningKey().jwk, "kid": "private", "d": "xyz"},
                "junk",
            ]
        }
    )
    assert list(parse_jwks(body, "u")) == [key.kid]
    for bad in (b"[]", b"{}", b"<html>", b'{"keys": 1}'):
        with pytest.raises(KeyFetchError):
            parse_jwks(bad, "u")


def test_plugin_base_urls_follow_backstage_discovery() -> None:
    assert plugin_base_urls(base_url="http://b:7007/")("catalog") == "http://b:7007/api/catalog"
    target = plugin_base_urls(target="http://{{pluginId}}.svc:7007/api/{{pluginId}}")
    assert target("search") == "http://search.svc:7007/api/search"
    with pytest.raises(ValueError, match="pluginId"):
        plugin_base_urls(target="http://b/api")


# -- the key cache ----------------------------------------------------------------------------


async def test_keys_are_fetched_once_per_plugin_and_cached(backstage: FakeBackstage) -> None:
    backstage.add("catalog")
    backstage.add("bench")
    clock = Clock()
    keys = _keys(backstage, clock)
    assert keys.url("catalog") == f"{BACKSTAGE}/api/catalog/.backstage/auth/v1/jwks.json"
    first = await keys.get("catalog")
    clock.now += 60
    assert await keys.get("catalog") == first
    await keys.get("bench")
    assert backstage.requests == [keys.url("catalog"), keys.url("bench")]
    clock.now += 600  # the cache time has passed
    await keys.get("catalog")
    assert len(backstage.requests) == 3


async def test_concurrent_requests_share_one_fetch(backstage: FakeBackstage) -> None:
    backstage.add("catalog")
    keys = _keys(backstage)
    results = await asyncio.gather(*(keys.get("catalog") for _ in range(20)))
    assert len(backstage.requests) == 1
    assert all(r == results[0] for r in results)


async def test_refreshes_are_spaced_by_the_cooldown(backstage: FakeBackstage) -> None:
    backstage.add("catalog")
    clock = Clock()
    keys = _keys(backstage, clock, refresh_cooldown=5)
    await keys.get("catalog")
    await keys.get("catalog", refresh=True)  # too soon: the cached keys
    assert len(backstage.requests) == 1
    clock.now += 5
    await keys.get("catalog", refresh=True)
    assert len(backstage.requests) == 2


async def test_a_failed_fetch_is_an_error_not_retried_within_the_cooldown(
    backstage: FakeBackstage,
) -> None:
    clock = Clock()
    keys = _keys(backstage, clock)
    with pytest.raises(KeyFetchError, match="404"):
        await keys.get("nobody")
    with pytest.raises(KeyFetchError, match="404"):
        await keys.get("nobody")
    assert len(backstage.requests) == 1
    clock.now += 10
    backstage.add("nobody")
    assert await keys.get("nobody")


async def test_keys_fetched_earlier_outlive_a_failed_refresh(backstage: FakeBackstage) -> None:
    key = backstage.add("catalog")
    clock = Clock()
    keys = _keys(backstage, clock)
    await keys.get("catalog")
    backstage.status = 503
    clock.now += 3600
    assert list(await keys.get("catalog")) == [key.kid]
    assert len(backstage.requests) == 2


async def test_the_least_recently_used_plugins_are_forgotten(backstage: FakeBackstage) -> None:
    for plugin in ("a", "b", "c"):
        backstage.add(plugin)
    keys = _keys(backstage, max_plugins=2)
    for plugin in ("a", "b", "a", "c", "a"):
        await keys.get(plugin)
    assert [u.split("/")[4] for u in backstage.requests] == ["a", "b", "c"]
    await keys.get("b")
    assert len(backstage.requests) == 4


async def test_the_real_fetch_has_a_timeout() -> None:
    with pytest.raises(KeyFetchError):
        await fetch_url("http://127.0.0.1:9/api/x/.backstage/auth/v1/jwks.json", 0.5)


# -- verifying with fetched keys ----------------------------------------------------------------


async def test_a_new_signing_key_is_fetched_when_a_token_names_it(
    backstage: FakeBackstage,
) -> None:
    old = backstage.add("catalog")
    clock = Clock()
    verifier = PluginTokenVerifier(_keys(backstage, clock), audience="events")
    assert (await verifier.verify(plugin_token(old))).subject == "plugin:catalog"
    new = backstage.add("catalog")  # Backstage rotates its key every hour
    clock.now += 3600 - 60
    assert (await verifier.verify(plugin_token(new))).plugin_id == "catalog"
    assert len(backstage.requests) == 2


async def test_a_key_unknown_after_a_refresh_is_refused(backstage: FakeBackstage) -> None:
    backstage.add("catalog")
    clock = Clock()
    verifier = PluginTokenVerifier(_keys(backstage, clock), audience="events")
    await verifier.verify(plugin_token(backstage.keys["catalog"][0]))
    clock.now += 30
    with pytest.raises(UnknownKeyError, match="unknown signing key for plugin 'catalog'"):
        await verifier.verify(plugin_token(SigningKey()))
    assert len(backstage.requests) == 2  # fetched again once, in vain


async def test_a_plugin_outside_the_allow_list_is_refused_without_a_fetch(
    backstage: FakeBackstage,
) -> None:
    key = backstage.add("scaffolder")
    verifier = PluginTokenVerifier(_keys(backstage), audience="events", plugins=("catalog",))
    with pytest.raises(PluginTokenError, match="plugin 'scaffolder' may not call"):
        await verifier.verify(plugin_token(key, "scaffolder"))
    assert backstage.requests == []


# -- the bus's authentication -----------------------------------------------------------------


async def test_the_bus_accepts_plugin_tokens_and_static_tokens(backstage: FakeBackstage) -> None:
    key = backstage.add("catalog")
    auth = _auth(backstage)
    assert await auth.check(f"Bearer {plugin_token(key)}") == Principal("service", "plugin:catalog")
    principal = await auth.check(f"Bearer {plugin_token(key)}")
    assert isinstance(principal, Principal)
    assert principal.created_by == "service=plugin:catalog"
    assert await auth.check("Bearer static-token-1") == Principal("service", "ops")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda k: plugin_token(k, audience="catalog"), "Invalid plugin token: wrong audience"),
        (lambda k: plugin_token(k, issued=0), "Invalid plugin token: expired"),
        (lambda k: plugin_token(SigningKey()), "Invalid plugin token: unknown signing key"),
        (lambda k: plugin_token(SigningKey(), kid=k.kid), "Invalid plugin token: signature"),
        (lambda k: plugin_token(k, "cat.alog"), "Invalid plugin token: forbidden subject"),
        (lambda k: plugin_token(k, "search"), "Invalid plugin token: the keys of plugin 'search'"),
        (lambda k: plugin_token(k, typ="vnd.backstage.user"), "Invalid token: only Backstage"),
        (lambda k: "e30.e30.e30", "Invalid token"),
        (lambda k: "static-token-2", "Invalid token"),
    ],
)
async def test_the_bus_refuses_bad_tokens(
    backstage: FakeBackstage, make: Any, message: str
) -> None:
    key = backstage.add("catalog")
    token = make(key)
    verdict = await _auth(backstage).check(f"Bearer {token}")
    assert isinstance(verdict, Refusal)
    assert verdict.message.startswith(message)
    assert token not in verdict.message


async def test_plugin_tokens_need_the_backstage_section() -> None:
    auth = BusAuth(StaticTokenAuth([STATIC]))
    verdict = await auth.check(f"Bearer {plugin_token(SigningKey())}")
    assert isinstance(verdict, Refusal)
    assert "events.bus.backstage is not configured" in verdict.message


async def test_the_default_policy_is_kept(backstage: FakeBackstage) -> None:
    key = backstage.add("catalog")
    closed = _auth(backstage)
    assert isinstance(await closed.check(None), Refusal)
    verifier = PluginTokenVerifier(_keys(backstage), audience="events")
    open_ = BusAuth(StaticTokenAuth([STATIC], allow_anonymous=True), verifier)
    assert await open_.check(None) == ANONYMOUS
    assert isinstance(await open_.check(f"Bearer {plugin_token(key, issued=0)}"), Refusal)
    assert await open_.check(f"Bearer {plugin_token(key)}") == Principal(
        "service", "plugin:catalog"
    )


async def test_refusals_never_log_the_token(
    backstage: FakeBackstage, caplog: pytest.LogCaptureFixture
) -> None:
    key = backstage.add("catalog")
    token = plugin_token(key, audience="catalog")
    with caplog.at_level("DEBUG"):
        await _auth(backstage).check(f"Bearer {token}")
    assert "wrong audience" in caplog.text
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


# -- configuration --------------------------------------------------------------------------------


def test_the_backstage_section_says_where_plugin_keys_are() -> None:
    config = parse_config(
        {
            "events": {
                "bus": {
                    "backstage": {
                        "baseUrl": "http://backstage:7007",
                        "plugins": ["catalog", "events"],
                        "keyCacheMs": 60_000,
                        "fetchTimeoutMs": 2_000,
                    }
                }
            }
        }
    )
    backstage = config.events.bus.backstage
    assert backstage is not None
    assert backstage.base_url == "http://backstage:7007"
    assert backstage.plugins == ("catalog", "events")
    assert (backstage.key_cache_ms, backstage.fetch_timeout_ms) == (60_000, 2_000)
    assert parse_config({}).events.bus.backstage is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({}, "events.bus.backstage: Value error, set either baseUrl or target"),
        ({"baseUrl": "backstage:7007"}, "events.bus.backstage.baseUrl: Value error, expected an"),
        ({"target": "http://b/api/catalog"}, "events.bus.backstage.target: Value error, must"),
        ({"baseUrl": "http://b", "plugins": ["a.b"]}, "events.bus.backstage.plugins: Value"),
        ({"baseUrl": "http://b", "fetchTimeoutMs": 0}, "events.bus.backstage.fetchTimeoutMs"),
        ({"baseUrl": "http://b", "jwksUrl": "x"}, "events.bus.backstage.jwksUrl: unknown key"),
    ],
)
def test_a_wrong_backstage_section_stops_the_start(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"events": {"bus": {"backstage": section}}})
    assert str(raised.value).startswith(message)
