"""``RemoteBroker`` against a real callboard server (uvicorn on a free port, in this process)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from callboard.app import create_app
from callboard.brokers import open_broker
from callboard.bus.remote import RemoteBroker
from callboard.config import parse_config
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.errors import BrokerError, BrokerUnavailable, ConfigError, SubscriptionError
from callboard.events import Event
from tests.contract.kits import served

TOKEN = "remote-test-token"
FAST = RetryPolicy(attempts=2, initial_delay=0.01, max_delay=0.01)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def server(port: int, broker: str = "memory://") -> AsyncIterator[str]:
    config = parse_config(
        {
            "backend": {
                "auth": {
                    "externalAccess": [
                        {"type": "static", "options": {"token": TOKEN, "subject": "tests"}}
                    ]
                }
            },
            "events": {"broker": broker, "notifyTimeoutMs": 500},
        }
    )
    app = create_app(config, use_entry_points=False)
    async with served(app, port) as address:
        yield "callboard+http://:" + TOKEN + "@" + address.removeprefix("http://")


def _remote(url: str) -> RemoteBroker:
    broker = open_broker(url)
    assert isinstance(broker, RemoteBroker)
    broker.backoff_start, broker.backoff_max = 0.05, 0.5
    return broker


class Recorder:
    """A handler that records events and lets a test await a count."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Condition()

    async def __call__(self, event: Event) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    async def wait_for(self, count: int) -> None:
        await self.wait_until(lambda events: len(events) >= count)

    async def wait_until(self, done: Callable[[list[Event]], bool]) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: done(self.events)), 20)


def test_urls_name_the_server_and_carry_the_token() -> None:
    broker = RemoteBroker.from_url("callboard+https://:sekret-token@bus.example.com:8443/cb/")
    assert broker.server == "https://bus.example.com:8443/cb"
    assert "sekret" not in repr(broker)
    query = RemoteBroker.from_url("callboard+http://localhost:7007?token=abc12345&leaseMs=5000")
    assert query.server == "http://localhost:7007"
    assert query.lease_ms == 5000
    with pytest.raises(ConfigError, match="unknown parameters"):
        RemoteBroker.from_url("callboard+http://localhost?tokne=x")


async def test_publish_and_subscribe_through_a_server() -> None:
    async with server(_free_port()) as url:
        recorder = Recorder()
        async with (
            DefaultEventsService(_remote(url)) as subscriber,
            DefaultEventsService(_remote(url)) as publisher,
        ):
            await subscriber.subscribe("svc.orders", "orders.*", recorder)
            sent = [
                Event(topic="orders.created", payload={"n": n}, metadata={"x-source": "test"})
                for n in range(25)
            ]
            for event in sent:
                assert await publisher.publish(event) is True
            await recorder.wait_for(25)
            assert [e.id for e in recorder.events] == [e.id for e in sent]
            assert recorder.events[0].metadata == {"x-source": "test"}
            assert recorder.events[0].time == sent[0].time


async def test_a_wrong_token_is_an_error_that_names_the_setting() -> None:
    port = _free_port()
    async with server(port):
        broker = RemoteBroker(f"http://127.0.0.1:{port}", "not-the-token")
        try:
            with pytest.raises(BrokerError, match="externalAccess") as caught:
                await broker.publish(Event(topic="a", payload=1))
            assert not caught.value.retriable
        finally:
            await broker.close()


async def test_an_unreachable_server_is_retriable() -> None:
    broker = RemoteBroker(f"http://127.0.0.1:{_free_port()}", TOKEN)
    try:
        with pytest.raises(BrokerUnavailable):
            await broker.publish(Event(topic="a", payload=1))
    finally:
        await broker.close()


async def test_the_health_check_follows_the_server() -> None:
    port = _free_port()
    broker = RemoteBroker(f"http://127.0.0.1:{port}", TOKEN)
    with pytest.raises(BrokerUnavailable, match="not started"):
        await broker.check()
    await broker.start()
    try:
        with pytest.raises(BrokerUnavailable, match=f"127.0.0.1:{port}"):
            await broker.check()
        async with server(port):
            await broker.check()
        with pytest.raises(BrokerUnavailable):
            await broker.check()
    finally:
        await broker.close()


