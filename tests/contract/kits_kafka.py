"""The contract kit of the Kafka broker, on a Tansu server (an Apache Kafka compatible broker).

One Tansu process serves the whole test session: it starts lazily at the first test that asks
for it and stops when the interpreter exits (the kits are plain functions of ``tmp_path``, with no
session fixture to hang it on). Each test gets a namespace of its own, a unique topic prefix, and
its topics are deleted at the end.
"""

from __future__ import annotations

import atexit
import contextlib
import uuid
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from callboard.brokers.base import Broker, RetentionPolicy
from callboard.brokers.kafka import KafkaBroker
from tests.contract.kit import BrokerKit
from tests.services import require_service, tansu

_server: dict[str, str] = {}


def tansu_address() -> str:
    """The ``host:port`` of the session's Tansu server, started at the first call."""
    if "address" not in _server:
        context = tansu()
        _server["address"] = context.__enter__()
        atexit.register(context.__exit__, None, None, None)
    return _server["address"]


async def delete_topics(address: str, prefix: str) -> None:
    """Drop every topic of one namespace."""
    admin = AIOKafkaAdminClient(bootstrap_servers=address)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def kafka_kit(tmp_path: Path) -> BrokerKit:
    address = tansu_address()
    host, _, port = address.partition(":")
    require_service("Tansu (Kafka)", host, int(port))
    prefix = f"cb_test_{uuid.uuid4().hex[:12]}."

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return KafkaBroker(
            address, prefix=prefix, retention=retention, lease=lease, fetch_wait_ms=10
        )

    async def crash(broker: Broker) -> None:
        assert isinstance(broker, KafkaBroker)
        await broker.abandon()

    async def drop() -> None:
        with contextlib.suppress(Exception):
            await delete_topics(address, prefix)

    kit = BrokerKit("kafka", factory, crash=crash)
    kit.teardown.append(drop)
    return kit
