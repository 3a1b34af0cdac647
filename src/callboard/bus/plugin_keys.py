"""The keys Backstage plugins publish, fetched and cached, and plugin tokens checked against them.

Each Backstage backend plugin signs its plugin tokens with keys of its own and publishes the
public halves at ``<plugin base URL>/.backstage/auth/v1/jwks.json`` (with Backstage's default
discovery, ``<backend base URL>/api/<pluginId>/...``). ``PluginKeys`` fetches that document
once per plugin and keeps it for a while; a token naming a key not in it makes it fetch again
(Backstage makes a new key every hour), though never twice within a few seconds for one plugin.

The only network access here is one ``GET`` of a JSON document, made with the standard library
in a worker thread, so the event loop never waits on it. Requests for one plugin that arrive while
its keys are being fetched wait for that fetch rather than starting their own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from callboard.bus.plugin_tokens import (
    DEFAULT_LEEWAY,
    PluginClaims,
    PluginTokenError,
    UnknownKeyError,
    read_header,
    shown,
    verify_plugin_token,
)

logger = logging.getLogger("callboard.bus.auth")

#: Where a plugin publishes its keys, relative to its base URL.
JWKS_PATH = "/.backstage/auth/v1/jwks.json"
#: The placeholder of a discovery-style target, as Backstage writes it.
PLUGIN_ID_PLACEHOLDER = "{{pluginId}}"

DEFAULT_CACHE_TTL = 600.0
DEFAULT_FETCH_TIMEOUT = 5.0
DEFAULT_REFRESH_COOLDOWN = 5.0
MAX_PLUGINS = 100
MAX_DOCUMENT = 1024 * 1024
_KEY_TYPES = frozenset({"EC", "RSA", "OKP"})

Keys = Mapping[str, Mapping[str, Any]]
#: Fetches a URL (``url``, ``timeout`` in seconds) and returns the body of a ``200``.
Fetch = Callable[[str, float], Awaitable[bytes]]


class KeyFetchError(Exception):
    """A plugin's keys could not be fetched or read (the message names the URL, not a token)."""


