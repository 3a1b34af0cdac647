"""The outbound paths under a real ``callboard serve`` killed with -9 mid-stream: nothing lost.

A server on a SQLite file takes events on its HTTP ingress and sends them out: to a push
subscription's endpoint (a receiver in this process, slow on purpose), or through the RabbitMQ-out
bridge (behind a slow link) to an exchange of the test's own. It is killed with -9 while events
are going out and started again on the same file: every event answered ``202`` arrives at least
once, each under one id (the event's, on a retry too), and the events that arrive twice, printed,
are at most about what was in flight.

The servers load ``support_modules`` only to give the SQLite broker a short lease, so the
restarted server takes over what the killed one held within seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from callboard.testing import new_standard_webhooks_secret
from tests.integration.servers import SUPPORT_MODULE, Fleet, Server, TcpProxy, free_port
from tests.integration.test_bridge_rabbitmq import Queue, queue  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

TOPIC = "orders"
TOTAL = 300
#: Events a consumer claims at once: duplicates after a kill are bounded by what was claimed.
BATCH = 8
#: Seconds the receiver takes to answer each push, and a chunk takes through the slow link.
RECEIVER_DELAY = 0.02
LINK_DELAY = 0.005
#: Requests in flight to the receiver at most.
PUSH_CONCURRENCY = 2


def served_config(directory: Path, **outbound: Any) -> Path:
    """A server on ``events.db`` in ``directory`` with ``TOPIC`` on its HTTP ingress."""
    broker = f"sqlite:///{directory / 'events.db'}"
    instance = {"broker": broker, "record": str(directory / "deliveries.log"), "lease": 2.0}
    modules = {"instance": instance, **outbound.pop("modules", {})}
    events = {
        "broker": broker,
        "http": {"topics": [TOPIC]},
        "delivery": {"batchSize": BATCH, "initialDelayMs": 50, "maxDelayMs": 500},
        "load": [SUPPORT_MODULE],
        "modules": modules,
        **outbound,
    }
    path = directory / "callboard.yaml"
    path.write_bytes(orjson.dumps({"events": events}))  # JSON is YAML
    return path


async def post_all(server: Server, client: httpx.AsyncClient, total: int) -> None:
    """POST the events ``{"n": 0}`` .. ``{"n": total - 1}``, ten at a time; each must be 202."""
    gate = asyncio.Semaphore(10)

    async def post(n: int) -> int:
        async with gate:
            return (await server.post(client, TOPIC, n)).status_code

    statuses = await asyncio.gather(*(post(n) for n in range(total)))
    assert set(statuses) == {202}, statuses


async def until(check: Callable[[], bool], within: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.01)


def ids_by_n(arrivals: Iterable[tuple[str, int]]) -> dict[int, set[str]]:
    found: dict[int, set[str]] = defaultdict(set)
    for identifier, n in arrivals:
        found[n].add(identifier)
    return found


async def kill_mid_stream_and_restart(
    server: Server,
    config: Path,
    workdir: Path,
    fleet: Fleet,
    client: httpx.AsyncClient,
    arrivals: Callable[[], list[tuple[str, int]]],
) -> int:
    """Kill ``server`` once a quarter of the events arrived, start it again, and wait until
    every event arrived; how many had arrived at the kill, which must not be all of them."""

    def arrived() -> int:
        return len(ids_by_n(arrivals()))

    await until(lambda: arrived() >= TOTAL // 4, 20, lambda: f"{arrived()} came\n{fleet.logs()}")
    server.kill()
    assert await server.wait_exit(10) is not None, "the server outlived kill -9"
    at_kill = arrived()
    assert at_kill < TOTAL, "every event arrived before the kill: nothing was tested"
    again = Server(config, workdir, "restarted")
    fleet.servers.append(again)
    await again.wait_ready(client)
    await until(
        lambda: arrived() == TOTAL,
        25,
        lambda: (
            f"lost: {sorted(set(range(TOTAL)) - set(ids_by_n(arrivals())))[:20]}\n" + fleet.logs()
        ),
    )
    return at_kill


def duplicates(arrivals: list[tuple[str, int]]) -> int:
    """How many arrivals repeated one before; each event must have come under one id."""
    found = ids_by_n(arrivals)
    assert sorted(found) == list(range(TOTAL))
    assert all(len(ids) == 1 for ids in found.values()), "an event came under two ids"
    return len(arrivals) - TOTAL


# -- push subscriptions -----------------------------------------------------------------------


class Receiver:
    """A push endpoint: records each request's ``webhook-id`` and ``n`` as it arrives, holds it
    until ``opened`` is set, then answers ``204`` after ``RECEIVER_DELAY``."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, int]] = []
        self.opened = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.arrivals.append((request.headers["webhook-id"], body["n"]))
        await self.opened.wait()
        await asyncio.sleep(RECEIVER_DELAY)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", found.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield found, f"http://127.0.0.1:{port}/hooks"
    finally:
        found.opened.set()
        await runner.cleanup()


async def test_a_push_subscription_killed_mid_stream_loses_no_event(
    receiver: tuple[Receiver, str], tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    endpoint, url = receiver
    target = {
        "url": url,
        "topics": [TOPIC],
        "secret": new_standard_webhooks_secret(),
        "concurrency": PUSH_CONCURRENCY,
    }
    config = served_config(tmp_path, push={"receiver": target})
    [server] = await fleet.start(config, client, count=1)
    await post_all(server, client, TOTAL)
    endpoint.opened.set()  # the events were all stored before the first one is answered
    at_kill = await kill_mid_stream_and_restart(
        server, config, tmp_path, fleet, client, lambda: endpoint.arrivals
    )
    repeated = duplicates(endpoint.arrivals)
    print(f"push: killed at {at_kill} of {TOTAL} events; {repeated} arrived twice")
    assert repeated <= PUSH_CONCURRENCY * BATCH


# -- RabbitMQ out -----------------------------------------------------------------------------


class SlowLink(TcpProxy):
    """A proxy whose every chunk, either way, waits ``LINK_DELAY`` before it goes on: each
    publish and its confirm take a while, so a kill lands while messages are in flight."""

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                await asyncio.sleep(LINK_DELAY)
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


async def test_the_rabbitmq_bridge_killed_mid_stream_loses_no_event(
    queue: Queue,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    fleet: Fleet,
    client: httpx.AsyncClient,
) -> None:
    link = SlowLink("127.0.0.1", 5672)
    await link.start()
    link.stall()  # nothing goes out until every event is stored
    section = {
        "url": f"amqp://guest:guest@127.0.0.1:{link.port}/",
        "exchange": {"name": queue.exchange},
        "topics": [TOPIC],
    }
    config = served_config(
        tmp_path, modules={"rabbitmq": {"rabbitmqPublishingEventConsumer": section}}
    )

    def arrivals() -> list[tuple[str, int]]:
        return [(m.message_id, orjson.loads(m.body)["n"]) for m in queue.messages]

    try:
        [server] = await fleet.start(config, client, count=1)
        await post_all(server, client, TOTAL)
        link.flow()
        at_kill = await kill_mid_stream_and_restart(
            server, config, tmp_path, fleet, client, arrivals
        )
    finally:
        await link.close()
    repeated = duplicates(arrivals())
    print(f"rabbitmq: killed at {at_kill} of {TOTAL} events; {repeated} arrived twice")
    assert repeated <= BATCH
