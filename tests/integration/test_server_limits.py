"""``callboard serve`` under hostile senders: huge heads, slow heads, thousands of connections.

Each test starts a real server with ``backend.server`` set small and the GitHub module on, and
checks from outside what a sender sees: the answer, whether the connection stays open, how much
memory the server takes, and that a signed webhook still gets its ``202`` during an attack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from callboard.testing.signing import sign_github
from tests.integration.servers import Fleet, Server

pytestmark = pytest.mark.slow

SECRET = "limits-test-secret"


def write_config(directory: Path, server: str) -> Path:
    path = directory / "callboard.yaml"
    path.write_text(
        f"""
backend:
  server:
{server}
events:
  broker: "memory://"
  shutdownTimeoutMs: 2000
  modules:
    github:
      webhookSecret: "{SECRET}"
""",
        encoding="utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, server: str, open_files: int | None = None
) -> AsyncIterator[Server]:
    """A server with ``server`` under ``backend.server``; it may open ``open_files`` files."""
    fleet = Fleet(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if open_files is not None:  # inherited by the server process
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))
        try:
            async with httpx.AsyncClient() as client:
                (started,) = await fleet.start(write_config(tmp_path, server), client, count=1)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        yield started
        await fleet.stop_all()
    finally:
        fleet.kill_all()


def peak_memory_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = json.loads(await reader.readexactly(length))
    return int(head.split()[1]), body


async def signed_push(server: Server) -> httpx.Response:
    body = b'{"ref": "refs/heads/main", "repository": {"full_name": "o/r"}}'
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{server.url}/api/events/http/github",
            content=body,
            headers=sign_github(body, SECRET, event="push"),
            timeout=5,
        )


async def test_the_configured_bounds_are_answered_by_the_server(tmp_path: Path) -> None:
    settings = "    maxHeaderCount: 20\n    headersTimeoutMs: 500\n"
    async with running(tmp_path, settings) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        headers = "".join(f"x-{i}: v\r\n" for i in range(21))
        writer.write(f"POST /api/events/http/github HTTP/1.1\r\n{headers}\r\n".encode())
        status, body = await read_answer(reader)
        assert status == 431
        assert "backend.server.maxHeaderCount" in str(body)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /api/events/http/github HTTP/1.1\r\nhost: ")
        status, body = await read_answer(reader)
        assert status == 408
        assert "backend.server.headersTimeoutMs" in str(body)
        writer.close()
        assert (await signed_push(server)).status_code == 202


async def test_a_64_mb_header_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    async with running(tmp_path, "    maxHeadersBytes: 64kb\n") as server:
        before = peak_memory_kb(server.pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /api/events/http/github HTTP/1.1\r\nx-hub-signature-256: ")
        chunk = b"a" * 65536

        async def stream() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(1024):  # 64 MB
                    writer.write(chunk)
                    await writer.drain()

        streaming = asyncio.create_task(stream())
        status, body = await read_answer(reader)
        streaming.cancel()
        writer.close()
        assert status == 431, body
        # The server held at most about the limit (plus one read), never the header.
        assert peak_memory_kb(server.pid) - before < 16 * 1024
        assert (await signed_push(server)).status_code == 202


async def test_thousands_of_slow_connections_leave_room_for_a_webhook(tmp_path: Path) -> None:
    settings = (
        "    maxConnections: 1000\n"
        "    headersTimeoutMs: 60000\n"  # longer than the test: the cap alone must hold
        "    keepAliveTimeoutMs: 60000\n"
    )
    # With fewer files than slow senders, a server without a cap runs out of them: accepting then
    # fails, and every new connection waits or is reset.
    async with running(tmp_path, settings, open_files=2500) as server:
        writers: list[asyncio.StreamWriter] = []
        stop = asyncio.Event()

        async def slow_sender() -> None:
            # Opens a connection, then sends its head one byte a second, again when closed.
            while not stop.is_set():
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                except OSError:
                    await asyncio.sleep(1)
                    continue
                writers.append(writer)
                try:
                    writer.write(b"POST /api/events/http/github HTTP/1.1\r\nx-slow: ")
                    while not stop.is_set() and not writer.is_closing():
                        await asyncio.sleep(1)
                        writer.write(b"a")
                        await writer.drain()
                except OSError:
                    pass
                finally:
                    writer.close()

        senders = [asyncio.create_task(slow_sender()) for _ in range(3000)]
        try:
            await asyncio.sleep(5)  # every sender connected, most more than once
            started = time.monotonic()
            response = await signed_push(server)
            assert response.status_code == 202, response.text
            assert time.monotonic() - started < 5
        finally:
            stop.set()
            for writer in writers:
                writer.transport.abort()
            await asyncio.gather(*senders, return_exceptions=True)
        warnings = [
            line for line in server.log().splitlines() if "backend.server.maxConnections" in line
        ]
        assert warnings, server.log()[-3000:]
        assert "idle or slow connections to make room" in warnings[0]
        # One line every few seconds, not one per connection.
        assert len(warnings) <= 4, warnings
