"""The URL of the Redis broker: ``redis://[user:password@]host:6379/0?prefix=&lease=&poll=``.

The broker's own parameters are taken out of the query; what is left (host, port, database,
credentials, ``rediss`` for TLS) is the driver's. An unknown parameter is refused rather than
ignored, so a misspelt ``prefix`` never mixes two deployments' keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from callboard.brokers import redact_url
from callboard.errors import ConfigError

KEY = "events.broker"
DEFAULT_PREFIX = "callboard"
#: Seconds: how long a consumer's entries stay its own without renewal.
DEFAULT_LEASE = 30.0
#: Seconds: how often an idle consumer looks for entries handed back by another member.
DEFAULT_POLL = 0.2
#: Seconds a publish waits for Redis before answering ``BrokerUnavailable``.
PUBLISH_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
#: The URL parameters of the broker; every other one is refused.
PARAMETERS = ("prefix", "lease", "poll")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """What the URL says, checked."""

    #: The driver's URL: the given one without the broker's own parameters.
    address: str
    prefix: str
    lease: float
    poll: float

    @classmethod
    def parse(cls, url: str) -> RedisSettings:
        parts = urlsplit(url)
        shown = redact_url(url)
        if parts.scheme.lower() not in ("redis", "rediss"):
            raise ConfigError(KEY, f"{shown}: expected redis://host:6379/0 or rediss://")
        if not parts.hostname:
            raise ConfigError(KEY, f"{shown}: name the Redis host: redis://host:6379/0")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as error:
            raise ConfigError(KEY, f"{shown}: the port must be a number: {error}") from None
        database = parts.path.strip("/") or "0"
        if not database.isdigit():
            raise ConfigError(
                KEY, f"{shown}: the path is the database number (/0), not /{database}"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(query) - set(PARAMETERS))
        if unknown:
            raise ConfigError(
                KEY, f"{shown}: unknown parameter(s) {unknown}; known: {list(PARAMETERS)}"
            )
        prefix = query.get("prefix", DEFAULT_PREFIX)
        if not prefix or not prefix.isprintable() or " " in prefix:
            raise ConfigError(KEY, f"{shown}: prefix must be printable, without spaces")
        return cls(
            urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", "")),
            prefix,
            _seconds(query, "lease", DEFAULT_LEASE, shown),
            _seconds(query, "poll", DEFAULT_POLL, shown),
        )


def _seconds(query: dict[str, str], name: str, default: float, shown: str) -> float:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            KEY, f"{shown}: {name} must be a positive number of seconds, not {text!r}"
        )
    return value
