"""Prometheus instruments for ingress, delivery, push and bridges, one registry per application.

The counters touched on every request and every delivery are plain integers, turned into
Prometheus samples only when ``/metrics`` is scraped: a labelled ``prometheus_client`` counter
takes a lock and checks its state on each increment, which costs more than the rest of a
delivery. Rarer events (failures, retries, dead letters) use ordinary instruments.

Label values are bounded: topics and subscription ids come from outside (a webhook's path, a bus
client's subscription), and one sample per value would let ``/metrics`` grow without end. The
first ``max_topics`` topics (``max_subscriptions`` subscriptions) keep a label of their own; any
later one is counted under ``"<other>"``, so totals stay right. No topic can be named so (``>``
is not allowed in a topic), so the bucket never mixes with a real topic's figures. Mapping a value to its label is a
dict lookup, the only cost the hot path pays for the bound.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

#: The label of every topic or subscription beyond the bound; never a topic's name.
OTHER = "<other>"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Level:
    """A gauge kept as a plain integer (deliveries in flight)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class Labels:
    """Label values for one label name: their own for the first ``limit`` seen, then ``OTHER``."""

    __slots__ = ("_limit", "own")

    def __init__(self, limit: int) -> None:
        #: The values with a label of their own (read directly on the hot path).
        self.own: dict[str, str] = {}
        self._limit = limit

    def __call__(self, value: str) -> str:
        label = self.own.get(value)
        if label is None:
            if len(self.own) >= self._limit:
                return OTHER  # not remembered: the map stays bounded too
            label = self.own[value] = value
        return label


class _Latency:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == float("inf") else str(bound), float(cumulative)))
        return out


