"""The composition root: configuration and modules in, a running callboard out.

``build()`` assembles a ``Callboard`` (events service, HTTP ingress, module lifecycle) that can be
embedded in any ASGI application; ``create_app()`` wraps it in the standalone application that
``callboard serve`` runs, with ``/healthz``, ``/readyz`` and ``/metrics`` beside the events routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from callboard.brokers import open_broker, redact_url
from callboard.brokers.base import Broker, BrokerAdmin, BrokerHealth
from callboard.bus.access import Access, Grant
from callboard.bus.admin import replay
from callboard.bus.api import BusApp, Publish
from callboard.bus.auth import (
    ANONYMOUS,
    PLUGIN_ID,
    BusAuth,
    Principal,
    StaticTokenAuth,
    static_tokens,
)
from callboard.bus.plugin_keys import PluginKeys, PluginTokenVerifier, plugin_base_urls
from callboard.bus.wire import BUS_PATH
from callboard.config import Config, parse_push_target
from callboard.console.access import ConsoleAccess
from callboard.console.app import ConsoleApp
from callboard.console.ingress_stats import IngressStats
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.errors import CallboardError, ConfigError, ModuleError
from callboard.extensions import Module, ModuleContext
from callboard.ingress.asgi import IngressApp, TracedIngressApp
from callboard.ingress.request_log import RequestLog
from callboard.ingress.types import BodyParser, Ingress
from callboard.metrics import Metrics
from callboard.metrics_sum import Part, combine
from callboard.modules import resolve_modules
from callboard.peers import Peers
from callboard.push.access import Caller
from callboard.push.api import PushApi, Refused
from callboard.push.registry import PushTargets
from callboard.push.store import JsonFileStore
from callboard.routing import EventRouter
from callboard.service import Subscription
from callboard.spans import Tracer

logger = logging.getLogger("callboard.app")

INGRESS_PREFIX = "/api/events/http"
#: Where the push targets' routes are, under the bus's path.
PUSH_PATH = "/push"
CONSOLE_PATH = "/console"
#: Seconds ``/readyz`` waits for the broker's health check: under the 2 s a worker has to
#: answer a sibling (``peers``), so a worker whose broker hangs says so, not "not answering".
HEALTH_TIMEOUT = 1.5
#: Seconds a health check's verdict answers ``/readyz`` before the broker is asked again, so a
#: storm of probes costs the engine one check a second.
HEALTH_TTL = 1.0


class Callboard:
    """A configured callboard. Run ``lifespan()`` around serving ``ingress``."""

    def __init__(
        self,
        config: Config,
        contexts: Sequence[ModuleContext],
        broker: Broker,
        metrics: Metrics,
        tracer: Tracer | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.contexts = tuple(contexts)
        if tracer is None and config.backend.tracing.enabled:
            tracer = open_tracer()
        #: The task reading the broker's figures for ``/metrics``, while one runs.
        self._reading: asyncio.Task[None] | None = None
        delivery = config.events.delivery
        self.events = DefaultEventsService(
            broker,
            retry=RetryPolicy(
                attempts=delivery.attempts,
                initial_delay=delivery.initial_delay_ms / 1000,
                max_delay=delivery.max_delay_ms / 1000,
                multiplier=delivery.multiplier,
            ),
            metrics=metrics,
            batch_size=delivery.batch_size,
            shutdown_timeout=config.events.shutdown_timeout_ms / 1000,
            handler_timeout=delivery.handler_timeout_ms / 1000 or None,
            ordered=delivery.ordered,
            tracer=tracer,
        )
        http = config.events.http
        traced: dict[str, Any] = {} if tracer is None else {"tracer": tracer}
        self.ingress = (IngressApp if tracer is None else TracedIngressApp)(
            self.events.publish,
            _collect_ingresses(config, self.contexts),
            parsers=_collect_parsers(self.contexts),
            body_limit=http.body_limit,
            max_metadata_bytes=http.max_metadata_bytes,
            keep_credentials=http.keep_credential_headers,
            detect_redeliveries=http.detect_redeliveries,
            metrics=metrics,
            # A line for every refused webhook; more observers: ``ingress.add_observer``.
            observers=[RequestLog()],
            **traced,
        )
        store_path = config.events.push_store_path
        #: The push subscriptions (``events.push`` and those made through the API).
        self.push = PushTargets(
            config.events.push_specs(),
            parse=parse_push_target,
            store=None if store_path is None else JsonFileStore(store_path),
            broker=broker,
            metrics=metrics.push,
            private_networks=config.events.bus.push_private_networks,
        )
        self.ready = False
        self._started: list[ModuleContext] = []
        #: Per module started, the subscriptions it asked for: closed before its stop hooks run.
        self._subscribed: dict[str, list[Subscription]] = {}

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start the service, subscriptions and modules; stop them all on the way out."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        await self.events.start()
        for context in self.contexts:
            self._started.append(context)
            subscribed = self._subscribed.setdefault(context.name, [])
            try:
                for spec in context.subscribers.subscriptions:
                    subscription = await self.events.subscribe(
                        spec.id,
                        spec.topics,
                        spec.handler,
                        concurrency=spec.concurrency,
                        handler_timeout=spec.handler_timeout,
                        ordered=spec.ordered,
                    )
                    subscribed.append(subscription)
                for route in context.subscribers.routers:
                    router = EventRouter(
                        self.events, id=route.id, topics=route.topics, destination=route.destination
                    )
                    await router.subscribe()
                for hook in context.lifecycle.start_hooks:
                    await hook(self.events)
            except Exception as error:
                logger.error("module %r failed to start: %s", context.name, error)
                await self.stop()
                raise ModuleError(context.name, f"failed to start: {error}") from error
        try:
            await self.push.start(self.events)
        except Exception:
            await self.stop()
            raise
        self._read_broker_figures()  # counted from now: the first scrape does not wait for it
        self.ready = True
        logger.info(
            "callboard started: broker %s, ingress topics %s, modules %s",
            redact_url(self.config.events.broker),
            sorted(self.ingress.ingresses),
            [c.name for c in self.contexts],
        )

    def observe_process(self) -> None:
        """Refresh this process's own gauges: whether it still consumes each subscription, and
        the age of its oldest unsettled event (the broker does not know when a handler began).
        """
        metrics = self.metrics
        metrics.set_per_subscription(
            metrics.oldest_unacked, self.events.oldest_unacked().items(), max
        )
        stopped = {stop.subscription for stop in self.events.stopped()}
        running = ((s.id, 0.0 if s.id in stopped else 1.0) for s in self.events.subscriptions)
        metrics.set_per_subscription(metrics.running, running, min)

    async def observe_broker(self, timeout: float = 2.0) -> None:
        """Refresh the broker gauges (health, and per subscription: backlog, in flight, lost).

        The process's own gauges (``observe_process``) are refreshed first, even when the
        broker does not answer. The broker's figures are read by a task of their own: a scrape
        waits ``timeout`` seconds for it, then answers with the figures it has while the task
        goes on (the next scrape takes its result). A slow answer is not an outage: only a
        broker that fails to answer marks ``callboard_broker_up`` 0.
        """
        self.observe_process()
        reading = self._read_broker_figures()
        if reading is None:
            return  # the broker cannot list its subscriptions: nothing more to tell
        done, _ = await asyncio.wait([reading], timeout=timeout)
        if not done:
            logger.info("the broker's figures take over %gs; /metrics shows the last ones", timeout)

    def _read_broker_figures(self) -> asyncio.Task[None] | None:
        """The task reading the broker's figures: the one under way, or a new one."""
        broker = self.events.broker
        if not isinstance(broker, BrokerAdmin):
            return None
        reading = self._reading
        if reading is None or reading.done():
            reading = self._reading = asyncio.create_task(
                self._read_broker(broker), name="callboard-broker-figures"
            )
        return reading

    async def _read_broker(self, broker: BrokerAdmin) -> None:
        metrics = self.metrics
        try:
            subscriptions = await broker.subscriptions()
        except CallboardError as error:
            logger.warning("the broker did not answer for /metrics: %s", error)
            metrics.broker_up.set(0)
            return
        metrics.broker_up.set(1)
        per = metrics.set_per_subscription
        per(metrics.backlog, ((info.name, info.backlog) for info in subscriptions))
        per(metrics.subscription_in_flight, ((info.name, info.in_flight) for info in subscriptions))
        per(metrics.lost, ((info.name, info.lost) for info in subscriptions))

    async def stop(self) -> None:
        self.ready = False
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        await self.push.stop()
        # The modules' subscriptions first, all at once: a handler still running may need what
        # a stop hook closes (an outbound bridge's producer). One time limit for the whole stop.
        timeout = self.config.events.shutdown_timeout_ms / 1000
        deadline = time.monotonic() + timeout
        await _close_within(
            [s for c in reversed(self._started) for s in self._subscribed.pop(c.name, [])],
            timeout,
        )
        for context in reversed(self._started):
            for hook in reversed(context.lifecycle.stop_hooks):
                try:
                    await hook()
                except Exception:
                    logger.exception("module %r failed to stop cleanly", context.name)
        self._started.clear()
        await self.events.close(max(0.0, deadline - time.monotonic()))


