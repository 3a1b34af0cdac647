"""callboard's configuration: YAML files merged in order, ``${VAR}`` from the environment.

Key names follow Backstage's ``app-config.yaml`` where Backstage has them, so one file can serve
both. Sections callboard does not own (``app``, ``catalog``, ``backend.database``, ...) are left
alone; inside the sections it owns, every key is checked and a wrong one stops the start with a
message naming its path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from callboard.brokers.base import RetentionPolicy
from callboard.errors import ConfigError, InvalidTopicError
from callboard.push.signing import signing_key
from callboard.push.spec import BreakerPolicy, PushSpec, RateLimit, Source, name_problem
from callboard.settings import Section, closest, doc_for, keys_of, validate_section
from callboard.topics import normalize_patterns, validate_topic

_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_VAR = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _topic(value: str) -> str:
    try:
        return validate_topic(value)
    except InvalidTopicError as error:
        raise ValueError(f"not a valid topic: {error.reason}") from None


#: A concrete topic name, checked against the topic grammar.
TopicName = Annotated[str, AfterValidator(_topic)]


class Listen(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=7007, ge=0, le=65535)


class ExternalAccess(Section):
    """One ``backend.auth.externalAccess`` entry; callboard reads those of ``type: static``."""

    # Other types (legacy, jwks) carry options callboard does not read.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    type: str
    options: dict[str, Any] = {}
    access_restrictions: tuple[dict[str, Any], ...] = Field(default=(), alias="accessRestrictions")


class BackendAuth(Section):
    # Backstage's auth section holds more (keys, pluginKeyStore) that callboard leaves alone.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    external_access: tuple[ExternalAccess, ...] = Field(default=(), alias="externalAccess")
    dangerously_disable_default_auth_policy: bool = Field(
        default=False, alias="dangerouslyDisableDefaultAuthPolicy"
    )

    @model_validator(mode="after")
    def _static_tokens(self) -> BackendAuth:
        # The rules of Backstage's static token handler. Raised as ConfigError directly, so the
        # message never echoes the entry (and its token) back.
        for index, entry in enumerate(self.external_access):
            if entry.type != "static":
                continue
            path = f"backend.auth.externalAccess.{index}.options"
            token, subject = entry.options.get("token"), entry.options.get("subject")
            if not isinstance(token, str) or not re.fullmatch(r"\S+", token):
                raise ConfigError(f"{path}.token", "must be a set of non-space characters")
            if len(token) < 8:
                raise ConfigError(f"{path}.token", "must be at least 8 characters long")
            if not isinstance(subject, str) or not re.fullmatch(r"\S+", subject):
                raise ConfigError(f"{path}.subject", "must be a set of non-space characters")
        return self


def _size_in_bytes(value: Any) -> Any:
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError("expected a size in bytes, such as 65536 or '64kb'")
        return int(match.group(1)) * _UNITS[match.group(2) and match.group(2).lower()]
    return value


#: A size in bytes, written as a number or with a unit ('64kb').
Bytes = Annotated[int, BeforeValidator(_size_in_bytes)]


class Server(Section):
    """Bounds of ``callboard serve``'s HTTP server: requests' heads, timeouts, connections."""

    max_request_line_bytes: Bytes = Field(
        default=8 * 1024, alias="maxRequestLineBytes", ge=256, le=1024**2
    )
    max_header_bytes: Bytes = Field(default=16 * 1024, alias="maxHeaderBytes", ge=256, le=1024**2)
    max_headers_bytes: Bytes = Field(
        default=64 * 1024, alias="maxHeadersBytes", ge=1024, le=16 * 1024**2
    )
    max_header_count: int = Field(default=100, alias="maxHeaderCount", ge=8, le=10_000)
    headers_timeout_ms: float = Field(default=10_000, alias="headersTimeoutMs", ge=10, le=600_000)
    body_timeout_ms: float = Field(default=30_000, alias="bodyTimeoutMs", ge=10, le=600_000)
    keep_alive_timeout_ms: float = Field(
        default=5_000, alias="keepAliveTimeoutMs", ge=10, le=600_000
    )
    max_connections: int = Field(default=10_000, alias="maxConnections", ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _within_head(self) -> Server:
        for key, value in (
            ("maxRequestLineBytes", self.max_request_line_bytes),
            ("maxHeaderBytes", self.max_header_bytes),
        ):
            if value > self.max_headers_bytes:
                raise ValueError(f"{key} ({value}) exceeds maxHeadersBytes, the whole head")
        return self


def _worker_count(value: Any) -> Any:
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return os.cpu_count() or 1
        if not value.strip().isdigit():
            raise ValueError("expected a number of processes, or 'auto' (one per core)")
    return value


#: A number of processes, or ``auto``: the machine's cores.
WorkerCount = Annotated[int, BeforeValidator(_worker_count)]


class Tracing(Section):
    """OpenTelemetry spans for webhooks, publishes and deliveries (the ``tracing`` extra)."""

    #: Spans go to the globally configured ``TracerProvider``.
    enabled: bool = False


class Backend(Section):
    # Backstage's backend section holds much else (baseUrl, database, auth, cors).
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    listen: Listen = Listen()
    auth: BackendAuth = BackendAuth()
    server: Server = Server()
    #: Serving processes of ``callboard serve``, each with its own socket on ``listen``.
    workers: WorkerCount = Field(default=1, ge=1, le=1024)
    #: One log line per HTTP request served (``callboard.access``).
    access_log: bool = Field(default=False, alias="accessLog")
    tracing: Tracing = Tracing()


class Http(Section):
    topics: tuple[TopicName, ...] = ()
    body_limit: int = Field(default=5 * 1024 * 1024, alias="bodyLimit", gt=0)
    max_metadata_bytes: int = Field(default=16 * 1024, alias="maxMetadataBytes", gt=0)
    keep_credential_headers: bool = Field(default=False, alias="keepCredentialHeaders")
    detect_redeliveries: bool = Field(default=True, alias="detectRedeliveries")

    @field_validator("body_limit", "max_metadata_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _SIZE.match(value)
            if match is None:
                raise ValueError("expected a size in bytes, such as 5242880 or '5mb'")
            return int(match.group(1)) * _UNITS[match.group(2) and match.group(2).lower()]
        return value


class Delivery(Section):
    attempts: int = Field(default=5, ge=1)
    initial_delay_ms: float = Field(default=200, alias="initialDelayMs", ge=0)
    max_delay_ms: float = Field(default=30_000, alias="maxDelayMs", ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    batch_size: int = Field(default=32, alias="batchSize", ge=1, le=10_000)
    #: A handler call running longer is cancelled and counts as a failed attempt; 0: no limit.
    handler_timeout_ms: float = Field(default=30_000, alias="handlerTimeoutMs", ge=0)
    #: ``false``: a failed event waits for its retry aside while later events go ahead.
    ordered: bool = True


class EventsMetrics(Section):
    """Bounds of the label sets of ``/metrics``: values beyond them count as ``other``."""

    max_topic_labels: int = Field(default=200, alias="maxTopicLabels", ge=1)
    max_subscription_labels: int = Field(default=200, alias="maxSubscriptionLabels", ge=1)


class Retention(Section):
    """How long durable brokers keep events (and delivery ids): Backstage's defaults."""

    min_age_ms: float = Field(default=600_000, alias="minAgeMs", ge=0)
    max_age_ms: float = Field(default=86_400_000, alias="maxAgeMs", gt=0)
    max_count: int = Field(default=10_000, alias="maxCount", ge=0)
    interval_ms: float = Field(default=60_000, alias="intervalMs", gt=0)
    batch_size: int = Field(default=1_000, alias="batchSize", ge=1)

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(
            min_age=self.min_age_ms / 1000,
            max_age=self.max_age_ms / 1000,
            max_count=self.max_count,
            interval=self.interval_ms / 1000,
            batch_size=self.batch_size,
        )


