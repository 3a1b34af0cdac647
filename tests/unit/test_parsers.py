from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest

from callboard import MediaType
from callboard.errors import MalformedBodyError, UnsupportedMediaTypeError
from callboard.ingress.parsers import DEFAULT_PARSERS, decode_text, parse_form, parse_json

JSON = MediaType.parse("application/json")
FORM = MediaType.parse("application/x-www-form-urlencoded")


@pytest.mark.parametrize(
    ("value", "kind", "params"),
    [
        ("application/json", "application/json", {}),
        ("Application/JSON; Charset=UTF-8", "application/json", {"charset": "UTF-8"}),
        (
            'text/plain; charset="latin-1"; format=flowed',
            "text/plain",
            {"charset": "latin-1", "format": "flowed"},
        ),
        ("application/json;", "application/json", {}),
        ("application/json; junk", "application/json", {}),
    ],
)
def test_media_type_parse(value: str, kind: str, params: dict[str, str]) -> None:
    media_type = MediaType.parse(value)
    assert media_type.type == kind
    assert dict(media_type.params) == params
    assert media_type.charset == params.get("charset")


def test_the_defaults_are_json_and_form() -> None:
    assert set(DEFAULT_PARSERS) == {"application/json", "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    "document", [{"a": [1, 2.5, None, True]}, [1, 2], "text", 3, None, {"ü": "é"}]
)
def test_json_utf8(document: Any) -> None:
    assert parse_json(json.dumps(document, ensure_ascii=False).encode(), JSON, "t") == document


@pytest.mark.parametrize("charset", ["utf-8", "UTF8", "latin-1", "utf-16", "iso-8859-15"])
def test_json_honours_the_charset(charset: str) -> None:
    document = {"name": "Zoë"}
    raw = json.dumps(document, ensure_ascii=False).encode(charset)
    media_type = MediaType.parse(f"application/json; charset={charset}")
    assert parse_json(raw, media_type, "t") == document


def test_json_in_latin1_is_not_read_as_utf8() -> None:
    raw = '{"name": "Zoë"}'.encode("latin-1")
    with pytest.raises(MalformedBodyError, match="not valid JSON"):
        parse_json(raw, JSON, "t")
    assert parse_json(raw, MediaType.parse("application/json; charset=latin-1"), "t") == {
        "name": "Zoë"
    }


def test_an_unknown_charset_is_unsupported_with_a_hint() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        parse_json(b"{}", MediaType.parse("application/json; charset=klingon"), "t")
    assert caught.value.status_code == 415
    assert "Unsupported charset: klingon" in caught.value.message
    assert "add_body_parser" in caught.value.message


def test_bytes_invalid_in_the_charset_are_malformed() -> None:
    with pytest.raises(MalformedBodyError, match="not valid utf-16"):
        decode_text(b"\x00\xd8", MediaType.parse("text/plain; charset=utf-16-le"), default="x")
    with pytest.raises(MalformedBodyError) as caught:
        parse_form(b"\xff\xfe", FORM, "t")
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    ("raw", "problem"),
    [(b"", "empty"), (b"{", "not valid JSON"), (b"{'a': 1}", "not valid JSON"), (b"\xff", "JSON")],
)
def test_malformed_json(raw: bytes, problem: str) -> None:
    with pytest.raises(MalformedBodyError, match=problem) as caught:
        parse_json(raw, JSON, "t")
    assert caught.value.status_code == 400


def test_github_form_payload_is_json() -> None:
    document = {"ref": "refs/heads/main", "commits": [{"id": "abc"}]}
    raw = urlencode({"payload": json.dumps(document)}).encode()
    assert parse_form(raw, FORM, "github") == document


def test_other_forms_are_mappings() -> None:
    raw = b"a=1&b=x+y&b=z&empty="
    assert parse_form(raw, FORM, "t") == {"a": "1", "b": ["x y", "z"], "empty": ""}
    assert parse_form(b"", FORM, "t") == {}
    # A payload field beside others is an ordinary field.
    assert parse_form(b"payload=%7B%7D&other=1", FORM, "t") == {"payload": "{}", "other": "1"}


def test_malformed_forms() -> None:
    with pytest.raises(MalformedBodyError, match="not valid form data"):
        parse_form(b"a=1&broken", FORM, "t")
    with pytest.raises(MalformedBodyError, match="'payload' is not valid JSON"):
        parse_form(b"payload=%7Bnope", FORM, "t")


def test_form_honours_the_charset() -> None:
    media_type = MediaType.parse("application/x-www-form-urlencoded; charset=latin-1")
    assert parse_form("name=Zoë".encode("latin-1"), media_type, "t") == {"name": "Zoë"}
    # Percent escapes are bytes in the declared charset too.
    assert parse_form(b"name=Zo%EB", media_type, "t") == {"name": "Zoë"}
    assert parse_form(b"name=Zo%C3%AB", FORM, "t") == {"name": "Zoë"}
    with pytest.raises(MalformedBodyError, match="not valid form data"):
        parse_form(b"name=Zo%EB", FORM, "t")
