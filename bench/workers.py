#!/usr/bin/env python3
"""``callboard serve`` with one worker and with two, in one run, on SQLite and PostgreSQL.

For each store, round after round, ``callboard serve`` and ``callboard serve --workers 2`` take
turns (the order reversed every other round), each session on a fresh store: a new SQLite file,
a new PostgreSQL schema in the benchmark's own database ``callboard_bench`` (made if missing,
dropped at the end). wrk drives the signed push of ``bench/run.py`` at the topic ``plain``, which
one counting subscription receives (``bench/counter.py``) in every worker, as competing consumers.
Each session (``bench/session.py``) reports requests/s, p50 and p99, the CPU time of the server's
processes (the supervisor and its workers) per accepted request, that every accepted event
reached the subscription exactly once across the workers, and on PostgreSQL the database
server's share: its backends' CPU per request and per commit, and requests per commit.

Then each figure's median over the rounds, and the ratio 2 workers / 1 worker.

    python bench/workers.py                                   # 3 rounds of 10 s
    python bench/workers.py --seconds 3 --rounds 1            # a quick check
    python bench/workers.py --stores sqlite --workers 1,2,4

The memory broker keeps its events in one process, so callboard refuses it with several workers:
``--stores memory`` is skipped with a note. Needs wrk (the Debian package ``wrk``) and, for
PostgreSQL, the database server on this machine (``CALLBOARD_BENCH_PG``, by default
``postgresql://postgres@127.0.0.1:5432``). Results go to ``bench/results/workers-<time>.json``.
"""

from __future__ import annotations

import argparse
import sys

from rounds import interleave, load_arguments, print_ratios, print_table, save, summarise
from run import ensure_wrk
from session import STORES, Options, Server, create_pg_database, drop_pg_database


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (first: base)")
    load_arguments(parser)
    args = parser.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    unknown = set(stores) - set(STORES)
    if unknown:
        parser.error(f"unknown store(s) {', '.join(sorted(unknown))}: choose from {STORES}")
    if "memory" in stores:
        print(
            "memory: skipped; callboard refuses several workers on the memory broker (its "
            "events stay inside one process)\n"
        )
        stores.remove("memory")
    if not stores:
        return 0
    counts = [int(n) for n in args.workers.split(",")]
    servers = [Server("uvicorn", n) for n in counts]
    ensure_wrk()
    options = Options(seconds=args.seconds, warmup=args.warmup, connections=args.connections)
    if "postgresql" in stores:
        create_pg_database()
    try:
        done = interleave(servers, stores, args.rounds, options)
    finally:
        if "postgresql" in stores:
            drop_pg_database()
    summaries = summarise(done)
    print(
        f"\ncallboard serve, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds}s (medians)\n"
    )
    print_table(summaries)
    for server in servers[1:]:
        print_ratios(summaries, server, servers[0])
    print(f"\nsaved to {save('workers', vars(args), done)}")
    return 0 if all(s.exactly_once == s.rounds for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
