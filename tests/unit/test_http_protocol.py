"""The HTTP protocol: one socket write per response, and the bounds of ``backend.server``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
import uvicorn

from callboard import cli
from callboard.config import parse_config
from callboard.errors import ConfigError
from callboard.http_protocol import (
    BoundedHttpToolsProtocol,
    GatheringTransport,
    ServerLimits,
    protocol_for,
)


class Recorder:
    """A stand-in transport that records what is written to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_writes_of_one_turn_go_out_together_at_its_end() -> None:
    recorder = Recorder()
    transport = GatheringTransport(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"head ")
    transport.write(bytearray(b"body"))
    assert recorder.writes == []
    await asyncio.sleep(0)
    assert recorder.writes == [b"head body"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert recorder.writes == [b"head body", b"next"]
    # Anything else is the wrapped transport's.
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_closing_writes_what_waits_first() -> None:
    recorder = Recorder()
    transport = GatheringTransport(recorder, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"last words")
    transport.close()
    assert (recorder.writes, recorder.closed) == ([b"last words"], True)
    transport.write(b"too late")
    await asyncio.sleep(0)
    assert recorder.writes == [b"last words"]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b" last"})
        return
    body = b'{"status":"accepted"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"21")]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": body})


release = asyncio.Event()


async def test_uvicorn_serves_small_and_streamed_responses_through_it() -> None:
    release.clear()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # connections wait in the backlog until uvicorn accepts them
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        app, http=BoundedHttpToolsProtocol, lifespan="off", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):  # one kept-alive connection
                response = await client.post("/hooks", content=b"{}")
                assert (response.status_code, response.json()) == (202, {"status": "accepted"})
            async with client.stream("GET", "/stream") as streamed:
                # The head and the first part arrive while the application still holds the rest.
                assert streamed.status_code == 202
                chunks = streamed.aiter_bytes()
                assert await asyncio.wait_for(anext(chunks), 2) == b"first"
                release.set()
                assert b"".join([part async for part in chunks]) == b" last"
    finally:
        server.should_exit = True
        await serving
        listener.close()


# The bounds, on a real uvicorn server and raw sockets.

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Gate:
    """What the bounded app is doing, for the tests to wait on; made anew on each test's loop.

    ``/hold`` requests wait in the app until ``opened`` is set.
    """

    opened = asyncio.Event()
    #: The ``/hold`` requests that have reached the app, one item each.
    holding: asyncio.Queue[str] = asyncio.Queue()
    #: Requests the app saw end with ``http.disconnect`` before their body was complete.
    disconnects: asyncio.Queue[str] = asyncio.Queue()

    @classmethod
    async def held(cls, count: int = 1) -> None:
        """Wait until ``count`` more ``/hold`` requests are in the app (5 s at most)."""
        for _ in range(count):
            await asyncio.wait_for(cls.holding.get(), 5)


async def bounded_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            Gate.disconnects.put_nowait(scope["path"])
            return
        if not message.get("more_body"):
            break
    if scope["path"] == "/hold":
        Gate.holding.put_nowait(scope["path"])
        await Gate.opened.wait()
    body = b'{"status":"accepted"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"21")]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": body})


SMALL = ServerLimits(
    max_request_line_bytes=512,
    max_header_bytes=400,
    max_headers_bytes=2048,
    max_header_count=10,
    headers_timeout=5,
    body_timeout=5,
    keep_alive_timeout=5,
    max_connections=100,
)


@contextlib.asynccontextmanager
async def serving(limits: ServerLimits) -> AsyncIterator[Connect]:
    """A uvicorn server running ``bounded_app`` under ``limits``; yields a connector."""
    Gate.opened = asyncio.Event()
    Gate.holding = asyncio.Queue()
    Gate.disconnects = asyncio.Queue()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        bounded_app, http=protocol_for(limits), lifespan="off", log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    writers: list[asyncio.StreamWriter] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        return reader, writer

    try:
        yield connect
    finally:
        Gate.opened.set()
        for writer in writers:
            writer.close()
        server.should_exit = True
        await task
        listener.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = dict(line.lower().split(": ", 1) for line in lines)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (within 5 s) with nothing more sent."""
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), 5) == b""
    return True


def request(
    target: str = "/hooks", headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "host: test", f"content-length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def refused(connect: Connect, data: bytes) -> tuple[int, dict[str, Any]]:
    reader, writer = await connect()
    writer.write(data)
    status, headers, body = await read_response(reader)
    assert headers["connection"] == "close"
    assert await closed(reader)
    return status, json.loads(body)


async def served(connect: Connect, data: bytes) -> int:
    reader, writer = await connect()
    writer.write(data)
    status, _, _ = await read_response(reader)
    return status


async def idle(connect: Connect) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection, served one request and kept alive: the server holds it open by now."""
    reader, writer = await connect()
    writer.write(request())
    assert (await read_response(reader))[0] == 202
    return reader, writer


