"""Choosing a broker by URL. Drivers are imported only when their scheme is asked for."""

from __future__ import annotations

import importlib
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from callboard.brokers.base import Broker, RetentionPolicy
from callboard.errors import ConfigError

#: scheme -> (module, class, extra to install)
SCHEMES: dict[str, tuple[str, str, str | None]] = {
    "memory": ("callboard.brokers.memory", "MemoryBroker", None),
    "sqlite": ("callboard.brokers.sqlite", "SQLiteBroker", None),
    "postgresql": ("callboard.brokers.postgres", "PostgresBroker", "postgres"),
    "postgres": ("callboard.brokers.postgres", "PostgresBroker", "postgres"),
    "callboard+http": ("callboard.bus.remote", "RemoteBroker", "remote"),
    "callboard+https": ("callboard.bus.remote", "RemoteBroker", "remote"),
}


class _FromUrl(Protocol):
    def __call__(self, url: str, *, retention: RetentionPolicy | None = None) -> Broker: ...


def open_broker(
    url: str, *, key: str = "events.broker", retention: RetentionPolicy | None = None
) -> Broker:
    """The broker for ``url`` (``memory://``, ``sqlite:///var/callboard.db``, ``postgresql://...``).

    ``retention`` is the window a durable broker keeps events in (``events.retention``).
    """
    scheme, sep, _ = url.partition("://")
    entry = SCHEMES.get(scheme.lower()) if sep else None
    if entry is None:
        raise ConfigError(
            key,
            f"unknown broker URL {url!r}; expected one of "
            + ", ".join(f"{s}://..." for s in SCHEMES),
        )
    module_name, class_name, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        hint = f"; install it with: pip install 'callboard[{extra}]'" if extra else ""
        raise ConfigError(key, f"the {scheme} broker cannot be loaded: {error}{hint}") from error
    from_url: _FromUrl = getattr(module, class_name).from_url
    return from_url(url, retention=retention)


def redact_url(url: str) -> str:
    """The broker URL as it may be logged: password and token parameters replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:***@{host}"
    query = "&".join(
        f"{key}=***" if key.lower() in _SECRET_PARAMETERS else f"{key}={value}" if sep else key
        for key, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_SECRET_PARAMETERS = frozenset({"password", "token", "secret", "sslpassword"})
