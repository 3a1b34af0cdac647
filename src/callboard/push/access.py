"""Who may see and change which push target over the API.

A push target makes callboard POST every event of its topics to a URL of the caller's choosing,
so it is guarded as a bus subscription is (``docs/bus-api.md``, "Who may use which
subscription"): one made over the API belongs to the caller that made it (its owner, kept in
the store), and ``events.bus.grants`` gives other callers an owner's rights by the target's
subscription id, ``push.<name>``, matched as the bus matches subscription ids. Targets from the
configuration have no owner: only the callers granted them see them, and the API never changes
them. A stored target without an owner (kept before owners were) is seen and managed only by
the callers granted it.

The grants come in as a callable on ``Caller`` (``app.py`` builds it from the bus's), so this
package imports nothing of ``bus/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from callboard.errors import RequestRejected
from callboard.push.spec import Source


@dataclass(frozen=True, slots=True)
class Caller:
    """Who called: the name logs and owners use (``service=backstage``), and its grants."""

    name: str
    #: Whether ``events.bus.grants`` gives this caller a subscription id (``push.<name>``).
    granted: Callable[[str], bool] = field(compare=False)
    #: A caller without credentials (the bus runs without authentication).
    anonymous: bool = False


class Guarded(Protocol):
    """What access is judged on: a target's spec, or a stored target that could not be read."""

    @property
    def name(self) -> str: ...
    @property
    def source(self) -> Source: ...
    @property
    def subscription(self) -> str: ...


def may(caller: Caller, spec: Guarded, owner: str | None) -> bool:
    """Whether ``caller`` may see and manage ``spec``, whose recorded owner is ``owner``."""
    if spec.source == "api" and owner is not None and owner == caller.name:
        return True
    return caller.granted(spec.subscription)


def check(caller: Caller, spec: Guarded, owner: str | None) -> None:
    """Raise the ``403`` that tells ``caller`` why it may not change ``spec``, if it may not.

    As the bus's, the answer names the target and who may manage it, never another caller.
    """
    if may(caller, spec, owner):
        return
    raise RequestRejected(
        f"push target {spec.name!r} is not {caller.name}'s: a caller may manage only the push "
        "targets it created and those events.bus.grants gives its subject (by the id "
        f"{spec.subscription!r}); choose another name",
        status_code=403,
    )