class BusBackstage(Section):
    """Where the Backstage whose plugins call the bus publishes their keys."""

    base_url: str | None = Field(default=None, alias="baseUrl")
    target: str | None = None
    plugins: tuple[str, ...] = ()
    key_cache_ms: float = Field(default=600_000, alias="keyCacheMs", gt=0)
    fetch_timeout_ms: float = Field(default=5_000, alias="fetchTimeoutMs", gt=0)

    @field_validator("base_url", "target")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("target")
    @classmethod
    def _placeholder(cls, value: str | None) -> str | None:
        if value is not None and "{{pluginId}}" not in value:
            raise ValueError("must contain {{pluginId}}, where the plugin id goes")
        return value

    @field_validator("plugins")
    @classmethod
    def _plugin_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for plugin_id in value:
            if not re.fullmatch(r"[a-zA-Z0-9_-]+", plugin_id):
                raise ValueError(f"{plugin_id!r} is not a Backstage plugin id")
        return value

    @model_validator(mode="after")
    def _one_location(self) -> BusBackstage:
        if (self.base_url is None) == (self.target is None):
            raise ValueError("set either baseUrl or target")
        return self


class BusGrant(Section):
    """Gives a bus caller an owner's rights on the subscriptions whose ids match a pattern."""

    #: A static token's ``subject``, or ``plugin:<pluginId>`` for a Backstage plugin.
    subject: str = Field(min_length=1)
    #: Subscription ids; ``*`` stands for any run of characters.
    subscriptions: tuple[str, ...] = Field(min_length=1)


