"""Group commit: many concurrent callers, one transaction.

A caller submits an item and awaits its future. One flusher task takes everything queued, hands
it to ``flush`` (one transaction, one round trip per statement) and resolves each future with its
result, or every future with the error. While a flush runs, new items queue for the next one, so
under load each commit carries many items and at rest a lone item goes out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from callboard.errors import BrokerUnavailable

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._queue.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="callboard-group-commit")
        # Shielded: a caller that gives up must not cancel the commit others are waiting on.
        return await asyncio.shield(future)

    async def wait_idle(self) -> None:
        """Wait until everything submitted so far is flushed."""
        while self._flusher is not None:
            await asyncio.wait([self._flusher])

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    results = await self._flush([item for item, _ in batch])
                except Exception as error:
                    if isinstance(error, BrokerUnavailable):
                        # What queued while the store could not be reached fails with it, rather
                        # than wait out another timeout: callers hear of an outage at once.
                        batch += self._queue
                        self._queue.clear()
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._flusher = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that gave up never reads its future's error; reading it here keeps asyncio from
    # reporting it as lost.
    if not future.cancelled():
        future.exception()
