"""The push sender: it reads an answer's body only up to a bound, a guarded request never
connects to a private address, and no failure repeats a URL's credentials."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from callboard.errors import PushFailed
from callboard.push.sender import MAX_READ, Sender


async def _endless_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers any request with ``200`` and a chunked body that never ends."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"x" * 16_384
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()


async def test_an_endless_answer_is_cut_off_after_the_bound() -> None:
    server = await asyncio.start_server(_endless_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = Sender()
    try:
        answer = await sender.post(f"http://127.0.0.1:{port}/", b"{}", {}, timeout=10.0)
        assert answer.status == 200
    finally:
        await sender.close()
        server.close()


async def test_a_short_answer_is_read_and_its_status_returned() -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b"y" * (MAX_READ // 2)
        writer.write(
            b"HTTP/1.1 503 Busy\r\nretry-after: 7\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        writer.write(body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = Sender()
    try:
        answer = await sender.post(f"http://127.0.0.1:{port}/", b"{}", {}, timeout=10.0)
        assert (answer.status, answer.retry_after) == (503, "7")
    finally:
        await sender.close()
        server.close()


async def test_the_time_limits_kept_ready_stay_bounded() -> None:
    async def no_content(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(no_content, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sender = Sender()
    try:
        # Targets replaced through the API, each with a time limit of its own.
        for n in range(200):
            answer = await sender.post(f"http://127.0.0.1:{port}/", b"{}", {}, 1 + n / 1000)
            assert answer.status == 204
        assert len(sender._timeouts) <= 64
    finally:
        await sender.close()
        server.close()


async def _count_requests(served: list[bytes]) -> asyncio.Server:
    async def no_content(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(no_content, "127.0.0.1", 0)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_guarded_request_does_not_connect_to_a_private_address(host: str) -> None:
    served: list[bytes] = []
    server = await _count_requests(served)
    port = server.sockets[0].getsockname()[1]
    sender = Sender()
    try:
        with pytest.raises(PushFailed) as refused:
            await sender.post(f"http://{host}:{port}/", b"{}", {}, 10.0, guarded=True)
        message = str(refused.value)
        assert "is a loopback address" in message
        assert "events.bus.pushPrivateNetworks: true" in message
        assert refused.value.status is None
        assert not refused.value.timed_out
        assert served == []
        # Unguarded (a configured target), the same endpoint is reached.
        answer = await sender.post(f"http://{host}:{port}/", b"{}", {}, 10.0)
        assert answer.status == 204
        assert len(served) == 1
        # The unguarded pool's connection is not lent to a guarded request either.
        with pytest.raises(PushFailed, match="loopback"):
            await sender.post(f"http://{host}:{port}/", b"{}", {}, 10.0, guarded=True)
        assert len(served) == 1
    finally:
        await sender.close()
        server.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://ops:hunter2-secret@127.0.0.1:99999/",  # an invalid URL: aiohttp repeats it
        "http://ops:hunter2-secret@[::1:1/",
        "http://ops:hunter2-secret@127.0.0.1:1/",  # nobody listens
        "http://ops:hunter2%2Dsecret@127.0.0.1:1/",
    ],
)
async def test_a_failure_never_repeats_the_urls_credentials(url: str) -> None:
    sender = Sender()
    try:
        for guarded in (False, True):
            with pytest.raises(PushFailed) as failed:
                await sender.post(url, b"{}", {}, 10.0, guarded=guarded)
            message = str(failed.value)
            assert "hunter2" not in message
            assert "ops:" not in message
    finally:
        await sender.close()


async def test_credentials_in_the_url_beside_an_authorization_header_fail_as_a_push() -> None:
    sender = Sender()
    try:
        with pytest.raises(PushFailed) as failed:
            await sender.post(
                "http://ops:hunter2-secret@127.0.0.1:1/",
                b"{}",
                {"authorization": "Bearer x"},
                10.0,
            )
        assert "cannot be made" in str(failed.value)
        assert "hunter2" not in str(failed.value)
    finally:
        await sender.close()
