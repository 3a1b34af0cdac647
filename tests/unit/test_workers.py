"""The parts of ``serve --workers``: summed metrics, the workers' private line, the socket, the key."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from callboard.cli import _load, _parser
from callboard.config import parse_config
from callboard.errors import ConfigError
from callboard.metrics import Metrics
from callboard.metrics_sum import BROKER_FAMILIES, COMBINE, Part, combine
from callboard.peers import Answerer, Peers
from callboard.workers import free_port, listeners, require_shared_broker


def worker_metrics(requests: int, delivered: int, latency: float, backlog: int) -> Metrics:
    metrics = Metrics()
    for _ in range(requests):
        metrics.count_ingress("jobs", 202)
    for _ in range(delivered):
        metrics.count_delivered("A", "jobs", latency)
    metrics.failures.labels("A", "jobs").inc()
    metrics.backlog.labels("A").set(backlog)
    metrics.broker_up.set(1)
    return metrics


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def text(metrics: Metrics) -> str:
    return metrics.exposition()[0].decode()


def test_counters_and_histograms_are_summed_over_the_workers() -> None:
    first, second = worker_metrics(3, 2, 0.003, 7), worker_metrics(5, 4, 0.2, 9)
    summed = samples(combine(Part(0, text(first)), [Part(1, text(second))]))

    assert summed["callboard_ingress_requests_total", (("status", "202"), ("topic", "jobs"))] == 8
    delivered = (("subscription", "A"), ("topic", "jobs"))
    assert summed["callboard_events_delivered_total", delivered] == 6
    assert summed["callboard_handler_failures_total", delivered] == 2
    latency = "callboard_delivery_latency_seconds"
    assert summed[f"{latency}_count", (("subscription", "A"),)] == 6
    assert summed[f"{latency}_bucket", (("le", "0.005"), ("subscription", "A"))] == 2
    assert summed[f"{latency}_bucket", (("le", "+Inf"), ("subscription", "A"))] == 6
    assert summed[f"{latency}_sum", (("subscription", "A"),)] == pytest.approx(0.006 + 0.8)


def test_the_broker_figures_are_the_answering_workers_not_a_sum() -> None:
    first, second = worker_metrics(1, 0, 0, 7), worker_metrics(1, 0, 0, 9)
    second.broker_up.set(0)

    summed = samples(combine(Part(1, text(second)), [Part(0, text(first))]))

    assert summed["callboard_subscription_backlog", (("subscription", "A"),)] == 9
    assert summed["callboard_broker_up", ()] == 0


def test_a_subscription_runs_only_if_every_worker_consumes_it_and_ages_take_the_oldest() -> None:
    first, second = Metrics(), Metrics()
    first.running.labels("A").set(1)
    second.running.labels("A").set(0)
    first.oldest_unacked.labels("A").set(3)
    second.oldest_unacked.labels("A").set(12)
    first.failures.labels("A", "jobs").inc()
    second.failures.labels("A", "jobs").inc()

    summed = samples(combine(Part(0, text(first)), [Part(1, text(second))]))

    assert summed["callboard_subscription_running", (("subscription", "A"),)] == 0
    assert summed["callboard_subscription_oldest_unacked_seconds", (("subscription", "A"),)] == 12
    created = summed[
        "callboard_handler_failures_created", (("subscription", "A"), ("topic", "jobs"))
    ]
    assert created == min(
        sample.value
        for metrics in (first, second)
        for family in text_string_to_metric_families(text(metrics))
        for sample in family.samples
        if sample.name == "callboard_handler_failures_created"
    )


def test_each_worker_is_reported_and_one_that_did_not_answer_is_down() -> None:
    first, second = worker_metrics(4, 0, 0, 0), worker_metrics(6, 0, 0, 0)

    summed = samples(combine(Part(0, text(first)), [Part(1, text(second)), Part(2, None)]))

    assert summed["callboard_ingress_requests_total", (("status", "202"), ("topic", "jobs"))] == 10
    assert summed["callboard_worker_ingress_requests_total", (("worker", "0"),)] == 4
    assert summed["callboard_worker_ingress_requests_total", (("worker", "1"),)] == 6
    assert ("callboard_worker_ingress_requests_total", (("worker", "2"),)) not in summed
    up = {
        labels: value for (name, labels), value in summed.items() if name == "callboard_worker_up"
    }
    assert up == {(("worker", "0"),): 1, (("worker", "1"),): 1, (("worker", "2"),): 0}


def test_the_families_combined_by_name_are_those_metrics_exposes() -> None:
    exposed = {family.name for family in text_string_to_metric_families(text(Metrics()))}

    assert exposed >= BROKER_FAMILIES | set(COMBINE)


async def test_siblings_answer_each_other_and_a_missing_one_is_reported(tmp_path: Path) -> None:
    workers = [Peers(tmp_path, index, 3, timeout=1) for index in range(2)]  # worker 2 is down

    def answerer(index: int) -> Answerer:
        async def answer(question: str) -> tuple[int, bytes]:
            return (200, f"{question} from {index}".encode())

        return answer

    for index, peers in enumerate(workers):
        await peers.start(answerer(index))
    try:
        answers = await workers[0].ask("metrics")
    finally:
        for peers in workers:
            await peers.close()

    assert [(a.worker, a.status, a.body) for a in answers] == [
        (1, 200, b"metrics from 1"),
        (2, None, b""),
    ]
    assert os.listdir(tmp_path) == []  # each worker's socket went with it


async def test_a_sibling_too_slow_to_answer_counts_as_not_answering(tmp_path: Path) -> None:
    asker, slow = Peers(tmp_path, 0, 2, timeout=0.2), Peers(tmp_path, 1, 2, timeout=5)
    never = asyncio.Event()

    async def answer(question: str) -> tuple[int, bytes]:
        await never.wait()
        return 200, b""

    await slow.start(answer)
    try:
        assert [(a.worker, a.status) for a in await asker.ask("ready")] == [(1, None)]
    finally:
        never.set()
        await slow.close()


def test_worker_sockets_share_a_port_and_a_listener_there_makes_it_busy() -> None:
    port = free_port("127.0.0.1", 0)
    first, second = listeners("127.0.0.1", port), listeners("127.0.0.1", port)
    try:
        for sock in (*first, *second):
            sock.listen()
        assert {s.getsockname()[1] for s in (*first, *second)} == {port}
        with pytest.raises(ConfigError) as raised:
            free_port("127.0.0.1", port)
    finally:
        for sock in (*first, *second):
            sock.close()

    assert raised.value.path == "backend.listen"
    assert f"cannot listen on 127.0.0.1:{port}" in str(raised.value)


def test_a_port_held_without_reuse_port_keeps_workers_out() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(OSError, match="in use"):
            listeners("127.0.0.1", held.getsockname()[1])


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (4, 4), ("3", 3)])
def test_backend_workers_takes_a_count(value: object, expected: int) -> None:
    assert parse_config({"backend": {"workers": value}}).backend.workers == expected


def test_backend_workers_auto_is_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)

    assert parse_config({"backend": {"workers": "auto"}}).backend.workers == 6


@pytest.mark.parametrize("value", [0, "many", -2])
def test_backend_workers_refuses_what_is_not_a_count(value: object) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"backend": {"workers": value}})

    assert raised.value.path == "backend.workers"


def test_the_workers_flag_overrides_the_key(tmp_path: Path) -> None:
    config = tmp_path / "callboard.yaml"
    config.write_text("backend:\n  workers: 3\n", encoding="utf-8")

    assert _load(_parser().parse_args(["serve", "-c", str(config)])).backend.workers == 3
    args = _parser().parse_args(["serve", "-c", str(config), "--workers", "2"])
    assert _load(args).backend.workers == 2
    assert _load(_parser().parse_args(["serve"])).backend.workers == 1


@pytest.mark.parametrize(
    ("broker", "refused"),
    [("memory://", True), ("sqlite:///:memory:", True), ("sqlite:///{dir}/c.db", False)],
)
def test_workers_need_a_broker_shared_by_processes(
    tmp_path: Path, broker: str, refused: bool
) -> None:
    config = parse_config(
        {"backend": {"workers": 2}, "events": {"broker": broker.format(dir=tmp_path)}}
    )
    if not refused:
        require_shared_broker(config)
        return
    with pytest.raises(ConfigError) as raised:
        require_shared_broker(config)

    assert raised.value.path == "backend.workers"
    assert "--workers" in str(raised.value)
    assert "inside one process" in str(raised.value)