def _get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read(MAX_DOCUMENT + 1)
    except urllib.error.HTTPError as error:
        error.close()  # it holds the connection
        raise KeyFetchError(f"GET {url} answered {error.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise KeyFetchError(f"GET {url} failed: {reason}") from None
    if len(body) > MAX_DOCUMENT:
        raise KeyFetchError(f"GET {url} answered more than {MAX_DOCUMENT} bytes")
    return body


async def fetch_url(url: str, timeout: float) -> bytes:
    """``GET`` a URL in a worker thread; ``KeyFetchError`` unless it answers ``200`` in time."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_get, url, timeout), timeout + 1)
    except TimeoutError:
        raise KeyFetchError(f"GET {url} took longer than {timeout:g} s") from None


def parse_jwks(body: bytes, url: str) -> dict[str, dict[str, Any]]:
    """The usable public keys of a JWKS document, by ``kid``.

    Keys without a ``kid``, shared-secret keys and keys of unknown types are left out.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise KeyFetchError(f"{url} is not JSON") from None
    listed = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(listed, list):
        raise KeyFetchError(f"{url} has no 'keys' list")
    keys: dict[str, dict[str, Any]] = {}
    for key in listed:
        if not isinstance(key, dict) or key.get("kty") not in _KEY_TYPES:
            continue
        kid = key.get("kid")
        if isinstance(kid, str) and kid and "d" not in key:  # never a private key
            keys[kid] = key
    return keys


def plugin_base_urls(
    *, base_url: str | None = None, target: str | None = None
) -> Callable[[str], str]:
    """Where a plugin lives: ``<base_url>/api/<id>``, or a target with ``{{pluginId}}`` in it."""
    if target is not None:
        template = target.rstrip("/")
        if PLUGIN_ID_PLACEHOLDER not in template:
            raise ValueError(f"a target must contain {PLUGIN_ID_PLACEHOLDER}")
        return lambda plugin_id: template.replace(PLUGIN_ID_PLACEHOLDER, quote(plugin_id, safe=""))
    if base_url is None:
        raise ValueError("either base_url or target is needed")
    base = base_url.rstrip("/")
    return lambda plugin_id: f"{base}/api/{quote(plugin_id, safe='')}"


@dataclass(slots=True)
class _Entry:
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    fetched_at: float = -math.inf  # when the keys were last fetched
    tried_at: float = -math.inf  # when a fetch was last attempted, successful or not
    error: str | None = None  # why the last attempt failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PluginKeys:
    """The published keys of each calling plugin, fetched on first use and cached.

    Keys are fetched again when ``cache_ttl`` seconds have passed, or when asked to
    (``refresh=True``, for a token naming an unknown key); a plugin's keys are never fetched twice
    within ``refresh_cooldown`` seconds, and a failed fetch is not retried within it either. When
    a fetch fails, keys fetched earlier stay in use. At most ``max_plugins`` plugins are
    remembered, the least recently used being forgotten first.
    """

    def __init__(
        self,
        base_url_for: Callable[[str], str],
        *,
        fetch: Fetch = fetch_url,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        refresh_cooldown: float = DEFAULT_REFRESH_COOLDOWN,
        max_plugins: int = MAX_PLUGINS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_url_for = base_url_for
        self._fetch = fetch
        self.cache_ttl = cache_ttl
        self.fetch_timeout = fetch_timeout
        self.refresh_cooldown = refresh_cooldown
        self._max_plugins = max_plugins
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def url(self, plugin_id: str) -> str:
        """Where ``plugin_id`` publishes its keys."""
        return self._base_url_for(plugin_id) + JWKS_PATH

    def _entry(self, plugin_id: str) -> _Entry:
        entry = self._entries.get(plugin_id)
        if entry is None:
            entry = self._entries[plugin_id] = _Entry()
            while len(self._entries) > self._max_plugins:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(plugin_id)
        return entry

    def _usable(self, entry: _Entry, refresh: bool, asked_at: float) -> Keys | None:
        """The cached keys if they may be used without fetching, else ``None``."""
        now = self._clock()
        if entry.tried_at >= asked_at:  # fetched (or failed) while this request waited
            return self._settled(entry)
        if now - entry.tried_at < self.refresh_cooldown:
            return self._settled(entry)
        if not refresh and entry.error is None and now - entry.fetched_at < self.cache_ttl:
            return entry.keys
        return None

    @staticmethod
    def _settled(entry: _Entry) -> Keys:
        if entry.error is not None and not entry.keys:
            raise KeyFetchError(entry.error)
        return entry.keys

    async def get(self, plugin_id: str, *, refresh: bool = False) -> Keys:
        """The keys ``plugin_id`` publishes, by ``kid``; ``KeyFetchError`` if none can be had."""
        asked_at = self._clock()
        entry = self._entry(plugin_id)
        keys = self._usable(entry, refresh, math.inf)
        if keys is not None:
            return keys
        async with entry.lock:
            keys = self._usable(entry, refresh, asked_at)
            if keys is not None:
                return keys
            url = self.url(plugin_id)
            entry.tried_at = self._clock()
            try:
                fetched = parse_jwks(await self._fetch(url, self.fetch_timeout), url)
            except KeyFetchError as error:
                entry.error = str(error)
                logger.warning(
                    "cannot fetch the keys of plugin %r%s: %s",
                    shown(plugin_id),
                    "; the keys fetched earlier stay in use" if entry.keys else "",
                    error,
                )
                return self._settled(entry)
            if fetched != entry.keys:
                logger.info("plugin %r publishes %d key(s) at %s", plugin_id, len(fetched), url)
            entry.keys, entry.fetched_at, entry.error = fetched, entry.tried_at, None
            return entry.keys


class PluginTokenVerifier:
    """Verifies Backstage plugin tokens addressed to ``audience`` with the callers' own keys.

    ``plugins``, when not empty, lists the plugin ids allowed to call; a token from any other
    plugin is refused before its keys are fetched.
    """

    def __init__(
        self,
        keys: PluginKeys,
        *,
        audience: str,
        plugins: Collection[str] = (),
        leeway: float = DEFAULT_LEEWAY,
    ) -> None:
        self.keys = keys
        self.audience = audience
        self.plugins = frozenset(plugins)
        self.leeway = leeway

    async def _keys(self, plugin_id: str, refresh: bool) -> Keys:
        try:
            return await self.keys.get(plugin_id, refresh=refresh)
        except KeyFetchError:
            raise PluginTokenError(
                f"the keys of plugin '{shown(plugin_id)}' cannot be fetched"
            ) from None

    async def verify(self, token: str) -> PluginClaims:
        """The verified claims of ``token``, or ``PluginTokenError`` saying why it is refused."""
        plugin_id = read_header(token).plugin_id
        if self.plugins and plugin_id not in self.plugins:
            raise PluginTokenError(f"plugin '{shown(plugin_id)}' may not call the events bus")
        keys = await self._keys(plugin_id, refresh=False)
        try:
            return verify_plugin_token(token, keys, audience=self.audience, leeway=self.leeway)
        except UnknownKeyError:
            keys = await self._keys(plugin_id, refresh=True)
            return verify_plugin_token(token, keys, audience=self.audience, leeway=self.leeway)
