"""``RetryLater``: a handler asks the shared retry policy for a later retry (Retry-After)."""

from __future__ import annotations

import asyncio

import pytest

from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy, SubscriptionWorker
from callboard.errors import RetryLater
from callboard.events import Event


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the workers wait between attempts, recorded instead of waited."""
    asked: list[float] = []

    async def recorded(self: SubscriptionWorker, seconds: float) -> bool:
        asked.append(seconds)
        return False

    monkeypatch.setattr(SubscriptionWorker, "_stopped_within", recorded)
    return asked


async def handled_after(failures: list[Exception], waits: list[float]) -> list[float]:
    policy = RetryPolicy(attempts=5, initial_delay=0.5, max_delay=0.5, jitter=0.0)
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        if failures:
            raise failures.pop(0)
        done.set()

    async with DefaultEventsService(retry=policy) as service:
        await service.subscribe("later", "orders", handler)
        await service.publish(Event(topic="orders"))
        await asyncio.wait_for(done.wait(), 5)
    return waits


async def test_the_delay_a_handler_names_is_waited_when_longer(waits: list[float]) -> None:
    assert await handled_after([RetryLater("busy", delay=42.0)], waits) == [42.0]


async def test_the_policy_s_own_delay_stays_when_longer(waits: list[float]) -> None:
    assert await handled_after([RetryLater("busy", delay=0.1), ValueError()], waits) == [0.5, 0.5]


def test_a_negative_delay_is_none() -> None:
    assert RetryLater("now", delay=-3).delay == 0.0
