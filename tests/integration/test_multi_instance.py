"""Durable brokers under real ``callboard serve`` processes: two instances, a crash, an outage.

The servers load ``support_modules``, which records each delivery in a file the test reads, and
share one store: a PostgreSQL schema of the test's own, or one SQLite file. Subscriptions ``A``
and ``B`` run on every server, so each is a consumer group shared by the processes.

- Nothing fails: each subscription handles each event exactly once, both processes taking part.
- ``kill -9`` of the instance in the middle of a handler: the other one handles that event once
  its lease runs out, and every event answered 202 is handled.
- PostgreSQL restarted (connections dropped, new ones refused) or partitioned away (connections
  open, nothing answers) under load: each request is answered within seconds, 202 or a JSON 503;
  the servers recover by themselves; everything answered 202 is handled and nothing stays leased.
- SIGTERM while PostgreSQL is out: the server still stops, in bounded time.

PostgreSQL outages go through ``servers.TcpProxy``, so the machine's server is never touched.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.integration.servers import (
    Fleet,
    Server,
    TcpProxy,
    handled,
    read_records,
    wait_for_records,
    write_config,
)
from tests.services import POSTGRES_URL, drop_postgres_schema, postgres_rows, require_service

pytestmark = pytest.mark.slow

#: Seconds a killed instance's leases outlive it.
LEASE = 1.5


@pytest.fixture
def postgres_schema(fleet: Fleet) -> Iterator[str]:
    """A schema of this test's own, dropped once its servers are gone."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    pytest.importorskip("asyncpg")
    name = f"callboard_multi_{uuid.uuid4().hex[:12]}"
    yield name
    fleet.kill_all()
    drop_postgres_schema(name)