async def _close_within(subscriptions: list[Subscription], timeout: float) -> None:
    """Close ``subscriptions`` together, waiting ``timeout`` seconds at most for their handlers:
    one still running then is left to the service's own close, which cancels it."""
    if not subscriptions:
        return
    closing = {asyncio.ensure_future(s.close()): s for s in subscriptions}
    done, pending = await asyncio.wait(closing, timeout=timeout)
    for future in pending:
        logger.warning(
            "subscription %r still handling after %gs; it is cancelled", closing[future].id, timeout
        )
    for future in done:
        if future.exception() is not None:
            logger.error(
                "subscription %r failed to stop", closing[future].id, exc_info=future.exception()
            )


def build(
    config: Config | None = None,
    *,
    modules: Sequence[Module] = (),
    broker: Broker | None = None,
    metrics: Metrics | None = None,
    use_entry_points: bool = True,
    tracer: Tracer | None = None,
) -> Callboard:
    """Assemble a callboard from configuration and modules (registered in order).

    ``tracer``: spans around requests, publishes and handler calls; by default the
    OpenTelemetry one when ``backend.tracing.enabled``, else none.
    """
    config = config if config is not None else Config()
    for warning in config.warnings:
        logging.getLogger("callboard.config").warning("%s", warning)
    if metrics is None:
        labels = config.events.metrics
        metrics = Metrics(
            max_topics=labels.max_topic_labels, max_subscriptions=labels.max_subscription_labels
        )
    contexts = []
    for module in resolve_modules(config, modules, use_entry_points=use_entry_points):
        context = ModuleContext(
            module.name,
            config.events.modules.get(module.name, {}),
            inlet_meter=metrics.bridges.meter,
        )
        try:
            module.register(context)
        except (ModuleError, ConfigError):
            raise
        except Exception as error:
            raise ModuleError(module.name, f"failed to register: {error}") from error
        contexts.append(context)
    chosen = broker if broker is not None else _module_broker(contexts)
    if chosen is None:
        chosen = open_broker(config.events.broker, retention=config.events.retention.policy())
    return Callboard(config, contexts, chosen, metrics, tracer)


