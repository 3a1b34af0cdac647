"""The thread that owns the SQLite connection, and commits in groups.

sqlite3 blocks, so a broker's database calls go to one connection, serialised here. Callers on
the event loop submit operations; a group of them runs in ONE transaction (``BEGIN IMMEDIATE``
when any operation writes) and the callers' futures are resolved after the commit. (The
broker's group-commit engine, ``callboard.group_commit``, makes each batch of publishes or
acknowledgements one operation, which goes at once with whatever else waits: ``now``.)

Where a group runs:

- **On the event loop, when the file is free** (``inline``, the default with
  ``synchronous=normal``). A commit in WAL mode with ``synchronous=NORMAL`` is an append to the
  log without a disk flush, tens of microseconds for a group; doing it on the loop spares the
  hand-off to a thread and back, and the two threads' fight for the GIL, on every group.
- **On the broker's thread, when it would wait**: the first group (opening the file and
  migrating it), a group that finds another process holding the write lock (the thread tries
  again every half millisecond until ``busy_timeout``), and every group with
  ``synchronous=FULL``, whose commits wait for the disk, and every group with an operation too
  long for the loop (``offload``: a batch of retention). While the thread has a group, what is
  submitted waits, so groups still commit in submission order.

The hand-off is batched on the event loop's side: operations submitted during one turn of the
loop (or while the thread works on a group) wait in a list and go together, so under load each
transaction carries everything that arrived since the one before.

An operation that raises a callboard error fails alone (operations check before they write); a
driver error rolls the whole transaction back and fails every operation in it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from callboard.errors import BrokerError, BrokerUnavailable, CallboardError

logger = logging.getLogger("callboard.brokers.sqlite")

#: Most operations committed in one transaction.
MAX_BATCH = 1_000

#: Pause between two attempts to start a write transaction while another process writes.
BUSY_PAUSE = 0.0005
_SQLITE_BUSY = 5


Operation = Callable[[sqlite3.Connection], Any]


@dataclass(slots=True)
class _Job:
    operation: Operation
    writes: bool
    #: Too long for the event loop (a batch of retention): its group goes to the thread.
    offload: bool
    #: Called on the event loop with the operation's result, or the exception it ended with.
    settle: Callable[[Any], None]


def translate(error: sqlite3.Error, path: str) -> BrokerError:
    """A driver error as callboard's own, saying what to do about it."""
    if isinstance(error, sqlite3.OperationalError):
        return BrokerUnavailable(
            f"the SQLite store {path} cannot be used right now ({error}); if it is locked, "
            "another process holds it too long; check that the directory exists and is writable"
        )
    return BrokerError(f"the SQLite store {path} failed: {error}")


class _Busy(Exception):
    """Another process holds the file's write lock (or, rarely, its read lock)."""


def _is_busy(error: sqlite3.Error) -> bool:
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_BUSY


