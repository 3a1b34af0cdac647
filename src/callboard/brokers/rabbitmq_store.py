"""What the RabbitMQ broker keeps beside its group queues, in classic queues read over AMQP.

RabbitMQ has no key-value store and, without the management plugin, no way to list queues or
read their arguments over AMQP. So a group's metadata is kept as records in one registry queue
(``<prefix>registry``): a record names the group with its patterns, its owner, or events it lost
to retention. Reading takes every record with ``basic.get`` and closes the channel, which puts
them all back where they were (a classic queue requeues in place). Records are facts folded
first-wins: the first patterns and the first owner recorded stand, lost counts add up, so two
servers recording the same group at once never contradict each other. Deleting a group
acknowledges (removes) its records.

A group is complete once a record names its patterns without saying ``making``: the server
that makes a group records it as ``making`` first (so a group whose making was cut off is
listed, and can be deleted) and as complete only once its queue holds what it should (bound,
and for a replaying group filled from the history stream); the next read of the registry
removes the ``making`` record of a complete group. A group recorded as ``making`` and never as
complete is made afresh by the next subscribe; a queue with no ``making`` record and no
complete one (made by an earlier version, or its records lost with the registry) is adopted
as it is.

Dead letters are a classic queue per group, listed the same way. The delivery ids a broker
instance accepted are kept in memory (``DeliveryWindow``), bounded by the retention policy's
count and age: RabbitMQ has no deduplication of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelLockedResource

from callboard.brokers.base import RetentionPolicy
from callboard.brokers.rabbitmq_group import plain_channel
from callboard.brokers.rabbitmq_names import decode_event
from callboard.events import Event

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class GroupRecord:
    """A group as the registry's records say."""

    topics: tuple[str, ...]
    owner: str | None = None
    lost: int = 0
    #: A record says the group was made to the end (not only that its making began).
    complete: bool = False
    #: A record says its making began (a server of this version made it, or is making it).
    making: bool = False
    records: list[AbstractIncomingMessage] = field(default_factory=list)


#: Per connection, the reads of queues under way in this process.
_LOCAL_LOCKS: weakref.WeakKeyDictionary[AbstractConnection, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)
#: Seconds between two tries of a lock another process holds.
_LOCK_RETRY = 0.02
#: Seconds between two warnings while a lock stays held by another process.
_LOCK_TELL = 30.0


@contextlib.asynccontextmanager
async def exclusive(
    connection: AbstractConnection, queue: str, *, longest_wait: float = _LOCK_RETRY
) -> AsyncIterator[None]:
    """Read ``queue`` alone: a reader takes every message, so a second reader at the same time
    would see none of them. Across processes the lock is an exclusive queue, which one
    connection at a time may declare and RabbitMQ deletes when that connection drops (a crashed
    holder frees it); within the process, an ``asyncio.Lock``. A lock held long (a group being
    made) is tried less and less often, up to every ``longest_wait`` seconds."""
    local = _LOCAL_LOCKS.setdefault(connection, {}).setdefault(queue, asyncio.Lock())
    name = f"{queue}.lock"
    wait = _LOCK_RETRY
    since = time.monotonic()
    told = since
    async with local:
        while True:
            channel = await plain_channel(connection)
            try:
                await channel.declare_queue(name, exclusive=True)
                break
            except ChannelLockedResource:
                await asyncio.sleep(wait)
                wait = min(wait * 2, max(longest_wait, _LOCK_RETRY))
                if time.monotonic() - told >= _LOCK_TELL:
                    told = time.monotonic()
                    logger.warning(
                        "waiting %.0fs for %s: another server holds it (making that "
                        "subscription, or reading the registry); a server that died frees it",
                        told - since,
                        name,
                    )
            except asyncio.CancelledError:
                # RabbitMQ may have granted the lock before the cancellation came: let go of it,
                # or it stays held as long as this connection lives.
                await asyncio.shield(_let_go(connection, name))
                raise
            finally:
                if not channel.is_closed:
                    await channel.close()
        try:
            yield
        finally:
            channel = await plain_channel(connection)
            try:
                await channel.queue_delete(name)
            finally:
                if not channel.is_closed:
                    await channel.close()


async def _let_go(connection: AbstractConnection, name: str) -> None:
    """Delete the lock ``name`` if this connection holds it (else RabbitMQ refuses: ignored)."""
    with contextlib.suppress(Exception):
        channel = await plain_channel(connection)
        try:
            await channel.queue_delete(name)
        finally:
            if not channel.is_closed:
                await channel.close()