def create_app(
    config: Config | None = None, *, peers: Peers | None = None, **options: Any
) -> CallboardApp:
    """The standalone ASGI application ``callboard serve`` runs.

    ``peers``: this process is one worker of several (``backend.workers``); ``/metrics`` and
    ``/readyz`` then answer for them all.
    """
    return CallboardApp(build(config, **options), peers=peers)


class BrokerCheck:
    """The broker's health check (``BrokerHealth``) as ``/readyz`` runs it: at most
    ``timeout`` seconds, one at a time however many probes ask, its verdict kept ``ttl``
    seconds. ``verdict`` hears each one (``True``: healthy), for ``callboard_broker_up``.
    """

    def __init__(
        self,
        health: BrokerHealth,
        verdict: Callable[[bool], object],
        *,
        timeout: float = HEALTH_TIMEOUT,
        ttl: float = HEALTH_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._health = health
        self._verdict = verdict
        self._timeout = timeout
        self._ttl = ttl
        self._clock = clock
        #: The last verdict (``None``: healthy, else why not) and when it came.
        self._problem: str | None = None
        self._checked: float | None = None
        self._running: asyncio.Task[str | None] | None = None
        self._closed = False

    async def problem(self) -> str | None:
        """Why the broker is not healthy (``None``: it is), from the last ``ttl`` seconds."""
        if self._closed:
            return "the server is stopping"
        checked = self._checked
        if checked is not None and self._clock() - checked < self._ttl:
            return self._problem
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.create_task(
                self._check(), name="callboard-broker-health"
            )
        # Shared: a probe that gives up (its client went away) leaves the check to the others.
        return await asyncio.shield(running)

    async def close(self) -> None:
        """Stop a check under way, and check no more (the broker is closing)."""
        self._closed = True
        running, self._running = self._running, None
        if running is not None and not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    async def _check(self) -> str | None:
        problem: str | None = None
        try:
            async with asyncio.timeout(self._timeout):
                await self._health.check()
        except TimeoutError:
            problem = (
                f"the broker ({type(self._health).__name__}) did not answer its health check "
                f"within {self._timeout:g}s"
            )
        except CallboardError as error:
            problem = str(error)
        except Exception as error:  # a broker's bug: not ready, and the log says why
            logger.exception("the broker's health check failed")
            problem = f"the broker's health check failed: {error!r}"
        # Once per change: a probe every few seconds would repeat the same line.
        if problem is not None and self._problem is None:
            logger.warning("the broker is not healthy, /readyz answers 503: %s", problem)
        elif problem is None and self._problem is not None:
            logger.info("the broker answers its health check again")
        self._problem, self._checked = problem, self._clock()
        self._verdict(problem is None)
        return problem


class CallboardApp:
    """ASGI app: the ingress on a direct path, everything else through Starlette routing."""

    def __init__(self, board: Callboard, *, peers: Peers | None = None) -> None:
        self.board = board
        self.peers = peers
        self._ingress_base = INGRESS_PREFIX + "/"
        broker = board.events.broker
        self.bus = bus_app(board.config, broker, board.events.publish)
        self.console = console_app(board, self.bus)
        self.push = push_app(board, self.bus)
        #: The broker's health check behind ``/readyz``; ``None``: a broker without one (memory),
        #: taken as always healthy.
        self.health = (
            BrokerCheck(broker, lambda up: board.metrics.broker_up.set(1 if up else 0))
            if isinstance(broker, BrokerHealth)
            else None
        )
        self.starlette = Starlette(
            routes=[
                Route("/", self._to_console),
                Route("/healthz", self._health),
                Route("/readyz", self._ready),
                Route("/metrics", self._metrics),
                Mount(INGRESS_PREFIX, app=board.ingress),
                Route(BUS_PATH + PUSH_PATH, self.push),
                Route(BUS_PATH + PUSH_PATH + "/{name}", self.push),
                Mount(BUS_PATH, app=self.bus),
                Mount(CONSOLE_PATH, app=self.console),
            ],
            lifespan=self._lifespan,
        )

    @asynccontextmanager
    async def _lifespan(self, app: object = None) -> AsyncIterator[None]:
        if self.peers is not None:
            # Before the service starts: a sibling asking meanwhile hears "not ready".
            await self.peers.start(self._answer_sibling)
        try:
            async with self.board.lifespan(app):
                try:
                    yield
                finally:
                    await self.console.close()
                    # Before the broker closes: unacknowledged events go back.
                    await self.bus.close()
                    if self.health is not None:
                        await self.health.close()
        finally:
            if self.peers is not None:
                await self.peers.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            if scope["path"].startswith(root + self._ingress_base, 0):
                await self.board.ingress(
                    {**scope, "root_path": root + INGRESS_PREFIX}, receive, send
                )
                return
        await self.starlette(scope, receive, send)

    async def _to_console(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}{CONSOLE_PATH}/live", status_code=303)

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready(self, request: Request) -> Response:
        if self.peers is None:
            status, body = await self._readiness()
            return JSONResponse(body, status_code=status)
        # One worker of several: the server is ready when every worker is. Each checks its
        # broker meanwhile.
        (status, body), answers = await asyncio.gather(self._readiness(), self.peers.ask("ready"))
        workers = [{"worker": self.peers.index, **body}]
        for answer in answers:
            if answer.status is None:
                workers.append({"worker": answer.worker, "status": "not answering"})
            else:
                workers.append({"worker": answer.worker, **json.loads(answer.body)})
        workers.sort(key=lambda worker: int(worker["worker"]))
        ready = all(worker["status"] == "ready" for worker in workers)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "workers": workers},
            status_code=200 if ready else 503,
        )

    async def _readiness(self) -> tuple[int, dict[str, Any]]:
        """This process's readiness: its HTTP status and body."""
        mine: dict[str, Any] = {} if self.peers is None else {"pid": os.getpid()}
        if not self.board.ready:
            return 503, {"status": "not ready", **mine}
        # A broker whose engine does not answer takes no webhook (they are answered 503) and
        # delivers nothing: not ready until it answers again, which the next check sees.
        problem = None if self.health is None else await self.health.problem()
        # A subscription that stopped consuming (its group was deleted under it) takes webhooks
        # nobody here handles any more: the instance is not ready until restarted.
        stopped = self.board.events.stopped()
        if stopped or problem is not None:
            body: dict[str, Any] = {"status": "not ready", **mine}
            if stopped:
                body["stopped"] = [
                    {"subscription": s.subscription, "reason": s.reason} for s in stopped
                ]
            if problem is not None:
                body["broker"] = problem
            return 503, body
        # A stalled handler holds up its own subscription only: the instance still takes
        # webhooks and serves the bus, so it stays ready, and says what is stuck.
        stalled = [
            {
                "subscription": stall.subscription,
                "event": stall.event_id,
                "topic": stall.topic,
                "seconds": round(stall.seconds, 1),
                "timeout": stall.timeout,
            }
            for stall in self.board.events.stalled()
        ]
        if stalled:
            return 200, {"status": "ready", **mine, "stalled": stalled}
        return 200, {"status": "ready", **mine}

    async def _metrics(self, request: Request) -> Response:
        await self.board.observe_broker()
        body, content_type = self.board.metrics.exposition()
        if self.peers is not None:
            # One worker of several: the figures of the whole server, summed over the workers.
            siblings = await self.peers.ask("metrics")
            body = combine(
                Part(self.peers.index, body.decode()),
                [Part(s.worker, None if s.status != 200 else s.body.decode()) for s in siblings],
            )
        return Response(body, headers={"content-type": content_type})

    async def _answer_sibling(self, question: str) -> tuple[int, bytes]:
        """What a sibling worker asks: this process's own figures, or its readiness."""
        if question == "metrics":
            # The broker's figures are the answering worker's to read: only this process's own.
            self.board.observe_process()
            return 200, self.board.metrics.exposition()[0]
        if question == "ready":
            status, body = await self._readiness()
            return status, json.dumps(body).encode()
        return 400, b""


