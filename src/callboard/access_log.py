"""The access log: one line per HTTP request served, when ``backend.accessLog`` asks for it.

Logged on ``callboard.access`` at info level once the response is complete: method, path (the
query string left out: some senders put tokens there), status, duration and client address, also
as fields of their own in JSON logs. Off, nothing wraps the application and a request pays
nothing for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

#: What a logged path may take up, in characters.
MAX_PATH = 256


class AccessLog:
    """ASGI middleware logging every HTTP request ``app`` answers."""

    def __init__(self, app: App, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger if logger is not None else logging.getLogger("callboard.access")

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self._log(scope, status, (time.perf_counter() - began) * 1000)

    def _log(self, scope: MutableMapping[str, Any], status: int, millis: float) -> None:
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if isinstance(raw, bytes) else str(scope.get("path", ""))
        if len(path) > MAX_PATH:
            path = path[:MAX_PATH] + "…"
        if not path.isprintable():
            path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
        client = scope.get("client")
        address = f"{client[0]}:{client[1]}" if client else "-"
        method = str(scope.get("method", ""))
        self.logger.info(
            "%s %s %s %s %.1fms",
            address,
            method,
            path,
            status or "-",
            millis,
            extra={
                "method": method,
                "path": path,
                "status": status or None,
                "duration_ms": round(millis, 3),
                "client": address,
            },
        )
