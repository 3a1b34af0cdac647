"""The contract kit of the Redis broker: each test on a key prefix of its own on the shared
Redis (127.0.0.1:6379), whose keys are deleted at the end."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from callboard.brokers.base import Broker, RetentionPolicy
from tests.contract.kit import POLL, BrokerKit
from tests.services import require_service

REDIS_URL = os.environ.get("CALLBOARD_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix:`` (a test's namespace)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def redis_kit(tmp_path: Path) -> BrokerKit:
    require_service("Redis", "127.0.0.1", 6379)
    from callboard.brokers.redis import RedisBroker

    prefix = f"cb_test_{uuid.uuid4().hex[:12]}"

    def factory(*, lease: float, retention: RetentionPolicy | None) -> Broker:
        return RedisBroker(
            f"{REDIS_URL}?prefix={prefix}", lease=lease, poll_interval=POLL, retention=retention
        )

    async def crash(broker: Broker) -> None:
        assert isinstance(broker, RedisBroker)
        await broker.abandon()

    async def drop() -> None:
        await delete_prefix(REDIS_URL, prefix)

    kit = BrokerKit("redis", factory, crash=crash)
    kit.teardown.append(drop)
    return kit
