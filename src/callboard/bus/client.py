"""An HTTP client for the bus API (the only module that imports httpx).

Every failure comes out as a callboard error: ``BrokerUnavailable`` when the server cannot be
reached or answers 5xx (try again later), ``BrokerError`` for a refusal that retrying will not
fix (a wrong token, a malformed request), ``SubscriptionError`` for a conflict on a subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from callboard.brokers.base import Start, SubscriptionInfo
from callboard.bus.wire import (
    BUS_PATH,
    MAX_DEAD_LETTERS,
    NOTIFY_TIMEOUT_HEADER,
    PUBLISH_RESULT_HEADER,
    AckRequest,
    AckResult,
    PublishRequest,
    SubscriptionRequest,
    WireDelivery,
    event_to_wire,
    events_from_wire,
)
from callboard.errors import (
    BrokerError,
    BrokerUnavailable,
    InvalidEventError,
    SubscriptionError,
)
from callboard.events import Event


@dataclass(frozen=True, slots=True)
class Polled:
    """One read of ``GET .../deliveries``: leased deliveries, none yet, or no subscription."""

    deliveries: tuple[WireDelivery, ...] = ()
    #: The server does not know the subscription (``404``): ``PUT`` it again.
    missing: bool = False


def _path(id: str) -> str:
    return "/subscriptions/" + quote(id, safe="")


class BusClient:
    """Talks to ``{server}/api/events/bus/v1`` with a bearer token."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.server + BUS_PATH,
            headers={"authorization": f"Bearer {token}"} if token else {},
            timeout=timeout,
            transport=transport,
        )
        #: Requests on their way, and whether there are none: ``aclose`` waits for them.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close the connections once the requests on their way are answered (at most
        ``timeout`` seconds): a request cut short is one the server never hears the end of."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        await self._http.aclose()

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    # -- the calls -----------------------------------------------------------------------------

    async def ping(self, timeout: float = 2.0) -> None:
        """The server answers on the bus path (any answer short of a server error will do: a
        Backstage backend has no ``/readyz``); ``BrokerUnavailable`` otherwise."""
        try:
            with self._request():
                response = await self._http.get("/subscriptions", timeout=timeout)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        if response.status_code >= 500:
            raise BrokerUnavailable(
                f"the callboard server at {self.server} answered {response.status_code}"
            )

    async def publish(self, event: Event, notified: Sequence[str] = ()) -> bool:
        """``False`` only when the server recognised the event as a redelivery."""
        response = await self._call(
            "POST", "/events", json=PublishRequest(event, tuple(notified)).to_wire()
        )
        if response.status_code == 400:
            # The server refused the event itself: sending it again can never succeed.
            raise InvalidEventError(self._message(response))
        self._expect(response, 201, 204)
        return bool(response.headers.get(PUBLISH_RESULT_HEADER) != "duplicate")

    async def put_subscription(self, id: str, topics: Sequence[str], start: Start = "end") -> None:
        body = SubscriptionRequest(tuple(topics), start).to_wire()
        self._expect(await self._call("PUT", _path(id), json=body), 201)

    async def delete_subscription(self, id: str) -> bool:
        """Forget the subscription on the server; ``False`` when it had no such subscription.

        ``SubscriptionError`` (a ``409``) means the server's own subscribers still read it.
        """
        response = await self._call("DELETE", _path(id))
        if response.status_code == 404:
            return False
        self._expect(response, 204)
        return True

    async def poll(
        self, id: str, lease_ms: int, max_count: int | None = None, *, head_timeout: float = 30.0
    ) -> Polled:
        """Read deliveries (at most ``max_count``); when there are none, wait as long as the
        server holds the read."""
        params = {"leaseMs": lease_ms}
        if max_count is not None:
            params["max"] = max_count
        request = self._http.build_request(
            "GET",
            _path(id) + "/deliveries",
            params=params,
            timeout=httpx.Timeout(self._timeout, read=None),
        )
        with self._request():
            return await self._poll(request, head_timeout)

    async def _poll(self, request: httpx.Request, head_timeout: float) -> Polled:
        try:
            async with asyncio.timeout(head_timeout):
                response = await self._http.send(request, stream=True)
        except (httpx.TransportError, TimeoutError) as error:
            raise self._unreachable(error) from error
        try:
            if response.status_code == 202:
                # Backstage's client: wait for the empty body, or the announced time + 1 s.
                header = response.headers.get(NOTIFY_TIMEOUT_HEADER, "")
                wait = (int(header) if header.isdigit() else 55_000) / 1000 + 1
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await response.aread()
                return Polled()
            await response.aread()
            if response.status_code == 404:
                return Polled(missing=True)
            self._expect(response, 200)
            items = self._json(response).get("deliveries", [])
            return Polled(tuple(WireDelivery.from_wire(item) for item in items))
        except httpx.TransportError as error:
            raise self._unreachable(error) from error
        finally:
            await response.aclose()

    async def ack(self, id: str, ack_ids: Sequence[str]) -> AckResult:
        return await self._settle(id, "/acks", AckRequest(tuple(ack_ids)))

    async def nack(self, id: str, ack_ids: Sequence[str]) -> AckResult:
        return await self._settle(id, "/nacks", AckRequest(tuple(ack_ids)))

    async def renew(self, id: str, ack_ids: Sequence[str], lease_ms: int) -> AckResult:
        return await self._settle(id, "/leases", AckRequest(tuple(ack_ids), lease_ms))

    async def deliver_to(self, id: str, event: Event) -> None:
        response = await self._call(
            "POST", _path(id) + "/events", json={"event": event_to_wire(event)}
        )
        if response.status_code == 404:
            raise SubscriptionError(f"no subscription {id!r} to deliver to")
        self._expect(response, 201)

    async def dead_letters(
        self, id: str, *, ids: Sequence[str] | None, limit: int, remove: bool
    ) -> list[Event]:
        if limit < 1:
            return []
        # The server hands out at most MAX_DEAD_LETTERS at once; ask for no more than that.
        body = {
            "ids": None if ids is None else list(ids),
            "limit": min(limit, MAX_DEAD_LETTERS),
            "remove": remove,
        }
        response = await self._call("POST", _path(id) + "/dead-letters/take", json=body)
        if response.status_code == 404:
            return []  # no such subscription: no dead letters either
        self._expect(response, 200)
        return events_from_wire(self._json(response), "deadLetters")

    async def subscriptions(self) -> list[SubscriptionInfo]:
        response = await self._call("GET", "/subscriptions")
        self._expect(response, 200)
        items = self._json(response).get("subscriptions", [])
        return [
            SubscriptionInfo(
                name=item["id"],
                topics=tuple(item["topics"]),
                in_flight=int(item.get("inFlight", 0)),
                backlog=int(item.get("backlog", 0)),
                lost=int(item.get("lost", 0)),
            )
            for item in items
        ]

    # -- plumbing ------------------------------------------------------------------------------

    async def _settle(self, id: str, route: str, body: AckRequest) -> AckResult:
        response = await self._call("POST", _path(id) + route, json=body.to_wire())
        self._expect(response, 200)
        return AckResult.from_wire(self._json(response))

    async def _call(self, method: str, path: str, *, json: Any = None) -> httpx.Response:
        try:
            with self._request():
                return await self._http.request(method, path, json=json)
        except httpx.TransportError as error:
            raise self._unreachable(error) from error

    def _unreachable(self, error: BaseException) -> BrokerUnavailable:
        reason = str(error) or type(error).__name__
        return BrokerUnavailable(f"cannot reach the callboard server at {self.server}: {reason}")

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BrokerError(f"the callboard server at {self.server} sent a body that is not JSON")
        return body

    def _message(self, response: httpx.Response) -> str:
        """The message of an error answer (Backstage's ``{"error": {"message": ...}}``)."""
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return response.text[:200]
        return str(message)

    def _expect(self, response: httpx.Response, *statuses: int) -> None:
        status = response.status_code
        if status in statuses:
            return
        message = self._message(response)
        where = f"the callboard server at {self.server} answered {status}"
        if status in (401, 403):
            raise BrokerError(
                f"{where}: {message}; check the token in the broker URL against "
                "backend.auth.externalAccess on the server",
                retriable=False,
            )
        if status == 409:
            raise SubscriptionError(f"{where}: {message}")
        raise (BrokerUnavailable if status >= 500 else BrokerError)(f"{where}: {message}")