class SQLiteThread:
    """Runs operations on one SQLite connection: on the event loop, or in a thread of its own.

    The connection never waits for a lock by itself (``busy_timeout`` 0): a group that finds
    the file locked goes to the thread, which tries again until ``busy_timeout`` has passed.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        path: str,
        *,
        busy_timeout: float = 10.0,
        inline: bool = True,
    ) -> None:
        self._connect = connect
        self._path = path
        self._busy_timeout = busy_timeout
        self._inline = inline
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        #: Submitted and not yet run (event loop side).
        self._pending: list[_Job] = []
        #: A group is with the thread, or a hand-off is scheduled: new operations wait.
        self._busy = False
        #: Opened by the thread; used by the loop too, never by both at once.
        self._connection: sqlite3.Connection | None = None
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

    def submit(
        self,
        operation: Operation,
        *,
        writes: bool = True,
        now: bool = False,
        offload: bool = False,
    ) -> asyncio.Future[Any]:
        """Run ``operation`` in the next group; its result once that group is committed.

        With ``now``, for an operation that is a batch already (a group commit's): the group
        goes at once, with whatever else waits, rather than at the end of this turn of the loop;
        inline on a free file, its future is done when this returns. With ``offload``, for an
        operation too long for the event loop (a batch of retention): its group runs on the
        thread even when the file is free, and the loop goes on meanwhile.
        """
        loop = self._running_loop()
        future = loop.create_future()
        settle = functools.partial(_settle, future)
        self._pending.append(_Job(operation, writes, offload, settle))
        if not self._busy:
            self._busy = True
            if now:
                self._hand_over()
            else:
                # Gather what else this turn of the loop submits, then run it in one go.
                loop.call_soon(self._hand_over)
        return future

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._thread is None:
            raise BrokerUnavailable(f"the SQLite broker on {self._path} is not running")
        return self._loop

    def _hand_over(self) -> None:
        """Run everything pending (at most ``MAX_BATCH`` a group), or become idle."""
        while self._pending and self._thread is not None:
            jobs = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            connection = self._connection
            if not self._inline or connection is None or any(job.offload for job in jobs):
                self._queue.put(jobs)
                return
            try:
                results = self._execute(connection, jobs)
            except _Busy:
                self._queue.put(jobs)
                return
            self._resolve(jobs, results)
        self._busy = False

    async def stop(self) -> None:
        """Finish what is queued, close the connection and end the thread."""
        if self._thread is None or self._stopped is None:
            return
        # What is still pending is handed over before the end (the queue keeps the order).
        self._thread = None
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_BATCH):
            self._queue.put(pending[start : start + MAX_BATCH])
        self._queue.put(None)
        await self._stopped

    def _run(self) -> None:
        try:
            while True:
                jobs = self._queue.get()
                if jobs is None:
                    break
                if self._connection is None:
                    try:
                        self._connection = self._open()
                    except sqlite3.Error as error:
                        self._post(jobs, [translate(error, self._path)] * len(jobs))
                        continue
                results = self._execute_waiting(self._connection, jobs)
                self._post(jobs, results)
        finally:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()
            loop, stopped = self._loop, self._stopped
            if loop is not None and stopped is not None and not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, stopped, None)

    def _open(self) -> sqlite3.Connection:
        """Connect, trying again while another process holds the file.

        Switching a new file to WAL needs it to itself; when two processes open one new file at
        once, SQLite answers the second ``SQLITE_BUSY`` at once instead of waiting.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                connection = self._connect()
            except sqlite3.OperationalError as error:
                if not _is_busy(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(BUSY_PAUSE)
                continue
            connection.execute("PRAGMA busy_timeout = 0")
            return connection

    def _execute_waiting(self, connection: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
        """``_execute``, tried again every ``BUSY_PAUSE`` while another process holds the file.

        SQLite's own busy handler sleeps in growing steps (up to 100 ms at a time) while the
        write lock is taken, which shows as delivery latency when two processes share a file;
        the lock is held for a commit's length only, so a short fixed pause is enough.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return self._execute(connection, jobs)
            except _Busy:
                if time.monotonic() >= deadline:
                    error = sqlite3.OperationalError("database is locked")
                    return [translate(error, self._path) for _ in jobs]
            time.sleep(BUSY_PAUSE)

    def _execute(self, connection: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
        """Run a group in one transaction; ``_Busy`` (nothing done) when the file is locked."""
        writes = any(job.writes for job in jobs)
        results: list[Any] = []
        try:
            if writes:
                connection.execute("BEGIN IMMEDIATE")
            for job in jobs:
                try:
                    results.append(job.operation(connection))
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
            # A write group can only find the lock taken at BEGIN; a read-only group may be
            # run again from the start.
            if _is_busy(error) and (not writes or not results):
                raise _Busy from error
            return [translate(error, self._path) for _ in jobs]
        except Exception as error:
            # A bug in an operation: fail the batch loudly rather than half-commit it.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            logger.exception("a SQLite broker operation failed")
            return [BrokerError(f"SQLite broker operation failed: {error!r}")] * len(jobs)
        return results

    def _post(self, jobs: list[_Job], results: list[Any]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._thread_done, jobs, results)

    def _thread_done(self, jobs: list[_Job], results: list[Any]) -> None:
        if self._inline:
            self._resolve(jobs, results)
            # Then what was submitted meanwhile: on the loop, if the file is free now.
            self._hand_over()
        else:
            # The next group goes to the thread first, so it works while the callers wake up.
            self._hand_over()
            self._resolve(jobs, results)

    def _resolve(self, jobs: list[_Job], results: list[Any]) -> None:
        for job, result in zip(jobs, results, strict=True):
            job.settle(result)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _resolve(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)
