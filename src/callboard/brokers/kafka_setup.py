"""Setting up the Kafka broker: its URL, its topics, and the admin requests it makes.

Apart from ``kafka.py`` so that the broker module keeps to the broker's behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import (
    AIOKafkaAdminClient,
    NewTopic,
    RecordsToDelete,
)
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from callboard.brokers import redact_url
from callboard.errors import BrokerUnavailable, ConfigError

logger = logging.getLogger(__name__)

_PREFIX = re.compile(r"[A-Za-z0-9._-]{0,200}")
_PARAMETERS = frozenset({"prefix", "timeout", "client_id", "fetch_wait_ms", "idempotent"})


def parse_url(url: str) -> dict[str, Any]:
    """The ``KafkaBroker`` arguments of
    ``kafka://host:port[,host:port]/?prefix=...&timeout=seconds&fetch_wait_ms=...``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "kafka" or not parts.hostname:
        raise ConfigError("events.broker", _problem(url))
    if parts.username or parts.password:
        raise ConfigError(
            "events.broker", f"{_problem(url)}; SASL credentials are not supported yet"
        )
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - _PARAMETERS
    if unknown:
        raise ConfigError(
            "events.broker",
            f"{_problem(url)}; unknown parameters {sorted(unknown)}, known: {sorted(_PARAMETERS)}",
        )
    prefix = query.get("prefix", "callboard.")
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            "events.broker",
            f"{_problem(url)}; prefix {prefix!r} must be at most 200 of A-Z a-z 0-9 . _ -",
        )
    try:
        timeout = float(query.get("timeout", "5"))
    except ValueError:
        timeout = -1.0
    if not 0 < timeout <= 300:
        raise ConfigError("events.broker", f"{_problem(url)}; timeout must be 0 to 300 seconds")
    bootstrap = parts.netloc.rpartition("@")[2]
    for host in bootstrap.split(","):
        if not re.fullmatch(r"[^:,/]+(:\d{1,5})?|\[[0-9a-fA-F:]+\](:\d{1,5})?", host):
            raise ConfigError("events.broker", f"{_problem(url)}; bad host {host!r}")
    return dict(
        bootstrap=bootstrap,
        prefix=prefix,
        timeout=timeout,
        client_id=query.get("client_id", "callboard"),
        fetch_wait_ms=_fetch_wait(url, query.get("fetch_wait_ms", "100")),
        idempotent=_flag(url, "idempotent", query.get("idempotent", "false")),
    )


def _flag(url: str, name: str, text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ConfigError("events.broker", f"{_problem(url)}; {name} must be true or false")
    return text.lower() in ("true", "1")


def _fetch_wait(url: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise ConfigError(
            "events.broker", f"{_problem(url)}; fetch_wait_ms must be 1 to 10000 milliseconds"
        )
    return int(text)


def _problem(url: str) -> str:
    return f"{redact_url(url)}: expected kafka://host:port[,host:port...]/?prefix=callboard."


async def ensure_topics(
    bootstrap: str, client_id: str, timeout: float, wanted: list[NewTopic]
) -> list[str]:
    """Create the topics of ``wanted`` that do not exist; what was created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, client_id=client_id, request_timeout_ms=round(timeout * 1000)
    )
    try:
        async with asyncio.timeout(timeout * 2):
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t.name not in existing]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(missing)
    except (KafkaError, OSError, TimeoutError) as error:
        raise BrokerUnavailable(
            f"could not create the topics on Kafka at {bootstrap}: {error or type(error).__name__}"
        ) from error
    finally:
        await admin.close()
    return [f"created topic {t.name}" for t in missing]


async def delete_records(
    bootstrap: str, client_id: str, timeout: float, tp: TopicPartition, before: int
) -> bool:
    """Ask Kafka to delete ``tp`` below ``before``; ``False`` when the server cannot."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id)
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            await admin.delete_records({tp: RecordsToDelete(before)})
    except (KafkaError, OSError, TimeoutError) as error:
        logger.info(
            "Kafka at %s did not delete records (%s); the retention floor is kept "
            "logically from now on",
            bootstrap,
            error or type(error).__name__,
        )
        return False
    finally:
        await admin.close()
    return True


async def stop(client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
    """Stop a driver client, whatever state its connections are in.

    With the server gone, aiokafka's fetcher can end in a ``CancelledError`` of its own making;
    only a cancellation of the caller is passed on.
    """
    try:
        await client.stop()
    except (KafkaError, OSError) as error:
        logger.debug("stopping a Kafka client failed: %s", error)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
