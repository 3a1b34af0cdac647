"""A module's subscriptions stop before its stop hooks run: an outbound bridge's handler still
sending when the server stops finishes with its producer open."""

from __future__ import annotations

import asyncio

from callboard import Event, ModuleContext, module
from callboard.app import build
from callboard.config import Config


async def test_a_handler_in_progress_finishes_before_the_stop_hook_closes_its_resource() -> None:
    steps: list[str] = []
    started = asyncio.Event()

    @module("outbound")
    def outbound(context: ModuleContext) -> None:
        async def send(event: Event) -> None:
            started.set()
            await asyncio.sleep(0.2)  # the delivery under way when the server stops
            steps.append(f"sent {event.payload}")

        async def close_producer() -> None:
            steps.append("producer closed")

        context.subscribers.add_subscription("outbound.send", "orders", send)
        context.lifecycle.on_stop(close_producer)

    board = build(Config(), modules=[outbound], use_entry_points=False)
    await board.start()
    await board.events.publish(Event(topic="orders", payload=1))
    await asyncio.wait_for(started.wait(), 5)
    await board.stop()
    assert steps == ["sent 1", "producer closed"]
