"""How a module plugs into callboard: small extension points and the module contract.

A module is an object with a ``name`` and a ``register(context)`` method. In ``register`` it
adds what it brings through the context's extension points; it does no I/O there. Work that
needs the running events service goes in a start hook (``context.lifecycle.on_start``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from callboard.brokers.base import Broker
from callboard.errors import InvalidTopicError
from callboard.events import Event
from callboard.ingress.types import BodyParser, DeliveryIdReader, Ingress, Validator
from callboard.service import DEFAULT, EventsService, Handler, HandlerTimeout, Subscriber
from callboard.settings import validate_section
from callboard.topics import join, normalize_patterns, validate_topic

M = TypeVar("M", bound=BaseModel)
StartHook = Callable[[EventsService], Awaitable[None]]
StopHook = Callable[[], Awaitable[None]]
#: What a module hands ``set_broker``: called once, when the application opens its broker.
BrokerMaker = Callable[[], Broker]
#: Where a router republishes an event; ``None`` drops it.
Destination = Callable[[Event], str | None]
#: The sub-topic an event is routed to (``push`` for a GitHub push); ``None`` or ``""``: none.
SubTopic = Callable[[Event], str | None]

_routing_logger = logging.getLogger("callboard.routing")
_MAX_CACHED_TOPICS = 1024


class InletMeter(Protocol):
    """What an inbound bridge (messages from outside into callboard) tells about one of its
    instances; the application's metrics count it (``callboard.metrics.BridgeMetrics``)."""

    def stored(self, accepted: bool) -> None:
        """A message was published: stored, or (``False``) recognised as a redelivery."""

    def dead_lettered(self) -> None:
        """A message that can never be published was kept as a dead letter."""

    def failed(self) -> None:
        """Receiving from the outside system, or connecting to it, failed."""

    def connected(self, now: bool) -> None:
        """Whether the instance is connected to the outside system now."""


#: An inbound bridge's meter, by the name of its instance (the source of its dead letters).
InletMeters = Callable[[str], InletMeter]


class _Unmetered:
    """The meter of a context built without metrics (a module's own tests): counts nothing."""

    def stored(self, accepted: bool) -> None:
        pass

    def dead_lettered(self) -> None:
        pass

    def failed(self) -> None:
        pass

    def connected(self, now: bool) -> None:
        pass


def unmetered(name: str) -> InletMeter:
    return _Unmetered()


class Module(Protocol):
    """A unit of wiring, named in configuration or found through an entry point."""

    @property
    def name(self) -> str: ...

    def register(self, context: ModuleContext) -> None: ...


@dataclass(frozen=True, slots=True)
class FunctionModule:
    """A module made from a function: ``callboard.module("name")`` decorates one."""

    name: str
    setup: Callable[[ModuleContext], None]

    def register(self, context: ModuleContext) -> None:
        self.setup(context)


def module(name: str) -> Callable[[Callable[[ModuleContext], None]], FunctionModule]:
    """Turn ``def register(context): ...`` into a module called ``name``."""

    def wrap(setup: Callable[[ModuleContext], None]) -> FunctionModule:
        return FunctionModule(name, setup)

    return wrap


@dataclass(frozen=True, slots=True)
class RouterSpec:
    id: str
    topics: tuple[str, ...]
    destination: Destination


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    id: str
    topics: tuple[str, ...]
    handler: Handler
    concurrency: int = 1
    #: ``DEFAULT``: ``events.delivery.handlerTimeoutMs``; ``None`` or 0: no time limit.
    handler_timeout: HandlerTimeout = DEFAULT
    #: ``None``: ``events.delivery.ordered``.
    ordered: bool | None = None


class IngressPoint:
    """Adds HTTP ingress topics and body parsers."""

    def __init__(self) -> None:
        self.ingresses: dict[str, Ingress] = {}
        self.parsers: dict[str, BodyParser] = {}

    def add_ingress(
        self,
        topic: str,
        *,
        validator: Validator | None = None,
        delivery_id: DeliveryIdReader | None = None,
        redact_headers: Iterable[str] = (),
    ) -> None:
        """Serve ``POST /api/events/http/{topic}``, checked by ``validator`` if given."""
        validate_topic(topic)
        self.ingresses[topic] = Ingress(
            topic, validator, delivery_id, frozenset(h.lower() for h in redact_headers)
        )

    def add_body_parser(self, media_type: str, parser: BodyParser) -> None:
        """Parse request bodies of ``media_type`` (``text/plain``) with ``parser``."""
        self.parsers[media_type.strip().lower()] = parser


