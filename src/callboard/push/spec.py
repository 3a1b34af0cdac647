"""What a push subscription is: the values ``events.push.<name>`` (or the API) describes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

#: The events service's subscription id of the push target ``name``: ``push.<name>``.
SUBSCRIPTION_PREFIX = "push."

Format = Literal["json", "cloudevents"]
CloudEventsMode = Literal["structured", "binary"]
#: Where a target comes from: ``events.push`` in the configuration, or the bus API.
Source = Literal["config", "api"]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def subscription_id(name: str) -> str:
    return SUBSCRIPTION_PREFIX + name


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a push target (it goes in a URL path and a subscription id)."""
    if _NAME.fullmatch(name):
        return None
    return (
        f"{name[:80]!r} cannot name a push target: use 1 to 64 letters, digits, '-' or '_', "
        "starting with a letter or digit"
    )


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: ``per_second`` pushes on average, ``burst`` at once after a quiet spell."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Open after ``failures`` failures in a row; stay open ``cooldown`` seconds."""

    failures: int = 5
    cooldown: float = 30.0


@dataclass(frozen=True, slots=True)
class PushSpec:
    """One push target: where its events go, how they are signed, how hard it is pushed."""

    name: str
    url: str
    topics: tuple[str, ...]
    #: ``whsec_...`` secrets; each signs every request (several while a secret is rotated).
    secrets: tuple[str, ...] = field(repr=False)
    #: Seconds a request may take, connection included.
    timeout: float = 10.0
    #: Extra request headers (their values are never shown: they may be credentials).
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    rate_limit: RateLimit | None = None
    enabled: bool = True
    format: Format = "json"
    cloud_events_mode: CloudEventsMode = "structured"
    #: The CloudEvents ``source`` attribute of what this target sends.
    cloud_events_source: str = "/callboard"
    #: Requests in flight to the endpoint at most (consumers of the subscription).
    concurrency: int = 8
    breaker: BreakerPolicy = BreakerPolicy()
    #: The longest ``Retry-After`` honoured, in seconds; a longer one is cut to it.
    max_retry_after: float = 300.0
    source: Source = "config"

    @property
    def subscription(self) -> str:
        return subscription_id(self.name)


@dataclass(frozen=True, slots=True)
class BrokenTarget:
    """A target stored from the API that no longer reads as one (the rules changed since, or
    the file was edited by hand). It sends nothing, and its name stays its owner's: left out, it
    could be claimed by another caller, who would then inherit its consumer group."""

    name: str
    #: Why it could not be read: the configuration's error, naming the key.
    reason: str
    source: Source = "api"

    @property
    def subscription(self) -> str:
        return subscription_id(self.name)
