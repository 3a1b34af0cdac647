"""One ``/metrics`` for a server of several worker processes: their expositions combined.

Every worker counts what it does itself (requests it answered, events it delivered), so the
server's figures are the sums of the workers'. A few are not: the broker's own figures (backlog,
events in flight, lost, whether it answered) are the same whichever worker asks, so they are taken
once, from the worker that answers the scrape; whether a subscription is consumed is the least of
the workers' (0 when one of them stopped consuming it), the age of the oldest unsettled event the
greatest, and a series' creation time the earliest.

Each worker's exposition is read with ``prometheus_client``'s parser and the result is rendered
by its ``generate_latest``, so the output is the same text format a single process serves.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

#: The broker's figures: every worker reads the same ones, so they are taken from one.
BROKER_FAMILIES = frozenset(
    {
        "callboard_broker_up",
        "callboard_subscription_backlog",
        "callboard_subscription_in_flight",
        "callboard_subscription_lost",
    }
)
#: Families combined otherwise than by a sum.
COMBINE: dict[str, Callable[[float, float], float]] = {
    "callboard_subscription_running": min,
    "callboard_subscription_oldest_unacked_seconds": max,
}
#: The family whose per-worker totals say how evenly the kernel spreads connections.
INGRESS_FAMILY = "callboard_ingress_requests"


@dataclass(frozen=True, slots=True)
class Part:
    """One worker's exposition, or ``None`` when it did not answer."""

    worker: int
    text: str | None


def combine(own: Part, siblings: Sequence[Part]) -> bytes:
    """The whole server's exposition: ``own`` (the answering worker's) with its siblings'."""
    parts = sorted((own, *siblings), key=lambda part: part.worker)
    families: dict[str, Metric] = {}
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    per_worker: list[tuple[int, float | None]] = []
    for part in parts:
        if part.text is None:
            per_worker.append((part.worker, None))
            continue
        requests = 0.0
        for family in text_string_to_metric_families(part.text):
            if family.name == INGRESS_FAMILY:
                requests = sum(s.value for s in family.samples if s.name.endswith("_total"))
            if family.name in BROKER_FAMILIES and part is not own:
                continue
            known = families.setdefault(family.name, family)
            into = samples.setdefault(known.name, {})
            how = _how(family.name)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                value = into.get(key)
                into[key] = sample.value if value is None else how(value, sample.value)
        per_worker.append((part.worker, requests))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Combined([*_rebuilt(families, samples), *_workers(per_worker)]))
    return generate_latest(registry)


def _how(name: str) -> Callable[[float, float], float]:
    if name.endswith("_created"):
        return min
    return COMBINE.get(name, operator.add)


def _rebuilt(
    families: dict[str, Metric],
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]],
) -> Iterator[Metric]:
    for name, family in families.items():
        metric = Metric(family.name, family.documentation, family.type, family.unit)
        for (sample_name, labels), value in samples[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        yield metric


def _workers(per_worker: Iterable[tuple[int, float | None]]) -> Iterator[Metric]:
    up = Metric(
        "callboard_worker_up", "1 when the worker answered this scrape, 0 when not.", "gauge"
    )
    requests = Metric(
        "callboard_worker_ingress_requests",
        "HTTP ingress requests each worker answered since it started (how evenly the kernel "
        "spreads connections).",
        "counter",
    )
    for worker, count in per_worker:
        labels = {"worker": str(worker)}
        up.add_sample("callboard_worker_up", labels, 0.0 if count is None else 1.0)
        if count is not None:
            requests.add_sample("callboard_worker_ingress_requests_total", labels, count)
    yield up
    yield requests


class _Combined(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics
