"""The catalog: one SQLite file, one row per repository, its entities kept as JSON.

Delivery is at least once, so every write is idempotent and carries the time of the event that
asked for it: a write older than what the row already holds is ignored. The repository's
metadata (name, address, archived) and its entities are versioned apart, so a late push still
refreshes entities after a rename, and nothing older than a deletion brings a repository back.
A deleted repository stays as a tombstone row, hidden from every listing.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from catalog_provider.changes import Repository
from catalog_provider.descriptor import Descriptor, Entity

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS repositories (
    key            TEXT PRIMARY KEY,   -- provider:id, stable across renames
    provider       TEXT NOT NULL,
    slug           TEXT NOT NULL,      -- owner/name, or GitLab's path_with_namespace
    web_url        TEXT NOT NULL,
    default_branch TEXT,
    archived       INTEGER NOT NULL DEFAULT 0,
    deleted        INTEGER NOT NULL DEFAULT 0,
    changed_at     INTEGER NOT NULL,   -- event time (microseconds) of the metadata written
    entities       TEXT NOT NULL DEFAULT '[]',
    errors         TEXT NOT NULL DEFAULT '[]',
    commit_ref     TEXT,               -- what the entities were read at (NULL: default branch)
    refreshed_at   INTEGER             -- event time of the entities written
)
"""

# Newer (or the same) event: write. ``archived`` stays as it was when the event does not say.
_UPSERT = """
INSERT INTO repositories (key, provider, slug, web_url, default_branch, archived, deleted,
                          changed_at)
VALUES (:key, :provider, :slug, :web_url, :default_branch, coalesce(:archived, 0), :deleted, :at)
ON CONFLICT (key) DO UPDATE SET
    slug = excluded.slug,
    web_url = excluded.web_url,
    default_branch = coalesce(excluded.default_branch, repositories.default_branch),
    archived = coalesce(:archived, repositories.archived),
    deleted = excluded.deleted,
    entities = CASE WHEN excluded.deleted THEN '[]' ELSE repositories.entities END,
    errors = CASE WHEN excluded.deleted THEN '[]' ELSE repositories.errors END,
    changed_at = excluded.changed_at
WHERE excluded.changed_at >= repositories.changed_at
"""

_SET_ENTITIES = """
UPDATE repositories SET entities = :entities, errors = :errors, commit_ref = :ref,
                        refreshed_at = :at
WHERE key = :key AND deleted = 0 AND (refreshed_at IS NULL OR refreshed_at <= :at)
"""


@dataclass(frozen=True, slots=True)
class CatalogRecord:
    """A repository in the catalog with the entities its descriptor declares."""

    key: str
    slug: str
    web_url: str
    default_branch: str | None
    archived: bool
    entities: tuple[Entity, ...]
    errors: tuple[str, ...]
    commit_ref: str | None


def version(time: datetime) -> int:
    """An event's time as an exact, ordered integer (microseconds since the epoch)."""
    return (time - _EPOCH) // timedelta(microseconds=1)


class CatalogStore:
    """The catalog in a SQLite file. ``open()`` before use; every write commits at once."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> CatalogStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"the catalog at {self.path} is not open; call open() first")
        return self._db

    def record(self, repository: Repository, at: datetime, *, deleted: bool = False) -> bool:
        """Write the repository's metadata (or its deletion) unless a newer write is there.

        Returns whether it was written.
        """
        cursor = self.db.execute(
            _UPSERT,
            {
                "key": repository.key,
                "provider": repository.provider,
                "slug": repository.slug,
                "web_url": repository.web_url,
                "default_branch": repository.default_branch,
                "archived": repository.archived,
                "deleted": deleted,
                "at": version(at),
            },
        )
        return cursor.rowcount > 0

    def wants_refresh(self, key: str, at: datetime) -> bool:
        """Whether entities read for an event of time ``at`` would be written: the repository
        is known, not deleted, and holds no newer refresh."""
        row = self.db.execute(
            "SELECT deleted, refreshed_at FROM repositories WHERE key = ?", (key,)
        ).fetchone()
        return row is not None and not row[0] and (row[1] is None or row[1] <= version(at))

    def set_entities(self, key: str, descriptor: Descriptor, ref: str | None, at: datetime) -> bool:
        """Replace the repository's entities with what ``descriptor`` declares, read at ``ref``.

        Ignored for an unknown or deleted repository and when a newer refresh is there.
        """
        cursor = self.db.execute(
            _SET_ENTITIES,
            {
                "key": key,
                "entities": _json(descriptor.entities),
                "errors": _json(descriptor.errors),
                "ref": ref,
                "at": version(at),
            },
        )
        return cursor.rowcount > 0

    def get(self, key: str) -> CatalogRecord | None:
        """The repository under ``key``, unless it is unknown or deleted."""
        rows = self._select("WHERE key = ? AND deleted = 0", (key,))
        return rows[0] if rows else None

    def repositories(self) -> list[CatalogRecord]:
        """Every repository in the catalog, by name."""
        return self._select("WHERE deleted = 0 ORDER BY slug, key", ())

    def _select(self, where: str, arguments: tuple[Any, ...]) -> list[CatalogRecord]:
        rows = self.db.execute(
            "SELECT key, slug, web_url, default_branch, archived, entities, errors, commit_ref"
            f" FROM repositories {where}",
            arguments,
        ).fetchall()
        return [
            CatalogRecord(
                key=key,
                slug=slug,
                web_url=web_url,
                default_branch=branch,
                archived=bool(archived),
                entities=tuple(json.loads(entities)),
                errors=tuple(json.loads(errors)),
                commit_ref=ref,
            )
            for key, slug, web_url, branch, archived, entities, errors, ref in rows
        ]


def _json(value: object) -> str:
    # YAML reads unquoted dates as dates: they are kept as their ISO text.
    return json.dumps(value, default=str, sort_keys=True)
