"""The catalog as a reader sees it: entities with the location they were read from."""

from __future__ import annotations

import copy
from typing import Any

from catalog_provider.descriptor import Entity
from catalog_provider.store import CatalogRecord

LOCATION = "backstage.io/managed-by-location"


def location(record: CatalogRecord, path: str) -> str:
    """Where the record's descriptor lives, as Backstage writes a location (``url:...``)."""
    ref = record.commit_ref or record.default_branch or "HEAD"
    tree = "/-/blob/" if record.key.startswith("gitlab:") else "/blob/"
    return f"url:{record.web_url}{tree}{ref}/{path}"


def entities(records: list[CatalogRecord], path: str) -> list[Entity]:
    """Every entity of the records, each annotated with its location (the current address)."""
    found: list[Entity] = []
    for record in records:
        for entity in record.entities:
            annotated = copy.deepcopy(entity)
            metadata: dict[str, Any] = annotated.setdefault("metadata", {})
            metadata.setdefault("annotations", {})[LOCATION] = location(record, path)
            found.append(annotated)
    return found
