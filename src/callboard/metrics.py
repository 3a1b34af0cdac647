"""Prometheus instruments for ingress and delivery, one registry per application."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Counters and histograms callboard keeps; label children are cached for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ingress_requests = Counter(
            "callboard_ingress_requests",
            "HTTP ingress requests by topic and response status.",
            ["topic", "status"],
            registry=r,
        )
        self.published = Counter(
            "callboard_events_published", "Events accepted by the broker.", ["topic"], registry=r
        )
        self.duplicates = Counter(
            "callboard_events_duplicate",
            "Redeliveries recognised by their delivery id and published only once.",
            ["topic"],
            registry=r,
        )
        self.delivered = Counter(
            "callboard_events_delivered",
            "Events handled successfully by a subscriber.",
            ["subscription", "topic"],
            registry=r,
        )
        self.failures = Counter(
            "callboard_handler_failures",
            "Handler calls that raised.",
            ["subscription", "topic"],
            registry=r,
        )
        self.retries = Counter(
            "callboard_delivery_retries",
            "Deliveries tried again after a handler failure.",
            ["subscription"],
            registry=r,
        )
        self.dead_letters = Counter(
            "callboard_dead_letters",
            "Events moved to a subscription's dead letters after the last attempt failed.",
            ["subscription"],
            registry=r,
        )
        self.latency = Histogram(
            "callboard_delivery_latency_seconds",
            "Time from an event's creation to the end of its successful handling.",
            ["subscription"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "callboard_deliveries_in_flight",
            "Deliveries being handled right now.",
            registry=r,
        )
        self._published: dict[str, Counter] = {}
        self._ingress: dict[tuple[str, int], Counter] = {}
        self._delivered: dict[tuple[str, str], Counter] = {}
        self._latency: dict[str, Histogram] = {}

    def count_ingress(self, topic: str, status: int) -> None:
        key = (topic, status)
        child = self._ingress.get(key)
        if child is None:
            child = self._ingress[key] = self.ingress_requests.labels(topic, str(status))
        child.inc()

    def count_published(self, topic: str) -> None:
        child = self._published.get(topic)
        if child is None:
            child = self._published[topic] = self.published.labels(topic)
        child.inc()

    def count_delivered(self, subscription: str, topic: str, seconds: float) -> None:
        key = (subscription, topic)
        child = self._delivered.get(key)
        if child is None:
            child = self._delivered[key] = self.delivered.labels(subscription, topic)
        child.inc()
        histogram = self._latency.get(subscription)
        if histogram is None:
            histogram = self._latency[subscription] = self.latency.labels(subscription)
        histogram.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
