"""A module the console's browser tests load into ``callboard serve`` through ``events.load``.

Section ``events.modules.inbox``: ``record``, a file to which the ``inbox`` subscription (on
``plain``) appends one line per event it handles (its id), and ``heal``, a file: while it does
not exist, an event whose payload is ``{"fail": true}`` fails, so it becomes a dead letter.
"""

from __future__ import annotations

from pathlib import Path

from callboard import Event, ModuleContext, module


@module("inbox")
def inbox(context: ModuleContext) -> None:
    record = Path(context.config["record"])
    heal = Path(context.config["heal"])

    def handle(event: Event) -> None:
        if event.payload == {"fail": True} and not heal.exists():
            raise RuntimeError("the inbox refused this event")
        with record.open("a", encoding="utf-8") as file:
            file.write(event.id + "\n")

    async def on_event(event: Event) -> None:
        handle(event)  # a few bytes to a local file: not worth a thread

    context.subscribers.add_subscription("inbox", ["plain"], on_event)
