"""Sessions in interleaved rounds, their medians, and the ratio of one server to another.

``interleave`` runs every (server, store) session once a round, the servers in turn within each
store, their order reversed every other round (A B, B A, ...), so a drift of the machine hits
every server alike; each session starts on a fresh store (``session.measure``). ``summarise``
takes each (server, store)'s medians over the rounds; ``print_table`` and ``print_ratios`` show
them as Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from session import Measured, Options, Server, measure

RESULTS = Path(__file__).resolve().parent / "results"


def load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load of every session: how long, how many rounds, how many connections."""
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="seconds of load before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)


@dataclass(frozen=True)
class Summary:
    """One (server, store)'s medians over the rounds."""

    server: Server
    store: str
    rounds: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float | None
    pg_cpu_us: float | None
    pg_server_cpu_us: float | None
    wal_bytes: float | None
    requests_per_commit: float | None
    pg_cpu_us_per_commit: float | None
    #: Sessions in which every accepted event reached the subscription exactly once.
    exactly_once: int
    accepted: int


def interleave(
    servers: Sequence[Server], stores: Sequence[str], rounds: int, options: Options
) -> list[Measured]:
    done: list[Measured] = []
    for n in range(rounds):
        order = list(servers) if n % 2 == 0 else list(reversed(servers))
        for store in stores:
            for server in order:
                measured = measure(server, store, options)
                done.append(measured)
                print(
                    f"round {n + 1} {store} {server.label}: {measured.req_per_s:,.0f} req/s, "
                    f"p99 {measured.p99_ms:.1f} ms, CPU {_fmt(measured.cpu_us)} µs/request, "
                    f"{measured.deliveries.summary()}",
                    flush=True,
                )
    return done


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(done: Sequence[Measured]) -> list[Summary]:
    groups: dict[tuple[Server, str], list[Measured]] = {}
    for measured in done:
        groups.setdefault((measured.server, measured.store), []).append(measured)
    summaries = []
    for (server, store), runs in groups.items():

        def med(figure: Callable[[Measured], float | None], runs: list[Measured] = runs) -> float:
            return _median([figure(r) for r in runs]) or 0.0

        summaries.append(
            Summary(
                server=server,
                store=store,
                rounds=len(runs),
                req_per_s=med(lambda r: r.req_per_s),
                p50_ms=med(lambda r: r.p50_ms),
                p99_ms=med(lambda r: r.p99_ms),
                errors=sum(r.errors for r in runs),
                cpu_us=_median([r.cpu_us for r in runs]),
                pg_cpu_us=_median([r.pg_cpu_us for r in runs]),
                pg_server_cpu_us=_median([r.pg_server_cpu_us for r in runs]),
                wal_bytes=_median([r.wal_bytes_per_request for r in runs]),
                requests_per_commit=_median([r.requests_per_commit for r in runs]),
                pg_cpu_us_per_commit=_median([r.pg_cpu_us_per_commit for r in runs]),
                exactly_once=sum(r.deliveries.exactly_once for r in runs),
                accepted=sum(r.deliveries.accepted for r in runs),
            )
        )
    return summaries


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(summaries: Sequence[Summary]) -> None:
    postgres = any(s.pg_cpu_us is not None for s in summaries)
    head = "| store | server | req/s | p50 ms | p99 ms | errors | CPU µs/request |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if postgres:
        head += (
            " PG CPU µs/request | PG server CPU µs/request | WAL B/request | requests/commit"
            " | PG CPU µs/commit |"
        )
        rule += "---:|---:|---:|---:|---:|"
    print(head + " exactly once |")
    print(rule + "---|")
    for s in summaries:
        line = (
            f"| {s.store} | {s.server.label} | {s.req_per_s:,.0f} | {s.p50_ms:.2f} | "
            f"{s.p99_ms:.2f} | {s.errors} | {_fmt(s.cpu_us)} |"
        )
        if postgres:
            line += (
                f" {_fmt(s.pg_cpu_us)} | {_fmt(s.pg_server_cpu_us)} | {_fmt(s.wal_bytes)} | "
                f"{_fmt(s.requests_per_commit, 1)} | "
                f"{_fmt(s.pg_cpu_us_per_commit)} |"
            )
        once = "yes" if s.exactly_once == s.rounds else "NO"
        print(f"{line} {once}: {s.exactly_once} of {s.rounds} sessions, {s.accepted:,} events |")


def print_ratios(summaries: Sequence[Summary], top: Server, bottom: Server) -> None:
    """Per store, ``top`` / ``bottom`` of the medians: req/s, p99, CPU per request."""
    print(f"\n| store | {top.label} / {bottom.label}: req/s | p99 | CPU per request |")
    print("|---|---:|---:|---:|")
    by_key = {(s.server, s.store): s for s in summaries}
    for store in dict.fromkeys(s.store for s in summaries):
        a, b = by_key.get((top, store)), by_key.get((bottom, store))
        if a is None or b is None:
            continue
        cpu = f"{a.cpu_us / b.cpu_us:.2f}" if a.cpu_us and b.cpu_us else "-"
        rate = a.req_per_s / b.req_per_s if b.req_per_s else 0.0
        p99 = a.p99_ms / b.p99_ms if b.p99_ms else 0.0
        print(f"| {store} | {rate:.2f} | {p99:.2f} | {cpu} |")


def save(name: str, args: dict[str, object], done: Sequence[Measured]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    sessions = [
        {**asdict(m), "server": m.server.label, "deliveries": m.deliveries.summary()} for m in done
    ]
    path.write_text(json.dumps({"args": args, "sessions": sessions}, indent=2, default=str))
    return path
