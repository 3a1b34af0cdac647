"""Who may use which subscription over the bus API.

Every subscription (a consumer group of the broker) records an owner that every server on the
broker shares (``SubscriptionInfo.owner``), as Backstage's ``event_bus_subscriptions.created_by``
does: ``IN_PROCESS`` for the events service's own subscriptions, or the bus caller that made
it (``Principal.created_by``). A caller may read, acknowledge and manage the subscriptions it
owns and those ``events.bus.grants`` give its subject; never the server's own, whose events its
modules must handle. A subscription without a recorded owner (made before owners were recorded)
belongs to the first caller that ``PUT``s or reads it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from callboard.brokers.base import IN_PROCESS
from callboard.bus.auth import Principal
from callboard.errors import RequestRejected


@dataclass(frozen=True, slots=True)
class Grant:
    """A subject's owner rights on the subscriptions whose ids ``ids`` matches."""

    subject: str
    ids: re.Pattern[str]

    @classmethod
    def parse(cls, subject: str, patterns: Iterable[str]) -> Grant:
        """From ``events.bus.grants``: id patterns in which ``*`` is any run of characters."""
        alternatives = "|".join(".*".join(map(re.escape, p.split("*"))) for p in patterns)
        return cls(subject, re.compile(f"(?:{alternatives})", re.DOTALL))

    def covers(self, principal: Principal, id: str) -> bool:
        return principal.subject == self.subject and self.ids.fullmatch(id) is not None


class Access:
    """The owner rule and ``events.bus.grants``, applied to one caller and one subscription."""

    def __init__(self, grants: Iterable[Grant] = ()) -> None:
        self.grants = tuple(grants)

    def may(self, principal: Principal, id: str, owner: str | None) -> bool:
        """Whether ``principal`` may use subscription ``id`` recorded with ``owner``."""
        if owner == IN_PROCESS:
            return False
        if owner is None or owner == principal.created_by:
            return True
        return any(grant.covers(principal, id) for grant in self.grants)

    def check(self, principal: Principal, id: str, owner: str | None) -> None:
        """Raise the ``403`` that tells ``principal`` why it may not use ``id``, if it may not.

        The answer names the subscription and who may use it, but never another caller's
        subject: that is theirs to tell.
        """
        if self.may(principal, id, owner):
            return
        if owner == IN_PROCESS:
            raise RequestRejected(
                f"Subscription with ID '{id}' belongs to the server's own modules: their events "
                "are handled inside callboard and are not read over the bus; subscribe under "
                "another id",
                status_code=403,
            )
        raise RequestRejected(
            f"Subscription with ID '{id}' belongs to the bus caller that created it; "
            f"{principal.created_by} may use only the subscriptions it created and those "
            "events.bus.grants gives its subject; subscribe under another id",
            status_code=403,
        )
