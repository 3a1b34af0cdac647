#!/usr/bin/env python3
"""HTTP servers on callboard's own ingress: granian against uvicorn, in one run.

The same callboard application, one serving process each, on the same store, under the same wrk
load (``bench/run.py``'s signed push at the topic ``plain``, one counting subscription):

- ``uvicorn``: ``callboard serve``, uvicorn with callboard's own HTTP protocol
  (``callboard.http_protocol``) and the bounds of ``backend.server``;
- ``granian``: ``granian --interface asgi`` serving ``create_app`` with its lifespan
  (``bench/granian_app.py``), one worker, one runtime thread, uvloop as uvicorn has.

For each store (memory, SQLite, PostgreSQL), round after round, the two take turns (the order
reversed every other round), each session on a fresh store (``bench/session.py``): requests/s,
p50 and p99, the CPU time of the server's processes per accepted request (granian's Rust threads
and its supervising process included), that every accepted event reached the subscription
exactly once, and on PostgreSQL the database server's share. Then the medians, and the ratio
granian / uvicorn.

    pip install granian                                   # not a dependency of callboard
    python bench/servers.py                               # 3 rounds of 10 s
    python bench/servers.py --seconds 3 --rounds 1        # a quick check
    python bench/servers.py --stores memory --workers 2   # memory refuses 2 workers: skipped

Needs wrk (the Debian package ``wrk``). Results go to ``bench/results/servers-<time>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from rounds import interleave, load_arguments, print_ratios, print_table, save, summarise
from run import ensure_wrk
from session import STORES, Options, Server, create_pg_database, drop_pg_database


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", default=",".join(STORES), help="memory,sqlite,postgresql")
    parser.add_argument("--workers", type=int, default=1, help="serving processes of each server")
    load_arguments(parser)
    args = parser.parse_args()
    if importlib.util.find_spec("granian") is None:
        raise SystemExit("granian is not installed here: pip install granian")
    stores = [s for s in args.stores.split(",") if s]
    unknown = set(stores) - set(STORES)
    if unknown:
        parser.error(f"unknown store(s) {', '.join(sorted(unknown))}: choose from {STORES}")
    if args.workers > 1 and "memory" in stores:
        print(f"memory: skipped; callboard refuses {args.workers} workers on the memory broker\n")
        stores.remove("memory")
    servers = [Server("uvicorn", args.workers), Server("granian", args.workers)]
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
        f"\ncallboard's application, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds}s (medians)\n"
    )
    print_table(summaries)
    print_ratios(summaries, servers[1], servers[0])
    print(f"\nsaved to {save('servers', vars(args), done)}")
    return 0 if all(s.exactly_once == s.rounds for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
