"""A module that ``callboard serve`` processes under test load through ``events.load``.

Its section, ``events.modules.instance``, says where to record deliveries and how to open the
broker:

- ``record``: a file to which every delivery appends one line, ``<subscription> <n> <pid>
  <phase>`` (``n`` is the event's ``payload["n"]``), with one ``O_APPEND`` write, so the test can
  count deliveries across processes, and across a process killed at any moment.
- ``broker``: the broker URL, opened as ``events.broker`` would be, then given the short
  ``lease`` and ``poll`` intervals (seconds) that keep crash tests fast.
- ``release``: a file; the ``slow`` subscription records ``start``, then waits until this file
  exists before it records ``done`` and returns, so a test can kill the process in the middle of
  a handler.

Subscriptions: ``A`` and ``B`` on ``jobs`` record ``done``; ``slow`` on ``slow`` as above.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from callboard import Event, ModuleContext, module
from callboard.brokers import open_broker
from callboard.brokers.base import Broker


def record(path: Path, subscription: str, event: Event, phase: str) -> None:
    line = f"{subscription} {event.payload['n']} {os.getpid()} {phase}\n".encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def tuned_broker(url: str, lease: float, poll: float) -> Broker:
    broker = open_broker(url)
    # Both durable brokers keep these as plain attributes, read when consumers are created.
    for name, value in (("lease", lease), ("poll_interval", poll), ("fallback_poll", poll)):
        if hasattr(broker, name):
            setattr(broker, name, value)
    return broker


@module("instance")
def instance(context: ModuleContext) -> None:
    section = context.config
    path = Path(section["record"])
    release = Path(section["release"]) if "release" in section else None
    url = str(section["broker"])
    lease, poll = float(section.get("lease", 2.0)), float(section.get("poll", 0.1))
    context.broker.set_broker(lambda: tuned_broker(url, lease, poll))

    def recorder(subscription: str) -> Callable[[Event], Awaitable[None]]:
        async def on_event(event: Event) -> None:
            record(path, subscription, event, "done")

        return on_event

    async def slow(event: Event) -> None:
        record(path, "slow", event, "start")
        while release is not None:
            if release.exists():
                break
            await asyncio.sleep(0.02)
        record(path, "slow", event, "done")

    context.subscribers.add_subscription("A", "jobs", recorder("A"))
    context.subscribers.add_subscription("B", "jobs", recorder("B"))
    context.subscribers.add_subscription("slow", "slow", slow)
