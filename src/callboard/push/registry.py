"""The push targets of one process: those configured and those created through the API.

Each enabled target is a subscription of the events service, ``push.<name>``, whose handler is
the target's ``Pusher``; every target shares one ``Sender`` (one connection pool). Targets from
``events.push`` are fixed; the API creates, replaces and deletes the others, kept in a
``PushStore`` so they come back after a restart, each with its owner: the API's caller that made
it, who alone (with the callers ``events.bus.grants`` gives it) may replace or delete it, checked
here under the lock that orders changes (``push/access.py``); starting and stopping take the
lock too, so no change made through the API meanwhile is half done or outlives ``stop``. Deleting
one closes its
subscription and forgets its consumer group (position and dead letters), so a target created
again later under the same name starts from the newest events instead of a stale backlog.

A stored target that no longer reads as one is kept as a ``BrokenTarget``, logged once at the
start: it sends nothing, its owner sees it with the reason and may replace or delete it, and
nobody else may take its name.

Targets made over the API are guarded (``push/addresses.py``): their requests may not reach a
private address unless ``events.bus.pushPrivateNetworks`` allows it, and a ``put`` whose URL's
host is such an address written as an IP literal is refused at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from callboard.brokers.base import Broker, BrokerAdmin
from callboard.errors import ConfigError, SubscriptionError
from callboard.metrics import PushMetrics
from callboard.push.access import Caller, check
from callboard.push.addresses import refusal, refused_kind
from callboard.push.sender import Sender
from callboard.push.spec import BrokenTarget, PushSpec
from callboard.push.store import PushStore, StoredTarget
from callboard.push.target import Pusher
from callboard.push.urls import ip_literal, without_credentials
from callboard.service import EventsService, Subscription

logger = logging.getLogger("callboard.push")

#: Validates a target's section (the configuration's keys) into a spec; raises ``ConfigError``.
Parse = Callable[[str, Mapping[str, Any]], PushSpec]


class PushTargets:
    """Starts, stops, lists and changes the push targets of one process."""

    def __init__(
        self,
        configured: Sequence[PushSpec],
        *,
        parse: Parse,
        store: PushStore | None,
        broker: Broker,
        metrics: PushMetrics,
        sender: Sender | None = None,
        private_networks: bool = False,
    ) -> None:
        self._configured = {spec.name: spec for spec in configured}
        self._specs: dict[str, PushSpec] = dict(self._configured)
        #: Stored targets that could not be read, by name: kept for their owners.
        self._broken: dict[str, BrokenTarget] = {}
        #: The owners of the targets made through the API (``None``: stored without one).
        self._owners: dict[str, str | None] = {}
        self._parse = parse
        self._store = store
        self._broker = broker
        self._metrics = metrics
        self.sender = sender if sender is not None else Sender()
        #: Whether targets made over the API may reach private addresses (``addresses.py``).
        self.private_networks = private_networks
        self._running: dict[str, Subscription] = {}
        self._events: EventsService | None = None
        self._lock = asyncio.Lock()

    @property
    def can_store(self) -> bool:
        """Whether targets can be created at runtime (a store is configured)."""
        return self._store is not None

    def targets(self) -> list[PushSpec]:
        return [self._specs[name] for name in sorted(self._specs)]

    def get(self, name: str) -> PushSpec | None:
        return self._specs.get(name)

    def broken(self) -> list[BrokenTarget]:
        """The stored targets that could not be read, by name."""
        return [self._broken[name] for name in sorted(self._broken)]

    def get_broken(self, name: str) -> BrokenTarget | None:
        return self._broken.get(name)

    def owner(self, name: str) -> str | None:
        """The caller that made the target ``name`` through the API (``None``: none recorded)."""
        return self._owners.get(name)

    async def start(self, events: EventsService) -> None:
        """Read the stored targets and subscribe every enabled one."""
        async with self._lock:
            await self._start(events)

    async def _start(self, events: EventsService) -> None:
        self._events = events
        if self._store is not None:
            for name, stored in (await self._store.load()).items():
                if name in self._configured:
                    logger.warning(
                        "push target %r is both in events.push and stored from the API; the "
                        "configuration's is used",
                        name,
                    )
                    continue
                self._owners[name] = stored.owner
                try:
                    self._specs[name] = self._parse(name, stored.section)
                except ConfigError as error:
                    url = stored.section.get("url")
                    reason = (
                        str(error)
                        if not isinstance(url, str)
                        else without_credentials(str(error), url)
                    )
                    self._broken[name] = BrokenTarget(name, reason)
                    logger.error(
                        "the stored push target %r cannot be read, so it sends nothing; its "
                        "owner sees why in the API, and may replace or delete it: %s",
                        name,
                        reason,
                    )
        for spec in self._specs.values():
            if spec.enabled:
                await self._run(events, spec)
        if self._running:
            logger.info("push targets started: %s", sorted(self._running))

    async def stop(self) -> None:
        """Close every target's subscription (finishing the pushes in flight), then the pool.

        A change through the API under way finishes first; one that comes later is kept in the
        store and started by nothing.
        """
        async with self._lock:
            self._events = None
            for name in list(self._running):
                await self._halt(name)
            await self.sender.close()

    async def put(
        self, name: str, section: Mapping[str, Any], *, by: Caller
    ) -> tuple[PushSpec, bool]:
        """Create or replace the runtime target ``name``: it, and whether it was created.

        A new target belongs to ``by``; a replaced one keeps its owner. Raises ``ConfigError``
        for a wrong section or a URL whose IP literal is private, ``RequestRejected`` (403)
        when the target is not ``by``'s to replace, ``SubscriptionError`` for a configured name.
        """
        spec = self._parse(name, section)
        async with self._lock:
            current = self._specs.get(name) or self._broken.get(name)
            if current is not None:
                check(by, current, self.owner(name))
            store = self._writable(name)
            self._check_address(spec)
            owner = by.name if current is None else self.owner(name)
            stored = await store.load()
            stored[name] = StoredTarget(dict(section), owner)
            await store.save(stored)
            await self._halt(name)
            self._specs[name] = spec
            self._broken.pop(name, None)
            self._owners[name] = owner
            if spec.enabled and self._events is not None:
                await self._run(self._events, spec)
        created = current is None
        logger.info("push target %r %s by %s", name, "created" if created else "replaced", by.name)
        return spec, created

    async def delete(self, name: str, *, by: Caller) -> bool:
        """Delete the runtime target ``name`` and its consumer group; whether it existed.

        Raises as ``put`` does when the target is not ``by``'s or is configured.
        """
        async with self._lock:
            spec = self._specs.get(name) or self._broken.get(name)
            if spec is None:
                return False
            check(by, spec, self.owner(name))
            store = self._writable(name)
            stored = await store.load()
            stored.pop(name, None)
            await store.save(stored)
            await self._halt(name)
            self._specs.pop(name, None)
            self._broken.pop(name, None)
            self._owners.pop(name, None)
            self._forget_metrics(name)
            if isinstance(self._broker, BrokerAdmin):
                try:
                    await self._broker.delete_subscription(spec.subscription)
                except SubscriptionError as error:
                    logger.warning("push target %r: its group stays: %s", name, error)
        logger.info("push target %r deleted by %s", name, by.name)
        return True

    def _forget_metrics(self, name: str) -> None:
        """Drop the series of a deleted target: a breaker left open would be reported, and
        alerted on, for as long as the process runs. A target counted under ``OTHER`` shares
        them with others, which keep them."""
        metrics = self._metrics
        label = metrics.target_label.own.get(name)
        if label is None:
            return
        for outcome in PushMetrics.OUTCOMES:
            metrics.requests.remove(label, outcome)
        metrics.duration.remove(label)
        metrics.breaker.remove(label)

    def _check_address(self, spec: PushSpec) -> None:
        """Refuse at once a URL whose host is an IP literal the target may not reach; a name
        is judged when its request connects, on the addresses it resolves to then."""
        if self.private_networks:
            return
        literal = ip_literal(spec.url)
        kind = None if literal is None else refused_kind(literal)
        if literal is not None and kind is not None:
            raise ConfigError(f"push.{spec.name}.url", refusal(literal, kind))

    def _writable(self, name: str) -> PushStore:
        if name in self._configured:
            raise SubscriptionError(
                f"push target {name!r} is configured in events.push; change it there"
            )
        if self._store is None:
            raise ConfigError(
                "events.pushStorePath", "is not set, so push targets cannot be made at runtime"
            )
        return self._store

    async def _run(self, events: EventsService, spec: PushSpec) -> None:
        guarded = spec.source == "api" and not self.private_networks
        pusher = Pusher(spec, self.sender, self._metrics, guarded=guarded)
        self._running[spec.name] = await events.subscribe(
            spec.subscription, spec.topics, pusher, concurrency=spec.concurrency
        )

    async def _halt(self, name: str) -> None:
        running = self._running.pop(name, None)
        if running is not None:
            await running.close()