class Bus(Section):
    backstage: BusBackstage | None = None
    grants: tuple[BusGrant, ...] = ()
    #: Whether callers without credentials may manage push targets (``docs/bus-api.md``).
    anonymous_push: bool = Field(default=False, alias="anonymousPush")
    #: Whether push targets made over the API may reach loopback, private, link-local and
    #: reserved addresses (``docs/bridges.md``); the configured ones always may.
    push_private_networks: bool = Field(default=False, alias="pushPrivateNetworks")
    max_topics_per_subscription: int = Field(default=1_000, alias="maxTopicsPerSubscription", ge=1)


def _rate(value: Any) -> Any:
    # ``rateLimit: 50`` is 50 a second, with the burst's default.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"perSecond": value}
    return value


class PushRateLimit(Section):
    """A push target's token bucket: ``perSecond`` on average, ``burst`` at once."""

    per_second: float = Field(alias="perSecond", gt=0, le=1_000_000)
    #: Default: one second's worth (``perSecond``, at least 1).
    burst: int | None = Field(default=None, ge=1, le=1_000_000)


class PushBreaker(Section):
    """A push target's circuit breaker: open after ``failures`` in a row, for ``cooldownMs``."""

    failures: int = Field(default=5, ge=1, le=10_000)
    cooldown_ms: float = Field(default=30_000, alias="cooldownMs", ge=10, le=86_400_000)


class PushCloudEvents(Section):
    """How a push target with ``format: cloudevents`` writes them."""

    mode: Literal["structured", "binary"] = "structured"
    #: The CloudEvents ``source`` of events that did not come in as CloudEvents.
    source: str = Field(default="/callboard", min_length=1)


