"""``callboard subscriptions``: what it shows of events that wait, and what it deletes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from callboard.brokers import admin, open_broker
from callboard.brokers.base import IN_PROCESS, Broker, SubscriptionInfo
from callboard.bus.admin import delete_subscription, format_subscriptions
from callboard.errors import SubscriptionError


def test_without_a_broker_figure_the_table_shows_what_the_broker_knows() -> None:
    text = format_subscriptions([SubscriptionInfo("s", ("t",), in_flight=3, backlog=2)])
    header, row = text.splitlines()
    assert header.split() == ["SUBSCRIPTION", "TOPICS", "IN", "FLIGHT", "LAG", "LOST"]
    assert row.split() == ["s", "t", "3", "5", "0"]


@dataclass(frozen=True)
class AgedInfo:
    name: str
    topics: tuple[str, ...]
    in_flight: int
    backlog: int
    oldest_unacked_seconds: float | None


def test_a_broker_that_tells_the_age_gets_a_column() -> None:
    text = format_subscriptions(
        [AgedInfo("s", ("t",), 1, 0, 42.25), AgedInfo("u", ("v",), 0, 0, None)]
    )
    header, first, second = text.splitlines()
    assert header.split()[-1] == "OLDEST"
    assert first.split()[-1] == "42.2s"
    assert second.split()[-1] == "-"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    broker = open_broker(f"sqlite:///{tmp_path / 'cb.db'}")
    await broker.start()
    yield broker
    await broker.close()


async def made(broker: Broker, group: str, owner: str | None) -> None:
    consumer = await broker.consume(group, ["t"], owner=owner)
    await consumer.close()


async def names(broker: Broker) -> list[str]:
    return [info.name for info in await admin(broker).subscriptions()]


async def test_a_subscription_nobody_seems_to_consume_is_deleted_at_once(broker: Broker) -> None:
    await made(broker, "tool", None)
    await made(broker, "reader", "service=reader")
    assert "deleted subscription tool" in await delete_subscription(broker, "tool")
    assert "deleted subscription reader" in await delete_subscription(broker, "reader")
    assert await names(broker) == []


async def test_a_servers_own_subscription_is_deleted_only_with_force(broker: Broker) -> None:
    await made(broker, "svc", IN_PROCESS)
    with pytest.raises(SubscriptionError) as refused:
        await delete_subscription(broker, "svc")
    assert "belongs to a server's events service" in str(refused.value)
    assert "--force" in str(refused.value)
    assert await names(broker) == ["svc"]
    done = await delete_subscription(broker, "svc", force=True)
    assert "servers that consumed it stop consuming it" in done
    assert await names(broker) == []


async def test_a_subscription_with_events_in_flight_is_deleted_only_with_force(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await made(broker, "reader", "service=reader")
    listed = await admin(broker).subscriptions()

    async def held_elsewhere() -> list[SubscriptionInfo]:
        # As another process's consumer leaves it: two events leased and not acknowledged.
        return [replace(info, in_flight=2) for info in listed]

    monkeypatch.setattr(broker, "subscriptions", held_elsewhere)
    with pytest.raises(SubscriptionError, match="has 2 events in flight"):
        await delete_subscription(broker, "reader")
    assert "deleted subscription reader" in await delete_subscription(broker, "reader", force=True)
