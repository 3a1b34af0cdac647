"""The push targets of a process: changes through the API made while it starts or stops,
stored targets that can no longer be read, and URLs whose IP literal is private."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest

from callboard.brokers.memory import MemoryBroker
from callboard.config import parse_push_target
from callboard.errors import ConfigError, RequestRejected
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


TEAM = Caller("service=team", granted=lambda subscription: False)


def stored_targets(store: MemoryStore, private_networks: bool = False) -> PushTargets:
    return PushTargets(
        [],
        parse=parse_push_target,
        store=store,
        broker=MemoryBroker(),
        metrics=Metrics().push,
        private_networks=private_networks,
    )


async def test_a_stored_target_that_cannot_be_read_keeps_its_name_for_its_owner(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, events = MemoryStore(), SlowEvents()
    events.gate.set()
    secret = new_standard_webhooks_secret()
    # Stored with credentials in an URL that no longer passes (say, the rules changed).
    url = "ftp://ops:hunter2@receiver.example/in"
    store.stored = {"crm": StoredTarget({**SECTION, "url": url, "secret": secret}, OPS.name)}
    push = stored_targets(store)
    with caplog.at_level(logging.ERROR, "callboard.push"):
        await push.start(cast(EventsService, events))
    (logged,) = [r.getMessage() for r in caplog.records if "'crm'" in r.getMessage()]
    assert "push.crm.url" in logged
    assert "hunter2" not in logged
    assert events.made == []  # it sends nothing
    assert push.get("crm") is None
    (broken,) = push.broken()
    assert broken.name == "crm"
    assert "push.crm.url" in broken.reason
    assert "hunter2" not in broken.reason
    section = {**SECTION, "secret": secret}
    with pytest.raises(RequestRejected) as refused:
        await push.put("crm", section, by=TEAM)
    assert refused.value.status_code == 403
    with pytest.raises(RequestRejected):
        await push.delete("crm", by=TEAM)
    assert "crm" in store.stored
    # Its owner replaces it (it existed: not created) and it runs again.
    spec, created = await push.put("crm", section, by=OPS)
    assert (spec.name, created) == ("crm", False)
    assert push.broken() == []
    assert push.owner("crm") == OPS.name
    assert [running.id for running in events.made] == ["push.crm"]
    await push.stop()


async def test_the_owner_may_delete_a_target_that_cannot_be_read() -> None:
    store, events = MemoryStore(), SlowEvents()
    events.gate.set()
    store.stored = {"crm": StoredTarget({"url": "http://x.example/"}, OPS.name)}
    push = stored_targets(store)
    await push.start(cast(EventsService, events))
    assert [b.name for b in push.broken()] == ["crm"]
    assert await push.delete("crm", by=OPS)
    assert push.broken() == []
    assert store.stored == {}
    await push.put("crm", {**SECTION, "secret": new_standard_webhooks_secret()}, by=TEAM)
    assert push.owner("crm") == TEAM.name
    await push.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/in",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/in",
        "http://[::1]:8080/in",
        "http://[::ffff:127.0.0.1]/in",
        "http://[fd00::1]/in",
    ],
)
async def test_a_url_whose_ip_literal_is_private_is_refused_at_once(url: str) -> None:
    store = MemoryStore()
    section = {**SECTION, "url": url, "secret": new_standard_webhooks_secret()}
    with pytest.raises(ConfigError) as refused:
        await stored_targets(store).put("crm", section, by=OPS)
    assert refused.value.path == "push.crm.url"
    assert "events.bus.pushPrivateNetworks" in refused.value.message
    assert store.stored == {}
    # Allowed by the key; and a name is judged only when its request connects.
    allowed = stored_targets(MemoryStore(), private_networks=True)
    assert (await allowed.put("crm", section, by=OPS))[1]
    named = {**section, "url": "http://localhost:8080/in"}
    assert (await stored_targets(MemoryStore()).put("crm", named, by=OPS))[1]
