from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest

from callboard import MediaType
from callboard.errors import InvalidEventError, MalformedBodyError, UnsupportedMediaTypeError
from callboard.ingress.parsers import (
    ALLOWED_CHARSETS,
    DEFAULT_PARSERS,
    MAX_DEPTH,
    charset_codec,
    decode_text,
    load_json,
    parse_form,
    parse_json,
)

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


@pytest.mark.parametrize(
    "charset",
    [
        *("UTF-8", "utf-8-sig", "UTF-16BE", "utf-32", "us-ascii", "latin-1", "ISO-8859-15"),
        *("windows-1252", "cp1251", "koi8-r", "shift_jis", "euc-jp", "gb18030", "big5", "euc-kr"),
    ],
)
def test_text_charsets_are_accepted(charset: str) -> None:
    assert charset_codec(charset) in ALLOWED_CHARSETS


@pytest.mark.parametrize(
    "charset",
    [
        *("base64", "hex", "rot13", "zlib", "bz2", "punycode", "unicode_escape", "idna"),
        *("raw_unicode_escape", "undefined", "utf-7", "uu", "quopri", "nope", "utf-8\x00", ""),
    ],
)
def test_codecs_that_are_not_text_encodings_are_refused(charset: str) -> None:
    assert charset_codec(charset) is None
    with pytest.raises(UnsupportedMediaTypeError, match="Unsupported charset"):
        decode_text(b"a", MediaType("text/plain", {"charset": charset}), default="x")


@pytest.mark.parametrize(
    "document",
    [b'"\\u0000"', b'{"\\u0000": 1}', b'"\\\\\\u0000"', b'"a\\\\\\\\\\u0000"'],
)
def test_json_with_nul_is_invalid(document: bytes) -> None:
    with pytest.raises(InvalidEventError, match="NUL"):
        load_json(document)


@pytest.mark.parametrize("document", [b'"\\\\u0000"', b'"\\\\\\\\u0000"', b'"u0000"'])
def test_an_escaped_backslash_before_u0000_is_no_nul(document: bytes) -> None:
    assert "\x00" not in load_json(document)


def test_the_depth_limit() -> None:
    assert load_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert load_json(b'"' + b"[" * 1000 + b'"') == "[" * 1000  # brackets in a string
    deeper = b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1)
    with pytest.raises(InvalidEventError, match=f"more than {MAX_DEPTH} levels"):
        load_json(deeper)


@pytest.mark.parametrize(
    ("document", "number"),
    [
        (b"18446744073709551616", "18446744073709551616"),
        (b"[1, -9223372036854775809]", "-9223372036854775809"),
        (b'{"a": "12345678901234567890", "b": 99999999999999999999}', "99999999999999999999"),
    ],
)
def test_integers_beyond_64_bits_are_refused(document: bytes, number: str) -> None:
    with pytest.raises(InvalidEventError, match=f"integer {number},"):
        load_json(document)


def test_integers_within_64_bits_stay_exact() -> None:
    assert load_json(b"[18446744073709551615, -9223372036854775808, 9007199254740993]") == [
        2**64 - 1,
        -(2**63),
        2**53 + 1,
    ]
    assert load_json(b"[1234567890123456789012.5]") == [1234567890123456789012.5]


def test_forms_with_nul_are_invalid() -> None:
    with pytest.raises(InvalidEventError, match="'a' holds the NUL"):
        parse_form(b"a=x%00", FORM, "t")
    with pytest.raises(InvalidEventError, match="NUL"):
        parse_form(b"k%00=1", FORM, "t")