def postgres_url(schema: str, port: int | None = None) -> str:
    parts = urlsplit(POSTGRES_URL)
    if port is not None:
        parts = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{port}")
    return urlunsplit(parts._replace(query=f"schema={schema}"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'callboard.db'}"
    schema: str = request.getfixturevalue("postgres_schema")
    return postgres_url(schema)


async def post_all(
    client: httpx.AsyncClient, servers: list[Server], numbers: range, topic: str = "jobs"
) -> None:
    """Post ``{"n": n}`` for each number, alternating between servers; each must get 202."""
    limit = asyncio.Semaphore(8)

    async def post(n: int) -> None:
        async with limit:
            response = await servers[n % len(servers)].post(client, topic, n)
        assert response.status_code == 202, (n, response.status_code, response.text)

    await asyncio.gather(*(post(n) for n in numbers))


async def test_each_subscription_gets_each_event_exactly_once(
    broker_url: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    config = write_config(tmp_path, broker_url, lease=LEASE)
    servers = await fleet.start(config, client)
    events = range(200)
    await post_all(client, servers, events)

    records = await wait_for_records(tmp_path, {"A": set(events), "B": set(events)}, fleet)
    await asyncio.sleep(0.5)  # a second delivery would come now, if any
    records = read_records(tmp_path)
    for subscription in ("A", "B"):
        counts = handled(records, subscription)
        assert set(counts) == set(events)
        twice = sorted(n for n, count in counts.items() if count > 1)
        assert not twice, f"{subscription} handled these more than once: {twice}"
    # The groups really were shared: both processes took part in each.
    pids = {s.pid for s in servers}
    for subscription in ("A", "B"):
        assert {r.pid for r in records if r.subscription == subscription} == pids
    await fleet.stop_all()


SLOW = -1


@dataclass(frozen=True, slots=True)
class Answer:
    n: int
    server: int
    sent: float
    elapsed: float
    status: int | None
    body: object = None


class Load:
    """Posters that keep posting ``jobs`` to the servers in turn, recording every answer."""

    def __init__(self, client: httpx.AsyncClient, servers: list[Server], first: int = 0) -> None:
        self.client = client
        self.servers = servers
        self.answers: list[Answer] = []
        self._numbers = itertools.count(first)
        self._stop = asyncio.Event()
        self._posters: list[asyncio.Task[None]] = []

    def start(self, posters: int = 6) -> None:
        self._posters = [asyncio.create_task(self._post()) for _ in range(posters)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._posters)

    def accepted(self) -> set[int]:
        return {a.n for a in self.answers if a.status == 202}

    async def _post(self) -> None:
        while not self._stop.is_set():
            n = next(self._numbers)
            index = n % len(self.servers)
            sent = time.monotonic()
            try:
                response = await self.servers[index].post(self.client, "jobs", n, timeout=15)
            except httpx.TransportError as error:
                elapsed = time.monotonic() - sent
                self.answers.append(Answer(n, index, sent, elapsed, None, repr(error)))
                await asyncio.sleep(0.05)
                continue
            body = response.json() if response.status_code != 202 else None
            elapsed = time.monotonic() - sent
            self.answers.append(Answer(n, index, sent, elapsed, response.status_code, body))
            if response.status_code != 202:
                await asyncio.sleep(0.05)


async def test_a_killed_instance_loses_nothing_and_its_event_goes_to_the_other(
    broker_url: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    config = write_config(tmp_path, broker_url, lease=LEASE)
    servers = await fleet.start(config, client)
    response = await servers[0].post(client, "slow", SLOW)
    assert response.status_code == 202

    # Whichever instance took the slow event is in its handler now: kill it there, while
    # both instances are busy with a load of other events.
    deadline = time.monotonic() + 10
    while not (started := [r for r in read_records(tmp_path) if r.subscription == "slow"]):
        assert time.monotonic() < deadline, "no instance started the slow handler"
        await asyncio.sleep(0.02)
    (victim,) = [s for s in servers if s.pid == started[0].pid]
    (survivor,) = [s for s in servers if s is not victim]
    load = Load(client, servers)
    load.start()
    try:
        await asyncio.sleep(1)
        victim.kill()
        assert await victim.wait_exit(5) is not None
        (tmp_path / "release").touch()
        await asyncio.sleep(0.5)
    finally:
        await load.stop()

    accepted = load.accepted()
    assert any(a.server == servers.index(victim) for a in load.answers if a.status == 202)
    assert all(a.status in (202, None) for a in load.answers), load.answers
    records = await wait_for_records(
        tmp_path, {"A": accepted, "B": accepted, "slow": {SLOW}}, fleet, timeout=30
    )
    slow = [r for r in records if r.subscription == "slow"]
    assert [(r.pid, r.phase) for r in slow] == [
        (victim.pid, "start"),
        (survivor.pid, "start"),
        (survivor.pid, "done"),
    ]
    # Everything answered 202 was handled, the victim's share included, and nothing else was
    # lost on the way: the survivor handled what the victim had taken and not finished.
    for subscription in ("A", "B"):
        assert set(handled(records, subscription)) >= accepted
    await fleet.stop_all()


@pytest.mark.postgres
@pytest.mark.timeout(120)
@pytest.mark.parametrize("outage", ["restart", "partition"])
async def test_a_postgres_outage_under_load_loses_nothing_accepted(
    outage: str, postgres_schema: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    """``restart``: connections drop and new ones are refused; ``partition``: nothing moves."""
    proxy = TcpProxy("127.0.0.1", urlsplit(POSTGRES_URL).port or 5432)
    await proxy.start()
    try:
        await _outage_under_load(outage, proxy, postgres_schema, tmp_path, fleet, client)
    finally:
        proxy.flow()
        await proxy.close()


async def _outage_under_load(
    outage: str,
    proxy: TcpProxy,
    schema: str,
    tmp_path: Path,
    fleet: Fleet,
    client: httpx.AsyncClient,
) -> None:
    config = write_config(tmp_path, postgres_url(schema, proxy.port), lease=LEASE)
    servers = await fleet.start(config, client)
    load = Load(client, servers)
    load.start()
    answers = load.answers
    try:
        await asyncio.sleep(1.5)
        cut = time.monotonic()
        if outage == "restart":
            await proxy.cut()
            await asyncio.sleep(5)
            await proxy.restore()
        else:
            proxy.stall()
            await asyncio.sleep(5)
            proxy.flow()
        restored = time.monotonic()
        # Recovery without a restart: both servers accept again, within a bound.
        deadline = restored + 30
        while not all(
            any(a.status == 202 and a.sent > restored and a.server == i for a in answers)
            for i in range(len(servers))
        ):
            assert time.monotonic() < deadline, "the servers did not recover"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
    finally:
        await load.stop()

    failures = [a for a in answers if a.status not in (202, 503)]
    assert not failures, failures[:5]
    slow = [a for a in answers if a.elapsed > 4.5]
    assert not slow, f"{len(slow)} answers took more than 4.5s, e.g. {slow[:3]}"
    refused = [a for a in answers if a.status == 503]
    assert refused, "no request met the outage"
    assert all(cut <= a.sent + a.elapsed for a in refused)
    for answer in refused:
        assert isinstance(answer.body, dict)
        assert answer.body["error"]["name"] == "ServiceUnavailableError"
    for server in servers:
        assert (await client.get(server.url + "/readyz")).status_code == 200
    after = range(100_000, 100_020)
    await post_all(client, servers, after)

    accepted = load.accepted() | set(after)
    records = await wait_for_records(tmp_path, {"A": accepted, "B": accepted}, fleet, timeout=30)
    assert set(handled(records, "A")) >= accepted
    assert set(handled(records, "B")) >= accepted
    # Nothing stays leased: what could not be acknowledged during the outage came back and
    # was acknowledged since.
    deadline = time.monotonic() + 10
    while leased := await leases(schema):
        assert time.monotonic() < deadline, f"leases never released: {leased}\n{fleet.logs()}"
        await asyncio.sleep(0.1)
    await fleet.stop_all()


async def leases(schema: str) -> list[tuple[str, int]]:
    rows = await postgres_rows(f'SELECT subscription, seq FROM "{schema}".leases ORDER BY seq')
    return [(name, seq) for name, seq in rows]


@pytest.mark.postgres
@pytest.mark.parametrize("outage", ["restart", "partition"])
async def test_a_server_stops_on_sigterm_while_postgres_is_out(
    outage: str, postgres_schema: str, tmp_path: Path, fleet: Fleet, client: httpx.AsyncClient
) -> None:
    """An outage must not keep a server from stopping: it would block every redeploy."""
    proxy = TcpProxy("127.0.0.1", urlsplit(POSTGRES_URL).port or 5432)
    await proxy.start()
    try:
        config = write_config(tmp_path, postgres_url(postgres_schema, proxy.port), lease=LEASE)
        (server,) = await fleet.start(config, client, count=1)
        await post_all(client, [server], range(10))
        await wait_for_records(tmp_path, {"A": set(range(10)), "B": set(range(10))}, fleet)
        if outage == "restart":
            await proxy.cut()
        else:
            proxy.stall()
        await asyncio.sleep(0.5)
        # It stops in bounded time, giving up on handing its (idle) leases back.
        await fleet.stop_all(timeout=10)
    finally:
        proxy.flow()
        await proxy.close()
