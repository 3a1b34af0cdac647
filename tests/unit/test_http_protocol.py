"""One socket write per response: the gathering transport, alone and under uvicorn."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import uvicorn

from callboard.http_protocol import GatheringHttpToolsProtocol, GatheringTransport


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
        app, http=GatheringHttpToolsProtocol, lifespan="off", log_config=None, access_log=False
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
