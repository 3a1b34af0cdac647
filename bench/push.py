#!/usr/bin/env python3
"""Push subscriptions: signed pushes/s from one callboard process to a local receiver.

The receiver runs in a process of its own: uvicorn with a raw ASGI app that checks each
request's Standard Webhooks signature (``webhook-signature`` over ``id.timestamp.body``, with
the standard library's HMAC) and answers ``204``; it counts what it took and what it refused.

For each broker, in this process: a member of the push target's group holds it while
``--events`` events are published (so they wait for the target), then callboard starts
(``callboard.build`` with ``events.push.bench``: the real push path, signing, rate limit off,
circuit breaker on) and the time to push every event to the receiver is taken, until callboard
counts every push as delivered. The receiver must have taken each one, signature checked.
Rounds alternate the brokers; the table shows the median of the rounds.

    python bench/push.py                          # memory and sqlite, 20,000 events, 3 rounds
    python bench/push.py --brokers sqlite --events 50000 --concurrency 8
    python bench/push.py --rounds 1 --events 5000     # a quick look

SQLite uses a file in a temporary directory, one per round. More requests in flight is not
faster here: on a 2-core machine 16 gave the most pushes/s and the least CPU per push, 64 and
128 less and more (more connections for one receiver to serve, fewer requests handled per turn
of the event loop); callboard runs on uvloop, as ``callboard serve`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

TOPIC = "bench.push"
TARGET = "bench"
SECRET = "whsec_" + base64.b64encode(b"callboard-push-benchmark-key-32b").decode()


# -- the receiver, in its own process ------------------------------------------------------------


class Receiver:
    """A raw ASGI app: check the signature of each POST, answer 204; ``GET /count`` tells."""

    def __init__(self, secret: str) -> None:
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.taken = 0
        self.refused = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            body = json.dumps({"taken": self.taken, "refused": self.refused}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        signed = b"%s.%s.%s" % (
            headers.get(b"webhook-id", b""),
            headers.get(b"webhook-timestamp", b""),
            b"".join(chunks),
        )
        expected = b"v1," + base64.b64encode(hmac.digest(self.key, signed, "sha256"))
        if hmac.compare_digest(expected, headers.get(b"webhook-signature", b"")):
            self.taken += 1
            status = 204
        else:
            self.refused += 1
            status = 401
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def serve_receiver(port: int) -> None:
    import uvicorn

    uvicorn.run(
        Receiver(SECRET),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="httptools",
        loop="uvloop",
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def receiver_counts(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as answer:
        counts: dict[str, int] = json.loads(answer.read())
        return counts


@asynccontextmanager
async def receiver_process() -> AsyncIterator[int]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--receiver", str(port)
    )
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise SystemExit("the receiver did not start")
        yield port
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


# -- callboard, in this process -------------------------------------------------------------------


def broker_url(kind: str, workdir: Path) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{workdir / (uuid.uuid4().hex + '.db')}"
    raise SystemExit(f"unknown broker {kind!r}: memory or sqlite")


async def one_round(
    kind: str, workdir: Path, port: int, count: int, concurrency: int
) -> dict[str, float]:
    from callboard import Event
    from callboard.app import build
    from callboard.brokers import open_broker
    from callboard.config import parse_config

    config = parse_config(
        {
            "events": {
                "broker": broker_url(kind, workdir),
                "push": {
                    TARGET: {
                        "url": f"http://127.0.0.1:{port}/hooks",
                        "topics": [TOPIC],
                        "secret": SECRET,
                        "concurrency": concurrency,
                    }
                },
            }
        }
    )
    broker = open_broker(config.events.broker)
    await broker.start()
    # A member that never fetches keeps the group while the events are published.
    holder = await broker.consume("push." + TARGET, [TOPIC])
    before = receiver_counts(port)["taken"]
    began = time.perf_counter()
    for first in range(0, count, 500):
        await asyncio.gather(
            *(
                broker.publish(Event(topic=TOPIC, payload={"n": n, "kind": "invoice.paid"}))
                for n in range(first, min(count, first + 500))
            )
        )
    published = time.perf_counter() - began
    board = build(config, broker=broker, use_entry_points=False)
    registry = board.metrics.registry
    labels = {"target": TARGET, "outcome": "delivered"}
    cpu = time.process_time()
    began = time.perf_counter()
    await board.start()
    while True:  # the figures callboard keeps: the end of the run is what they say
        if (registry.get_sample_value("callboard_push_requests_total", labels) or 0) >= count:
            break
        await asyncio.sleep(0.005)
    pushed = time.perf_counter() - began
    cpu = time.process_time() - cpu
    await holder.close()
    await board.stop()
    counts = receiver_counts(port)
    return {
        "pushes_per_s": count / pushed,
        "publish_per_s": count / published,
        "cpu_us_per_push": cpu / count * 1e6,
        "taken": counts["taken"] - before,
        "refused": counts["refused"],
    }


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    kinds = [k.strip() for k in args.brokers.split(",") if k.strip()]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="callboard-push-") as tmp:
        async with receiver_process() as port:
            for _ in range(args.rounds):
                for kind in kinds:  # in turn, so a drift of the machine hits all alike
                    results[kind].append(
                        await one_round(kind, Path(tmp), port, args.events, args.concurrency)
                    )
    rows: list[dict[str, object]] = []
    for kind in kinds:
        rs = results[kind]
        rows.append(
            {
                "broker": kind,
                "events": args.events,
                "concurrency": args.concurrency,
                "pushes_per_s": round(statistics.median(r["pushes_per_s"] for r in rs)),
                "cpu_us_per_push": round(statistics.median(r["cpu_us_per_push"] for r in rs)),
                "all_taken": all(r["taken"] == args.events for r in rs),
                "refused": max(r["refused"] for r in rs),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--brokers", default="memory,sqlite", help="memory and/or sqlite")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=16, help="the target's requests in flight"
    )
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="callboard's event loop"
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.receiver is not None:
        serve_receiver(args.receiver)
        return 0
    if args.loop == "uvloop":
        import uvloop  # what ``callboard serve`` runs on (uvicorn's loop="auto")

        rows = uvloop.run(run(args))
    else:
        rows = asyncio.run(run(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    stamp = time.strftime("%Y-%m-%d %H:%M")
    print(
        f"{stamp}: one push target (concurrency {args.concurrency}), signed JSON POSTs to a "
        f"receiver in its own process, {args.events:,} events, median of {args.rounds} rounds, "
        f"{args.loop}, {os.cpu_count()} cores\n"
    )
    print("| broker | signed pushes/s | CPU µs per push (callboard) | all taken | refused |")
    print("|---|---:|---:|---|---:|")
    show: Callable[[object], str] = lambda v: f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    for row in rows:
        print(
            f"| {row['broker']} | {show(row['pushes_per_s'])} | {row['cpu_us_per_push']} | "
            f"{'yes' if row['all_taken'] else 'NO'} | {row['refused']} |"
        )
    return 0 if all(r["all_taken"] and not r["refused"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
