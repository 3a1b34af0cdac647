"""A counting subscriber for the benchmarks, loaded as a module (``events.load: [counter:module]``).

It subscribes to the benchmark topics and does nothing but count; the counts are read from
``/metrics`` (``callboard_events_delivered_total``), so the benchmark can check that every
accepted request reached the subscriber.

With ``BENCH_DELIVERIES`` naming a directory, it also writes the id of every event it handles,
one line ``<subscription> <event id>`` each, to a file of its own process in that directory
(``<pid>-<n>.ids``), so a benchmark can check across the worker processes of one server that each
event reached the subscription once and only once (``bench/tally.py``). The file is buffered,
flushed when the application stops and closed when the process exits.
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import TextIO

from callboard import Event, ModuleContext, module

TOPICS = tuple(os.environ.get("BENCH_TOPICS", "plain,github.push").split(","))
SUBSCRIPTION = "bench-counter"


async def count(event: Event) -> None:
    return None


class Recorder:
    """Writes ``<subscription> <event id>`` for every event handled, to this process's file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file: TextIO | None = None  # opened by the first event: a process that serves

    async def __call__(self, event: Event) -> None:
        if self.file is None:
            path = self.directory / f"{os.getpid()}-{id(self)}.ids"
            self.file = path.open("a", buffering=1 << 20)
            atexit.register(self.file.close)
        self.file.write(f"{SUBSCRIPTION} {event.id}\n")

    async def flush(self) -> None:
        if self.file is not None:
            self.file.flush()


@module("bench-counter")
def register(context: ModuleContext) -> None:
    directory = os.environ.get("BENCH_DELIVERIES")
    if not directory:
        context.subscribers.add_subscription(SUBSCRIPTION, TOPICS, count)
        return
    recorder = Recorder(Path(directory))
    context.subscribers.add_subscription(SUBSCRIPTION, TOPICS, recorder)
    context.lifecycle.on_stop(recorder.flush)
