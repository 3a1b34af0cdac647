"""The built-in body parsers, JSON and form-encoded, and the checks that keep a payload storable.

A parser refuses, with ``400``, what no broker could ever keep, so the sender is told at once
instead of being answered ``503`` and retrying forever: JSON nested deeper than the encoder
can write back, the NUL character (PostgreSQL keeps it neither in ``text`` nor in ``jsonb``),
integers beyond 64 bits (which the JSON decoder would silently turn into floats) and text that
is not Unicode. Each check costs a scan of the raw bytes in C on the common path; the deeper
look runs only when that scan finds a candidate.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import orjson

from callboard import cloud_events
from callboard.errors import InvalidEventError, MalformedBodyError, UnsupportedMediaTypeError
from callboard.ingress.types import BodyParser, MediaType

_UTF8 = frozenset({"utf-8", "utf8"})

#: Text encodings a body may declare. Python also has codecs that are not text encodings
#: (``base64``, ``zlib``, ``rot13``, ``unicode_escape``, ``idna``...); none of those is accepted.
_TEXT_CHARSETS = (
    *("utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"),
    *("utf-32", "utf-32-le", "utf-32-be", "ascii"),
    *(f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16)),
    *(f"cp125{n}" for n in range(9)),
    *("koi8-r", "koi8-u", "koi8-t"),
    *("gb2312", "gbk", "gb18030", "hz", "big5", "big5hkscs", "cp950"),
    *("euc-jp", "euc-jis-2004", "euc-jisx0213", "shift-jis", "shift-jis-2004"),
    *("shift-jisx0213", "cp932", "iso2022-jp", "iso2022-jp-2", "iso2022-jp-3"),
    *("euc-kr", "cp949", "johab", "iso2022-kr"),
)
ALLOWED_CHARSETS = frozenset(codecs.lookup(name).name for name in _TEXT_CHARSETS)
_known_charsets: dict[str, str | None] = {}

#: Levels of arrays and objects a payload may have. orjson reads 1024 levels but writes 254,
#: and the bus API sends a payload inside ``{"events": [{"payload": ...}]}``: a few levels are
#: kept for that envelope.
MAX_DEPTH = 250
_ENVELOPE = 254 - MAX_DEPTH
#: ``\u0000`` escaped in JSON: an odd number of backslashes before ``u0000``, so the text
#: ``\\u0000`` (an escaped backslash, then ``u0000``) does not match.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
#: 19 digits in a row: the shortest integer outside orjson's exact range (-2**63 .. 2**64 - 1).
#: Found by turning every digit into ``0`` and searching for 19 of them: two passes in C, where
#: a regular expression would try a match at every digit of the payload. The same copy, with
#: ``{`` turned into ``[``, counts the openings of arrays and objects in one pass.
_LONG_RUN = b"0" * 19
_SHAPE = bytes.maketrans(b"123456789{", b"000000000[")
_DIGITS = re.compile(rb"[0-9]+")
#: What may stand before a number in JSON; a run after anything else (a quote, a letter) is text.
_BEFORE_NUMBER = frozenset(b":[, \t\r\n")
_FRACTION = frozenset(b".eE")
_MAX_POSITIVE = str(2**64 - 1)
_MAX_NEGATIVE = str(2**63)


def charset_codec(charset: str) -> str | None:
    """The codec of a declared charset when it is an accepted text encoding, else ``None``."""
    key = charset.lower()
    known = _known_charsets.get(key, "")
    if known != "":
        return known
    try:
        name: str | None = codecs.lookup(key).name
    except (LookupError, ValueError):
        name = None
    if name not in ALLOWED_CHARSETS:
        name = None
    if len(_known_charsets) < 256:  # senders use a handful of spellings
        _known_charsets[key] = name
    return name


def decode_text(raw: bytes, media_type: MediaType, *, default: str = "utf-8") -> str:
    """The body as text in the charset it declares; 415 for a charset that is not a known text
    encoding, 400 when the bytes are not valid in it."""
    charset = media_type.charset or default
    codec = charset_codec(charset)
    if codec is None:
        raise UnsupportedMediaTypeError(
            f"Unsupported charset: {charset[:64]}. Send UTF-8 (or another text encoding such "
            f"as UTF-16, ISO-8859-1 or Shift_JIS), or add a body parser for {media_type.type} "
            "in a module (context.ingress.add_body_parser)"
        )
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as error:
        raise MalformedBodyError(f"the body is not valid {charset}: {error.reason}") from None


def load_json(document: bytes, what: str = "the body") -> Any:
    """Parse a UTF-8 JSON ``document`` into a payload every broker can keep.

    ``what`` names the document in error messages.
    """
    try:
        payload = orjson.loads(document)
    except orjson.JSONDecodeError as error:
        raise MalformedBodyError(f"{what} is not valid JSON: {error}") from None
    shape = document.translate(_SHAPE)
    if len(document) > 2 * MAX_DEPTH and shape.count(b"[") > MAX_DEPTH and _too_deep(payload):
        raise InvalidEventError(
            f"{what} is nested more than {MAX_DEPTH} levels deep; callboard keeps at most "
            f"{MAX_DEPTH} levels of arrays and objects"
        )
    if b"\\u0000" in document and _NUL_ESCAPE.search(document):
        raise InvalidEventError(
            f"{what} holds the NUL character (\\u0000), which no event store keeps in text; "
            "leave it out or encode the value (base64, for one)"
        )
    if _LONG_RUN in shape and _long_integer_likely(document, shape):
        number = _out_of_range_integer(document)
        if number is not None:
            shown = number if len(number) <= 40 else f"{number[:40]}... ({len(number)} digits)"
            raise InvalidEventError(
                f"{what} holds the integer {shown}, outside the range callboard keeps exactly "
                "(-2**63 to 2**64-1); send it as a string"
            )
    return payload


def _too_deep(payload: Any) -> bool:
    """Whether the payload is nested more than ``MAX_DEPTH`` levels (the encoder counts them)."""
    nested = payload
    for _ in range(_ENVELOPE):
        nested = [nested]
    try:
        orjson.dumps(nested)
    except orjson.JSONEncodeError:
        return True
    return False


def _long_integer_likely(document: bytes, shape: bytes) -> bool:
    """Whether a run of 19 or more digits may be an integer rather than text or a fraction.

    Git object ids of all digits (``"before": "0000..."`` when a branch is created) are common in
    webhooks; they stand after a quote, so the standard library's slower decoder is not run on
    their account.
    """
    start = shape.find(_LONG_RUN)
    while start != -1:
        begin = start - 1 if start and document[start - 1] == 0x2D else start  # a minus sign
        if not begin or document[begin - 1] in _BEFORE_NUMBER:
            run = _DIGITS.match(document, start)
            end = run.end() if run is not None else start
            if end == len(document) or document[end] not in _FRACTION:
                return True
        # The rest of this run, if as long, follows a digit and is skipped in its turn.
        start = shape.find(_LONG_RUN, start + len(_LONG_RUN))
    return False


class _OutOfRange(Exception):
    def __init__(self, number: str) -> None:
        self.number = number


def _check_integer(text: str) -> int:
    digits = text.removeprefix("-")
    limit = _MAX_NEGATIVE if text.startswith("-") else _MAX_POSITIVE
    # JSON integers have no leading zeros, so comparing lengths, then digits, compares values.
    if len(digits) > len(limit) or (len(digits) == len(limit) and digits > limit):
        raise _OutOfRange(text)
    return 0


def _out_of_range_integer(document: bytes) -> str | None:
    """The first integer orjson would have turned into a float, as written; ``None`` if none.

    Only called when 19 digits stand in a row (in a number or a string); the standard library's
    decoder hands each integer over as text, so no giant integer is ever built.
    """
    try:
        json.loads(document, parse_int=_check_integer)
    except _OutOfRange as found:
        return found.number
    except ValueError:  # orjson read it already; nothing more to learn here
        return None
    return None


def parse_json(raw: bytes, media_type: MediaType, topic: str) -> Any:
    """``application/json``: the charset parameter is honoured (UTF-8 when absent)."""
    if not raw:
        raise MalformedBodyError("the body is empty; a JSON document was expected")
    charset = media_type.charset
    if charset is None or charset.lower() in _UTF8:
        return load_json(raw)
    return load_json(decode_text(raw, media_type).encode("utf-8"))


def parse_form(raw: bytes, media_type: MediaType, topic: str) -> Any:
    """``application/x-www-form-urlencoded``.

    GitHub's form option sends the JSON document in a ``payload`` field; when that field is
    there, its JSON is the payload. Any other form becomes a mapping of field to value (a list
    when a field repeats).
    """
    text = decode_text(raw, media_type)
    try:
        # Percent-escaped bytes are in the declared charset too; undecodable ones are an error.
        fields = parse_qs(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            encoding=media_type.charset or "utf-8",
            errors="strict",
        )
    except ValueError as error:
        raise MalformedBodyError(f"the body is not valid form data: {error}") from None
    payload = fields.get("payload")
    if payload is not None and len(fields) == 1 and len(payload) == 1:
        what = "the form field 'payload'"
        return load_json(_utf8(payload[0], what), what)
    _check_form(fields)
    return {key: values[0] if len(values) == 1 else values for key, values in fields.items()}


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedBodyError(
            f"{what} holds a lone surrogate (half of a UTF-16 pair), which is not text"
        ) from None


def _check_form(fields: Mapping[str, list[str]]) -> None:
    """Refuse form fields that hold NUL or lone surrogates: no store keeps them as text."""
    for key, values in fields.items():
        what = f"the form field {key[:40]!r}"
        for text in (key, *values):
            if "\x00" in text:
                raise InvalidEventError(
                    f"{what} holds the NUL character (%00), which no event store keeps in text; "
                    "leave it out or encode the value (base64, for one)"
                )
            _utf8(text, what)


def parse_cloud_data(raw: bytes, media_type: MediaType, topic: str) -> Any:
    """The data of a binary-mode CloudEvent, whatever its media type.

    JSON for a JSON media type, or for none (the CloudEvents default); the text for another
    media type in UTF-8 (declared or not); the ``bytes`` as they came for anything else, and for
    text holding NUL, which no store keeps as text (``callboard.cloud_events`` keeps those as
    base64). ``None`` for an empty body: a CloudEvent without data.
    """
    if not raw:
        return None
    if not media_type.type or cloud_events.is_json(media_type.type):
        return parse_json(raw, media_type, topic)
    charset = media_type.charset
    if charset is None or charset.lower() in _UTF8:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
        if "\x00" not in text:
            return text
    return raw


DEFAULT_PARSERS: dict[str, BodyParser] = {
    "application/json": parse_json,
    "application/x-www-form-urlencoded": parse_form,
}
#: Structured-mode CloudEvents: the body is their JSON document, which the ingress then reads
#: as events with ``callboard.cloud_events``.
CLOUD_EVENT_PARSERS: dict[str, BodyParser] = dict.fromkeys(cloud_events.MEDIA_TYPES, parse_json)
