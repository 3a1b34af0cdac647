"""The shared pure pieces: HMAC and token checks, failures, secret settings, layering."""

from __future__ import annotations

import ast
import hashlib
import hmac
import logging
from pathlib import Path

import pytest

from callboard import build
from callboard.config import parse_config
from callboard.errors import ConfigError, ModuleError
from callboard.modules import BUILTIN, import_module_object
from callboard.providers import Failure, HmacScheme, SignatureFailures
from callboard.providers._signatures import check_hmac, check_token, first
from callboard.providers._wiring import Secrets
from callboard.settings import Section, validate_section

FAILURES = SignatureFailures.for_header("X-Sig", "'sha256=' and hex", "events.modules.x.secret")
SCHEME = HmacScheme("sha256", "sha256=", "hex")
BODY = b'{"hello": "world"}'


def hex_signature(secret: bytes, body: bytes = BODY) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_check_hmac_accepts_any_configured_secret() -> None:
    for secret in (b"one", b"two"):
        assert check_hmac(hex_signature(secret), BODY, [b"one", "two"], SCHEME, FAILURES) is None


def test_check_hmac_accepts_upper_case_hex() -> None:
    value = "sha256=" + hex_signature(b"one")[7:].upper()
    assert check_hmac(value, BODY, [b"one"], SCHEME, FAILURES) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, FAILURES.missing),
        ("", FAILURES.malformed),
        ("sha1=abcdef", FAILURES.malformed),
        ("sha256=zz", FAILURES.malformed),
        ("sha256=abcd", FAILURES.malformed),
        ("sha256=" + "é" * 64, FAILURES.malformed),
        ("sha256=" + "0" * 64, FAILURES.mismatch),
    ],
)
def test_check_hmac_failures(value: str | None, expected: Failure) -> None:
    assert check_hmac(value, BODY, [b"one"], SCHEME, FAILURES) == expected


def test_check_hmac_base64_scheme() -> None:
    scheme = HmacScheme("sha512", "", "base64")
    value = scheme.sign("secret", BODY)
    assert check_hmac(value, BODY, ["secret"], scheme, FAILURES) is None
    assert check_hmac("!!notbase64", BODY, ["secret"], scheme, FAILURES) == FAILURES.malformed


def test_check_token_is_exact() -> None:
    assert check_token("s3cret", ["other", "s3cret"], FAILURES) is None
    assert check_token("s3cre", ["s3cret"], FAILURES) == FAILURES.mismatch
    assert check_token("s3cret ", ["s3cret"], FAILURES) == FAILURES.mismatch
    assert check_token(None, ["s3cret"], FAILURES) == FAILURES.missing
    assert check_token("ünïcode", ["s3cret"], FAILURES) == FAILURES.mismatch
    assert check_token("☃", ["s3cret"], FAILURES) == FAILURES.malformed


def test_check_token_matches_utf8_secret_sent_over_http() -> None:
    # The ingress decodes header bytes as Latin-1; a UTF-8 secret arrives as mojibake.
    on_the_wire = "pässwörd".encode().decode("latin-1")
    assert check_token(on_the_wire, ["pässwörd"], FAILURES) is None


def test_first_header_value() -> None:
    assert first({"x": ["a", "b"]}, "x") == "a"
    assert first({"x": []}, "x") is None
    assert first({"x": "a"}, "x") == "a"
    assert first({}, "x") is None


def test_failure_rejection_shape() -> None:
    rejection = Failure("SignatureMismatchError", "no match").rejection()
    assert rejection.status == 403
    assert rejection.body == {
        "error": {"name": "SignatureMismatchError", "message": "no match"},
        "response": {"statusCode": 403},
    }


def test_failure_messages_never_hold_the_expected_signature() -> None:
    expected = hex_signature(b"one")
    failure = check_hmac("sha256=" + "0" * 64, BODY, [b"one"], SCHEME, FAILURES)
    assert failure is not None
    assert expected[7:] not in failure.message


class Holder(Section):
    webhook_secret: Secrets = ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("one", ("one",)), (["one", "two"], ("one", "two")), ("", ()), (["", "x"], ("x",))],
)
def test_secret_setting_takes_one_or_many(value: object, expected: tuple[str, ...]) -> None:
    assert validate_section(Holder, {"webhook_secret": value}, "p").webhook_secret == expected


def test_secret_setting_is_not_in_repr() -> None:
    assert "hunter2" not in repr(validate_section(Holder, {"webhook_secret": "hunter2"}, "p"))


def test_config_errors_never_repeat_a_secret() -> None:
    with pytest.raises((ConfigError, ModuleError)) as caught:
        build(
            parse_config({"events": {"modules": {"gitlab": {"signingToken": "whsec_%%hunter2"}}}}),
            use_entry_points=False,
        )
    assert "events.modules.gitlab.signingToken" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises((ConfigError, ModuleError)) as caught:
        build(
            parse_config({"events": {"modules": {"github": {"webhookSecret": {"x": "hunter2"}}}}}),
            use_entry_points=False,
        )
    assert "hunter2" not in str(caught.value)


def test_no_secret_warns_once_at_start_and_names_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="callboard.providers"):
        build(parse_config({"events": {"modules": {"github": {}}}}), use_entry_points=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "events.modules.github.webhookSecret" in warnings[0]


def test_configured_secret_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        build(
            parse_config({"events": {"modules": {"github": {"webhookSecret": "hunter2"}}}}),
            use_entry_points=False,
        )
    assert "hunter2" not in caplog.text


def test_every_builtin_provider_imports() -> None:
    for name in BUILTIN:
        assert import_module_object(name).name == name


ALLOWED = {
    "callboard.events",
    "callboard.errors",
    "callboard.extensions",
    "callboard.ingress.types",
    "callboard.settings",
    "callboard.topics",
}


def test_providers_depend_on_contracts_only() -> None:
    folder = Path(__file__).resolve().parents[3] / "src" / "callboard" / "providers"
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                target = node.module
                if target.startswith("callboard") and not target.startswith("callboard.providers"):
                    assert target in ALLOWED, f"{path.name} imports {target}"


def test_provider_switched_on_by_naming_it_in_load() -> None:
    board = build(parse_config({"events": {"load": ["gitea"]}}), use_entry_points=False)
    assert "gitea" in board.ingress.ingresses
