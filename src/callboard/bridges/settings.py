"""What the bridges' settings share: durations written as Backstage writes them, sections that
hold one instance or named ones, and refusing a bridge whose extra is missing. No driver is
imported here."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator

from callboard.errors import ConfigError, ModuleError
from callboard.settings import keys_of, validate_section

M = TypeVar("M", bound=BaseModel)

#: The instance a section written as one instance (its keys at the top) is.
DEFAULT_INSTANCE = "default"

_UNIT_SECONDS = {
    "ms": 0.001,
    "millisecond": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_OBJECT_KEYS = {
    "milliseconds": 0.001,
    "seconds": 1.0,
    "minutes": 60.0,
    "hours": 3600.0,
    "days": 86400.0,
}
_SPOKEN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
_ISO = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?$",
    re.IGNORECASE,
)
_DURATION_FORMS = "{seconds: 20}, '20s', '1 minute' or 'PT20S'"


def _seconds(value: Any) -> Any:
    """A duration as Backstage writes one (a HumanDuration object or a string), in seconds."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(_OBJECT_KEYS))
        if unknown or not value:
            raise ValueError(f"expected a duration such as {_DURATION_FORMS}")
        total = 0.0
        for key, amount in value.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise ValueError(f"{key} must be a number, not {amount!r}")
            total += amount * _OBJECT_KEYS[key]
        return total
    if isinstance(value, str):
        spoken = _SPOKEN.match(value)
        if spoken is not None:
            unit = spoken.group(2).lower()
            factor = _UNIT_SECONDS.get(unit) or _UNIT_SECONDS.get(unit.removesuffix("s"))
            if factor is not None:
                return float(spoken.group(1)) * factor
        iso = _ISO.match(value.strip())
        if iso is not None and value.strip().upper() not in ("P", "PT"):
            parts = {key: float(found or 0) for key, found in iso.groupdict().items()}
            return parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    raise ValueError(f"expected a duration such as {_DURATION_FORMS}")


#: A duration in seconds, written as Backstage writes one: ``{seconds: 20}``, ``'20s'``,
#: ``'1 minute'`` or ISO 8601 (``'PT20S'``).
Duration = Annotated[float, BeforeValidator(_seconds)]


def instances(raw: Mapping[str, Any] | None, model: type[M], path: str) -> dict[str, M]:
    """The instances of a section: one (``default``, when the section holds keys of ``model``)
    or named ones, each validated."""
    if not raw:
        return {}
    if raw.keys() & set(keys_of(model)):
        return {DEFAULT_INSTANCE: validate_section(model, raw, path)}
    found = {}
    for name, section in raw.items():
        if not isinstance(section, Mapping):
            raise ConfigError(f"{path}.{name}", "expected an instance's keys (clientId, ...)")
        found[name] = validate_section(model, section, f"{path}.{name}")
    return found


def require_extra(module: str, package: str, extra: str, needs: str) -> None:
    """Refuse a bridge at registration when its driver (``package``, installed by ``extra``) is
    missing, before anything starts; ``needs`` says who needs what."""
    if importlib.util.find_spec(package) is None:
        raise ModuleError(
            module, f"{needs}, which the '{extra}' extra installs: pip install 'callboard[{extra}]'"
        )
