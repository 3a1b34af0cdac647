"""callboard's application for granian, to compare HTTP servers on callboard's own ingress.

    CALLBOARD_BENCH_CONFIG=callboard.yaml PYTHONPATH=bench \\
        granian --interface asgi --factory granian_app:create

The same application ``callboard serve`` runs (``callboard.app.create_app``), built from the
configuration file ``CALLBOARD_BENCH_CONFIG`` names, with the same logging; granian runs its
lifespan (the broker, the subscriptions, the modules' hooks). As ``serve`` does once started, the
garbage collector is tuned for serving (``callboard.gc_tuning``) when the lifespan's start-up has
completed. What stays ``serve``'s own: its HTTP protocol and the bounds of ``backend.server``,
which granian replaces with its own, and the workers of ``backend.workers`` (granian's
``--workers`` instead).

granian is not a dependency of callboard: ``pip install granian`` to run this.
"""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from callboard.app import create_app
from callboard.config import load_config
from callboard.gc_tuning import tune_for_serving
from callboard.logs import configure_logging


def create() -> ASGIApp:
    """The ASGI application of the configuration ``CALLBOARD_BENCH_CONFIG`` names."""
    path = os.environ.get("CALLBOARD_BENCH_CONFIG")
    config = load_config([path] if path else [])
    configure_logging(config.logging.level, config.logging.format)
    app = create_app(config)

    async def served(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                tune_for_serving()
            await send(message)

        await app(scope, receive, started)

    return served