def bus_app(config: Config, broker: Broker, publish: Publish | None = None) -> BusApp:
    """The bus routes as ``backend.auth`` and ``events.bus`` configure them."""
    auth = config.backend.auth
    static = StaticTokenAuth.from_settings(
        [entry.model_dump(by_alias=True) for entry in auth.external_access],
        disable_default_policy=auth.dangerously_disable_default_auth_policy,
    )
    bus = config.events.bus
    return BusApp(
        broker,
        BusAuth(static, _plugin_tokens(config)),
        publish=publish,
        notify_timeout_ms=config.events.notify_timeout_ms,
        access=Access(Grant.parse(g.subject, g.subscriptions) for g in bus.grants),
        max_topics=bus.max_topics_per_subscription,
    )


def push_app(board: Callboard, bus: BusApp) -> PushApi:
    """The push targets' routes, authenticated as the bus is and granted by its grants."""
    grants = bus.access.grants

    async def authenticate(authorization: str | None) -> Caller | Refused:
        verdict = await bus.auth.check(authorization)
        if not isinstance(verdict, Principal):
            return Refused(verdict.message)
        principal = verdict

        def granted(id: str) -> bool:
            return any(grant.covers(principal, id) for grant in grants)

        return Caller(principal.created_by, granted, anonymous=principal == ANONYMOUS)

    return PushApi(board.push, authenticate, anonymous=board.config.events.bus.anonymous_push)


