"""The contract kit of the NATS JetStream broker: each test on a prefix of its own.

Every test gets its own streams (``<prefix>_events``, ``_dead``, ``_groups``) on the shared
nats-server, deleted at the end, so tests never see each other's events.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from callboard.brokers.base import Broker, RetentionPolicy
from tests.contract.kit import BrokerKit
from tests.services import require_service

NATS_HOST = os.environ.get("CALLBOARD_TEST_NATS_HOST", "127.0.0.1")
NATS_PORT = int(os.environ.get("CALLBOARD_TEST_NATS_PORT", "4222"))
NATS_URL = f"nats://{NATS_HOST}:{NATS_PORT}"


async def delete_streams(url: str, prefix: str) -> None:
    """Delete every stream of ``prefix`` (a test's own)."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for suffix in ("events", "dead", "groups"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(f"{prefix}_{suffix}")
    finally:
        await nc.close()


async def nats_kit(tmp_path: Path) -> BrokerKit:
    require_service("NATS", NATS_HOST, NATS_PORT)
    from callboard.brokers.nats import NatsBroker

    prefix = f"cb_test_{uuid.uuid4().hex[:12]}"

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return NatsBroker([NATS_URL], prefix=prefix, lease=lease, retention=retention)

    async def crash(broker: Broker) -> None:
        assert isinstance(broker, NatsBroker)
        await broker.abandon()

    async def teardown() -> None:
        await delete_streams(NATS_URL, prefix)

    kit = BrokerKit("nats", factory, crash=crash)
    kit.teardown.append(teardown)
    return kit
