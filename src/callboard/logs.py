"""Logging set-up: readable lines, or one JSON object per line; drivers' outages in one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

# uvicorn adds ``color_message``, the message with ANSI colour codes: never part of a JSON line.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


#: Drivers whose INFO lines narrate their own workings (a consumer group joined, the topics it
#: follows, a channel opened): shown at ``debug`` only; their warnings and errors always.
CHATTY_DRIVERS = ("aiokafka", "aio_pika", "aiormq", "nats", "aiobotocore", "botocore", "aiohttp")


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        # uvicorn's own set-up may have left handlers and a level here: ours rule.
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(logging.NOTSET)
    logging.getLogger("uvicorn.access").disabled = True
    quiet = logging.NOTSET if level == "debug" else logging.WARNING
    for name in CHATTY_DRIVERS:
        logging.getLogger(name).setLevel(quiet)


class OneLine(logging.Filter):
    """Logs a driver's record of an outage as one line instead of a traceback.

    Drivers log a dropped connection or a failed reconnect with the exception attached; callboard
    reports the outage itself, as warnings, and recovers, so a traceback would read as a crash.
    A record whose exception is one of ``kinds`` becomes ``<message>: <reason>``; any other
    exception keeps its traceback.
    """

    def __init__(
        self,
        kinds: tuple[type[BaseException], ...],
        reason: Callable[[BaseException], str] = lambda error: str(error) or type(error).__name__,
    ) -> None:
        super().__init__()
        self._kinds = kinds
        self._reason = reason

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and isinstance(error, self._kinds):
            record.msg = f"{record.getMessage()}: {self._reason(error)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


#: aiormq's record of a connection RabbitMQ dropped (a node stopped or killed).
AIORMQ_OUTAGE = OneLine((ConnectionError, TimeoutError))


def quiet_aiormq_outages() -> None:
    """One line, not a traceback, for each RabbitMQ connection aiormq sees dropped."""
    logging.getLogger("aiormq.connection").addFilter(AIORMQ_OUTAGE)
