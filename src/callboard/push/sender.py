"""The HTTP client of push subscriptions: one pooled aiohttp session for every target.

The only module that imports aiohttp. One ``Sender`` per process (the application makes one and
hands it to every target): its connections are kept alive and reused across requests and
targets, so a push costs a request, not a connection. Redirects are not followed (a signed
request goes where it was configured to go, or fails). aiohttp's exceptions end here, turned
into ``PushFailed`` that names what went wrong without the request's body or headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from callboard.errors import PushFailed

#: A response body longer than this is not read: the connection is closed instead of reused.
MAX_READ = 64 * 1024
#: Time limits kept ready: targets use a handful, while the API may set any number over time.
_MAX_TIMEOUTS = 64
USER_AGENT = "callboard-push"


@dataclass(frozen=True, slots=True)
class Answer:
    """What the receiver answered: its status, and its ``Retry-After`` header if any."""

    status: int
    retry_after: str | None = None


class Sender:
    """POSTs requests over one pooled, keep-alive aiohttp session (opened on first use)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        # No pool-wide bound: each target bounds its own requests in flight (its concurrency).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"user-agent": USER_AGENT},
            skip_auto_headers=("accept-encoding",),
            auto_decompress=False,
        )
        return self._session

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Answer:
        """POST ``body``; the answer, whatever its status. Raises ``PushFailed`` on a timeout
        or when the endpoint cannot be reached."""
        session = self._session or self._open()
        limit = self._timeouts.get(timeout)
        if limit is None:
            limit = aiohttp.ClientTimeout(total=timeout)
            if len(self._timeouts) < _MAX_TIMEOUTS:
                self._timeouts[timeout] = limit
        try:
            async with session.post(
                url, data=body, headers=headers, timeout=limit, allow_redirects=False
            ) as response:
                await _drain(response)
                return Answer(response.status, response.headers.get("retry-after"))
        except TimeoutError:
            raise PushFailed(f"no answer within {timeout:g}s", timed_out=True) from None
        except aiohttp.ClientError as error:
            raise PushFailed(f"the endpoint cannot be reached: {error}") from None

    async def close(self) -> None:
        """Close the pooled connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read the answer's body to its end, so the connection goes back to the pool; one longer
    than ``MAX_READ`` (declared or streamed) is not read on: its connection is closed."""
    length = response.content_length
    if length is not None and length > MAX_READ:
        response.close()
        return
    read = 0
    async for chunk in response.content.iter_any():
        read += len(chunk)
        if read > MAX_READ:
            response.close()
            return
