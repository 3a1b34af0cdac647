"""The live view's server-sent events: one watcher's events, written as they come."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from callboard.console.live import Dropped, LiveTap, Watcher
from callboard.events import Event

#: Seconds between two comments that keep an idle stream (and the proxies on its way) open.
KEEPALIVE = 15.0


def event_to_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "topic": event.topic,
        "time": event.time.isoformat(),
        "deliveryId": event.delivery_id,
        "payload": event.payload,
        "metadata": event.metadata,
    }


def _frame(kind: str, data: Any) -> bytes:
    # orjson writes no newline, so the data is one ``data:`` line.
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream(Response):
    """``text/event-stream`` of a watcher: ``event`` frames, ``dropped`` when it fell behind."""

    def __init__(self, tap: LiveTap, watcher: Watcher, keepalive: float = KEEPALIVE) -> None:
        super().__init__(
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
        # No content-length: the body is as long as the watch.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._tap = tap
        self._watcher = watcher
        self._keepalive = keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b": watching\n\n", "more_body": True})
            while await self._next(gone, send):
                pass
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            await self._tap.leave(self._watcher)

    async def _next(self, gone: asyncio.Task[None], send: Send) -> bool:
        """Write the next frame (or a keep-alive); ``False`` once the stream is over."""
        taking = asyncio.create_task(self._watcher.next())
        done, _ = await asyncio.wait(
            {taking, gone}, timeout=self._keepalive, return_when=asyncio.FIRST_COMPLETED
        )
        if taking not in done:
            taking.cancel()  # nothing is lost: a cancelled get takes nothing from the queue
            with contextlib.suppress(asyncio.CancelledError):
                await taking
            if gone in done:
                return False
            await send({"type": "http.response.body", "body": b": idle\n\n", "more_body": True})
            return True
        item = taking.result()
        if item is None:
            return False
        if isinstance(item, Dropped):
            body = _frame("dropped", {"count": item.count})
        else:
            body = _frame("event", event_to_json(item))
        await send({"type": "http.response.body", "body": body, "more_body": True})
        return True
