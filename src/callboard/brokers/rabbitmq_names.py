"""Names and encodings of the RabbitMQ broker: the URL, queue names, routing keys, messages.

Callboard topics go to AMQP as routing keys of a topic exchange, segment for segment, so that the
exchange does the matching. Two characters a callboard segment may hold mean something to AMQP:
a segment that is exactly ``#`` would be a wildcard in a binding key, so ``%`` and ``#`` are
percent-encoded (reversibly) in every segment of routing and binding keys. A group's queue is
named after the group; a name too long for AMQP's 255 bytes is replaced by its digest (the
registry keeps the real name).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from callboard.errors import ConfigError, InvalidEventError
from callboard.events import Event
from callboard.topics import ONE, REST, SEPARATOR

#: The longest queue name or routing key AMQP carries (a ``shortstr``), in bytes.
MAX_AMQP_NAME = 255
#: The header holding the moment an event was published (nanoseconds since the epoch).
STAMP = "cb-stamp"
#: The header naming the only group an event goes to (``deliver_to``).
TARGET = "cb-target"
#: The header of a marker in the history stream (``rabbitmq_history``): not an event, skipped by
#: every reader; its value tells the reader that published it that it has read up to it.
MARKER = "cb-marker"

_KEY = "events.broker"
_DEFAULT_PREFIX = "callboard."
#: Query parameters the broker reads itself; the others go to aio-pika (``heartbeat``...).
_OWN = {"prefix", "timeout", "heartbeat", "history"}
_FLAGS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True, slots=True)
class RabbitSettings:
    """What the ``amqp://`` URL says, split into the driver's URL and the broker's own knobs."""

    #: The URL handed to aio-pika, without the broker's own parameters.
    url: str
    #: Prefix of every exchange and queue name: the namespace of one callboard installation.
    prefix: str = _DEFAULT_PREFIX
    #: Seconds a publish or an operation may wait for RabbitMQ before ``BrokerUnavailable``.
    timeout: float = 5.0
    #: AMQP heartbeat in seconds: how soon a silent peer is taken for dead, which is the lease
    #: of what a consumer holds when its process hangs or the network is cut.
    heartbeat: float = 30.0
    #: Keep every event in a stream (``<prefix>history``) as well, so a new group can start at
    #: the beginning or at a time (``?history=true``): replay, at the cost of a second write.
    history: bool = False


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(_KEY, f"?{name}= must be a number of seconds in (0, 3600], not {value!r}")
    return seconds


def _flag(name: str, value: str) -> bool:
    flag = _FLAGS.get(value.lower())
    if flag is None:
        raise ConfigError(_KEY, f"?{name}= must be true or false, not {value!r}")
    return flag


def parse_url(url: str) -> RabbitSettings:
    """The settings of an ``amqp://user:password@host:5672/vhost?prefix=...`` URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise ConfigError(
            _KEY, "a RabbitMQ broker URL starts with amqp:// or amqps://, e.g. amqp://host:5672/"
        )
    if not parts.hostname:
        raise ConfigError(_KEY, "the RabbitMQ URL names no host: amqp://user:password@host:5672/")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError as error:
        raise ConfigError(_KEY, f"the RabbitMQ URL has a bad port: {error}") from None
    own: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        (own.__setitem__(name, value) if name in _OWN else rest.append((name, value)))
    prefix = own.get("prefix", _DEFAULT_PREFIX)
    if not prefix or len(prefix.encode()) > 100 or prefix.startswith("amq."):
        raise ConfigError(
            _KEY, "?prefix= must be 1 to 100 bytes and not start with 'amq.' (reserved by AMQP)"
        )
    driver = urlunsplit(parts._replace(query=urlencode(rest)))
    return RabbitSettings(
        url=driver,
        prefix=prefix,
        timeout=_seconds("timeout", own["timeout"]) if "timeout" in own else 5.0,
        heartbeat=_seconds("heartbeat", own["heartbeat"]) if "heartbeat" in own else 30.0,
        history=_flag("history", own["history"]) if "history" in own else False,
    )


def _escape(segment: str) -> str:
    return segment.replace("%", "%25").replace("#", "%23")


def _unescape(segment: str) -> str:
    return segment.replace("%23", "#").replace("%25", "%")


def routing_key(topic: str) -> str:
    """The routing key of a topic; ``InvalidEventError`` when AMQP cannot carry it."""
    key = SEPARATOR.join(_escape(segment) for segment in topic.split(SEPARATOR))
    if len(key.encode()) > MAX_AMQP_NAME:
        raise InvalidEventError(
            f"its topic is {len(key.encode())} bytes as an AMQP routing key; "
            f"RabbitMQ carries at most {MAX_AMQP_NAME}: use a shorter topic"
        )
    return key


def topic_of(key: str) -> str:
    """The topic a routing key was made from (``routing_key`` reversed)."""
    return SEPARATOR.join(_unescape(segment) for segment in key.split(SEPARATOR))


def binding_key(pattern: str) -> str:
    """The AMQP binding key of a callboard pattern: ``*`` is ``*``; ``>`` (one or more trailing
    segments) is ``*.#`` (one segment, then zero or more)."""
    segments = pattern.split(SEPARATOR)
    mapped = [ONE if s == ONE else "*.#" if s == REST else _escape(s) for s in segments]
    return SEPARATOR.join(mapped)


def queue_name(prefix: str, kind: str, group: str) -> str:
    """The name of a group's queue of ``kind`` (``group``, ``dead``), within AMQP's limit."""
    name = f"{prefix}{kind}.{group}"
    if len(name.encode()) <= MAX_AMQP_NAME:
        return name
    return f"{prefix}{kind}#{hashlib.sha256(group.encode()).hexdigest()}"


def history_name(prefix: str) -> str:
    """The stream that keeps every event when history is on."""
    return f"{prefix}history"


def making_name(prefix: str, group: str) -> str:
    """What the lock of making ``group`` is named after (``rabbitmq_store.exclusive`` adds
    ``.lock``): a digest, so that no group's own queue can bear the name, whatever its length."""
    return f"{prefix}making#{hashlib.sha256(group.encode()).hexdigest()}"


def encode_event(event: Event) -> bytes:
    return orjson.dumps(
        {
            "id": event.id,
            "topic": event.topic,
            "time": event.time.isoformat(),
            "payload": event.payload,
            "metadata": event.metadata,
        }
    )


def decode_event(body: bytes) -> Event:
    fields: dict[str, Any] = orjson.loads(body)
    return Event.restore(
        fields["topic"],
        fields["payload"],
        fields["metadata"],
        fields["id"],
        datetime.fromisoformat(fields["time"]),
    )
