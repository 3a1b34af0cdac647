"""The kits of the RabbitMQ broker: every test on names of its own, deleted at the end.

RabbitMQ's vhosts cannot be made over AMQP, so a test is isolated by a name prefix
(``?prefix=cb_test_<random>.``); the teardown deletes the exchange and every queue the test's
brokers declared, which the kit learns from the registry and the names the broker uses.

``rabbitmq`` is the broker as configured by default; ``rabbitmq_history`` the same with
``?history=true`` (every event also kept in a stream), the broker that can replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from callboard.brokers.base import Broker, RetentionPolicy
from tests.contract.kit import RETENTION_COUNT, BrokerKit
from tests.services import require_service

RABBITMQ_URL = os.environ.get("CALLBOARD_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")


async def drop_namespace(url: str, prefix: str) -> None:
    """Delete the exchange and every queue named with ``prefix`` (what one test made)."""
    import aio_pika

    from callboard.brokers.rabbitmq_names import queue_name
    from callboard.brokers.rabbitmq_store import read_groups

    connection = await aio_pika.connect(url)
    try:
        try:
            groups = await read_groups(connection, f"{prefix}registry")
        except aio_pika.exceptions.ChannelNotFoundEntity:  # the test made nothing
            groups = {}
        # The ledger of earlier versions, and the history stream.
        names = [f"{prefix}registry", f"{prefix}ledger", f"{prefix}history"]
        names += [queue_name(prefix, kind, g) for g in groups for kind in ("group", "dead")]
        for name in names:
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        channel = await connection.channel()
        await channel.exchange_delete(f"{prefix}events")
        await channel.close()
    finally:
        await connection.close()


@contextlib.contextmanager
def served_namespace(query: str = "") -> Iterator[str]:
    """A broker URL (with ``query`` added) on a prefix of its own, for ``callboard serve``
    processes; what the prefix names is deleted at the end (in the caller's thread: the
    servers are gone by then). Skips when the amqp entry point is not installed yet."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    import pytest

    from callboard.brokers import open_broker
    from callboard.errors import ConfigError

    prefix = f"cb_serve_{uuid.uuid4().hex[:12]}."
    url = f"{RABBITMQ_URL}?prefix={prefix}{query}"
    try:
        open_broker(url)
    except ConfigError as error:
        pytest.skip(f"the amqp entry point is not installed yet: {error}")
    try:
        yield url
    finally:
        asyncio.run(drop_namespace(RABBITMQ_URL, prefix))


async def rabbitmq_kit(tmp_path: Path, *, history: bool = False) -> BrokerKit:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    from callboard.brokers.rabbitmq import RabbitBroker
    from callboard.brokers.rabbitmq_names import parse_url

    prefix = f"cb_test_{uuid.uuid4().hex[:12]}."
    settings = parse_url(f"{RABBITMQ_URL}?prefix={prefix}&history={str(history).lower()}")

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return RabbitBroker(settings, lease=lease, retention=retention)

    async def crash(broker: Broker) -> None:
        assert isinstance(broker, RabbitBroker)
        await broker.abandon()

    async def teardown() -> None:
        await drop_namespace(settings.url, prefix)

    kit = BrokerKit(
        "rabbitmq_history" if history else "rabbitmq",
        factory,
        crash=crash,
        deviations={
            RETENTION_COUNT: "each event is stored only in the queues of the groups that take "
            "it, so retention counts max_count per group's queue (tests/integration/"
            "test_rabbitmq_broker.py checks the figures against that model)"
        },
    )
    kit.teardown.append(teardown)
    return kit


async def rabbitmq_history_kit(tmp_path: Path) -> BrokerKit:
    """The RabbitMQ broker with ``?history=true``."""
    return await rabbitmq_kit(tmp_path, history=True)