class Signal(logging.Handler):
    """Sets ``event`` at the first record it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.event.set()


@contextlib.contextmanager
def logged(name: str) -> Iterator[asyncio.Event]:
    """An event set when the logger ``name`` passes on a record."""
    signal = Signal()
    logging.getLogger(name).addHandler(signal)
    try:
        yield signal.event
    finally:
        logging.getLogger(name).removeHandler(signal)


@pytest.mark.parametrize(
    ("under", "over", "status", "key"),
    [
        # The target: 512 bytes at most.
        (request("/" + "a" * 511), request("/" + "a" * 512), 414, "maxRequestLineBytes"),
        # One header line: 400 bytes of name and value at most.
        (
            request(headers=[("x-big", "v" * 395)]),
            request(headers=[("x-big", "v" * 396)]),
            431,
            "maxHeaderBytes",
        ),
        # Ten headers at most (host and content-length are two of them).
        (
            request(headers=[(f"x-{i}", "v") for i in range(8)]),
            request(headers=[(f"x-{i}", "v") for i in range(9)]),
            431,
            "maxHeaderCount",
        ),
        # 2048 bytes of head in all, each header under its own limit.
        (
            request(headers=[(f"x-{i}", "v" * 250) for i in range(7)]),
            request(headers=[(f"x-{i}", "v" * 250) for i in range(8)]),
            431,
            "maxHeadersBytes",
        ),
    ],
    ids=["request-line", "header-line", "header-count", "headers-in-all"],
)
async def test_a_head_over_a_limit_is_refused_and_one_under_it_served(
    under: bytes, over: bytes, status: int, key: str
) -> None:
    async with serving(SMALL) as connect:
        assert await served(connect, under) == 202
        answered, body = await refused(connect, over)
        assert answered == status
        assert body["response"] == {"statusCode": status}
        assert f"backend.server.{key}" in body["error"]["message"]
        assert body["error"]["name"] in ("URITooLongError", "RequestHeaderFieldsTooLargeError")
        assert body["request"]["method"] == "POST"


async def test_a_head_that_never_ends_is_refused_while_it_arrives() -> None:
    async with serving(SMALL) as connect:
        reader, writer = await connect()
        writer.write(b"POST /hooks HTTP/1.1\r\nx-endless: ")
        sent = 0

        async def stream() -> None:
            nonlocal sent
            with contextlib.suppress(ConnectionError):
                while sent < 64 * 1024 * 1024:
                    writer.write(b"v" * 65536)
                    sent += 65536
                    await writer.drain()

        streaming = asyncio.create_task(stream())
        status, _, body = await read_response(reader)
        streaming.cancel()
        assert status == 431
        assert "backend.server.maxHeadersBytes" in json.loads(body)["error"]["message"]
        assert sent < 64 * 1024 * 1024  # answered long before the header's end


async def test_pipelined_requests_whose_bodies_fill_a_chunk_are_served() -> None:
    # Each head is under the 2048 bytes allowed, but two of them, or a body and a head, are not:
    # bytes of one request must never count toward the next one's head.
    head_sized = [("x-pad", "v" * 390)] * 4
    one = request("/one", head_sized, b"b" * 3000)
    two = request("/two", head_sized, b"c" * 10)
    three = request("/three", head_sized)
    async with serving(SMALL) as connect:
        reader, writer = await connect()
        # A chunk ends inside the next head, after a body or after a whole other head. The
        # answer to the chunk's whole request shows the server has read it before the rest goes.
        for first, second, completed_by_second in [
            (one + two[:600], two[600:], 1),
            (three + three[:600], three[600:] + one, 2),
        ]:
            writer.write(first)
            assert (await read_response(reader))[0] == 202
            writer.write(second)
            for _ in range(completed_by_second):
                assert (await read_response(reader))[0] == 202


async def test_a_slow_head_is_answered_408_and_closed() -> None:
    limits = ServerLimits(headers_timeout=0.3, body_timeout=5, keep_alive_timeout=5)
    async with serving(limits) as connect:
        silent, _ = await connect()  # sends nothing at all
        reader, writer = await connect()
        writer.write(b"POST /hooks HTTP/1.1\r\nhost: te")
        for stream in (reader, silent):
            status, _, body = await read_response(stream)
            assert status == 408
            assert "backend.server.headersTimeoutMs" in json.loads(body)["error"]["message"]
            assert await closed(stream)


async def test_a_stalled_body_closes_the_connection_and_the_app_sees_a_disconnect() -> None:
    limits = ServerLimits(headers_timeout=5, body_timeout=0.3, keep_alive_timeout=5)
    async with serving(limits) as connect:
        reader, writer = await connect()
        writer.write(b"POST /stalled HTTP/1.1\r\nhost: test\r\ncontent-length: 100\r\n\r\nabc")
        assert await closed(reader)
        assert await asyncio.wait_for(Gate.disconnects.get(), 5) == "/stalled"
        assert Gate.disconnects.empty()


async def test_an_idle_kept_alive_connection_is_closed() -> None:
    limits = ServerLimits(headers_timeout=5, body_timeout=5, keep_alive_timeout=0.3)
    async with serving(limits) as connect:
        reader, writer = await connect()
        writer.write(request())
        assert (await read_response(reader))[0] == 202
        assert await closed(reader)


async def test_at_the_cap_the_oldest_idle_connection_makes_room(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="callboard.http")
    # No deadline closes a connection while the test runs: only the cap does.
    limits = ServerLimits(max_connections=3, keep_alive_timeout=60)
    with logged("callboard.http") as warned:
        async with serving(limits) as connect:
            busy_reader, busy = await connect()
            busy.write(request("/hold"))  # running a request: never closed to make room
            await Gate.held()
            oldest_reader, _ = await idle(connect)
            younger_reader, younger = await idle(connect)
            newest_reader, newest = await connect()
            assert await closed(oldest_reader)
            newest.write(request())
            assert (await read_response(newest_reader))[0] == 202
            Gate.opened.set()
            assert (await read_response(busy_reader))[0] == 202
            younger.write(request())  # still served
            assert (await read_response(younger_reader))[0] == 202
            await asyncio.wait_for(warned.wait(), 5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "callboard.http"]
    assert len(warnings) == 1
    assert "backend.server.maxConnections" in warnings[0]
    assert "closed 1 idle or slow connections" in warnings[0]


async def test_when_every_connection_runs_a_request_a_new_one_is_refused() -> None:
    async with serving(ServerLimits(max_connections=2)) as connect:
        for _ in range(2):
            _, writer = await connect()
            writer.write(request("/hold"))
        await Gate.held(2)
        reader, _ = await connect()
        assert await closed(reader)


def test_the_open_files_limit_is_raised_for_the_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(now=value))
    assert cli.fit_open_files(2000) == 2000
    assert limits["now"] == (2000 + cli.RESERVED_FILES, 4096)
    # Past the hard limit: raised to it, and the cap shrinks to what fits.
    assert cli.fit_open_files(10_000) == 4096 - cli.RESERVED_FILES
    assert limits["now"] == (4096, 4096)


def test_the_server_section_reads_sizes_and_checks_bounds() -> None:
    server = parse_config({"backend": {"server": {"maxHeadersBytes": "32kb"}}}).backend.server
    assert (server.max_headers_bytes, server.max_header_bytes) == (32 * 1024, 16 * 1024)
    with pytest.raises(ConfigError, match=r"backend\.server\.maxHeaderCount"):
        parse_config({"backend": {"server": {"maxHeaderCount": 0}}})
    with pytest.raises(ConfigError, match=r"maxHeaderBytes .* exceeds maxHeadersBytes"):
        parse_config({"backend": {"server": {"maxHeadersBytes": "8kb"}}})