def console_app(board: Callboard, bus: BusApp) -> ConsoleApp:
    """The web console, open to the bus's callers (``backend.auth``), counting the ingress."""
    auth = board.config.backend.auth
    tokens = static_tokens(entry.model_dump(by_alias=True) for entry in auth.external_access)
    broker = board.events.broker

    async def bearer(authorization: str | None) -> str | None:
        verdict = await bus.auth.check(authorization)
        return verdict.created_by if isinstance(verdict, Principal) else None

    async def replay_since(subscription: str, since: datetime) -> int:
        return (await replay(broker, subscription, since)).delivered

    def consumers() -> dict[str, int]:
        counts = Counter(s.id for s in board.events.subscriptions for _ in s.workers)
        counts.update(bus.feeds.local().keys())
        return dict(counts)

    stats = IngressStats()
    board.ingress.add_observer(stats)
    return ConsoleApp(
        broker,
        board.events,
        ConsoleAccess(
            [(token.token, token.subject) for token in tokens],
            bearer,
            open=auth.dangerously_disable_default_auth_policy,
        ),
        replay=replay_since,
        ingress=stats,
        consumers=consumers,
    )


def _plugin_tokens(config: Config) -> PluginTokenVerifier | None:
    """The verifier of Backstage plugin tokens ``events.bus.backstage`` asks for, if any."""
    backstage = config.events.bus.backstage
    if backstage is None:
        return None
    keys = PluginKeys(
        plugin_base_urls(base_url=backstage.base_url, target=backstage.target),
        cache_ttl=backstage.key_cache_ms / 1000,
        fetch_timeout=backstage.fetch_timeout_ms / 1000,
    )
    return PluginTokenVerifier(keys, audience=PLUGIN_ID, plugins=backstage.plugins)


