"""Reading a ``catalog-info.yaml``: the entities it declares and what is wrong with it.

The file holds one YAML document per entity (``---`` between them), each with Backstage's
envelope: ``apiVersion``, ``kind`` and ``metadata.name``. A document without them is reported,
not kept; the others are kept, as Backstage's processors keep the valid entities of a location.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

Entity = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Descriptor:
    """The entities one descriptor file declares, and its problems (empty when none)."""

    entities: tuple[Entity, ...] = ()
    errors: tuple[str, ...] = ()


#: What a repository without a descriptor file declares.
ABSENT = Descriptor()


def parse_descriptor(text: str | None) -> Descriptor:
    """The entities of a descriptor's text; ``None`` (no such file) declares none."""
    if text is None:
        return ABSENT
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        return Descriptor(errors=(f"not valid YAML: {_one_line(error)}",))
    entities: list[Entity] = []
    errors: list[str] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue
        problem = _envelope_problem(document)
        if problem is None:
            entities.append(dict(document))
        else:
            errors.append(f"document {number}: {problem}")
    return Descriptor(tuple(entities), tuple(errors))


def _envelope_problem(document: object) -> str | None:
    if not isinstance(document, Mapping):
        return (
            f"expected a mapping with apiVersion, kind and metadata, got {type(document).__name__}"
        )
    for key in ("apiVersion", "kind"):
        if not isinstance(document.get(key), str) or not document[key]:
            return f"{key} must be a non-empty string"
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        return "metadata must be a mapping"
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        return "metadata.name must be a non-empty string"
    return None


def _one_line(error: yaml.YAMLError) -> str:
    return " ".join(str(error).split())
