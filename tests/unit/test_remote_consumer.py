"""``RemoteConsumer`` against a scripted bus server (``httpx.MockTransport``)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from callboard.bus import remote
from callboard.bus.remote import RemoteBroker
from callboard.bus.wire import WireDelivery
from callboard.events import Event

GROUP = "svc.remote"


class Server:
    """Answers the bus routes a consumer uses and records the acks, nacks and renewals."""

    def __init__(self, *ack_ids: str) -> None:
        self.waiting = [WireDelivery(i, 1, Event(topic="jobs", payload=i)) for i in ack_ids]
        self.acks: list[list[str]] = []
        self.nacks: list[list[str]] = []
        #: The ``max`` of each read of deliveries.
        self.asked: list[str | None] = []
        #: Status answered to the next acknowledgements, one per request, before answering 200.
        self.failures: list[int] = []
        #: Acknowledgements are answered once it is set.
        self.proceed = asyncio.Event()
        self.proceed.set()
        self.ack_arrived = asyncio.Event()
        self.answered = asyncio.Event()
        #: The acknowledgements answered 200, per request.
        self.settled: list[list[str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "PUT":
            return httpx.Response(201, json={"id": GROUP, "topics": ["jobs"]})
        if path.endswith("/deliveries"):
            self.asked.append(request.url.params.get("max"))
            if not self.waiting:
                await asyncio.Event().wait()  # a long poll with nothing to say
            items, self.waiting = self.waiting, []
            return httpx.Response(200, json={"deliveries": [d.to_wire() for d in items]})
        ids = json.loads(request.content)["ackIds"]
        if path.endswith("/acks"):
            self.acks.append(ids)
            self.ack_arrived.set()
            await self.proceed.wait()
            if self.failures:
                return httpx.Response(self.failures.pop(0), json={"error": {"message": "down"}})
            self.settled.append(ids)
            self.answered.set()
        elif path.endswith("/nacks"):
            self.nacks.append(ids)
        return httpx.Response(200, json={"done": ids, "unknown": []})


def _broker(server: Server) -> RemoteBroker:
    broker = RemoteBroker(
        "http://callboard", "token", backoff=(0.01, 0.05), transport=httpx.MockTransport(server)
    )
    return broker


async def test_release_hands_deliveries_back_as_a_nack_and_ignores_what_it_does_not_hold() -> None:
    server = Server("a", "b", "c")
    broker = _broker(server)
    consumer = await broker.consume(GROUP, ["jobs"])
    a, b, c = await consumer.fetch(10)
    assert server.asked == ["10"]  # the server leases no more than the fetch takes
    await consumer.release([b, c])
    await consumer.release([b])  # not held any more: nothing is sent
    assert server.nacks == [["b", "c"]]
    await consumer.ack([a, b])  # b was handed back: only a is acknowledged
    await consumer.close()
    assert server.acks == [["a"]]
    assert server.nacks == [["b", "c"]]  # nothing was left to hand back on closing
    await broker.close()


async def test_acknowledgements_of_one_turn_go_out_in_one_request() -> None:
    server = Server(*"abcde")
    broker = _broker(server)
    consumer = await broker.consume(GROUP, ["jobs"])
    deliveries = await consumer.fetch(10)
    for delivery in deliveries:  # one by one, as the events service acknowledges
        await consumer.ack([delivery])
    await asyncio.wait_for(server.answered.wait(), 3)
    assert server.acks == [list("abcde")]
    await consumer.close()
    await broker.close()


async def test_acknowledgements_are_retried_when_the_server_fails() -> None:
    server = Server("a")
    server.failures = [503]
    broker = _broker(server)
    consumer = await broker.consume(GROUP, ["jobs"])
    [a] = await consumer.fetch(10)
    await consumer.ack([a])
    await asyncio.wait_for(server.answered.wait(), 3)
    assert server.acks == [["a"], ["a"]]
    await consumer.close()
    await broker.close()


async def test_closing_waits_for_the_acknowledgements_on_their_way() -> None:
    server = Server("a", "b", "c")
    server.proceed.clear()
    broker = _broker(server)
    consumer = await broker.consume(GROUP, ["jobs"])
    a, b, _ = await consumer.fetch(10)
    await consumer.ack([a])
    await asyncio.wait_for(server.ack_arrived.wait(), 3)  # sent, not answered yet
    await consumer.ack([b])  # queued behind it
    closing = asyncio.create_task(broker.close())
    await asyncio.sleep(0)
    server.proceed.set()
    await asyncio.wait_for(closing, 3)
    assert server.acks == server.settled == [["a"], ["b"]]
    assert server.nacks == [["c"]]


async def test_closing_gives_up_on_acknowledgements_the_server_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(remote, "CLOSE_TIMEOUT", 0.05)
    server = Server("a")
    server.proceed.clear()
    broker = _broker(server)
    consumer = await broker.consume(GROUP, ["jobs"])
    [a] = await consumer.fetch(10)
    await consumer.ack([a])
    await asyncio.wait_for(server.ack_arrived.wait(), 3)  # on its way, never answered
    with caplog.at_level(logging.WARNING, "callboard.bus.remote"):
        await asyncio.wait_for(broker.close(), 3)
    assert "1 acknowledgements could not be sent" in caplog.text
    assert not server.answered.is_set()
