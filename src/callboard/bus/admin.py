"""Operations on a broker's subscriptions from a separate process: the ``callboard
subscriptions``, ``dead-letters`` and ``replay`` commands.

They open the configured broker directly and use its operations (``BrokerAdmin``), so they see
what a durable broker keeps; an in-memory broker keeps everything inside the serving process,
and there is nothing to look at from here.

Deleting a subscription that a server consumes stops that server's consumer of it: the broker
cannot reach consumers in other processes, which find the group gone at their next fetch and
then report the subscription as stopped (``/readyz`` not ready, naming it;
``callboard_subscription_running`` 0 in ``/metrics``) until they restart. So a subscription of a
server's events service (owner ``in-process``), or one with events in flight, is deleted only
with ``force``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from callboard.brokers import admin
from callboard.brokers.base import IN_PROCESS, Broker, BrokerAdmin, SubscriptionInfo
from callboard.deadletters import DeadLetter, read_dead_letters
from callboard.deadletters import redrive as redrive_dead_letters
from callboard.errors import CallboardError, NotFoundError, SubscriptionError
from callboard.events import utc_now

logger = logging.getLogger("callboard.admin")

#: Told how far long work has gone: ``(done, total)``; ``total`` is ``None`` when not known.
Progress = Callable[[int, int | None], None]


async def require_subscription(broker: Broker, subscription: str) -> SubscriptionInfo:
    """The subscription named; ``NotFoundError`` naming it (and those there are) otherwise."""
    infos = await admin(broker).subscriptions()
    for info in infos:
        if info.name == subscription:
            return info
    known = ", ".join(i.name for i in infos) or "none"
    raise NotFoundError(f"no subscription {subscription!r} in the store (there are: {known})")


def require_durable(broker: Broker, url: str) -> None:
    """Refuse a broker that keeps nothing outside the serving process."""
    if not broker.capabilities.durable:
        raise SubscriptionError(
            f"the broker {url.partition('://')[0]}:// keeps its subscriptions inside the serving "
            "process; there is nothing to inspect from a separate process. Use a durable broker "
            "(sqlite:///... or postgresql://...) in events.broker"
        )


def format_subscriptions(infos: Sequence[object]) -> str:
    # The age of the oldest unacknowledged event is a column only when the broker tells it
    # (``oldest_unacked_seconds``). None of the bundled brokers records when a handler began:
    # that is known to the serving process alone (its /metrics and /readyz), and the table
    # shows what the broker knows, the events in flight. Rows stay one per line, for scripts.
    ages = [getattr(info, "oldest_unacked_seconds", None) for info in infos]
    with_age = any(age is not None for age in ages)
    header = ("SUBSCRIPTION", "TOPICS", "IN FLIGHT", "LAG", "LOST")
    rows = [(*header, "OLDEST") if with_age else header]
    for info, age in zip(infos, ages, strict=True):
        in_flight: int = getattr(info, "in_flight", 0)
        backlog: int = getattr(info, "backlog", 0)
        lost: int = getattr(info, "lost", 0)
        topics: Sequence[str] = getattr(info, "topics", ())
        row = (
            str(getattr(info, "name", "")),
            ",".join(topics),
            str(in_flight),
            str(backlog + in_flight),
            str(lost),
        )
        rows.append((*row, "-" if age is None else f"{age:.1f}s") if with_age else row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


async def list_subscriptions(broker: Broker) -> str:
    infos = await admin(broker).subscriptions()
    if not infos:
        return "no subscriptions"
    return format_subscriptions(infos)


def format_dead_letters(letters: Sequence[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    return "\n".join(
        f"{letter.id}  {letter.failed_at.isoformat()}  topic={letter.event.topic}  "
        f"attempts={letter.attempts}  event={letter.event.id}\n    {letter.error}"
        for letter in letters
    )


async def list_dead_letters(broker: Broker, subscription: str, limit: int) -> str:
    await require_subscription(broker, subscription)
    return format_dead_letters(await read_dead_letters(admin(broker), subscription, limit=limit))


async def delete_subscription(broker: Broker, subscription: str, *, force: bool = False) -> str:
    """Forget ``subscription``; one a server may be consuming only with ``force``."""
    operations = admin(broker)
    infos = await operations.subscriptions()
    signs = next((_signs_of_consumers(i) for i in infos if i.name == subscription), [])
    if signs and not force:
        raise SubscriptionError(
            f"subscription {subscription!r} {' and '.join(signs)}: deleting it stops the "
            "consumer of every server that runs it (they report it as stopped in /readyz and "
            "/metrics until they restart). Stop those servers first, or pass --force to delete "
            "it anyway"
        )
    if not await operations.delete_subscription(subscription):
        raise NotFoundError(f"no subscription {subscription!r} to delete")
    done = f"deleted subscription {subscription} with its leases and dead letters"
    if signs:
        done += (
            "; servers that consumed it stop consuming it and report it as stopped in /readyz "
            "and /metrics until they restart"
        )
    return done


def _signs_of_consumers(info: SubscriptionInfo) -> list[str]:
    """What the broker knows of the group's consumers (it cannot see other processes')."""
    signs = []
    if info.owner == IN_PROCESS:
        signs.append("belongs to a server's events service (a module's subscription)")
    if info.in_flight:
        signs.append(f"has {info.in_flight} events in flight")
    return signs


async def redrive(
    broker: Broker,
    subscription: str,
    ids: Sequence[str] | None,
    progress: Progress | None = None,
) -> str:
    """Deliver dead letters of ``subscription`` again: all, or those with ``ids``, each of which
    must be there (``NotFoundError`` names those that are not)."""
    await require_subscription(broker, subscription)
    operations = admin(broker)
    if ids:
        found = await operations.take_dead_letters(subscription, ids=ids, limit=len(ids))
        missing = sorted(set(ids) - {letter.id for letter in found})
        if missing:
            raise NotFoundError(
                f"subscription {subscription!r} has no dead letter {', '.join(missing)}; "
                f"list them with `callboard dead-letters list --subscription {subscription}`"
            )
    count = await redrive_dead_letters(operations, subscription, ids or None, progress=progress)
    return f"redrove {count} dead letters to {subscription}"


@dataclass(frozen=True, slots=True)
class ReplayResult:
    delivered: int
    topics: tuple[str, ...]


async def replay(
    broker: Broker,
    subscription: str,
    since: datetime,
    *,
    topics: Sequence[str] | None = None,
    idle: float = 1.0,
    progress: Progress | None = None,
) -> ReplayResult:
    """Deliver again to ``subscription`` every event on its topics kept since ``since``.

    A temporary group starting at ``since`` reads the kept events up to now; each one is handed
    to the subscription alone (``deliver_to``), whose own position does not move. The temporary
    group is deleted at the end.
    """
    if not broker.capabilities.replay:
        raise SubscriptionError(
            f"this broker ({type(broker).__name__}) keeps no history to replay: the memory "
            "broker never does, and RabbitMQ does with ?history=true in events.broker "
            "(docs/brokers.md)"
        )
    operations = admin(broker)
    info = await require_subscription(broker, subscription)
    if topics is None:
        topics = tuple(info.topics)
    until = utc_now()
    group = f"replay.{subscription}.{uuid.uuid4().hex[:8]}"
    reader = await broker.consume(group, topics, start=since)
    delivered = 0
    try:
        while True:
            try:
                batch = await asyncio.wait_for(reader.fetch(100), idle)
            except TimeoutError:
                break  # nothing more kept
            if not batch:
                break
            fresh = [d for d in batch if d.event.time <= until]
            for delivery in fresh:
                await operations.deliver_to(subscription, delivery.event)
                await reader.ack((delivery,))
                delivered += 1
                if progress is not None:
                    progress(delivered, None)
            if len(fresh) < len(batch):
                break  # reached events published after the replay began
    finally:
        with contextlib.suppress(Exception):
            await reader.close()
        await _forget(operations, group)
    return ReplayResult(delivered, tuple(topics))


async def _forget(operations: BrokerAdmin, group: str) -> None:
    """Delete the group a replay read with: it served that replay only."""
    try:
        await operations.delete_subscription(group)
    except CallboardError as error:
        logger.warning(
            "the replay's reading group %r is left behind (%s); delete it with "
            "`callboard subscriptions --delete %s`",
            group,
            error,
            group,
        )