class Metrics:
    """What callboard counts; ``exposition()`` renders it in Prometheus text format."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_topics: int = 200,
        max_subscriptions: int = 200,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        #: The label of a topic, and of a subscription (``OTHER`` beyond the bound).
        self.topic_label = Labels(max_topics)
        self.subscription_label = Labels(max_subscriptions)
        self._topics = self.topic_label.own
        self.ingress: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.published: defaultdict[str, int] = defaultdict(int)
        self.delivered: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.latency: dict[str, _Latency] = {}
        self.in_flight = Level()
        r.register(_HotPath(self))
        self.duplicates = Counter(
            "callboard_events_duplicate",
            "Redeliveries recognised by their delivery id and published only once.",
            ["topic"],
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
        self.broker_up = Gauge(
            "callboard_broker_up",
            "1 when the broker answered the last scrape's questions, 0 when it did not.",
            registry=r,
        )
        self.backlog = Gauge(
            "callboard_subscription_backlog",
            "Events a subscription has not been handed yet (its lag).",
            ["subscription"],
            registry=r,
        )
        self.subscription_in_flight = Gauge(
            "callboard_subscription_in_flight",
            "Events handed to a subscription's consumers and not yet acknowledged.",
            ["subscription"],
            registry=r,
        )
        self.lost = Gauge(
            "callboard_subscription_lost",
            "Events retention deleted before the subscription received them.",
            ["subscription"],
            registry=r,
        )
        self.running = Gauge(
            "callboard_subscription_running",
            "1 while this process consumes the subscription, 0 once its consumers stopped by "
            "themselves (the broker no longer has its group: it was deleted).",
            ["subscription"],
            registry=r,
        )
        self.oldest_unacked = Gauge(
            "callboard_subscription_oldest_unacked_seconds",
            "Age of the oldest event this process is handling (or holding for a retry) for the "
            "subscription, from its first attempt; 0 when idle.",
            ["subscription"],
            registry=r,
        )

        self.push = PushMetrics(r, max_targets=max_subscriptions)
        self.bridges = BridgeMetrics(r, max_bridges=max_subscriptions)

    def count_ingress(self, topic: str, status: int) -> None:
        self.ingress[self.topic_label(topic), status] += 1

    def count_published(self, topic: str) -> None:
        self.published[self.topic_label(topic)] += 1

    def count_delivered(self, subscription: str, topic: str, seconds: float) -> None:
        """Count a delivery; ``subscription`` is already a label (``subscription_label``)."""
        # The lookup inline: calling ``topic_label`` costs more than the rest of this method.
        label = self._topics.get(topic) or self.topic_label(topic)
        self.delivered[subscription, label] += 1
        latency = self.latency.get(subscription)
        if latency is None:
            latency = self.latency[subscription] = _Latency()
        latency.observe(seconds)

    def set_per_subscription(
        self,
        gauge: Gauge,
        values: Iterable[tuple[str, float]],
        combine: Callable[[float, float], float] = operator.add,
    ) -> None:
        """Replace every sample of ``gauge`` by one per subscription label.

        Subscriptions beyond the bound share ``OTHER``, their values combined (summed, or for
        an age the largest); subscriptions no longer listed lose their sample.
        """
        samples: dict[str, float] = {}
        for subscription, value in values:
            label = self.subscription_label(subscription)
            known = samples.get(label)
            samples[label] = value if known is None else combine(known, value)
        gauge.clear()
        for label, value in samples.items():
            gauge.labels(label).set(value)

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PushMetrics:
    """Push subscriptions' figures, per target (bounded as subscriptions are): requests by
    outcome, their duration, and the state of each target's circuit breaker."""

    #: Every outcome a push is counted under; a fixed set, so the label stays bounded.
    OUTCOMES = ("delivered", "rejected", "failed", "timeout", "unreachable", "circuit_open")

    def __init__(self, registry: CollectorRegistry, *, max_targets: int = 200) -> None:
        #: The label of a target's name (``OTHER`` beyond the bound).
        self.target_label = Labels(max_targets)
        self.requests = Counter(
            "callboard_push_requests",
            "Push deliveries by target and outcome: delivered (2xx), rejected (4xx), failed "
            "(5xx), timeout, unreachable, circuit_open (not sent: the breaker is open).",
            ["target", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "callboard_push_duration_seconds",
            "Time from sending a push request to its answer (or its failure).",
            ["target"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.breaker = Gauge(
            "callboard_push_breaker_state",
            "A push target's circuit breaker: 0 closed, 1 half-open (one trial), 2 open.",
            ["target"],
            registry=registry,
        )


class BridgeMetrics:
    """Inbound bridges' figures, per instance (named as its dead letters are, and bounded as
    subscriptions are): messages by outcome, failures to receive or connect, and whether each
    is connected. Outbound bridges are subscriptions: the delivery metrics count them."""

    #: Every outcome a message is counted under; a fixed set, so the label stays bounded.
    OUTCOMES = ("stored", "duplicate", "dead_letter")

    def __init__(self, registry: CollectorRegistry, *, max_bridges: int = 200) -> None:
        #: The label of an instance's name (``OTHER`` beyond the bound).
        self.bridge_label = Labels(max_bridges)
        self.messages = Counter(
            "callboard_bridge_messages",
            "Messages an inbound bridge took in, by outcome: stored (published), duplicate (a "
            "redelivery the broker already had), dead_letter (never publishable; kept as a "
            "dead letter).",
            ["bridge", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "callboard_bridge_failures",
            "Times an inbound bridge failed to receive from, or connect to, the outside system.",
            ["bridge"],
            registry=registry,
        )
        self.connected = Gauge(
            "callboard_bridge_connected",
            "1 while an inbound bridge is connected to the outside system, 0 when it is not.",
            ["bridge"],
            registry=registry,
        )

    def meter(self, bridge: str) -> BridgeMeter:
        """The meter of one inbound bridge instance (``extensions.InletMeter``)."""
        return BridgeMeter(self, self.bridge_label(bridge))


class BridgeMeter:
    """One inbound bridge instance's samples, looked up once."""

    __slots__ = ("_connected", "_dead", "_duplicate", "_failures", "_stored")

    def __init__(self, metrics: BridgeMetrics, label: str) -> None:
        self._stored = metrics.messages.labels(label, "stored")
        self._duplicate = metrics.messages.labels(label, "duplicate")
        self._dead = metrics.messages.labels(label, "dead_letter")
        self._failures = metrics.failures.labels(label)
        self._connected = metrics.connected.labels(label)

    def stored(self, accepted: bool) -> None:
        (self._stored if accepted else self._duplicate).inc()

    def dead_lettered(self) -> None:
        self._dead.inc()

    def failed(self) -> None:
        self._failures.inc()

    def connected(self, now: bool) -> None:
        self._connected.set(1 if now else 0)


class _HotPath(Collector):
    """Renders the plain counters of ``Metrics`` at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield _counter(
            "callboard_ingress_requests",
            "HTTP ingress requests by topic and response status.",
            ["topic", "status"],
            (([topic, str(status)], n) for (topic, status), n in list(m.ingress.items())),
        )
        yield _counter(
            "callboard_events_published",
            "Events accepted by the broker.",
            ["topic"],
            (([topic], n) for topic, n in list(m.published.items())),
        )
        yield _counter(
            "callboard_events_delivered",
            "Events handled successfully by a subscriber.",
            ["subscription", "topic"],
            (([sub, topic], n) for (sub, topic), n in list(m.delivered.items())),
        )
        latency = HistogramMetricFamily(
            "callboard_delivery_latency_seconds",
            "Time from an event's creation to the end of its successful handling.",
            labels=["subscription"],
        )
        for sub, histogram in list(m.latency.items()):
            latency.add_metric([sub], histogram.buckets(), histogram.total)
        yield latency
        yield GaugeMetricFamily(
            "callboard_deliveries_in_flight",
            "Deliveries being handled right now.",
            value=m.in_flight.value,
        )

    def describe(self) -> Iterable[Metric]:
        return ()


def _counter(
    name: str, documentation: str, labels: list[str], samples: Iterable[tuple[list[str], int]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in samples:
        family.add_metric(values, count)
    return family
