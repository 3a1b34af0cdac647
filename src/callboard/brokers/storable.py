"""What no broker can keep, refused at publish with the same answer from every broker.

PostgreSQL cannot keep the NUL character in text (the server's strings end at it), while SQLite
and the memory broker can; and JSON has limits of its own (orjson encodes at most 254 levels of
nesting, integers within 64 bits, and valid Unicode only). Left to the store, such an event is a
driver error on one broker (answered ``503``, so its sender retries it forever) and accepted on
another. Every broker therefore checks at publish, before anything is stored, and refuses with
``InvalidEventError`` naming the field (answered ``400``): a NUL in the id or topic, or anywhere in
the payload or metadata (where the encoded JSON holds it as the ``\\u0000`` escape), or a payload
or metadata that cannot be encoded as JSON at all.

The checks cost little: the durable brokers encode the event anyway, and looking for the escape
in the encoded bytes is a ``memchr`` scan; the memory broker, which keeps events as they are,
pays one encoding per publish for the same answer.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from callboard.errors import InvalidEventError
from callboard.events import Event

#: ``\u0000`` escaped in JSON: an odd number of backslashes before ``u0000``, so the text
#: ``\\u0000`` (an escaped backslash, then ``u0000``) does not match.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

_HINT = "leave it out or encode the value (base64, for one)"


def encode_checked(event: Event) -> tuple[bytes, bytes]:
    """The event's payload and metadata as JSON, once they are known to be storable.

    Raises ``InvalidEventError`` naming the field for what no broker can keep (see the module).
    """
    check_names(event)
    payload = _encode(event, "payload", event.payload)
    metadata = _encode(event, "metadata", dict(event.metadata))
    return payload, metadata


def check_storable(event: Event) -> None:
    """``encode_checked`` for a broker that keeps events as they are (the memory broker).

    Values JSON has no form for (any Python object the memory broker can hand over as it is)
    are let through: only what JSON could encode but no durable broker could keep is refused,
    so an event accepted here is accepted by every broker.
    """
    check_names(event)
    _encode(event, "payload", event.payload, _OPAQUE)
    _encode(event, "metadata", dict(event.metadata), _OPAQUE)


def check_names(event: Event) -> None:
    """Refuse a NUL in the event's id or topic (PostgreSQL cannot keep it in text)."""
    for field, value in (("id", event.id), ("topic", event.topic)):
        if "\x00" in value:
            raise InvalidEventError(
                f"event {event.id!r} on {event.topic!r}: its {field} holds the NUL character "
                f"(\\x00), which PostgreSQL cannot store in text; {_HINT}"
            )


#: orjson's options and fallback for the memory broker: keys that are not strings, and objects
#: JSON has no form for, pass (as ``null``); what is left to fail is depth, integer range and
#: invalid Unicode.
_OPAQUE: tuple[int, Any] = (orjson.OPT_NON_STR_KEYS, lambda value: None)


def _encode(
    event: Event, field: str, value: object, lenient: tuple[int, Any] | None = None
) -> bytes:
    try:
        if lenient is None:
            data = orjson.dumps(value)
        else:
            data = orjson.dumps(value, option=lenient[0], default=lenient[1])
    except TypeError as error:
        raise InvalidEventError(
            f"event {event.id!r} on {event.topic!r}: its {field} cannot be stored as JSON "
            f"({error}); callboard keeps JSON values nested at most 254 levels deep, integers "
            "from -2**63 to 2**64-1 and valid Unicode strings"
        ) from error
    if b"\\u0000" in data and _NUL_ESCAPE.search(data):
        raise InvalidEventError(
            f"event {event.id!r} on {event.topic!r}: its {field} holds the NUL character "
            f"(\\u0000), which PostgreSQL cannot store in text; {_HINT}"
        )
    return data
