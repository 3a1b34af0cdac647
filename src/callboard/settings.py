"""Validating a section of configuration against a pydantic model, with errors by key path."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from callboard.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# The value of a key with one of these words in its name is never repeated in an error.
_CREDENTIAL_KEY = re.compile(r"secret|token|password|credential", re.IGNORECASE)


class Section(BaseModel):
    """Base of configuration sections: immutable, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def validate_section(model: type[M], data: Mapping[str, Any] | None, path: str) -> M:
    """Validate ``data`` (found at ``path``) as ``model``; raise ``ConfigError`` naming each key."""
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = (
                ".".join([path, *(str(part) for part in item["loc"])])
                if path
                else ".".join(str(part) for part in item["loc"])
            )
            message = item["msg"]
            if item["type"] == "extra_forbidden":
                message = "unknown key; check its spelling against docs/configuration.md"
            elif (
                "input" in item
                and item["type"] != "missing"
                and not any(_CREDENTIAL_KEY.search(str(part)) for part in item["loc"])
            ):
                message = f"{message} (got {item['input']!r})"
            problems.append((key, message))
        first_key, first_message = problems[0]
        others = "".join(f"\n{key}: {message}" for key, message in problems[1:])
        raise ConfigError(first_key, first_message + others) from None
