"""What tracing hooks into: the webhook request, the publish, each call of a handler.

The HTTP ingress, the events service and the subscriptions call a ``Tracer`` when one is
configured (``backend.tracing``), and nothing at all otherwise. ``callboard.tracing`` is the
OpenTelemetry one; the trace travels with the event in its ``traceparent`` metadata (W3C Trace
Context), so a handler in another process continues the trace of the webhook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Protocol

from callboard.events import Event
from callboard.service import Handler

#: The metadata entries that carry a trace from the publisher to the handlers.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

#: Told the HTTP status a request was answered with.
Answered = Callable[[int], None]


class Tracer(Protocol):
    """Spans around the three steps an event goes through."""

    def request(
        self, method: str, route: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> AbstractContextManager[Answered]:
        """Around one webhook request, continuing the trace of its ``traceparent`` header."""
        ...

    def publish(self, event: Event) -> AbstractContextManager[Event]:
        """Around one publish: gives the event to publish, with the trace in its metadata."""
        ...

    def handler(self, subscription: str, handler: Handler) -> Handler:
        """``handler``, each call (each delivery attempt) in a span of its own, continuing the
        trace the event carries."""
        ...
