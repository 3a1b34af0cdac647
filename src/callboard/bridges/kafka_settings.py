"""The Kafka bridges' configuration, in Backstage's key names, and what a Kafka client makes of it.

Backstage's ``events.modules.kafka`` holds two sections: ``kafkaConsumingEventPublisher`` (Kafka
into callboard) and ``kafkaPublishingEventConsumer`` (callboard out to Kafka), each one instance
or named instances. An instance names its cluster (``clientId``, ``brokers``, ``ssl``, ``sasl``,
``retry``, ``requestTimeout``) and its ``topics``. Times are milliseconds, or a duration as
Backstage writes one (``{seconds: 30}``, ``'30s'``).

Nothing here imports the Kafka driver: the connection options are plain keyword arguments,
handed to aiokafka by ``kafka_in`` and ``kafka_out``, so the settings load without it.
"""

from __future__ import annotations

import os
import random
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from callboard.bridges.settings import Duration
from callboard.settings import Section

_HUMAN = TypeAdapter(Duration)


def _milliseconds(value: Any) -> Any:
    """A number of milliseconds as it is; a Backstage duration in milliseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    try:
        return _HUMAN.validate_python(value) * 1000
    except ValidationError as error:
        raise ValueError(error.errors()[0]["msg"].removeprefix("Value error, ")) from None


#: Milliseconds: a number, or a duration such as ``{seconds: 30}`` or ``'30s'``.
Millis = Annotated[float, BeforeValidator(_milliseconds), Field(ge=0)]


class Tls(Section):
    """``ssl`` as an object: whom to trust and which certificate to show (PEM text or a file)."""

    ca: tuple[str, ...] = ()
    key: SecretStr | None = None
    cert: str | None = None
    reject_unauthorized: bool = Field(default=True, alias="rejectUnauthorized")


class Sasl(Section):
    mechanism: Literal["plain", "scram-sha-256", "scram-sha-512"]
    username: str
    password: SecretStr


class Retry(Section):
    """kafkajs's back-off: ``initialRetryTime`` growing by ``multiplier`` up to ``maxRetryTime``,
    each delay spread by ``factor``. ``retries`` is read by kafkajs only: callboard never gives up
    storing a message it read, and the delivery policy counts a send's attempts."""

    max_retry_time: Millis = Field(default=30_000, alias="maxRetryTime")
    initial_retry_time: Millis = Field(default=300, alias="initialRetryTime")
    factor: float = Field(default=0.2, ge=0, le=1)
    multiplier: float = Field(default=2, ge=1)
    retries: int = Field(default=5, ge=0)

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row."""
        base = min(self.max_retry_time, self.initial_retry_time * self.multiplier ** (failures - 1))
        return base * (1 + self.factor * (2 * random.random() - 1)) / 1000


class Connection(Section):
    """What every Kafka bridge instance says about its cluster."""

    client_id: str = Field(alias="clientId", min_length=1)
    brokers: tuple[str, ...] = Field(min_length=1)
    ssl: bool | Tls = False
    sasl: Sasl | None = None
    retry: Retry = Retry()
    request_timeout: Millis = Field(default=30_000, alias="requestTimeout", gt=0)


# -- Kafka into callboard ---------------------------------------------------------------------


class ConsumerOptions(Section):
    """``topics[].kafka`` of the consuming publisher: one Kafka consumer of a group."""

    topics: tuple[str, ...] = Field(min_length=1)
    group_id: str = Field(alias="groupId", min_length=1)
    from_beginning: bool = Field(default=False, alias="fromBeginning")
    #: ``true``: offsets of stored messages are committed every ``autoCommitInterval``;
    #: ``false``: after each fetched batch is stored. Never ahead of what is stored, either way.
    auto_commit: bool = Field(default=True, alias="autoCommit")
    auto_commit_interval: Millis = Field(default=5_000, alias="autoCommitInterval")
    #: Read for Backstage's sake only: a message callboard could not store is retried in place
    #: until it is stored (the partition waits), and one it cannot decode is a dead letter.
    pause_on_error: bool = Field(default=False, alias="pauseOnError")
    session_timeout: Millis = Field(default=30_000, alias="sessionTimeout", gt=0)
    rebalance_timeout: Millis = Field(default=60_000, alias="rebalanceTimeout", gt=0)
    heartbeat_interval: Millis = Field(default=3_000, alias="heartbeatInterval", gt=0)
    metadata_max_age: Millis = Field(default=300_000, alias="metadataMaxAge", gt=0)
    max_bytes_per_partition: int = Field(default=1024**2, alias="maxBytesPerPartition", gt=0)
    min_bytes: int = Field(default=1, alias="minBytes", ge=1)
    max_bytes: int = Field(default=10 * 1024**2, alias="maxBytes", gt=0)
    max_wait_time: Millis = Field(default=5_000, alias="maxWaitTime")


class InTopic(Section):
    #: The callboard topic the messages are published on.
    topic: str
    kafka: ConsumerOptions


class ConsumingPublisher(Connection):
    """One instance of ``kafkaConsumingEventPublisher``."""

    topics: tuple[InTopic, ...] = Field(min_length=1)


# -- callboard out to Kafka -------------------------------------------------------------------


class Headers(Section):
    """Which metadata entries become Kafka headers; names compared without case."""

    forward: bool = False
    #: When given, only these are forwarded (the blacklist is not read then).
    whitelist: tuple[str, ...] | None = None
    blacklist: tuple[str, ...] = ("authorization",)

    def chosen(self, name: str) -> bool:
        """Whether the metadata entry ``name`` (lower-cased) is forwarded."""
        if not self.forward:
            return False
        if self.whitelist is not None:
            return name in {allowed.lower() for allowed in self.whitelist}
        return name not in {refused.lower() for refused in self.blacklist}


class ProducerOptions(Section):
    """``topics[].kafka`` of the publishing consumer."""

    topic: str = Field(min_length=1)
    idempotent: bool = False
    retry: Retry | None = None
    headers: Headers | None = None


class OutTopic(Section):
    #: The callboard topic (or pattern) forwarded.
    topic: str
    kafka: ProducerOptions
    #: Where Backstage's code reads ``headers``; ``kafka.headers`` is read too.
    headers: Headers | None = None
    #: ``json``: the payload as the message value; ``cloudevents``: a binary-mode CloudEvent.
    format: Literal["json", "cloudevents"] = "json"
    #: The CloudEvents ``source`` of events that did not come in as CloudEvents.
    source: str = "callboard"

    @model_validator(mode="after")
    def _one_header_rule(self) -> OutTopic:
        if self.headers is not None and self.kafka.headers is not None:
            raise ValueError("give headers or kafka.headers, not both")
        return self

    def header_rule(self) -> Headers:
        return self.headers or self.kafka.headers or Headers()


class PublishingConsumer(Connection):
    """One instance of ``kafkaPublishingEventConsumer``."""

    topics: tuple[OutTopic, ...] = Field(min_length=1)


# -- what a client makes of it ----------------------------------------------------------------


def client_options(connection: Connection) -> dict[str, Any]:
    """aiokafka's keyword arguments for the cluster of ``connection``."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(connection.brokers),
        "client_id": connection.client_id,
        "request_timeout_ms": round(connection.request_timeout),
        "retry_backoff_ms": round(connection.retry.initial_retry_time),
    }
    tls = connection.ssl
    secure = tls is not False
    if secure:
        options["ssl_context"] = tls_context(tls if isinstance(tls, Tls) else Tls())
    sasl = connection.sasl
    if sasl is not None:
        options["sasl_mechanism"] = sasl.mechanism.upper()
        options["sasl_plain_username"] = sasl.username
        options["sasl_plain_password"] = sasl.password.get_secret_value()
    options["security_protocol"] = ("SASL_" if sasl else "") + ("SSL" if secure else "PLAINTEXT")
    return options


def tls_context(tls: Tls) -> ssl.SSLContext:
    """A client TLS context trusting ``ca`` (or the system's authorities), showing ``cert``."""
    context = ssl.create_default_context()
    for authority in tls.ca:
        if _is_pem(authority):
            context.load_verify_locations(cadata=authority)
        else:
            context.load_verify_locations(cafile=authority)
    if tls.cert is not None:
        key = tls.key.get_secret_value() if tls.key is not None else None
        with _as_file(tls.cert) as cert, _as_file(key) as key_file:
            assert cert is not None
            context.load_cert_chain(cert, key_file)
    if not tls.reject_unauthorized:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _is_pem(text: str) -> bool:
    return text.lstrip().startswith("-----BEGIN")


@contextmanager
def _as_file(text: str | None) -> Iterator[str | None]:
    """A path to read PEM from: the path given, or a private file holding the PEM text given
    (the ``ssl`` module reads certificates and keys from files only), removed after."""
    if text is None or not _is_pem(text):
        yield text
        return
    descriptor, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(text)
        yield path
    finally:
        os.unlink(path)
