"""Publishes of the Redis broker, pipelined: what queues while a pipeline runs goes in the next.

One pipeline is in flight at a time, and a batch keeps the order the publishes were called in,
so concurrent publishes are stored in call order and share a round trip to Redis. Each publish
is answered from its own reply: a refused one fails alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from callboard.errors import BrokerError

#: Most publishes sent in one pipeline.
MAX_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One publish: a dead letter for the stream ``letters``, or the publish script's args."""

    letters: str | None
    args: list[str]


Send = Callable[[Sequence[Outgoing]], Awaitable[list[object]]]


class Publisher:
    """Sends queued publishes in batches, one pipeline at a time."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._queue: list[tuple[Outgoing, asyncio.Future[bool]]] = []
        self._running: asyncio.Task[None] | None = None

    async def submit(self, item: Outgoing) -> bool:
        """Queue ``item`` and wait for its reply: ``True`` stored, ``False`` a redelivery."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                replies = await self._send([item for item, _ in batch])
            except BrokerError as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException as error:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(BrokerError(f"publishing failed: {error!r}"))
                raise
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(BrokerError(f"Redis refused the event: {reply}"))
                else:
                    future.set_result(reply is not None)