async def take_all(
    connection: AbstractConnection,
    queue: str,
    settle: Callable[[list[tuple[AbstractIncomingMessage, bytes]]], set[int]],
) -> None:
    """Take every message of ``queue`` unacknowledged, acknowledge those ``settle`` names (by
    position), and put the others back in place by closing the channel."""
    async with exclusive(connection, queue):
        await _take_all(connection, queue, settle)


async def _take_all(
    connection: AbstractConnection,
    queue: str,
    settle: Callable[[list[tuple[AbstractIncomingMessage, bytes]]], set[int]],
) -> None:
    channel = await plain_channel(connection)
    try:
        source = await channel.get_queue(queue, ensure=False)
        taken: list[tuple[AbstractIncomingMessage, bytes]] = []
        while True:
            message = await source.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append((message, message.body))
        for index in sorted(settle(taken)):
            await taken[index][0].ack()
    finally:
        if not channel.is_closed:
            await channel.close()


def fold(taken: Sequence[tuple[AbstractIncomingMessage, bytes]]) -> dict[str, GroupRecord]:
    """The groups the registry's records describe (first patterns and owner win)."""
    groups: dict[str, GroupRecord] = {}
    for message, body in taken:
        fact = orjson.loads(body)
        name = fact["group"]
        record = groups.get(name)
        if record is None:
            record = groups[name] = GroupRecord(tuple(fact.get("topics") or ()))
        if not record.topics and fact.get("topics"):
            record.topics = tuple(fact["topics"])
        if fact.get("making"):
            record.making = True
        elif fact.get("topics"):
            record.complete = True
        if record.owner is None and fact.get("owner"):
            record.owner = fact["owner"]
        record.lost += int(fact.get("lost", 0))
        record.records.append(message)
    return groups


def group_fact(
    group: str,
    *,
    topics: Sequence[str] = (),
    owner: str | None = None,
    lost: int = 0,
    making: bool = False,
) -> bytes:
    """A record of ``group``; ``making``: its making began and is not done yet."""
    fact: dict[str, object] = {"group": group, "topics": list(topics), "owner": owner, "lost": lost}
    if making:
        fact["making"] = True
    return orjson.dumps(fact)


async def read_groups(connection: AbstractConnection, registry: str) -> dict[str, GroupRecord]:
    found: dict[str, GroupRecord] = {}

    def keep(taken: list[tuple[AbstractIncomingMessage, bytes]]) -> set[int]:
        found.update(fold(taken))
        # A complete group's ``making`` record says nothing more: removed while the registry
        # is held, so records do not pile up (every read takes them all).
        return {
            i
            for i, (_, body) in enumerate(taken)
            if (fact := orjson.loads(body)).get("making") and found[fact["group"]].complete
        }

    await take_all(connection, registry, keep)
    return found


async def forget_group(connection: AbstractConnection, registry: str, group: str) -> bool:
    """Remove the group's records; whether there were any."""
    gone: set[int] = set()

    def mine(taken: list[tuple[AbstractIncomingMessage, bytes]]) -> set[int]:
        gone.update(i for i, (_, body) in enumerate(taken) if orjson.loads(body)["group"] == group)
        return gone

    await take_all(connection, registry, mine)
    return bool(gone)


async def dead_letters(
    connection: AbstractConnection,
    queue: str,
    *,
    ids: Sequence[str] | None,
    remove: bool,
    limit: int,
) -> list[Event]:
    """The dead letters of one queue, oldest first; ``remove`` acknowledges those returned."""
    chosen: list[Event] = []
    wanted = set(ids) if ids is not None else None

    def pick(taken: list[tuple[AbstractIncomingMessage, bytes]]) -> set[int]:
        positions: set[int] = set()
        for index, (_, body) in enumerate(taken):
            if len(chosen) >= limit:
                break
            letter = decode_event(body)
            if wanted is None or letter.id in wanted:
                chosen.append(letter)
                positions.add(index)
        return positions if remove else set()

    await take_all(connection, queue, pick)
    return chosen


class DeliveryWindow:
    """The delivery ids this instance accepted, per topic: the newest ``max_count`` of them,
    each for ``max_age`` seconds (memory stays bounded whatever ``min_age`` says)."""

    def __init__(self, policy: RetentionPolicy) -> None:
        self._ids: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._policy = policy

    def seen(self, key: tuple[str, str]) -> bool:
        """Record the id; whether it was already there."""
        now = time.monotonic()
        ids = self._ids
        while ids and now - next(iter(ids.values())) >= self._policy.max_age:
            ids.popitem(last=False)
        if key in ids:
            return True
        while len(ids) >= max(self._policy.max_count, 1):
            ids.popitem(last=False)
        ids[key] = now
        return False

    def forget(self, key: tuple[str, str]) -> None:
        """Drop an id recorded for a publish that failed, so the sender's retry is taken."""
        self._ids.pop(key, None)
