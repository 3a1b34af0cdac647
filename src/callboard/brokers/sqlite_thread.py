"""The thread that owns the SQLite connection and commits in groups.

sqlite3 blocks, so one dedicated thread does every database call of a broker. Callers on the
event loop submit operations; the thread runs a group of them in ONE transaction (``BEGIN
IMMEDIATE`` when any operation writes) and resolves the callers' futures after the commit.
Concurrent publishes therefore share one commit (group commit), and a publish returns only once its
event is committed.

The hand-off is batched on the event loop's side: operations submitted while the thread works on a
group wait in a list, and the whole list goes to the thread at once when that group is committed
(a lone operation on an idle thread goes at the end of the current turn of the loop). So the loop
and the thread wake each other once per transaction, not once per operation, and under load each
transaction carries everything that arrived during the one before.

An operation that raises a callboard error fails alone (operations check before they write); a
driver error rolls the whole transaction back and fails every operation in it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from callboard.errors import BrokerError, BrokerUnavailable, CallboardError

logger = logging.getLogger("callboard.brokers.sqlite")

#: Most operations committed in one transaction.
MAX_BATCH = 1_000

#: Pause between two attempts to start a write transaction while another process writes.
BUSY_PAUSE = 0.0005
_SQLITE_BUSY = 5


@dataclass(slots=True)
class Changes:
    """What one transaction changed, for waking consumers once it is committed."""

    topics: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)


Operation = Callable[[sqlite3.Connection, Changes], Any]


@dataclass(slots=True)
class _Job:
    operation: Operation
    writes: bool
    future: asyncio.Future[Any]


def translate(error: sqlite3.Error, path: str) -> BrokerError:
    """A driver error as callboard's own, saying what to do about it."""
    if isinstance(error, sqlite3.OperationalError):
        return BrokerUnavailable(
            f"the SQLite store {path} cannot be used right now ({error}); if it is locked, "
            "another process holds it too long; check that the directory exists and is writable"
        )
    return BrokerError(f"the SQLite store {path} failed: {error}")


class SQLiteThread:
    """Runs operations on one SQLite connection, in a thread of its own."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        path: str,
        on_commit: Callable[[Changes], None],
        *,
        busy_timeout: float = 10.0,
    ) -> None:
        self._connect = connect
        self._path = path
        self._busy_timeout = busy_timeout
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        #: Submitted and not yet handed to the thread (event loop side).
        self._pending: list[_Job] = []
        #: A group is with the thread, or a hand-off is scheduled: new operations wait.
        self._busy = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="callboard-sqlite", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def submit(self, operation: Operation, *, writes: bool = True) -> asyncio.Future[Any]:
        if self._loop is None or self._thread is None:
            raise BrokerUnavailable(f"the SQLite broker on {self._path} is not running")
        future = self._loop.create_future()
        self._pending.append(_Job(operation, writes, future))
        if not self._busy:
            # Gather what else this turn of the loop submits, then hand it over in one go.
            self._busy = True
            self._loop.call_soon(self._hand_over)
        return future

    def _hand_over(self) -> None:
        """Give the thread everything pending (at most ``MAX_BATCH``), or become idle."""
        pending = self._pending
        if not pending or self._thread is None:
            self._busy = False
            return
        if len(pending) > MAX_BATCH:
            self._queue.put(pending[:MAX_BATCH])
            del pending[:MAX_BATCH]
        else:
            self._queue.put(pending)
            self._pending = []

    async def stop(self) -> None:
        """Finish what is queued, close the connection and end the thread."""
        if self._thread is None or self._stopped is None:
            return
        self._thread = None
        # What is still pending is handed over before the end (the queue keeps the order).
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_BATCH):
            self._queue.put(pending[start : start + MAX_BATCH])
        self._queue.put(None)
        await self._stopped

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        try:
            while True:
                jobs = self._queue.get()
                if jobs is None:
                    break
                if connection is None:
                    try:
                        connection = self._connect()
                    except sqlite3.Error as error:
                        self._post(jobs, [translate(error, self._path)] * len(jobs), None)
                        continue
                results, changes = self._execute(connection, jobs)
                self._post(jobs, results, changes)
        finally:
            if connection is not None:
                connection.close()
            loop, stopped = self._loop, self._stopped
            if loop is not None and stopped is not None and not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, stopped, None)

    def _execute(
        self, connection: sqlite3.Connection, jobs: list[_Job]
    ) -> tuple[list[Any], Changes | None]:
        changes = Changes()
        writes = any(job.writes for job in jobs)
        results: list[Any] = []
        try:
            if writes:
                self._begin(connection)
            for job in jobs:
                try:
                    results.append(job.operation(connection, changes))
                except CallboardError as error:
                    results.append(error)
            if writes:
                connection.execute("COMMIT")
        except sqlite3.Error as error:
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("rolling back a failed SQLite transaction failed")
            return [translate(error, self._path) for _ in jobs], None
        except Exception as error:
            # A bug in an operation: fail the batch loudly rather than half-commit it.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            logger.exception("a SQLite broker operation failed")
            return [BrokerError(f"SQLite broker operation failed: {error!r}")] * len(jobs), None
        return results, changes

    def _begin(self, connection: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE``, tried again every half millisecond while another process writes.

        SQLite's own busy handler sleeps in growing steps (up to 100 ms at a time) while the
        write lock is taken, which shows as delivery latency when two processes share a file;
        the lock is held for a commit's length only, so a short fixed pause is enough.
        """
        connection.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    connection.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as error:
                    busy = (getattr(error, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_BUSY
                    if not busy or time.monotonic() >= deadline:
                        raise
                time.sleep(BUSY_PAUSE)
        finally:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")

    def _post(self, jobs: list[_Job], results: list[Any], changes: Changes | None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._deliver, jobs, results, changes)

    def _deliver(self, jobs: list[_Job], results: list[Any], changes: Changes | None) -> None:
        # The next group goes to the thread first, so it works while the callers wake up.
        self._hand_over()
        for job, result in zip(jobs, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
        if changes is not None and (changes.topics or changes.groups):
            self._on_commit(changes)


def _resolve(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)
