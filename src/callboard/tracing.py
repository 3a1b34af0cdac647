"""OpenTelemetry spans for webhooks, publishes and deliveries: the ``tracing`` extra.

The only module that imports ``opentelemetry``, and only when ``backend.tracing.enabled`` asks
for it. Spans go to the globally configured ``TracerProvider`` (set by the embedding
application, or by ``opentelemetry-instrument`` from the ``OTEL_*`` environment variables).

The trace travels in the event's metadata as W3C Trace Context (``traceparent``, ``tracestate``):
a webhook that carries ``traceparent`` continues its sender's trace; the publish span is a child
of the request span; each call of a handler is a span whose parent is the publish span, in this
process or another one reading the same broker.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from callboard.events import Event, MetadataValue
from callboard.service import Handler
from callboard.spans import TRACEPARENT, TRACESTATE, Answered

_PROPAGATOR = TraceContextTextMapPropagator()
_SYSTEM = "callboard"


class OpenTelemetryTracer:
    """A ``callboard.spans.Tracer`` over an OpenTelemetry tracer."""

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        try:
            version: str | None = metadata.version("callboard")
        except metadata.PackageNotFoundError:
            version = None
        self._tracer = trace.get_tracer("callboard", version, tracer_provider=provider)

    @contextmanager
    def request(
        self, method: str, route: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> Iterator[Answered]:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in headers
            if name in (b"traceparent", b"tracestate")
        }
        parent = _PROPAGATOR.extract(carrier) if TRACEPARENT in carrier else None
        with self._tracer.start_as_current_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        ) as span:

            def answered(status: int) -> None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"answered {status}"))

            yield answered

    @contextmanager
    def publish(self, event: Event) -> Iterator[Event]:
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = _carried(event)  # published outside any span: continue what it carries
        with self._tracer.start_as_current_span(
            f"publish {event.topic}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "send",
                "messaging.destination.name": event.topic,
                "messaging.message.id": event.id,
            },
        ):
            metadata: dict[str, MetadataValue] = {
                key: value for key, value in event.metadata.items() if key != TRACESTATE
            }
            _PROPAGATOR.inject(metadata)
            yield Event.restore(event.topic, event.payload, metadata, event.id, event.time)

    def handler(self, subscription: str, handler: Handler) -> Handler:
        tracer = self._tracer

        async def traced(event: Event) -> None:
            with tracer.start_as_current_span(
                f"process {event.topic}",
                # An event without a trace starts one: never the subscription task's context.
                context=_carried(event) or Context(),
                kind=SpanKind.CONSUMER,
                attributes={
                    "messaging.system": _SYSTEM,
                    "messaging.operation.type": "process",
                    "messaging.destination.name": event.topic,
                    "messaging.consumer.group.name": subscription,
                    "messaging.message.id": event.id,
                },
            ):
                await handler(event)

        return traced


def _carried(event: Event) -> Context | None:
    """The trace context an event carries in its metadata, if any."""
    traceparent = event.header(TRACEPARENT)
    if not traceparent:
        return None
    carrier = {TRACEPARENT: traceparent}
    tracestate = event.header(TRACESTATE)
    if tracestate:
        carrier[TRACESTATE] = tracestate
    return _PROPAGATOR.extract(carrier)


def provider_is_set() -> bool:
    """Whether a ``TracerProvider`` was set globally (without one, spans go nowhere)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
