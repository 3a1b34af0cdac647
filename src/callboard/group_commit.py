"""Group commit: many concurrent callers, one transaction (or one request).

A caller submits an item and awaits its future. One flusher task takes everything queued, hands
it to ``flush`` (one transaction) and resolves each future with its result, or every future with
the error; ``flush`` may also answer an item with an exception of its own (an event the store
refused), which fails that item's caller alone. While a flush runs, new items queue for the next
one, so under load each commit carries many items and at rest a lone item goes out at once.

Regrouping: callers whose items were just committed usually come back at once with the next one
(a webhook sender with a fixed number of connections, a publishing loop). Flushed at once, the
next commit would take only what queued meanwhile, and the callers coming back would wait for
that commit AND their own: the callers settle into two halves taking turns, each waiting two
commits. So after a commit of ``k`` items the flusher waits, at most ``regroup`` seconds, for
three quarters of them to be back; then everybody rides one commit. Under light load (commits of
fewer than ``REGROUP_FROM`` items) the next items go at once.

``settled`` hears of each commit's items once its callers have had that time, just before the
next commit goes out: work that follows from a commit but is nobody's answer (waking consumers)
then runs while the next commit waits for the disk, instead of delaying the callers' return.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar, cast

from callboard.errors import BrokerUnavailable

T = TypeVar("T")
R = TypeVar("R")

#: The smallest commit after which the flusher regroups: below it the load is light and the next
#: items go at once.
REGROUP_FROM = 4


class _Together(Generic[R]):
    """The results of items submitted together (``submit_many``), in order, behind one future.

    One future for the lot instead of one per item, gathered: an acknowledgement batch is
    dozens of items, and a future with its gathering callback per item is most of the cost
    of handing them over.
    """

    __slots__ = ("future", "left", "results")

    def __init__(self, future: asyncio.Future[list[R]], count: int) -> None:
        self.future = future
        self.results: list[R | None] = [None] * count
        self.left = count

    def set_result(self, index: int, result: R) -> None:
        self.results[index] = result
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(cast("list[R]", self.results))

    def set_exception(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


#: Where an item's result goes: the future of a lone item, or its place among items submitted
#: together.
_Sink = asyncio.Future[R] | tuple[_Together[R], int]


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        max_batch: int,
        *,
        regroup: float = 0.0,
        settled: Callable[[list[T]], None] | None = None,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._regroup = regroup
        self._settled = settled
        self._queue: list[tuple[T, _Sink[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        #: While regrouping: how many queued items end the wait, and the wait's future.
        self._enough = 0
        self._regrouped: asyncio.Future[None] | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._kick()
        # A caller that gives up cancels its own future only: the flusher, which the others wait
        # on, does not await it, and skips it when the commit resolves the rest. (Hence no
        # ``asyncio.shield``, which costs a second future and its callbacks per caller.)
        return await future

    def _kick(self) -> None:
        """Start the flusher, or end its regrouping wait once enough callers are back."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._run(), name="callboard-group-commit")
        elif self._regrouped is not None and len(self._queue) >= self._enough:
            self._regrouped.cancel()  # enough are back: end the wait

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """``submit`` for several items at once; their results, in order."""
        if not items:
            return []
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        together = _Together(future, len(items))
        self._queue.extend((item, (together, index)) for index, item in enumerate(items))
        self._kick()
        return await future

    async def wait_idle(self) -> None:
        """Wait until everything submitted so far is flushed."""
        while self._flusher is not None:
            await asyncio.wait([self._flusher])

    async def _run(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                if await self._commit(batch):
                    await self._wait_for_callers(len(batch))
                    if self._settled is not None:
                        self._settled([item for item, _ in batch])
        finally:
            self._flusher = None
            self._regrouped = None

    async def _commit(self, batch: list[tuple[T, _Sink[R]]]) -> bool:
        """Flush a batch and resolve its futures; committed?"""
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as error:
            if isinstance(error, BrokerUnavailable):
                # What queued while the store could not be reached fails with it, rather than
                # wait out another timeout: callers hear of an outage at once.
                batch += self._queue
                self._queue.clear()
            for _, sink in batch:
                if isinstance(sink, tuple):
                    sink[0].set_exception(error)
                elif not sink.done():
                    sink.set_exception(error)
            return False
        for (_, sink), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(sink, tuple):
                    sink[0].set_exception(result)
                elif not sink.done():
                    sink.set_exception(result)
            elif isinstance(sink, tuple):
                sink[0].set_result(sink[1], result)
            elif not sink.done():
                sink.set_result(result)
        return True

    async def _wait_for_callers(self, committed: int) -> None:
        """Give the callers of the last commit ``regroup`` seconds to come back (see above)."""
        enough = len(self._queue) + (committed * 3) // 4
        if self._regroup <= 0 or committed < REGROUP_FROM or len(self._queue) >= enough:
            return
        self._enough = enough
        self._regrouped = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait([self._regrouped], timeout=self._regroup)
        finally:
            self._regrouped = None
