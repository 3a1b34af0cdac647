"""What the SQL-backed brokers share: named queries, the stored form of an event
(``columns``, shared with the Redis broker).

Each dialect keeps its SQL in files beside this module (``sqlite/``, ``postgres/``), loaded with
``importlib.resources`` so they ship inside the wheel. ``queries.sql`` holds named queries::

    -- name: ack
    -- One line saying what the query does.
    DELETE FROM ...;

Nothing here imports a database driver: each broker module imports its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from callboard.brokers.columns import StoredEvent, decode_event, encode_event
from callboard.errors import BrokerError

__all__ = [
    "Expired",
    "StoredEvent",
    "cancel_all",
    "decode_event",
    "encode_event",
    "migration_names",
    "queries",
    "read_sql",
    "repeat",
]

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def read_sql(dialect: str, name: str) -> str:
    """The text of ``<dialect>/<name>`` (``schema.sql``, ``migrations/0001_init.sql``)."""
    return resources.files(__package__).joinpath(dialect, name).read_text(encoding="utf-8")


def migration_names(dialect: str) -> list[str]:
    """The migration files of a dialect, in the order they apply (``NNNN_*.sql``)."""
    folder = resources.files(__package__).joinpath(dialect, "migrations")
    return sorted(item.name for item in folder.iterdir() if item.name.endswith(".sql"))


@cache
def queries(dialect: str) -> dict[str, str]:
    """The named queries of ``<dialect>/queries.sql``, without their comment lines."""
    text = read_sql(dialect, "queries.sql")
    found: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        body = text[match.end() : following.start() if following else len(text)]
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        found[match.group(1)] = "\n".join(lines).strip()
    return found


@dataclass(frozen=True, slots=True)
class Expired:
    """What one retention batch deleted, and which subscriptions had not received it."""

    deleted: int
    lost: dict[str, int]
    #: The seq the pass's next batch starts after; ``None``: the pass's range is done.
    resume: int | None = None


async def repeat(
    interval: float,
    job: Callable[[], Awaitable[object]],
    failure: str,
    *,
    log: logging.Logger,
    first: float | None = None,
) -> None:
    """Run ``job`` every ``interval`` seconds (the first time after ``first``) until cancelled.

    A ``BrokerError`` is logged as ``<failure>: <error>`` and the next run comes as planned: the
    durable brokers' upkeep (lease renewal, retention) must outlive a store that is down a while.
    """
    await asyncio.sleep(interval if first is None else first)
    while True:
        try:
            await job()
        except BrokerError as error:
            log.warning("%s: %s", failure, error)
        await asyncio.sleep(interval)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel a broker's background tasks and wait until each has ended; empties ``tasks``."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()
