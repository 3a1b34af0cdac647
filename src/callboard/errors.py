"""callboard's own exceptions.

Every error callboard raises on purpose derives from ``CallboardError``::

    CallboardError
    ├── ConfigError            a configuration key is wrong (``path`` names it)
    ├── InvalidTopicError      a topic or topic pattern breaks the grammar
    ├── InvalidEventError      an event can never be stored as it is (answered 400, never retried)
    ├── BrokerError            the broker failed (``retriable`` tells whether to try again)
    │   └── BrokerUnavailable  the broker cannot be reached right now
    ├── SubscriptionError      a subscription cannot be made as asked
    ├── NotFoundError          what an operation names does not exist (a subscription, a dead
    │                          letter, an event, the store's file)
    ├── HandlerTimeoutError    a handler ran past its time limit (also a ``TimeoutError``)
    ├── RetryLater             a handler's failure that says when to try again (``delay``)
    ├── PushFailed             a push subscription's receiver did not take an event
    ├── BridgeFailed           the outside system a bridge writes to did not take an event
    ├── ModuleError            a module failed to load, register or start (``module`` names it)
    ├── RequestRejected        an HTTP request was refused (``status_code``)
    │   ├── MalformedBodyError         400: the body does not parse as its media type says
    │   ├── PayloadTooLargeError       413: the body is over the configured limit
    │   └── UnsupportedMediaTypeError  415: no parser for the media type or charset
    └── ServiceClosedError     the events service is shutting down or closed

Driver exceptions are translated into these at the broker boundary (``raise ... from exc``),
so application code never needs to import a driver to handle a failure.
"""

from __future__ import annotations


class CallboardError(Exception):
    """Base class of every error raised by callboard."""


class ConfigError(CallboardError):
    """A configuration value is missing or wrong; ``path`` is its dotted key path."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class InvalidTopicError(CallboardError, ValueError):
    """A topic name or topic pattern does not follow the grammar."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"invalid topic {topic!r}: {reason}")


class InvalidEventError(CallboardError, ValueError):
    """An event holds something no broker can keep: a NUL character in a name or a text, a payload
    nested too deeply to encode. Publishing it again can never succeed, so the HTTP answer is
    ``400`` naming the problem, never ``503``."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class BrokerError(CallboardError):
    """The broker failed to do what was asked."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached right now; the same call may succeed later."""

    retriable = True


class SubscriptionError(CallboardError):
    """A subscription cannot be made or used as asked."""


class NotFoundError(CallboardError):
    """What an operation names does not exist: a subscription, a dead letter, an event, or the
    store itself (``callboard`` exits 1 rather than 2, the exit of a usage error)."""


class HandlerTimeoutError(CallboardError, TimeoutError):
    """A handler call ran past its time limit and was cancelled: a failed attempt, retried."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the handler did not finish within {seconds:g}s and was cancelled "
            "(events.delivery.handlerTimeoutMs, or handler_timeout= of the subscription)"
        )
        self.seconds = seconds


class RetryLater(CallboardError):
    """A handler failed and names how long to wait before the next attempt (``delay``, in
    seconds): a receiver's ``Retry-After``, a circuit breaker's cool-down. The retry policy
    waits at least that long; the attempt counts as failed like any other."""

    def __init__(self, message: str, *, delay: float) -> None:
        super().__init__(message)
        self.delay = max(0.0, delay)


class PushFailed(CallboardError):
    """A push subscription's receiver did not take an event: an answer other than ``2xx``
    (``status``), no answer in time (``timed_out``), or no connection (``status`` is ``None``).
    Retried, then a dead letter."""

    def __init__(self, message: str, *, status: int | None = None, timed_out: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.timed_out = timed_out


class PushStoreError(CallboardError):
    """The file that keeps push targets made over the API could not be read or written; the
    change asked for was not made."""


class BridgeFailed(CallboardError):
    """The outside system a bridge writes to (SNS, EventBridge, Kafka, RabbitMQ) did not take
    an event: it refused the entry (``code`` is its error code) or could not be reached
    (``code`` is ``None``). Retried, then a dead letter."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class ModuleError(CallboardError):
    """A module failed to load, register or start; ``module`` names it."""

    def __init__(self, module: str, message: str) -> None:
        self.module = module
        super().__init__(f"module {module!r}: {message}")


class ServiceClosedError(CallboardError):
    """The events service is shutting down or closed and takes no more work."""


class RequestRejected(CallboardError):
    """An HTTP request was refused; ``status_code`` is the status to answer with."""

    status_code = 400

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class MalformedBodyError(RequestRejected):
    status_code = 400


class PayloadTooLargeError(RequestRejected):
    status_code = 413


class UnsupportedMediaTypeError(RequestRejected):
    status_code = 415
