"""``callboard subscriptions``: what it shows of events that wait."""

from __future__ import annotations

from dataclasses import dataclass

from callboard.brokers.base import SubscriptionInfo
from callboard.bus.admin import format_subscriptions


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
