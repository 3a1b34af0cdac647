"""The HTTP client of push subscriptions: one pooled aiohttp session for every target.

The only module that imports aiohttp. One ``Sender`` per process (the application makes one and
hands it to every target): its connections are kept alive and reused across requests and
targets, so a push costs a request, not a connection. Redirects are not followed (a signed
request goes where it was configured to go, or fails). aiohttp's exceptions end here, turned
into ``PushFailed`` that names what went wrong without the request's body, headers or the URL's
credentials.

A request may be ``guarded`` (a target made over the API, ``push/addresses.py``): it goes over a
second pool whose every socket is made by ``_guarded_socket``, which sees the address about to
be connected to (after DNS resolution, an IP literal included) and refuses a private one. The
pools are apart so that a connection kept alive for a configured target is never lent to a
guarded request for the same host.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from callboard.errors import PushFailed
from callboard.push.addresses import refusal, refused_kind
from callboard.push.urls import without_credentials

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


class _PrivateAddress(OSError):
    """A guarded connection refused before it was made. Its text is the same for every
    address, so that aiohappyeyeballs, trying each address of a name, raises the first refusal
    itself rather than a text joining them all; the address is an attribute."""

    def __init__(self, address: str, kind: str) -> None:
        super().__init__("refused: a private address")
        self.address = address
        self.kind = kind


def _guarded_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """The socket for ``addr_info`` (a ``getaddrinfo`` entry), unless its address is one a
    guarded request may not reach."""
    family, type_, proto, _, sockaddr = addr_info
    address = str(sockaddr[0])
    kind = refused_kind(address)
    if kind is not None:
        raise _PrivateAddress(address, kind)
    return socket.socket(family=family, type=type_, proto=proto)


class Sender:
    """POSTs requests over pooled, keep-alive aiohttp sessions (each opened on first use)."""

    def __init__(self) -> None:
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self, guarded: bool) -> aiohttp.ClientSession:
        # No pool-wide bound: each target bounds its own requests in flight (its concurrency).
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, socket_factory=_guarded_socket if guarded else None
        )
        session = self._sessions[guarded] = aiohttp.ClientSession(
            connector=connector,
            headers={"user-agent": USER_AGENT},
            skip_auto_headers=("accept-encoding",),
            auto_decompress=False,
        )
        return session

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
        *,
        guarded: bool = False,
    ) -> Answer:
        """POST ``body``; the answer, whatever its status. Raises ``PushFailed`` on a timeout,
        when the endpoint cannot be reached, or (``guarded``) when its address is private."""
        session = self._sessions.get(guarded) or self._open(guarded)
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
            raise PushFailed(without_credentials(_failure(error), url)) from None
        except ValueError as error:
            # The request cannot be built: credentials in the URL beside an Authorization
            # header, a header value HTTP cannot carry. Not the endpoint's fault, and retried
            # like any failure until it is a dead letter; the message never repeats the URL.
            raise PushFailed(
                without_credentials(f"the request cannot be made: {error}", url)
            ) from None

    async def close(self) -> None:
        """Close the pooled connections."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()


def _failure(error: aiohttp.ClientError) -> str:
    """What went wrong, in words; the URL is not repeated (it may hold credentials)."""
    if isinstance(error, aiohttp.ClientConnectorError):
        cause = error.os_error
        if isinstance(cause, _PrivateAddress):
            return f"not sent to {error.host}: {refusal(cause.address, cause.kind)}"
    if isinstance(error, aiohttp.InvalidURL):
        detail = error.description
        return "the URL is not valid" + (f": {detail}" if detail else "")
    return f"the endpoint cannot be reached: {error}"


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