def _module_broker(contexts: Sequence[ModuleContext]) -> Broker | None:
    setters = [c for c in contexts if c.broker.factory is not None]
    if len(setters) > 1:
        raise ModuleError(
            setters[1].name,
            f"sets the broker, but module {setters[0].name!r} already does; keep one of them",
        )
    if setters and setters[0].broker.factory is not None:
        return setters[0].broker.factory()
    return None


def _collect_ingresses(config: Config, contexts: Sequence[ModuleContext]) -> list[Ingress]:
    found: dict[str, tuple[str, Ingress]] = {}
    for context in contexts:
        for topic, ingress in context.ingress.ingresses.items():
            if topic in found:
                raise ModuleError(
                    context.name,
                    f"adds the HTTP ingress {topic!r}, which module {found[topic][0]!r} already added",
                )
            found[topic] = (context.name, ingress)
    ingresses = [ingress for _, ingress in found.values()]
    ingresses.extend(Ingress(topic) for topic in config.events.http.topics if topic not in found)
    return ingresses


def _collect_parsers(contexts: Sequence[ModuleContext]) -> dict[str, BodyParser]:
    parsers: dict[str, BodyParser] = {}
    for context in contexts:
        parsers.update(context.ingress.parsers)
    return parsers


def open_tracer() -> Tracer:
    """The OpenTelemetry tracer ``backend.tracing`` asks for (imported only then)."""
    try:
        from callboard.tracing import OpenTelemetryTracer, provider_is_set
    except ImportError as error:
        raise ConfigError(
            "backend.tracing.enabled",
            f"needs OpenTelemetry ({error.name} is missing): pip install 'callboard[tracing]'",
        ) from None
    if not provider_is_set():
        logger.info(
            "backend.tracing is on, but no OpenTelemetry TracerProvider is set yet: spans go "
            "nowhere until one is (opentelemetry-instrument and the OTEL_* variables, or "
            "trace.set_tracer_provider in the application that embeds callboard)"
        )
    return OpenTelemetryTracer()
