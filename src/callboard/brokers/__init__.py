"""Choosing a broker by URL, through the ``callboard.brokers`` entry points.

The scheme of the URL names an entry point of the group ``callboard.brokers``; its value is a
``BrokerFactory`` (``callboard.brokers.base``), loaded only when its scheme is asked for, so a
driver is imported only by those who use it. callboard declares its own brokers that way in its
``pyproject.toml``; a package adds one the same way, without touching callboard::

    [project.entry-points."callboard.brokers"]
    foo = "foo_broker:FooBroker.from_url [foo]"

The optional extra in brackets is what ``pip install`` needs for the broker's driver: it is named
in the error when the factory cannot be imported.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from importlib import metadata
from typing import cast
from urllib.parse import urlsplit, urlunsplit

from callboard.brokers.base import (
    MAX_PAGE,
    Broker,
    BrokerAdmin,
    BrokerFactory,
    BrokerHealth,
    EventLog,
    EventPage,
    EventQuery,
    Outcome,
    OutcomeState,
    RetentionPolicy,
    StoredEvent,
)
from callboard.errors import ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_PAGE",
    "Broker",
    "BrokerAdmin",
    "BrokerFactory",
    "BrokerHealth",
    "EventLog",
    "EventPage",
    "EventQuery",
    "Outcome",
    "OutcomeState",
    "RetentionPolicy",
    "StoredEvent",
    "admin",
    "broker_entry_points",
    "broker_factory",
    "event_log",
    "open_broker",
    "redact_url",
]

#: The entry-point group brokers are declared in.
ENTRY_POINT_GROUP = "callboard.brokers"


@functools.cache
def broker_entry_points() -> Mapping[str, tuple[metadata.EntryPoint, ...]]:
    """Every declared broker, by lower-case scheme (several when packages disagree).

    Read once per process; ``broker_entry_points.cache_clear()`` reads them again.
    """
    found: dict[str, list[metadata.EntryPoint]] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        same = found.setdefault(entry.name.lower(), [])
        # A package seen twice on the path declares the same value twice: one is enough.
        if all(other.value != entry.value for other in same):
            same.append(entry)
    return {scheme: tuple(entries) for scheme, entries in sorted(found.items())}


def open_broker(
    url: str, *, key: str = "events.broker", retention: RetentionPolicy | None = None
) -> Broker:
    """The broker for ``url`` (``memory://``, ``sqlite:///var/callboard.db``, ``postgresql://...``).

    ``retention`` is the window a durable broker keeps events in (``events.retention``). Raises
    ``ConfigError`` (at ``key``) for a scheme no installed package declares, and for one whose
    driver is not installed, naming what to install.
    """
    return broker_factory(url, key=key)(url, retention=retention)


def broker_factory(url: str, *, key: str = "events.broker") -> BrokerFactory:
    """The factory the entry point of ``url``'s scheme names, loaded."""
    scheme, sep, _ = url.partition("://")
    declared = broker_entry_points()
    entries = declared.get(scheme.lower(), ()) if sep else ()
    if not declared:
        raise ConfigError(
            key,
            f"no broker is declared in the {ENTRY_POINT_GROUP!r} entry points, not even "
            "callboard's own: install callboard (pip install callboard, or pip install -e . in "
            "a checkout) rather than running it from its sources alone",
        )
    if not entries:
        raise ConfigError(
            key,
            f"unknown broker URL {url!r}; expected one of "
            + ", ".join(f"{known}://..." for known in declared)
            + f" (a package adds a scheme through the {ENTRY_POINT_GROUP!r} entry points)",
        )
    if len(entries) > 1:
        raise ConfigError(
            key,
            f"the {scheme}:// broker is declared by several installed packages ("
            + ", ".join(f"{_package(entry)}: {entry.value}" for entry in entries)
            + "); uninstall all but one",
        )
    (entry,) = entries
    try:
        loaded = entry.load()
    except ImportError as error:
        raise ConfigError(
            key, f"the {scheme} broker cannot be loaded: {error}{_install_hint(entry)}"
        ) from error
    except AttributeError as error:
        raise ConfigError(
            key, f"the {scheme} broker's entry point {entry.value!r} names nothing: {error}"
        ) from error
    if not callable(loaded):
        raise ConfigError(
            key, f"the {scheme} broker's entry point {entry.value!r} names no broker factory"
        )
    return cast(BrokerFactory, loaded)


def admin(broker: Broker) -> BrokerAdmin:
    """``broker`` as ``BrokerAdmin``, for the operations on it (subscriptions, dead letters,
    retention, migrations).

    Raises ``ConfigError`` (key ``events.broker``) when the broker offers no operations.
    """
    if isinstance(broker, BrokerAdmin):
        return broker
    raise ConfigError(
        "events.broker",
        f"the broker {type(broker).__name__} offers no operations (subscriptions, dead letters, "
        "replay, retention, migrations): it does not implement callboard.BrokerAdmin",
    )


def event_log(broker: Broker) -> EventLog:
    """``broker`` as ``EventLog``, for reading its stored events (``callboard events``).

    Raises ``ConfigError`` (key ``events.broker``) when the broker keeps no history to read.
    """
    if isinstance(broker, EventLog):
        return broker
    raise ConfigError(
        "events.broker",
        f"the broker {type(broker).__name__} keeps no history of events to read: it does not "
        "implement callboard.EventLog; use a durable broker (sqlite:///... or postgresql://...)",
    )


def _package(entry: metadata.EntryPoint) -> str:
    """The distribution that declares ``entry``, as ``pip`` names it."""
    return entry.dist.name if entry.dist is not None else "an unknown package"


def _install_hint(entry: metadata.EntryPoint) -> str:
    """What to install for a broker whose driver is missing: the extras its entry point names."""
    if not entry.extras:
        return ""
    extras = ",".join(entry.extras)
    if entry.dist is None:
        return f"; install the extra [{extras}] of the package that declares it"
    return f"; install it with: pip install '{entry.dist.name}[{extras}]'"


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
