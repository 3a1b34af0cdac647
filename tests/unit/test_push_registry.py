"""The push targets of a process against changes through the API made while it starts or stops."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, cast

from callboard.brokers.memory import MemoryBroker
from callboard.config import parse_push_target
from callboard.metrics import Metrics
from callboard.push.access import Caller
from callboard.push.registry import PushTargets
from callboard.push.store import Stored, StoredTarget
from callboard.service import EventsService, Handler
from callboard.testing import new_standard_webhooks_secret

SECTION = {"url": "http://receiver.example/in", "topics": ["billing"]}
OPS = Caller("service=ops", granted=lambda subscription: False)


class MemoryStore:
    def __init__(self) -> None:
        self.stored: Stored = {}

    async def load(self) -> Stored:
        return dict(self.stored)

    async def save(self, targets: Mapping[str, StoredTarget]) -> None:
        self.stored = dict(targets)


class Running:
    def __init__(self, id: str, topics: tuple[str, ...]) -> None:
        self.id, self.topics = id, topics
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class SlowEvents:
    """Subscribes only once ``gate`` is set, and remembers every subscription it made."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.asked = asyncio.Event()
        self.made: list[Running] = []

    async def subscribe(
        self, id: str, topics: str | Sequence[str], handler: Handler, **options: Any
    ) -> Running:
        self.asked.set()
        await self.gate.wait()
        running = Running(id, tuple(topics))
        self.made.append(running)
        return running


def targets(metrics: Metrics | None = None) -> PushTargets:
    return PushTargets(
        [],
        parse=parse_push_target,
        store=MemoryStore(),
        broker=MemoryBroker(),
        metrics=(metrics or Metrics()).push,
    )


async def test_a_target_put_while_stopping_does_not_outlive_the_stop() -> None:
    push, events = targets(), SlowEvents()
    events.gate.set()
    await push.start(cast(EventsService, events))
    events.gate.clear()
    section = {**SECTION, "secret": new_standard_webhooks_secret()}
    putting = asyncio.ensure_future(push.put("billing", section, by=OPS))
    await events.asked.wait()  # the put is subscribing its target
    stopping = asyncio.ensure_future(push.stop())
    await asyncio.sleep(0.01)
    events.gate.set()
    await putting
    await stopping
    assert [running.closed for running in events.made] == [True]


async def test_a_deleted_target_leaves_no_metrics_behind() -> None:
    metrics, events = Metrics(), SlowEvents()
    events.gate.set()
    push = targets(metrics)
    await push.start(cast(EventsService, events))
    section = {**SECTION, "secret": new_standard_webhooks_secret()}
    await push.put("billing", section, by=OPS)
    state = {"target": "billing"}
    assert metrics.registry.get_sample_value("callboard_push_breaker_state", state) == 0
    assert await push.delete("billing", by=OPS)
    assert metrics.registry.get_sample_value("callboard_push_breaker_state", state) is None
    exposed = metrics.exposition()[0].decode()
    assert 'target="billing"' not in exposed
    await push.stop()
