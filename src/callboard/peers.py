"""The private line between the worker processes of one server.

A scrape of ``/metrics`` or a probe of ``/readyz`` reaches one worker, chosen by the kernel; that
worker asks each of its siblings for its own figures over a Unix socket in a directory only the
server's user can enter (the supervisor makes it), and answers for the whole server.

The exchange is one question per connection: the asker writes a word and a newline; the sibling
writes its HTTP status, a newline, then its body, and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("callboard.peers")

#: What a worker answers to a question: an HTTP status and a body.
Answerer = Callable[[str], Awaitable[tuple[int, bytes]]]

#: Bytes a question may take; an answer has no bound (a worker's whole exposition).
MAX_QUESTION = 64


@dataclass(frozen=True, slots=True)
class Answer:
    """A sibling's answer; ``status`` is ``None`` when it did not answer (down, or too slow)."""

    worker: int
    status: int | None
    body: bytes = b""


class Peers:
    """Worker ``index`` of ``count``: answers its siblings, and asks them."""

    def __init__(self, directory: Path, index: int, count: int, *, timeout: float = 2.0) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self.timeout = timeout
        self._server: asyncio.Server | None = None

    def path(self, worker: int) -> Path:
        return self.directory / f"worker-{worker}.sock"

    async def start(self, answer: Answerer) -> None:
        """Answer the siblings' questions with ``answer`` until ``close()``."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(self.timeout):
                    question = (await reader.readline())[:MAX_QUESTION].decode().strip()
                status, body = await answer(question)
                writer.write(b"%d\n" % status + body)
                await writer.drain()
            except (OSError, TimeoutError, UnicodeDecodeError) as error:
                logger.debug("a sibling's question went unanswered: %s", error)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        path = self.path(self.index)
        path.unlink(missing_ok=True)  # left by this worker's previous process
        self._server = await asyncio.start_unix_server(serve, path=str(path))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
            self.path(self.index).unlink(missing_ok=True)

    async def ask(self, question: str) -> list[Answer]:
        """Every sibling's answer, in worker order."""
        siblings = [worker for worker in range(self.count) if worker != self.index]
        return list(await asyncio.gather(*(self._ask(worker, question) for worker in siblings)))

    async def _ask(self, worker: int, question: str) -> Answer:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path(worker)))
                writer.write(question.encode() + b"\n")
                await writer.drain()
                head = await reader.readline()
                body = await reader.read()
            return Answer(worker, int(head), body)
        except (OSError, TimeoutError, ValueError) as error:
            logger.warning("worker %d did not answer %r: %s", worker, question, error)
            return Answer(worker, None)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
