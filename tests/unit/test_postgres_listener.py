"""The PostgreSQL broker's notifications: what the listener makes of them (no server needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("asyncpg")

from callboard.brokers.postgres_listener import Listener, notification


def listener(origin: str | None) -> tuple[Listener, list[tuple[list[str] | None, list[str]]]]:
    woken: list[tuple[list[str] | None, list[str]]] = []
    return (
        Listener(
            "postgresql://h/db",
            "ch",
            lambda topics, groups: woken.append((topics, groups)),
            connect_timeout=1,
            origin=origin,
        ),
        woken,
    )


def test_a_notification_wakes_the_consumers_of_its_topics_and_groups() -> None:
    one, woken = listener("me")
    one._received(notification({"b", "a"}, {"g"}, origin="other"))
    one._received(notification({"c"}, set()))
    assert woken == [(["a", "b"], ["g"]), (["c"], [])]


def test_a_broker_skips_its_own_notifications() -> None:
    one, woken = listener("me")
    one._received(notification({"a"}, set(), origin="me"))
    assert woken == []
    anonymous, woken = listener(None)
    anonymous._received(notification({"a"}, set(), origin="me"))
    assert woken == [(["a"], [])]


def test_a_notification_too_long_for_notify_wakes_everyone() -> None:
    many = {f"topic-{n:04d}" for n in range(1000)}
    assert notification(many, set(), origin="me") == "*"
    one, woken = listener("me")
    one._received("*")
    assert woken == [(None, [])]


def test_an_unexpected_notification_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    one, woken = listener("me")
    for payload in ("not json", "[1, 2]", '{"t": 1}'):
        one._received(payload)
    assert woken == []
    assert caplog.text.count("ignored an unexpected notification") == 3
