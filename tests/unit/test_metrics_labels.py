"""``/metrics`` stays bounded however many topics and subscriptions there are."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from callboard.errors import InvalidTopicError
from callboard.metrics import OTHER, Labels, Metrics
from callboard.topics import validate_topic


def totals(metrics: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    body, _ = metrics.exposition()
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def test_twenty_thousand_topics_keep_the_exposition_small_and_the_totals_right() -> None:
    metrics = Metrics(max_topics=200, max_subscriptions=50)
    sub = metrics.subscription_label("s")
    for n in range(20_000):
        topic = f"topic.{n}"
        metrics.count_ingress(topic, 202)
        metrics.count_published(topic)
        metrics.count_delivered(sub, topic, 0.01)
        metrics.duplicates.labels(metrics.topic_label(topic)).inc()
        metrics.failures.labels(sub, metrics.topic_label(topic)).inc()
    body, _ = metrics.exposition()
    assert len(body) < 150_000  # 1.2 MB unbounded
    found = totals(metrics)
    published = found["callboard_events_published_total"]
    assert len(published) == 201
    assert sum(published.values()) == 20_000
    assert published[(("topic", OTHER),)] == 20_000 - 200
    assert published[(("topic", "topic.0"),)] == 1
    assert sum(found["callboard_ingress_requests_total"].values()) == 20_000
    assert sum(found["callboard_events_delivered_total"].values()) == 20_000
    assert sum(found["callboard_events_duplicate_total"].values()) == 20_000
    assert sum(found["callboard_handler_failures_total"].values()) == 20_000
    assert len(found["callboard_handler_failures_total"]) == 201


def test_a_topic_with_a_label_keeps_it_and_the_map_stays_bounded() -> None:
    labels = Labels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    assert len(labels.own) == 2


def test_subscription_gauges_combine_the_ones_beyond_the_bound() -> None:
    metrics = Metrics(max_subscriptions=2)
    metrics.set_per_subscription(metrics.backlog, [("a", 1), ("b", 2), ("c", 3), ("d", 4)])
    metrics.set_per_subscription(metrics.oldest_unacked, [("a", 1.0), ("c", 5.0), ("d", 7.0)], max)
    found = totals(metrics)
    assert found["callboard_subscription_backlog"] == {
        (("subscription", "a"),): 1,
        (("subscription", "b"),): 2,
        (("subscription", OTHER),): 7,
    }
    assert found["callboard_subscription_oldest_unacked_seconds"] == {
        (("subscription", "a"),): 1.0,
        (("subscription", OTHER),): 7.0,
    }
    # A subscription that is gone loses its sample.
    metrics.set_per_subscription(metrics.backlog, [("a", 0)])
    assert totals(metrics)["callboard_subscription_backlog"] == {(("subscription", "a"),): 0}


def test_a_topic_named_other_keeps_its_own_label_apart_from_the_bucket() -> None:
    labels = Labels(1)
    assert [labels(t) for t in ("other", "b", "c")] == ["other", OTHER, OTHER]
    with pytest.raises(InvalidTopicError):
        validate_topic(OTHER)
