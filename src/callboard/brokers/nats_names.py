"""Names on NATS JetStream for the NATS broker: subjects, streams, consumers, and the event codec.

A NATS subject is tokens joined by ``.`` like a callboard topic, and NATS matches ``*`` and ``>``
as callboard does, so a topic maps to a subject segment by segment and a pattern keeps its
wildcards. Subjects cannot hold whitespace (topics cannot either), a token made only of ``*`` or
``>`` is a wildcard, and non-ASCII bytes are best kept out of subjects; so every byte outside
printable ASCII, and ``%``, ``*`` and ``>``, is written ``%XX``: reversible, and a segment stays
one token. Subscription ids may hold any printable character (``.`` included), which consumer
names cannot: a group is named on the engine by a digest of its id, its real id kept in its record.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from callboard.brokers.storable import encode_checked
from callboard.events import Event

#: Bytes kept as they are in a subject token; every other byte is ``%XX``.
_SAFE = frozenset(range(0x21, 0x7F)) - {ord("%"), ord("*"), ord(">"), ord(".")}
#: What a prefix may hold: it names streams (no ``.``) and starts every subject.
PREFIX = re.compile(r"[A-Za-z0-9_-]{1,32}")


def encode_token(segment: str) -> str:
    """One topic segment as one subject token (``%XX`` for what a subject should not carry)."""
    data = segment.encode()
    if all(byte in _SAFE for byte in data):
        return segment
    return "".join(chr(byte) if byte in _SAFE else f"%{byte:02X}" for byte in data)


def decode_token(token: str) -> str:
    """The topic segment ``encode_token`` made ``token`` of."""
    if "%" not in token:
        return token
    return bytes(_unescape(token)).decode()


def _unescape(token: str) -> list[int]:
    out: list[int] = []
    index = 0
    while index < len(token):
        if token[index] == "%":
            out.append(int(token[index + 1 : index + 3], 16))
            index += 3
        else:
            out.extend(token[index].encode())
            index += 1
    return out


def topic_tokens(topic: str) -> str:
    """A topic (or a pattern: ``*`` and ``>`` stay wildcards) as subject tokens."""
    return ".".join(
        segment if segment in ("*", ">") else encode_token(segment) for segment in topic.split(".")
    )


def tokens_topic(tokens: str) -> str:
    """The topic ``topic_tokens`` made ``tokens`` of."""
    return ".".join(decode_token(token) for token in tokens.split("."))


def group_key(group: str) -> str:
    """The engine's name for a subscription id: a digest, valid as a consumer name and token."""
    return "g" + hashlib.sha256(group.encode()).hexdigest()[:40]


def message_id(topic: str, delivery_id: str) -> str:
    """The ``Nats-Msg-Id`` of a delivery id on a topic: the stream dedupes per topic this way."""
    return hashlib.sha256(f"{topic}\n{delivery_id}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Layout:
    """Every stream and subject of one prefix: brokers with other prefixes never meet."""

    prefix: str

    @property
    def events(self) -> str:
        """The stream of events and of events delivered to one group (``deliver_to``)."""
        return f"{self.prefix}_events"

    @property
    def dead(self) -> str:
        """The stream of dead letters, kept until taken."""
        return f"{self.prefix}_dead"

    @property
    def groups(self) -> str:
        """The stream of group records (topics, owner, lost), the last one per group kept."""
        return f"{self.prefix}_groups"

    def event_subject(self, topic: str) -> str:
        return f"{self.prefix}.ev.{topic_tokens(topic)}"

    def target_subject(self, key: str) -> str:
        return f"{self.prefix}.to.{key}"

    def dead_subject(self, key: str) -> str:
        return f"{self.prefix}.dl.{key}"

    def group_subject(self, key: str) -> str:
        return f"{self.prefix}.grp.{key}"

    def filter_subject(self, patterns: tuple[str, ...]) -> str:
        """The one filter a 2.9 consumer may have covering every pattern of a group.

        One pattern is its own filter. Several share the longest literal prefix that leaves each
        at least one more token (``github.push`` and ``github.issues``: ``github.>``), or all
        events; the consumer then drops what the patterns do not match.
        """
        if len(patterns) == 1:
            return self.event_subject(patterns[0])
        split = [p.split(".") for p in patterns]
        common: list[str] = []
        for tokens in zip(*split, strict=False):
            first = tokens[0]
            if first in ("*", ">") or any(t != first for t in tokens):
                break
            common.append(first)
        while common and any(len(s) <= len(common) for s in split):
            common.pop()
        return f"{self.prefix}.ev." + ".".join([*map(encode_token, common), ">"])


def ack_position(reply: str) -> tuple[int, int]:
    """The stream sequence of a message JetStream delivered, and how often it was delivered,
    read off its ack subject (``reply``).

    The subject is ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>
    .<pending>``, or that with a domain and an account hash after ``$JS.ACK`` (and a random token
    at the end, tokens after which are reserved: nats-server and nats-py accept them) on newer
    servers. Two numbers of a split, rather than the client's ``metadata``
    (nine fields, a timestamp and three objects): this is read once per event delivered.
    """
    tokens = reply.split(".")
    count = len(tokens)
    if tokens[:2] == ["$JS", "ACK"] and (count == 9 or count >= 11):
        first = 4 if count == 9 else 6
        return int(tokens[first + 1]), int(tokens[first])
    raise ValueError(f"{reply!r} is not the ack subject of a JetStream message")


def encode_event(event: Event) -> bytes:
    """The event as stored: JSON with its payload and metadata checked (``encode_checked``)."""
    payload, metadata = encode_checked(event)
    head = orjson.dumps({"id": event.id, "topic": event.topic, "time": event.time.isoformat()})
    return b"".join((head[:-1], b',"payload":', payload, b',"metadata":', metadata, b"}"))


def decode_event(data: bytes) -> Event:
    """The event ``encode_event`` stored."""
    body: dict[str, Any] = orjson.loads(data)
    return Event.restore(
        body["topic"],
        body["payload"],
        body["metadata"],
        body["id"],
        datetime.fromisoformat(body["time"]),
    )