async def test_failed_events_become_dead_letters_on_the_server_and_redrive() -> None:
    async with server(_free_port()) as url:
        seen: list[Event] = []
        healed = asyncio.Event()
        fail = True

        async def handler(event: Event) -> None:
            seen.append(event)
            if fail:
                raise RuntimeError("not today")
            healed.set()

        broker = _remote(url)
        stored = asyncio.Event()
        publish = broker.publish

        async def watched(event: Event) -> bool:
            accepted = await publish(event)
            if event.topic.startswith("$deadletter."):
                stored.set()
            return accepted

        broker.publish = watched  # type: ignore[method-assign]
        async with DefaultEventsService(broker, retry=FAST) as service:
            await service.subscribe("svc.flaky", "jobs", handler)
            await service.publish(Event(topic="jobs", payload="j1"))
            await asyncio.wait_for(stored.wait(), 10)
            letters = await service.dead_letters("svc.flaky")
            assert letters[0].error == "RuntimeError: not today"
            assert letters[0].event.payload == "j1"
            fail = False
            assert await service.redrive("svc.flaky") == 1
            await asyncio.wait_for(healed.wait(), 10)
            assert await service.dead_letters("svc.flaky") == []


async def test_closing_a_subscription_hands_unhandled_events_back() -> None:
    async with server(_free_port()) as url:
        gate = asyncio.Event()
        first = Recorder()

        async def slow(event: Event) -> None:
            await first(event)
            await gate.wait()

        async with DefaultEventsService(_remote(url), shutdown_timeout=0.1) as one:
            running = await one.subscribe("svc.slow", "jobs", slow)
            async with DefaultEventsService(_remote(url)) as publisher:
                for n in range(3):
                    await publisher.publish(Event(topic="jobs", payload=n))
            await first.wait_for(1)
            await running.close(timeout=0.1)  # the handler never finished event 0
        second = Recorder()
        async with DefaultEventsService(_remote(url)) as two:
            await two.subscribe("svc.slow", "jobs", second)
            await second.wait_for(3)
            assert sorted(e.payload for e in second.events) == [0, 1, 2]


async def test_a_subscription_is_deleted_once_its_consumers_are_closed() -> None:
    async with server(_free_port()) as url:
        broker = _remote(url)
        try:
            consumer = await broker.consume("svc.retired", ["jobs"])
            with pytest.raises(SubscriptionError, match="close it before deleting"):
                await broker.delete_subscription("svc.retired")
            assert [s.name for s in await broker.subscriptions()] == ["svc.retired"]
            await consumer.close()
            assert await broker.delete_subscription("svc.retired") is True
            assert await broker.subscriptions() == []
            assert await broker.delete_subscription("svc.retired") is False
        finally:
            await broker.close()


@pytest.mark.skipif(
    importlib.util.find_spec("callboard.brokers.sqlite") is None,
    reason="needs a durable broker on the server (callboard.brokers.sqlite)",
)
async def test_a_restarted_server_loses_nothing_unacknowledged(tmp_path: Path) -> None:
    port = _free_port()
    store = f"sqlite:///{tmp_path / 'bus.db'}"
    gate = asyncio.Event()
    started = asyncio.Event()
    recorder = Recorder()

    async def handler(event: Event) -> None:
        if event.payload == 0 and not gate.is_set():
            started.set()
            await gate.wait()  # still being handled when the server goes away
        await recorder(event)

    def complete(events: list[Event]) -> bool:
        payloads = [e.payload for e in events]
        return set(payloads) == set(range(30)) and payloads.count(0) >= 2

    async with server(port, store) as url:
        service = DefaultEventsService(_remote(url))
        await service.subscribe("svc.restart", "orders", handler)
        async with DefaultEventsService(_remote(url)) as publisher:
            for n in range(30):
                await publisher.publish(Event(topic="orders", payload=n))
        await asyncio.wait_for(started.wait(), 20)
    # Down: the first batch is with the client, unacknowledged; the rest is only in the store.
    # The consumer retries with backoff until the server is back.
    async with server(port, store):
        gate.set()
        try:
            # Event 0's acknowledgement reaches a server that no longer holds its lease, so the
            # store hands it out again: it was kept across the restart, not lost.
            await recorder.wait_until(complete)
        finally:
            await service.close()


async def test_leaving_the_service_right_after_a_handler_returned_keeps_its_acknowledgements() -> (
    None
):
    async with server(_free_port()) as url:
        for round in range(5):  # the last acknowledgement is on its way at a different moment
            group = f"svc.leaving-{round}"
            handled = Recorder()
            async with (
                DefaultEventsService(_remote(url)) as publisher,
                DefaultEventsService(_remote(url)) as service,
            ):
                await service.subscribe(group, "jobs", handled)
                for n in range(3):
                    await publisher.publish(Event(topic="jobs", payload=n))
                await handled.wait_for(3)
                # Left at once: the last acknowledgements may still be on their way.
            broker = _remote(url)
            try:
                [info] = [s for s in await broker.subscriptions() if s.name == group]
                # Neither leased (it would come back when the lease ends) nor waiting.
                assert (info.in_flight, info.backlog) == (0, 0)
            finally:
                await broker.close()
