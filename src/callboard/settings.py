"""Validating a section of configuration against a pydantic model, with errors by key path."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from callboard.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# The value of a key with one of these words in its name is never repeated in an error (header
# values carry credentials too: ``Authorization``).
_CREDENTIAL_KEY = re.compile(r"secret|token|password|credential|headers", re.IGNORECASE)


class Section(BaseModel):
    """Base of configuration sections: immutable, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


#: Where the keys are documented, by the start of their path; the first match wins.
_DOCS = (
    *(
        (f"events.modules.{bridge}", "docs/bridges.md")
        for bridge in ("kafka", "awsSqs", "awsSns", "awsEventBridge", "rabbitmq")
    ),
    ("events.modules.", "docs/providers.md"),
    ("events.push", "docs/bridges.md"),
    ("", "docs/configuration.md"),
)


def doc_for(path: str) -> str:
    """The document that lists the key at ``path``."""
    return next(doc for prefix, doc in _DOCS if path.startswith(prefix))


def closest(key: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The known key ``key`` most likely misspells, if one is close enough."""
    candidates = list(known)
    folded = {candidate.lower(): candidate for candidate in candidates}
    if key.lower() in folded:
        return folded[key.lower()]
    found = difflib.get_close_matches(key, candidates, n=1, cutoff=cutoff)
    return found[0] if found else None


def keys_of(model: type[BaseModel]) -> list[str]:
    """The keys a section reads, as written in the configuration (aliases when they have one)."""
    return [field.alias or name for name, field in model.model_fields.items()]


def validate_section(model: type[M], data: Mapping[str, Any] | None, path: str) -> M:
    """Validate ``data`` (found at ``path``) as ``model``; raise ``ConfigError`` naming each key."""
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            loc = item["loc"]
            key = ".".join([path, *(str(part) for part in loc)] if path else map(str, loc))
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                message = "unknown key"
                section = _section_at(model, loc[:-1])
                near = closest(str(loc[-1]), keys_of(section)) if section is not None else None
                if near is not None:
                    message += f"; did you mean {near!r}?"
            elif item["type"] == "tuple_type":
                # Sections keep lists as tuples; the user wrote (or should write) a list.
                message = "Input should be a list"
            if (
                "input" in item
                and item["type"] not in ("missing", "extra_forbidden")
                and not any(_CREDENTIAL_KEY.search(str(part)) for part in loc)
            ):
                message = f"{message} (got {item['input']!r})"
            joint = " See" if message.endswith("?") else "; see"
            problems.append((key, f"{message}{joint} {doc_for(key)}"))
        first_key, first_message = problems[0]
        others = "".join(f"\n{key}: {message}" for key, message in problems[1:])
        raise ConfigError(first_key, first_message + others) from None


def _section_at(model: type[BaseModel], loc: Iterable[int | str]) -> type[BaseModel] | None:
    """The section model found at ``loc`` inside ``model`` (list indexes skipped), if any."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if typing.get_origin(current) is dict:
            current = _section_type(typing.get_args(current)[1])  # ``part`` names an entry
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = next(
            (f for name, f in current.model_fields.items() if part in (name, f.alias)), None
        )
        if field is None:
            return None
        current = _section_type(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _section_type(annotation: Any) -> Any:
    """The section model an annotation holds: itself, or inside a tuple or an optional."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (tuple, typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not ...]
            if len(args) != 1:
                return None
            annotation = args[0]
        else:
            return annotation
