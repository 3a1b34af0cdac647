"""Which instance holds a Kafka group is decided by the order of the group topic, alike everywhere."""

from __future__ import annotations

import orjson
import pytest

pytest.importorskip("aiokafka")

from aiokafka import TopicPartition

from callboard.brokers.kafka_log import Hold, Mirror

META = TopicPartition("cb.groups", 0)


def mirror() -> Mirror:
    return Mirror(TopicPartition("cb.events", 0), TopicPartition("cb.deadletters", 0), META)


def claim(m: Mirror, offset: int, instance: str, until: int, stored_ms: int) -> None:
    value = orjson.dumps({"instance": instance, "until": until})
    m.apply(META, offset, b"holder:workers", value, stored_ms)


def test_of_two_claims_written_at_once_the_first_stored_wins() -> None:
    m = mirror()
    claim(m, 0, "a", 30_000, 1_000)
    claim(m, 1, "b", 30_001, 1_001)
    assert m.holds["workers"] == Hold("a", 30_000)


def test_the_holder_renews_and_another_takes_over_only_once_the_hold_ran_out() -> None:
    m = mirror()
    claim(m, 0, "a", 30_000, 1_000)
    claim(m, 1, "a", 40_000, 20_000)
    claim(m, 2, "b", 70_000, 39_999)
    assert m.holds["workers"].instance == "a"
    claim(m, 3, "b", 80_000, 40_000)
    assert m.holds["workers"] == Hold("b", 80_000)


def test_a_hold_let_go_is_free_and_a_deleted_group_has_no_holder() -> None:
    m = mirror()
    claim(m, 0, "a", 30_000, 1_000)
    claim(m, 1, "a", 0, 2_000)  # closed: let go
    claim(m, 2, "b", 32_000, 2_001)
    assert m.holds["workers"].instance == "b"
    m.apply(META, 3, b"holder:workers", None, 3_000)
    assert "workers" not in m.holds
    assert "holder:workers" not in m.meta
