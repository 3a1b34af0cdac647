"""The kits of callboard's own brokers: memory, SQLite, PostgreSQL and the remote broker.

Each builder takes the test's directory and returns a kit on a store of its own: a SQLite file
there, a PostgreSQL schema dropped at the end, a callboard server (in this process, on a free
port, its own broker a SQLite file) for the remote broker.
"""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.types import ASGIApp

from callboard.app import create_app
from callboard.brokers.base import Broker, RetentionPolicy
from callboard.config import parse_config
from tests.contract.kit import CALL_ORDER, DELETED_GROUP, OWNER, POLL, BrokerKit
from tests.services import POSTGRES_URL, postgres_execute, require_service

KitBuilder = Callable[[Path], Awaitable[BrokerKit]]


async def memory_kit(tmp_path: Path) -> BrokerKit:
    return BrokerKit.from_url("memory", "memory://", tmp_path)


async def sqlite_kit(tmp_path: Path) -> BrokerKit:
    from callboard.brokers.sqlite import SQLiteBroker

    path = str(tmp_path / "callboard.db")

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return SQLiteBroker(
            path, lease=lease, poll_interval=POLL, watch_interval=POLL / 2, retention=retention
        )

    async def crash(broker: Broker) -> None:
        assert isinstance(broker, SQLiteBroker)
        await broker.abandon()

    return BrokerKit("sqlite", factory, crash=crash)


async def postgres_kit(tmp_path: Path) -> BrokerKit:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    from callboard.brokers.postgres import PostgresBroker

    schema = f"callboard_test_{uuid.uuid4().hex[:12]}"

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return PostgresBroker(
            POSTGRES_URL, schema=schema, lease=lease, poll_interval=POLL, retention=retention
        )

    async def crash(broker: Broker) -> None:
        assert isinstance(broker, PostgresBroker)
        await broker.abandon()

    async def drop_schema() -> None:
        await postgres_execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    kit = BrokerKit("postgresql", factory, crash=crash)
    kit.teardown.append(drop_schema)
    return kit


# -- the remote broker --------------------------------------------------------------------------

TOKEN = "contract-suite-token"
#: The subject the server records as the owner of what the remote broker subscribes.
SUBJECT = "contract-suite"


class CuttableTransport(httpx.AsyncBaseTransport):
    """An HTTP transport that can be cut, as the network of a killed process is."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.cut = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut:
            raise httpx.ConnectError("the connection was cut", request=request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def served(app: ASGIApp, port: int = 0) -> AsyncIterator[str]:
    """``app`` served by uvicorn in this process on ``port`` (0: a free one); yields its
    ``http://`` address."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            lifespan="on",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:  # startup, not delivery: there is nothing to await instead
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    (port,) = {s.getsockname()[1] for listener in server.servers for s in listener.sockets}
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def remote_kit(tmp_path: Path) -> BrokerKit:
    """``callboard+http://`` brokers of one live server whose own broker is a SQLite file."""
    from callboard.brokers.sqlite import SQLiteBroker
    from callboard.bus.remote import RemoteBroker

    database = str(tmp_path / "server.db")
    config = parse_config(
        {
            "backend": {
                "auth": {
                    "externalAccess": [
                        {"type": "static", "options": {"token": TOKEN, "subject": SUBJECT}}
                    ]
                }
            },
            "events": {"broker": f"sqlite:///{database}", "notifyTimeoutMs": 500},
        }
    )
    # The server's own broker polls as fast as the suite's durable brokers do.
    own = SQLiteBroker(database, poll_interval=POLL, watch_interval=POLL / 2)
    stack = AsyncExitStack()
    address = await stack.enter_async_context(
        served(create_app(config, broker=own, use_entry_points=False))
    )
    transports: dict[int, CuttableTransport] = {}

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        # ``retention`` is the server's business: the remote broker keeps nothing itself.
        transport = CuttableTransport()
        broker = RemoteBroker(
            address,
            TOKEN,
            lease_ms=round(lease * 1000),
            backoff=(0.05, 0.5),
            transport=transport,
        )
        transports[id(broker)] = transport
        return broker

    async def crash(broker: Broker) -> None:
        # The process is gone: nothing it held is handed back, no lease of it is renewed.
        transports[id(broker)].cut = True

    kit = BrokerKit(
        "remote",
        factory,
        crash=crash,
        deviations={
            OWNER: "the server records the caller its token names as the owner",
            CALL_ORDER: "concurrent publishes are concurrent HTTP requests",
            DELETED_GROUP: "a reader whose subscription the server forgot subscribes again",
        },
    )
    kit.teardown.append(stack.aclose)
    return kit


def _engine_kit(name: str, kit: str | None = None) -> KitBuilder:
    """The kit of the broker on a distributed engine, ``<kit>_kit`` (``kit`` defaults to the
    engine's name) from ``tests.contract.kits_<name>``, imported when a test asks for it (its
    driver is an optional extra)."""

    async def build(tmp_path: Path) -> BrokerKit:
        module = importlib.import_module(f"tests.contract.kits_{name}")
        builder: KitBuilder = getattr(module, f"{kit or name}_kit")
        return await builder(tmp_path)

    return build


#: callboard's own kits, by the name the suite's test ids carry.
KITS: dict[str, KitBuilder] = {
    "memory": memory_kit,
    "sqlite": sqlite_kit,
    "postgresql": postgres_kit,
    "remote": remote_kit,
    **{name: _engine_kit(name) for name in ("nats", "redis", "rabbitmq", "kafka")},
    # RabbitMQ with ?history=true: the broker that can replay.
    "rabbitmq_history": _engine_kit("rabbitmq", "rabbitmq_history"),
}
