"""uvicorn's httptools protocol, bounded, with a response's writes gathered into one socket write.

Gathering: uvicorn writes a response's head when the application sends ``http.response.start``
and its body when it sends ``http.response.body``: two ``send`` system calls, and two TCP
segments, for every small response, such as a webhook's 202. Here the connection's writes made in
one turn of the event loop are gathered and written together at the end of that turn. A response
sent at once (head and body) costs one system call; a streamed one (a held bus read) still has its
head on the wire as soon as the application yields.

Bounds: callboard takes requests from the internet, so a request's head is bounded while its bytes
arrive (httptools buffers an unfinished header in memory, joining its pieces one by one), every
connection has a deadline for its head, its body and its idle time, and the number of open
connections is capped. The bounds are counted in ``data_received`` and the parser's callbacks;
deadlines are kept by one watchdog timer per connection that reads ``loop.time()`` values stored
by the state changes, so a request costs no timer of its own.

This leans on the internals of uvicorn's ``HttpToolsProtocol`` (its parser callbacks, ``cycle``,
``pipeline``, ``flow``, ``on_response_complete`` and ``_start_asgi_task``); ``pyproject.toml``
pins the uvicorn versions it was checked against.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from callboard.http_errors import error_body

logger = logging.getLogger("callboard.http")

# Where a connection's parser stands: between messages, inside a head, inside a body.
_BETWEEN, _HEAD, _BODY = 0, 1, 2

#: Seconds between two warnings that the connection cap was reached.
CAP_REPORT_INTERVAL = 5.0
#: Seconds a refused connection is still read (and discarded) after its answer: closing a socket
#: with unread bytes resets it, and the reset can destroy the answer before the client reads it.
LINGER = 2.0
_SHOWN_URL = 256


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one connection of ``callboard serve`` may send and hold (``backend.server``)."""

    max_request_line_bytes: int = 8 * 1024
    """Longest request target (URL); longer ones are answered 414."""
    max_header_bytes: int = 16 * 1024
    """Longest header line, name and value; longer ones are answered 431."""
    max_headers_bytes: int = 64 * 1024
    """Largest head, request line and headers together; larger ones are answered 431."""
    max_header_count: int = 100
    """Most headers in one request; more are answered 431."""
    headers_timeout: float = 10.0
    """Seconds from connection open (or a next request's first byte) to a complete head: 408."""
    body_timeout: float = 30.0
    """Seconds without a body byte while a body is expected: the connection is closed."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle kept-alive connection stays open."""
    max_connections: int = 10_000
    """Open connections; beyond it the oldest ones not running a request are closed."""