class SubscriberPoint:
    """Adds subscriptions and routers, started once the events service runs."""

    def __init__(self) -> None:
        self.subscriptions: list[SubscriptionSpec] = []
        self.routers: list[RouterSpec] = []

    def add_subscription(
        self,
        id: str,
        topics: str | Sequence[str],
        handler: Handler,
        *,
        concurrency: int = 1,
        handler_timeout: HandlerTimeout = DEFAULT,
        ordered: bool | None = None,
    ) -> None:
        """Subscribe ``handler`` once the service runs (``EventsService.subscribe``'s options)."""
        self.subscriptions.append(
            SubscriptionSpec(
                id, normalize_patterns(topics), handler, concurrency, handler_timeout, ordered
            )
        )

    def add_subscriber(self, subscriber: Subscriber, *, id: str | None = None) -> None:
        kind = type(subscriber)
        name = (
            id
            or getattr(subscriber, "subscriber_id", None)
            or f"{kind.__module__}.{kind.__qualname__}"
        )
        self.add_subscription(name, tuple(subscriber.topics), subscriber.on_event)

    def add_router(self, *, id: str, topics: str | Sequence[str], destination: Destination) -> None:
        """Republish each event on ``topics`` to ``destination(event)`` (dropped if ``None``)."""
        self.routers.append(RouterSpec(id, normalize_patterns(topics), destination))

    def add_sub_topic_router(self, *, id: str, topic: str, sub_topic: SubTopic) -> None:
        """Republish each event on ``topic`` to ``<topic>.<sub_topic(event)>`` (``github.push``)."""
        self.add_router(id=id, topics=topic, destination=sub_topic_destination(id, sub_topic))


def sub_topic_destination(router_id: str, sub_topic: SubTopic) -> Destination:
    """The sub-topic rule: ``<topic>`` goes to ``<topic>.<sub_topic(event)>``.

    An event with no sub-topic is dropped, and so is one whose sub-topic is not a valid topic
    segment (it holds whitespace, ``*`` or ``>``), with a warning naming ``router_id``. A
    sub-topic with dots gives a deeper topic (``azureDevOps.git.push``).
    """
    known: dict[tuple[str, str], str] = {}

    def destination(event: Event) -> str | None:
        sub = sub_topic(event)
        if not sub:
            return None
        key = (event.topic, sub)
        topic = known.get(key)
        if topic is None:
            try:
                topic = join(event.topic, sub)
            except InvalidTopicError:
                _routing_logger.warning(
                    "router %r left event %s on %r: %r is not a valid topic segment",
                    router_id,
                    event.id,
                    event.topic,
                    sub,
                )
                return None
            if len(known) < _MAX_CACHED_TOPICS:
                known[key] = topic
        return topic

    return destination


class BrokerPoint:
    """Replaces the broker named by ``events.broker``."""

    def __init__(self) -> None:
        self.factory: BrokerMaker | None = None
        self.owner: str | None = None

    def set_broker(self, factory: BrokerMaker) -> None:
        self.factory = factory


class LifecyclePoint:
    """Hooks run when the application starts (in module order) and stops (in reverse).

    A module's subscriptions are closed before its stop hooks run, so a stop hook may close
    what its handlers use (a producer, a connection).
    """

    def __init__(self) -> None:
        self.start_hooks: list[StartHook] = []
        self.stop_hooks: list[StopHook] = []

    def on_start(self, hook: StartHook) -> None:
        self.start_hooks.append(hook)

    def on_stop(self, hook: StopHook) -> None:
        self.stop_hooks.append(hook)


@dataclass
class ModuleContext:
    """What ``Module.register`` receives: the module's configuration and the extension points."""

    name: str
    #: The module's section, ``events.modules.<name>`` (empty when absent).
    config: Mapping[str, Any] = field(default_factory=dict)
    ingress: IngressPoint = field(default_factory=IngressPoint)
    subscribers: SubscriberPoint = field(default_factory=SubscriberPoint)
    broker: BrokerPoint = field(default_factory=BrokerPoint)
    lifecycle: LifecyclePoint = field(default_factory=LifecyclePoint)
    #: The meter of an inbound bridge's instance, by name; given by the application.
    inlet_meter: InletMeters = unmetered

    def settings(self, model: type[M]) -> M:
        """The module's section validated as ``model``; errors name ``events.modules.<name>.<key>``."""
        return validate_section(model, self.config, f"events.modules.{self.name}")
