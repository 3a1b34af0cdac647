"""Where push targets created through the API are kept, so that they survive a restart.

``PushStore`` is what the targets need: read every stored target, write them all. The one
implementation, ``JsonFileStore``, keeps them in one JSON file: a handful of targets changed now
and then needs no database, the file can be read and backed up by hand, and it works whatever
the broker is. It is written whole each time, to a temporary file beside it that then replaces
it (``os.replace``, after ``fsync``), so a crash leaves the old file or the new one, never half
of one. It holds the targets' secrets: it is created readable by its owner only (``0600``).
Beside each target it keeps the bus caller that made it (``owners``), who alone may manage it
(``push/access.py``); a file written before owners were kept has none, and is read as such.

Each process reads the file when it starts; a change made through one process's API is not
seen by another process until that one restarts (``docs/bridges.md``).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from callboard.errors import PushStoreError

_VERSION = 2


@dataclass(frozen=True, slots=True)
class StoredTarget:
    """One target made through the API: its section as the API was given it, and its owner."""

    #: The target's keys, as ``events.push.<name>`` has them (left out of ``repr``: they hold
    #: the secret and the headers' values).
    section: Mapping[str, Any] = field(repr=False)
    #: The bus caller that made it (``service=ops``); ``None``: kept before owners were.
    owner: str | None


#: Stored targets by name.
Stored = dict[str, StoredTarget]


class PushStore(Protocol):
    """Keeps the push targets created at runtime."""

    async def load(self) -> Stored:
        """Every stored target by name (nothing stored: an empty mapping)."""
        ...

    async def save(self, targets: Mapping[str, StoredTarget]) -> None:
        """Replace what is stored by ``targets``, durably."""
        ...


class JsonFileStore:
    """Push targets in one JSON file, replaced atomically on each change."""

    def __init__(self, path: str | Path, *, key: str = "events.pushStorePath") -> None:
        self.path = Path(path)
        #: The configuration key that named the file, for error messages.
        self._key = key

    async def load(self) -> Stored:
        return await asyncio.to_thread(self._read)

    async def save(self, targets: Mapping[str, StoredTarget]) -> None:
        document = {
            "version": _VERSION,
            "push": {name: dict(target.section) for name, target in targets.items()},
            "owners": {
                name: target.owner for name, target in targets.items() if target.owner is not None
            },
        }
        try:
            await asyncio.to_thread(self._write, json.dumps(document, indent=2, sort_keys=True))
        except OSError as error:
            raise PushStoreError(
                f"cannot write {self.path} ({self._key}): {error.strerror}; nothing was changed"
            ) from None

    def _read(self) -> Stored:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise PushStoreError(
                f"cannot read {self.path} ({self._key}): {error.strerror}"
            ) from None
        try:
            document = json.loads(text)
        except ValueError:
            raise PushStoreError(f"{self.path} ({self._key}) is not valid JSON") from None
        targets = document.get("push") if isinstance(document, dict) else None
        owners = document.get("owners", {}) if isinstance(document, dict) else None
        if (
            not isinstance(targets, dict)
            or not all(isinstance(t, dict) for t in targets.values())
            or not isinstance(owners, dict)
            or not all(isinstance(o, str) for o in owners.values())
        ):
            raise PushStoreError(
                f'{self.path} ({self._key}) is not a push store: expected {{"push": '
                '{name: {...}}, "owners": {name: caller}}'
            )
        return {name: StoredTarget(t, owners.get(name)) for name, t in targets.items()}

    def _write(self, text: str) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{self.path.name}.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
