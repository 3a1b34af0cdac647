"""A counting subscriber for the benchmarks, loaded as a module (``events.load: [counter:module]``).

It subscribes to the benchmark topics and does nothing but count; the counts are read from
``/metrics`` (``callboard_events_delivered_total``), so the benchmark can check that every
accepted request reached the subscriber.
"""

from __future__ import annotations

import os

from callboard import Event, ModuleContext, module

TOPICS = tuple(os.environ.get("BENCH_TOPICS", "plain,github.push").split(","))


async def count(event: Event) -> None:
    return None


@module("bench-counter")
def register(context: ModuleContext) -> None:
    context.subscribers.add_subscription("bench-counter", TOPICS, count)
