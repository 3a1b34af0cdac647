"""The built-in body parsers: JSON and form-encoded."""

from __future__ import annotations

import codecs
from typing import Any
from urllib.parse import parse_qs

import orjson

from callboard.errors import MalformedBodyError, UnsupportedMediaTypeError
from callboard.ingress.types import BodyParser, MediaType

_UTF8 = frozenset({"utf-8", "utf8"})


def decode_text(raw: bytes, media_type: MediaType, *, default: str = "utf-8") -> str:
    """The body as text in the charset it declares; 415 for an unknown charset, 400 if it fails."""
    charset = (media_type.charset or default).lower()
    try:
        codecs.lookup(charset)
    except LookupError:
        raise UnsupportedMediaTypeError(
            f"Unsupported charset: {charset}. Send UTF-8, or add a body parser for "
            f"{media_type.type} in a module (context.ingress.add_body_parser)"
        ) from None
    try:
        return raw.decode(charset)
    except UnicodeDecodeError as error:
        raise MalformedBodyError(f"the body is not valid {charset}: {error.reason}") from None


def parse_json(raw: bytes, media_type: MediaType, topic: str) -> Any:
    """``application/json``: the charset parameter is honoured (UTF-8 when absent)."""
    if not raw:
        raise MalformedBodyError("the body is empty; a JSON document was expected")
    charset = media_type.charset
    document: bytes | str = (
        raw if charset is None or charset.lower() in _UTF8 else decode_text(raw, media_type)
    )
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError as error:
        raise MalformedBodyError(f"the body is not valid JSON: {error}") from None


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
        try:
            return orjson.loads(payload[0])
        except orjson.JSONDecodeError as error:
            raise MalformedBodyError(
                f"the form field 'payload' is not valid JSON: {error}"
            ) from None
    return {key: values[0] if len(values) == 1 else values for key, values in fields.items()}


DEFAULT_PARSERS: dict[str, BodyParser] = {
    "application/json": parse_json,
    "application/x-www-form-urlencoded": parse_form,
}
