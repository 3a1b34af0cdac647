from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from callboard.logs import CHATTY_DRIVERS, JsonFormatter, OneLine, configure_logging


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger("callboard.test").makeRecord(
        "callboard.test", logging.WARNING, __file__, 1, message, args, None, extra=extra
    )


def test_json_lines_carry_level_logger_and_message() -> None:
    line = JsonFormatter().format(record("subscription %r failed %d times", "s", 3))
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["logger"] == "callboard.test"
    assert entry["message"] == "subscription 's' failed 3 times"
    assert entry["time"].endswith("+00:00")
    assert "\n" not in line


def test_extras_are_kept_and_anything_is_serialised() -> None:
    entry = json.loads(JsonFormatter().format(record("m", topic="github", odd=object())))
    assert entry["topic"] == "github"
    assert entry["odd"].startswith("<object object")


def test_exceptions_are_included() -> None:
    try:
        raise ValueError("bad value")
    except ValueError:
        exc_info = sys.exc_info()
    item = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "oops", (), exc_info)
    entry = json.loads(JsonFormatter().format(item))
    assert entry["message"] == "oops"
    assert "ValueError: bad value" in entry["exception"]


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = access


@pytest.mark.usefixtures("restore_root_logger")
@pytest.mark.parametrize(("fmt", "is_json"), [("json", True), ("text", False)])
def test_configure_logging(monkeypatch: pytest.MonkeyPatch, fmt: str, is_json: bool) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("debug", fmt)
    logging.getLogger("callboard.x").debug("hello %s", "there")
    logging.getLogger("uvicorn.error").info("from uvicorn")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if is_json:
        assert [json.loads(line)["message"] for line in lines] == ["hello there", "from uvicorn"]
    else:
        assert "DEBUG" in lines[0]
        assert "callboard.x: hello there" in lines[0]
    assert logging.getLogger().level == logging.DEBUG


@pytest.mark.usefixtures("restore_root_logger")
def test_drivers_narrate_at_debug_only(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        configure_logging("info", "text")
        logging.getLogger("aiokafka.consumer").info("Updating subscribed topics to: x")
        logging.getLogger("aiokafka.consumer").warning("fetch failed")
        assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [
            "fetch failed"
        ]
        configure_logging("debug", "text")
        logging.getLogger("aiokafka.consumer").info("Joined group")
        assert stream.getvalue().splitlines()[-1].endswith("Joined group")
    finally:
        for name in CHATTY_DRIVERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_an_outage_is_one_line_and_another_error_keeps_its_traceback() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    driver = logging.getLogger("tests.driver")
    driver.addHandler(handler)
    driver.addFilter(OneLine((ConnectionError,)))
    try:
        for error in (ConnectionResetError("reset by peer"), ValueError("bad frame")):
            try:
                raise error
            except Exception:
                driver.warning("reader exited %s", "abnormally", exc_info=True)
    finally:
        driver.removeHandler(handler)
        driver.filters.clear()
    text = stream.getvalue()
    assert text.startswith("reader exited abnormally: reset by peer\n")
    assert text.count("Traceback") == 1
    assert "ValueError: bad frame" in text
