"""Checkpoints of a SQLite store's write-ahead log, off the write path.

In WAL mode a commit appends to the log, and a checkpoint copies the log back into the database
file. SQLite runs one by itself in whichever connection commits when the log passes 1,000 pages,
so a publish committed on the event loop could pay for copying the megabytes that a retention
pass wrote (a pause of several milliseconds for every request waiting behind it). The broker's
connection turns that off (``wal_autocheckpoint = 0``) and ``Checkpointer`` runs passive
checkpoints instead, on a thread and a connection of its own: a passive checkpoint never takes
the write lock, so writers go on meanwhile, and the log is rewound by the first write after a
checkpoint that copied all of it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

logger = logging.getLogger("callboard.brokers.sqlite")

#: Seconds between two checkpoints.
INTERVAL = 0.5


class Checkpointer:
    """A thread that checkpoints one SQLite file's log every ``interval`` seconds."""

    def __init__(self, path: str, *, interval: float = INTERVAL) -> None:
        self._path = path
        self._interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="callboard-sqlite-checkpoint", daemon=True
        )
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        await asyncio.to_thread(thread.join)

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        failing = False
        try:
            while not self._stopping.wait(self._interval):
                try:
                    if connection is None:
                        connection = self._connect()
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as error:
                    if not failing:  # once per failure, not twice a second
                        logger.warning(
                            "checkpointing %s failed, trying again: %s", self._path, error
                        )
                    failing = True
                    continue
                failing = False
        finally:
            if connection is not None:
                connection.close()

    def _connect(self) -> sqlite3.Connection:
        # Never creates the file: the broker's own connection does, and migrates it.
        uri = Path(self._path).resolve().as_uri() + "?mode=rw"
        connection = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA busy_timeout = 0")
        return connection