#: Headers a push target sets itself: configured ``headers`` may not replace them.
_OWN_HEADERS = frozenset(
    {
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
        "content-length",
        "host",
        "transfer-encoding",
        "connection",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class PushTarget(Section):
    """One ``events.push.<name>``: each event on ``topics`` POSTed to ``url``, signed."""

    url: str
    topics: tuple[str, ...] = Field(min_length=1)
    #: A ``whsec_...`` secret, or several (each signs every request) while rotating.
    secret: tuple[str, ...] = Field(min_length=1)
    #: Milliseconds a request may take, connecting included.
    timeout: float = Field(default=10_000, ge=1, le=600_000)
    headers: dict[str, str] = {}
    rate_limit: Annotated[PushRateLimit | None, BeforeValidator(_rate)] = Field(
        default=None, alias="rateLimit"
    )
    enabled: bool = True
    format: Literal["json", "cloudevents"] = "json"
    cloud_events: PushCloudEvents = Field(default=PushCloudEvents(), alias="cloudEvents")
    #: Requests in flight at most; above 1 the events are not sent in publish order.
    concurrency: int = Field(default=8, ge=1, le=256)
    circuit_breaker: PushBreaker = Field(default=PushBreaker(), alias="circuitBreaker")
    max_retry_after_ms: float = Field(default=300_000, alias="maxRetryAfterMs", ge=0, le=86_400_000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+", value) or any(c.isspace() for c in value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("topics", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("topics")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return normalize_patterns(value)
        except InvalidTopicError as error:
            raise ValueError(f"{error.topic!r} is not a topic pattern: {error.reason}") from None

    @field_validator("secret", mode="before")
    @classmethod
    def _secrets(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("secret")
    @classmethod
    def _decodable(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for secret in value:
            signing_key(secret)  # its ValueError never repeats the secret
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            if name.lower() in _OWN_HEADERS:
                raise ValueError(f"{name!r} is set by callboard itself and cannot be configured")
            if any((c < " " and c != "\t") or c == "\x7f" for c in text):
                raise ValueError(f"the value of {name!r} holds a control character")
        return value

    def spec(self, name: str, source: Source = "config") -> PushSpec:
        limit = self.rate_limit
        return PushSpec(
            name=name,
            url=self.url,
            topics=self.topics,
            secrets=self.secret,
            timeout=self.timeout / 1000,
            headers=tuple((k.lower(), v) for k, v in self.headers.items()),
            rate_limit=None
            if limit is None
            else RateLimit(limit.per_second, limit.burst or max(1, round(limit.per_second))),
            enabled=self.enabled,
            format=self.format,
            cloud_events_mode=self.cloud_events.mode,
            cloud_events_source=self.cloud_events.source,
            concurrency=self.concurrency,
            breaker=BreakerPolicy(
                self.circuit_breaker.failures, self.circuit_breaker.cooldown_ms / 1000
            ),
            max_retry_after=self.max_retry_after_ms / 1000,
            source=source,
        )


def parse_push_target(name: str, section: Mapping[str, Any]) -> PushSpec:
    """A push target created through the API; errors name ``push.<name>.<key>``."""
    problem = name_problem(name)
    if problem is not None:
        raise ConfigError(f"push.{name[:80]}", problem)
    return validate_section(PushTarget, section, f"push.{name}").spec(name, "api")


class Events(Section):
    broker: str = "memory://"
    http: Http = Http()
    delivery: Delivery = Delivery()
    metrics: EventsMetrics = EventsMetrics()
    retention: Retention = Retention()
    bus: Bus = Bus()
    shutdown_timeout_ms: float = Field(default=10_000, alias="shutdownTimeoutMs", ge=0)
    notify_timeout_ms: float = Field(default=55_000, alias="notifyTimeoutMs", gt=0)
    use_event_bus: Literal["never", "always", "auto"] = Field(default="auto", alias="useEventBus")
    load: tuple[str, ...] = ()
    modules: dict[str, dict[str, Any]] = {}
    #: HTTP push subscriptions by name (``docs/bridges.md``).
    push: dict[str, PushTarget] = {}
    #: The file that keeps the push subscriptions created through the API; unset: none can be.
    push_store_path: str | None = Field(default=None, alias="pushStorePath", min_length=1)

    @field_validator("push")
    @classmethod
    def _push_names(cls, value: dict[str, PushTarget]) -> dict[str, PushTarget]:
        for name in value:
            problem = name_problem(name)
            if problem is not None:
                # Raised as ConfigError directly: a ValueError's message would echo the whole
                # section, secrets included.
                raise ConfigError(f"events.push.{name[:80]}", f"{problem}; see docs/bridges.md")
        return value

    def push_specs(self) -> list[PushSpec]:
        """The configured push targets."""
        return [target.spec(name) for name, target in self.push.items()]

    @field_validator("modules", mode="before")
    @classmethod
    def _module_sections(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            # ``github:`` with nothing under it switches the module on with its defaults.
            return {name: {} if section is None else section for name, section in value.items()}
        return value


class Logging(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(Section):
    """The whole configuration callboard reads."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    backend: Backend = Backend()
    events: Events = Events()
    logging: Logging = Logging()

    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        """Keys that look wrong without stopping the start: unknown ``events`` keys (left
        out), top-level keys that look like a misspelt section of callboard's."""
        return self._warnings


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two mappings; the later one wins, lists are replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        known = merged.get(key)
        if isinstance(known, Mapping) and isinstance(value, Mapping):
            merged[key] = merge(known, value)
        else:
            merged[key] = value
    return merged


def substitute(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` in every string by the variable's value; ``$${VAR}`` stays literal."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            if match.group(1):
                return "${" + match.group(2) + "}"
            name = match.group(2)
            if name not in env:
                raise ConfigError(path, f"environment variable {name} is not set")
            return env[name]

        return _VAR.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: substitute(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env, f"{path}.{i}") for i, v in enumerate(value)]
    return value


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read configuration file {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", f"{path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def load_config(
    paths: Iterable[str | Path] = (),
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    strict: bool = False,
) -> Config:
    """Read, merge, substitute and validate configuration files (none: the defaults).

    ``strict``: a key that would be a warning (``Config.warnings``) is an error.
    """
    data: dict[str, Any] = {}
    for path in paths:
        data = merge(data, read_file(Path(path)))
    if overrides:
        data = merge(data, overrides)
    return parse_config(data, env=env, strict=strict)


#: What the operations commands read (``callboard subscriptions``, ``events``...): the store.
OPERATIONS_KEYS = (("events", "broker"), ("events", "retention"), ("logging",))


def load_store_config(
    paths: Iterable[str | Path] = (), *, env: Mapping[str, str] | None = None
) -> Config:
    """The configuration the operations commands need: ``events.broker``, ``events.retention``
    and ``logging`` only, so a key they do not use (a provider's ``${SECRET}`` unset where the
    command runs) cannot stop them. The rest is left at its defaults."""
    data: dict[str, Any] = {}
    for path in paths:
        data = merge(data, read_file(Path(path)))
    kept: dict[str, Any] = {}
    for keys in OPERATIONS_KEYS:
        value: Any = data
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is not None:
            target = kept
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
    return parse_config(kept, env=env)


def parse_config(
    data: Mapping[str, Any], *, env: Mapping[str, str] | None = None, strict: bool = False
) -> Config:
    """Validate an already-read configuration mapping.

    Unknown keys directly under ``events`` (a Backstage section callboard shares) are left out
    with a warning, and so are top-level keys that look like a misspelt ``backend``, ``events``
    or ``logging``; the warnings are in ``Config.warnings``. ``strict``: they are errors.
    """
    resolved = substitute(data, os.environ if env is None else env)
    resolved, warnings = _without_unknown_keys(resolved)
    if strict and warnings:
        path, message = warnings[0]
        raise ConfigError(path, message + "".join(f"\n{p}: {m}" for p, m in warnings[1:]))
    config = validate_section(Config, resolved, "")
    config._warnings = tuple(f"{path}: {message}" for path, message in warnings)
    return config


#: The sections callboard reads at the top level; other top-level keys are Backstage's.
_OWN_SECTIONS = ("backend", "events", "logging")


def _without_unknown_keys(
    data: Mapping[str, Any],
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The configuration without the unknown ``events`` keys, and a warning for each key that
    looks wrong: ``(path, message)``, naming the closest known key."""
    warnings: list[tuple[str, str]] = []
    for key in data:
        if key in _OWN_SECTIONS:
            continue
        near = closest(str(key), _OWN_SECTIONS, cutoff=0.7)
        if near is not None:
            message = f"callboard does not read this key; did you mean {near!r}?"
            warnings.append((str(key), f"{message} See {doc_for(near)}"))
    events = data.get("events")
    if not isinstance(events, Mapping):
        return dict(data), warnings
    known = keys_of(Events)
    names = set(known) | set(Events.model_fields)
    unknown = [key for key in events if key not in names]
    for key in unknown:
        path = f"events.{key}"
        near = closest(str(key), known)
        hint = f"; did you mean {near!r}?" if near is not None else ""
        joint = " See" if hint else "; see"
        warnings.append((path, f"unknown key, ignored{hint}{joint} {doc_for(path)}"))
    if not unknown:
        return dict(data), warnings
    kept = {key: value for key, value in events.items() if key not in unknown}
    return {**data, "events": kept}, warnings