class GatheringTransport:
    """A transport whose writes wait for the end of the loop's turn, then go out together.

    Everything else is the wrapped transport's. Closing writes what is still waiting first.
    """

    __slots__ = ("_loop", "_transport", "_waiting")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._waiting: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._waiting:
            self._loop.call_soon(self._flush)
        self._waiting.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        if waiting and not self._transport.is_closing():
            self._transport.write(waiting[0] if len(waiting) == 1 else b"".join(waiting))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class ConnectionGuard:
    """The open connections of one server, oldest first, and the cap on their number.

    At the cap a new connection makes room by closing the oldest connection that is not running a
    request (idle between requests, or still sending its head): a flood of slow connections then
    costs its own members their place, never a sender whose request is being served. Only when
    every connection is running a request is the new one refused. What happened is logged as one
    warning every ``CAP_REPORT_INTERVAL`` seconds at most, with counts.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open: OrderedDict[BoundedHttpToolsProtocol, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self._warned_at = -CAP_REPORT_INTERVAL
        self._report: asyncio.TimerHandle | None = None

    def admit(self, protocol: BoundedHttpToolsProtocol) -> bool:
        """Register a new connection; ``False`` if it must be refused."""
        if len(self.open) >= self.max_connections:
            victim = self._oldest_idle()
            if victim is None:
                self.refused += 1
                self._note(protocol.loop)
                return False
            del self.open[victim]
            victim.evict()
            self.evicted += 1
            self._note(protocol.loop)
        self.open[protocol] = None
        return True

    def discard(self, protocol: BoundedHttpToolsProtocol) -> None:
        self.open.pop(protocol, None)

    def _oldest_idle(self) -> BoundedHttpToolsProtocol | None:
        # Busy connections met on the way move to the young end, so each is passed over once
        # rather than at every admission.
        for _ in range(len(self.open)):
            oldest = next(iter(self.open))
            if not oldest.busy:
                return oldest
            self.open.move_to_end(oldest)
        return None

    def _note(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._report is None:
            when = max(loop.time(), self._warned_at + CAP_REPORT_INTERVAL)
            self._report = loop.call_at(when, self._warn, loop)

    def _warn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._report = None
        self._warned_at = loop.time()
        evicted, refused, self.evicted, self.refused = self.evicted, self.refused, 0, 0
        logger.warning(
            "%d connections open, the most backend.server.maxConnections allows: closed %d "
            "idle or slow connections to make room and refused %d new ones since the last "
            "report; raise backend.server.maxConnections if these are real clients",
            len(self.open),
            evicted,
            refused,
        )


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the answer waits in ``_refusal``."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a ``GatheringTransport``, with ``ServerLimits`` enforced.

    Give uvicorn the class ``protocol_for(limits)`` makes (``uvicorn.Config(http=...)``); this
    one holds the default limits and a guard of its own.
    """

    limits: ClassVar[ServerLimits] = ServerLimits()
    guard: ClassVar[ConnectionGuard] = ConnectionGuard(ServerLimits().max_connections)

    url = b""  # uvicorn sets it at a message's first byte; a refusal may come before
    _state = _BETWEEN
    _stopped = False
    _refusal: tuple[int, str, str] | None = None
    _head_wire = 0  # bytes of the current head (or trailers) seen on the wire
    _head_size = 0  # bytes of the current head the parser has handed over
    _header_count = 0
    _heads_done = 0
    _body_seen = False
    _timer: asyncio.TimerHandle | None = None

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(GatheringTransport(transport, self.loop))  # type: ignore[arg-type]
        now = self.loop.time()
        self._read_at = self._head_started = self._idle_since = now
        limits = self.limits
        self._period = min(limits.headers_timeout, limits.body_timeout, limits.keep_alive_timeout)
        if not self.guard.admit(self):
            self._stopped = True
            self.transport.close()
            return
        self._timer = self.loop.call_at(now + self._period, self._watch)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def handle_websocket_upgrade(self) -> None:
        # The connection now belongs to the WebSocket protocol: it leaves this one's bookkeeping.
        self.guard.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().handle_websocket_upgrade()

    @property
    def busy(self) -> bool:
        """Whether a request of this connection is being read or answered."""
        return self.cycle is not None and not self.cycle.response_complete

    def evict(self) -> None:
        """Close to make room for a new connection (the guard calls this)."""
        self._stopped = True
        self.transport.close()

    # Reading: the head is counted while it arrives

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        self._read_at = self.loop.time()
        self._receive(data)

    def _receive(self, data: bytes | memoryview) -> None:
        if self._state == _BODY:
            # The chunk may end this body and begin the next head; that head's bytes in this
            # chunk are not counted on the wire (at most one read), its parsed size still is.
            self._body_seen = False
            if not self._feed(data):
                return
            if self._state == _BODY and not self._body_seen:
                # Trailers, or framing with no body: httptools buffers trailers as it does headers.
                self._head_wire += len(data)
                if self._head_wire > self.limits.max_headers_bytes:
                    self._stop(0, "", "")
            return
        # The chunk starts between messages or inside a head: its bytes are head bytes until
        # the head completes.
        room = self.limits.max_headers_bytes - self._head_wire
        done = self._heads_done
        if len(data) > room:
            view = memoryview(data)
            if not self._feed(view[:room]):
                return
            if self._state == _HEAD and self._heads_done == done:
                self._stop(*self._too_large_head())
                return
            self._receive(view[room:])
            return
        if not self._feed(data):
            return
        if self._state == _HEAD and self._heads_done == done:
            self._head_wire += len(data)
            if self._head_wire >= self.limits.max_headers_bytes:
                self._stop(*self._too_large_head())

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; ``False`` when the connection is done with (refused or upgraded)."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._stop(*self._refusal)
            else:
                self._stopped = True
                message = "Invalid HTTP request received."
                self.logger.warning(message)
                self.send_400_response(message)
            return False
        return True

    def _too_large_head(self) -> tuple[int, str, str]:
        limit = self.limits.max_headers_bytes
        return (
            431,
            "RequestHeaderFieldsTooLargeError",
            f"the request's head (request line and headers) is over {limit} bytes, "
            "the limit set by backend.server.maxHeadersBytes",
        )

    def _refuse(self, status: int, name: str, message: str) -> None:
        self._refusal = (status, name, message)
        raise _Refused(message)

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.cycle is not None:  # a next request on a kept-alive connection
            self._head_started = self._read_at
        self._state = _HEAD
        self._head_size = self._header_count = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_size += len(url)
        if len(self.url) > self.limits.max_request_line_bytes:
            self._refuse(
                414,
                "URITooLongError",
                f"the request line's target is over {self.limits.max_request_line_bytes} bytes, "
                "the limit set by backend.server.maxRequestLineBytes",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._header_count += 1
        self._head_size += size + 4
        limits = self.limits
        if (
            size > limits.max_header_bytes
            or self._header_count > limits.max_header_count
            or self._head_size > limits.max_headers_bytes
        ):
            self._refuse(*self._header_refusal(name, size))
        # uvicorn's own ``on_header``, inlined: this runs for every header of every request.
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 section 5.5 excludes from the value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def _header_refusal(self, name: bytes, size: int) -> tuple[int, str, str]:
        limits = self.limits
        shown = name[:64].decode("latin-1")
        if size > limits.max_header_bytes:
            message = (
                f"the header {shown!r} is {size} bytes, over the {limits.max_header_bytes} "
                "set by backend.server.maxHeaderBytes"
            )
        elif self._header_count > limits.max_header_count:
            message = (
                f"the request has over {limits.max_header_count} headers, the limit set by "
                "backend.server.maxHeaderCount"
            )
        else:
            return self._too_large_head()
        return 431, "RequestHeaderFieldsTooLargeError", message

    def on_headers_complete(self) -> None:
        self._state = _BODY
        self._head_wire = 0
        self._heads_done += 1
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._state = _BETWEEN
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn's, without its keep-alive timer per request: the watchdog keeps that deadline.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_since = self.loop.time()

    # Deadlines

    def _watch(self) -> None:
        """The connection's one timer: enforce the deadline of its state, then re-arm."""
        self._timer = None
        if self._stopped or self.transport.is_closing():
            return
        now = self.loop.time()
        limits = self.limits
        state = self._state
        if state == _HEAD or (state == _BETWEEN and self.cycle is None):
            if now >= self._head_started + limits.headers_timeout:
                self._stop(
                    408,
                    "RequestTimeoutError",
                    f"the request's head did not arrive within {limits.headers_timeout:g} s, "
                    "the limit set by backend.server.headersTimeoutMs",
                )
                return
            deadline = self._head_started + limits.headers_timeout
        elif state == _BODY:
            if self.flow.read_paused:  # held back by the server, not by the sender
                self._read_at = now
            deadline = self._read_at + limits.body_timeout
            if now >= deadline:
                logger.debug("closing a connection whose request body stalled")
                self._stop(0, "", "")
                return
        elif self.cycle is not None and self.cycle.response_complete:
            deadline = self._idle_since + limits.keep_alive_timeout
            if now >= deadline:
                self._stopped = True
                self.transport.close()
                return
        else:  # the application is answering: its time is its own
            deadline = now + self._period
        self._timer = self.loop.call_at(min(deadline, now + self._period), self._watch)

    def _stop(self, status: int, name: str, message: str) -> None:
        """Answer ``status`` (0: none) and close; only close if an answer is being written."""
        self._stopped = True
        if not status or self.busy or self.transport.is_closing():
            self.transport.close()
            return
        logger.debug("refused a request with %d: %s", status, message)
        self.transport.write(self._error_response(status, name, message))
        # Half-close after the answer and read on for a while (``data_received`` discards
        # what comes), so the client gets to read the answer before the connection is gone.
        if not self.transport.can_write_eof():  # TLS cannot half-close
            self.transport.close()
            return
        self.transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(LINGER, self.transport.close)

    def _error_response(self, status: int, name: str, message: str) -> bytes:
        method = url = ""
        if self.url:  # the method precedes the target, so it is known
            method = self.parser.get_method().decode("ascii", "replace")
            url = self.url[:_SHOWN_URL].decode("latin-1")
            if len(self.url) > _SHOWN_URL:
                url += "..."
        body = error_body({"method": method, "path": url}, status, name, message)
        reason = {408: b"Request Timeout", 414: b"URI Too Long"}.get(
            status, b"Request Header Fields Too Large"
        )
        return b"".join(
            [
                b"HTTP/1.1 %d %s\r\n" % (status, reason),
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )


def protocol_for(limits: ServerLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class of one server: ``limits`` and a connection guard of its own."""

    class ServerProtocol(BoundedHttpToolsProtocol):
        pass

    ServerProtocol.limits = limits
    ServerProtocol.guard = ConnectionGuard(limits.max_connections)
    return ServerProtocol
