"""One push target at work: the handler of its subscription, which POSTs each event.

A delivery passes the target's circuit breaker (open: it fails at once, asking to be retried
when the cool-down ends), waits for a token of its rate limit, then is encoded (the payload as
JSON, or a CloudEvent), signed with the Standard Webhooks headers and sent. A ``2xx`` answer is
the acknowledgement; anything else raises, so the subscription's retry policy tries again and
in the end moves the event to its dead letters. A ``429`` or ``503`` with ``Retry-After`` asks
the policy to wait that long (``RetryLater``), cut to ``max_retry_after``.

Which failures count against the breaker: timeouts, unreachable endpoints, ``5xx``, ``408`` and
``429``. Another ``4xx`` is about the event, not the endpoint: it is retried and dead-lettered,
and the breaker takes it as an answer. While the breaker's half-open trial is out, the other deliveries
wait in the handler for its outcome rather than fail: a failure would spend one of their attempts
every moment, and dead-letter events that were never sent.

The configured headers go under the ones callboard writes (the signature, the CloudEvent's
``ce-*``, ``content-type``, ``callboard-topic``), so they can add to a request, never rewrite it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from time import monotonic, time

import orjson

from callboard import cloud_events
from callboard.errors import InvalidEventError, PushFailed, RetryLater
from callboard.events import Event
from callboard.metrics import PushMetrics
from callboard.push.breaker import CircuitBreaker, State
from callboard.push.limits import TokenBucket
from callboard.push.retry_after import retry_after
from callboard.push.sender import Sender
from callboard.push.signing import signed_headers, signing_key
from callboard.push.spec import PushSpec

logger = logging.getLogger("callboard.push")

#: What goes on the wire for an event: its headers and body (before signing).
Encoder = Callable[[Event], tuple[dict[str, str], bytes]]
#: The header naming an event's topic on a JSON push.
TOPIC_HEADER = "callboard-topic"
#: Answers that say the endpoint is overloaded or down, not that the event is wrong.
_ENDPOINT_TROUBLE = frozenset({408, 429})
#: What an HTTP header value may not hold (RFC 9110, section 5.5): control characters but the tab.
_NOT_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def encoder(spec: PushSpec) -> Encoder:
    """How ``spec`` writes an event: the payload as JSON, or a CloudEvent."""
    if spec.format == "cloudevents":
        write = (
            cloud_events.to_binary
            if spec.cloud_events_mode == "binary"
            else cloud_events.to_structured
        )
        source = spec.cloud_events_source
        return lambda event: write(event, source=source)

    def as_json(event: Event) -> tuple[dict[str, str], bytes]:
        headers = {"content-type": "application/json", TOPIC_HEADER: event.topic}
        return headers, orjson.dumps(event.payload)

    return as_json


class Pusher:
    """Sends one target's events; an instance is the handler of the target's subscription."""

    def __init__(
        self,
        spec: PushSpec,
        sender: Sender,
        metrics: PushMetrics,
        *,
        clock: Callable[[], float] = monotonic,
        guarded: bool = False,
    ) -> None:
        self.spec = spec
        self._sender = sender
        #: Whether the endpoint's address is checked (``push/addresses.py``).
        self._guarded = guarded
        self._keys = tuple(signing_key(secret) for secret in spec.secrets)
        self._extra = dict(spec.headers)
        self._encode = encoder(spec)
        label = metrics.target_label(spec.name)
        self._outcomes = {o: metrics.requests.labels(label, o) for o in PushMetrics.OUTCOMES}
        self._duration = metrics.duration.labels(label)
        self._state = metrics.breaker.labels(label)
        self._state.set(State.CLOSED.value)
        breaker = spec.breaker
        self.breaker = CircuitBreaker(
            breaker.failures, breaker.cooldown, on_change=self._changed, clock=clock
        )
        limit = spec.rate_limit
        self.bucket = (
            None if limit is None else TokenBucket(limit.per_second, limit.burst, clock=clock)
        )

    async def __call__(self, event: Event) -> None:
        # Written first: an event that cannot be written fails without touching the breaker.
        written, body = self._encode(event)
        headers = {**self._extra, **written}
        self._check_headers(headers)
        wait = self.breaker.admit()
        while wait is not None and self.breaker.state is State.HALF_OPEN:
            # The trial is out: its outcome decides for this delivery too.
            await asyncio.sleep(wait)
            wait = self.breaker.admit()
        if wait is not None:
            self._outcomes["circuit_open"].inc()
            raise RetryLater(
                f"push target {self.spec.name!r}: not sent, its circuit breaker is open (the "
                f"endpoint failed {self.breaker.consecutive_failures} times in a row); "
                f"next try in {wait:.1f}s",
                delay=wait,
            )
        spec = self.spec
        began = monotonic()
        try:
            if self.bucket is not None:
                pause = self.bucket.reserve()
                if pause > 0:
                    await asyncio.sleep(pause)
                    began = monotonic()
            headers.update(signed_headers(self._keys, event.id, int(time()), body))
            answer = await self._sender.post(
                spec.url, body, headers, spec.timeout, guarded=self._guarded
            )
        except PushFailed as error:
            self._duration.observe(monotonic() - began)
            self._outcomes["timeout" if error.timed_out else "unreachable"].inc()
            self.breaker.failed()
            raise PushFailed(
                f"push target {spec.name!r}: {error}", timed_out=error.timed_out
            ) from None
        except BaseException:
            self.breaker.failed()  # cancelled (a time limit, a shutdown): a trial must not stay out
            raise
        self._duration.observe(monotonic() - began)
        self._answered(answer.status, answer.retry_after)

    def _check_headers(self, headers: dict[str, str]) -> None:
        """Refuse a header value the HTTP client would refuse (a CloudEvent's
        ``datacontenttype`` holding a line break): the event's fault, not the endpoint's, so it
        is raised before the breaker is asked. The value is not repeated."""
        for name, value in headers.items():
            if _NOT_IN_HEADER.search(value):
                raise InvalidEventError(
                    f"push target {self.spec.name!r}: not sent, its header {name!r} would hold a "
                    "control character (a line break, NUL), which HTTP does not allow"
                )

    def _answered(self, status: int, retry_after_header: str | None) -> None:
        """Count an answer; raise unless it is a ``2xx``."""
        if 200 <= status < 300:
            self._outcomes["delivered"].inc()
            self.breaker.succeeded()
            return
        self._outcomes["failed" if status >= 500 else "rejected"].inc()
        if status >= 500 or status in _ENDPOINT_TROUBLE:
            self.breaker.failed()
        else:
            self.breaker.succeeded()  # the endpoint answers: the event is the problem
        message = f"push target {self.spec.name!r}: the endpoint answered {status}"
        if status in (429, 503):
            delay = retry_after(retry_after_header, time())
            if delay is not None:
                delay = min(delay, self.spec.max_retry_after)
                raise RetryLater(f"{message}, retry after {delay:g}s", delay=delay)
        raise PushFailed(message, status=status)

    def _changed(self, before: State, after: State) -> None:
        self._state.set(after.value)
        name = self.spec.name
        if after is State.OPEN:
            logger.warning(
                "push target %r: circuit breaker open after %d failure(s) in a row; nothing is "
                "sent to it for %gs, its deliveries wait",
                name,
                self.breaker.consecutive_failures,
                self.breaker.cooldown,
            )
        elif after is State.HALF_OPEN:
            logger.info("push target %r: circuit breaker half-open, one trial delivery goes", name)
        else:
            logger.info("push target %r: circuit breaker closed, the endpoint answers again", name)
