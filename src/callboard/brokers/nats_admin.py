"""The NATS broker's streams, group records and operations (``BrokerAdmin``).

Group records live in a stream of their own, one subject per group, the last message kept:
made with ``Nats-Expected-Last-Subject-Sequence: 0`` (only if absent) and changed with the
sequence last read (compare and set), so brokers in several processes agree on a group's topics
and its first owner. Retention is ``nats_retention``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)

from callboard.brokers.base import RetentionPolicy, Start, SubscriptionInfo
from callboard.brokers.nats_consumer import NatsConsumer, Released
from callboard.brokers.nats_names import Layout, decode_event, group_key
from callboard.errors import BrokerError, BrokerUnavailable, SubscriptionError
from callboard.events import Event

logger = logging.getLogger(__name__)

_EXPECT_LAST = "Nats-Expected-Last-Subject-Sequence"
TRANSIENT = (nats.errors.Error, TimeoutError, OSError)


def unavailable(doing: str, error: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(f"NATS did not answer while {doing} ({error!r}); try again later")


class NatsAdmin:
    """What the broker keeps on the server besides events in flight, and the operations."""

    def __init__(
        self, layout: Layout, retention: RetentionPolicy, timeout: float, replicas: int
    ) -> None:
        self._layout = layout
        self._replicas = replicas
        self._retention = retention
        self._timeout = timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        #: This instance's open members, per group key.
        self._readers: dict[str, list[NatsConsumer]] = {}
        #: Handed back and not delivered again yet, per group key (JetStream counts them as
        #: pending acknowledgement; callboard as backlog).
        self._released: dict[str, Released] = {}

    @property
    def _client(self) -> Client:
        if self._nc is None:
            raise BrokerUnavailable("the NATS broker is not started (call start() first)")
        return self._nc

    @property
    def _jsc(self) -> JetStreamContext:
        if self._nc is None or self._js is None:
            raise BrokerUnavailable("the NATS broker is not started (call start() first)")
        return self._js

    # -- streams --------------------------------------------------------------------------------

    def _stream_configs(self) -> list[StreamConfig]:
        layout, policy = self._layout, self._retention
        prefix = layout.prefix
        stored: dict[str, Any] = {"storage": StorageType.FILE, "num_replicas": self._replicas}
        return [
            StreamConfig(
                name=layout.events,
                subjects=[f"{prefix}.ev.>", f"{prefix}.to.>"],
                max_age=policy.max_age + policy.interval,
                duplicate_window=policy.max_age,
                **stored,
            ),
            StreamConfig(name=layout.dead, subjects=[f"{prefix}.dl.>"], **stored),
            StreamConfig(
                name=layout.groups,
                subjects=[f"{prefix}.grp.>"],
                max_msgs_per_subject=1,
                **stored,
            ),
        ]

    async def _ensure_streams(self, *, upgrade: bool = False) -> list[str]:
        """Create the streams that are missing; with ``upgrade``, also bring the limits of
        existing ones to this broker's retention policy (``migrate``). What was applied."""
        applied: list[str] = []
        js = self._jsc
        try:
            for config in self._stream_configs():
                assert config.name is not None
                try:
                    current = (await js.stream_info(config.name)).config
                except nats.js.errors.NotFoundError:
                    await js.add_stream(config)
                    applied.append(f"created stream {config.name}")
                    continue
                limits = (
                    "subjects",
                    "max_age",
                    "duplicate_window",
                    "max_msgs_per_subject",
                    "num_replicas",
                )
                wanted = {name: getattr(config, name) for name in limits}
                if upgrade and any(getattr(current, k) != v for k, v in wanted.items() if v):
                    await js.update_stream(config)
                    applied.append(f"updated the limits of stream {config.name}")
        except nats.js.errors.APIError as error:
            raise BrokerError(
                f"NATS refused the broker's streams ({error}); is JetStream enabled (-js)?"
            ) from error
        except TRANSIENT as error:
            raise unavailable("creating the streams", error) from error
        return applied

    async def _still_stored(self, seq: int) -> bool:
        try:
            await self._jsc.get_msg(self._layout.events, seq)
        except nats.js.errors.NotFoundError:
            return False
        except TRANSIENT as error:
            raise unavailable("checking a delivery id", error) from error
        return True

    # -- group records --------------------------------------------------------------------------

    async def _record(self, key: str) -> tuple[dict[str, Any], int] | None:
        """The group's record and its sequence, or ``None``."""
        try:
            found = await self._jsc.get_msg(
                self._layout.groups, subject=self._layout.group_subject(key)
            )
        except nats.js.errors.NotFoundError:
            return None
        except TRANSIENT as error:
            raise unavailable("reading a subscription", error) from error
        assert found.data is not None
        assert found.seq is not None
        record: dict[str, Any] = json.loads(found.data)
        return record, found.seq

    async def _write_record(self, key: str, record: Mapping[str, Any], last: int) -> bool:
        """Write if the group's last record is still ``last`` (0: none); whether it was."""
        try:
            await self._jsc.publish(
                self._layout.group_subject(key),
                json.dumps(record).encode(),
                timeout=self._timeout,
                headers={_EXPECT_LAST: str(last)},
            )
        except nats.js.errors.BadRequestError:
            return False
        except nats.js.errors.APIError as error:
            if error.err_code == 10071:  # wrong last sequence
                return False
            raise BrokerError(f"NATS refused a subscription record: {error}") from error
        except TRANSIENT as error:
            raise unavailable("writing a subscription", error) from error
        return True

    async def _join_record(
        self, group: str, key: str, patterns: tuple[str, ...], owner: str | None
    ) -> None:
        for _ in range(10):
            found = await self._record(key)
            if found is None:
                made = {"name": group, "topics": list(patterns), "owner": owner, "lost": 0}
                if await self._write_record(key, made, 0):
                    return
                continue
            record, seq = found
            if set(record["topics"]) != set(patterns):
                raise SubscriptionError(
                    f"subscription {group!r} already reads {record['topics']}; "
                    f"cannot join it with {list(patterns)}: use another subscription id"
                )
            if owner is None or record.get("owner") is not None:
                return
            if await self._write_record(key, {**record, "owner": owner}, seq):
                return
        raise BrokerError(f"subscription {group!r}: its record keeps changing; try again")

    async def _add_lost(self, key: str, lost: int) -> None:
        for _ in range(10):
            found = await self._record(key)
            if found is None:
                return
            record, seq = found
            if await self._write_record(key, {**record, "lost": record["lost"] + lost}, seq):
                return

    # -- consumers ------------------------------------------------------------------------------

    async def _ensure_consumers(
        self, key: str, patterns: tuple[str, ...], start: Start, lease: float
    ) -> None:
        layout = self._layout
        # No cap on what a group holds unacknowledged (JetStream's default stalls it at 1000):
        # callboard's workers bound their batches themselves.
        common: dict[str, Any] = {
            "ack_policy": AckPolicy.EXPLICIT,
            "ack_wait": lease,
            "max_ack_pending": -1,
        }
        if start == "end":
            topics = ConsumerConfig(deliver_policy=DeliverPolicy.NEW, **common)
        elif start == "beginning":
            topics = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, **common)
        else:
            topics = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start, **common
            )
        topics.durable_name = key
        topics.filter_subject = layout.filter_subject(patterns)
        targeted = ConsumerConfig(
            durable_name=key + "_to",
            filter_subject=layout.target_subject(key),
            deliver_policy=DeliverPolicy.NEW,
            **common,
        )
        for config in (topics, targeted):
            await self._ensure_consumer(config)

    async def _ensure_consumer(self, config: ConsumerConfig) -> None:
        js, stream = self._jsc, self._layout.events
        assert config.durable_name is not None
        try:
            try:
                await js.consumer_info(stream, config.durable_name)
            except nats.js.errors.NotFoundError:
                await js.add_consumer(stream, config)
        except nats.js.errors.APIError as error:
            # Made by another process meanwhile is fine; anything else is not.
            try:
                await js.consumer_info(stream, config.durable_name)
            except nats.js.errors.NotFoundError:
                raise BrokerError(f"NATS refused the consumer: {error}") from error
        except TRANSIENT as error:
            raise unavailable("joining a subscription", error) from error

    async def _consumer_figures(self, key: str) -> tuple[int, int]:
        """(pending, acknowledgement pending) of the group's two consumers together."""
        pending = acking = 0
        for name in (key, key + "_to"):
            try:
                info = await self._jsc.consumer_info(self._layout.events, name)
            except nats.js.errors.NotFoundError:
                continue
            pending += info.num_pending or 0
            acking += info.num_ack_pending or 0
        return pending, acking

    async def _positions(self, key: str) -> dict[str, tuple[int, int]]:
        """Per consumer of the group: (pending, the last stream sequence it delivered)."""
        found = {}
        for name in (key, key + "_to"):
            try:
                info = await self._jsc.consumer_info(self._layout.events, name)
            except nats.js.errors.NotFoundError:
                continue
            delivered = info.delivered.stream_seq if info.delivered else 0
            found[name] = (info.num_pending or 0, delivered or 0)
        return found

    async def _records(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            info = await self._jsc.stream_info(
                self._layout.groups, subjects_filter=f"{self._layout.prefix}.grp.>"
            )
        except TRANSIENT as error:
            raise unavailable("listing subscriptions", error) from error
        found = []
        for subject in sorted(info.state.subjects or {}):
            key = subject.rpartition(".")[2]
            record = await self._record(key)
            if record is not None:
                found.append((key, record[0]))
        return found

    async def _subscriptions(
        self, readers: Mapping[str, Sequence[NatsConsumer]]
    ) -> list[SubscriptionInfo]:
        listed = []
        for key, record in await self._records():
            try:
                pending, acking = await self._consumer_figures(key)
            except TRANSIENT as error:
                raise unavailable("reading a subscription's figures", error) from error
            back = len(self._released.get(key, ()))
            buffered = sum(member.buffered for member in readers.get(key, ()))
            listed.append(
                SubscriptionInfo(
                    name=record["name"],
                    topics=tuple(record["topics"]),
                    in_flight=max(0, acking - back - buffered),
                    backlog=pending + back + buffered,
                    lost=record["lost"],
                    owner=record.get("owner"),
                )
            )
        return sorted(listed, key=lambda info: info.name)

    async def delete_subscription(self, group: str) -> bool:
        key = group_key(group)
        if self._readers.get(key):
            raise SubscriptionError(
                f"subscription {group!r} is still read by {len(self._readers[key])} consumer(s) "
                "of this broker; stop them before deleting it"
            )
        js, layout = self._jsc, self._layout
        existed = False
        try:
            for name in (key, key + "_to"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    existed |= await js.delete_consumer(layout.events, name)
            existed |= await self._purge(layout.groups, layout.group_subject(key)) > 0
            existed |= await self._purge(layout.dead, layout.dead_subject(key)) > 0
        except TRANSIENT as error:
            raise unavailable("deleting a subscription", error) from error
        self._released.pop(key, None)
        return existed

    async def _purge(self, stream: str, subject: str | None = None, seq: int | None = None) -> int:
        """Purge and say how many messages went (the client's own purge says only ``True``)."""
        request: dict[str, Any] = {}
        if subject is not None:
            request["filter"] = subject
        if seq is not None:
            request["seq"] = seq
        reply = await self._client.request(
            f"$JS.API.STREAM.PURGE.{stream}", json.dumps(request).encode(), timeout=self._timeout
        )
        answer = json.loads(reply.data)
        if "error" in answer:
            raise BrokerError(f"NATS refused to purge {stream}: {answer['error']}")
        return int(answer.get("purged", 0))

    # -- dead letters ---------------------------------------------------------------------------

    async def take_dead_letters(
        self,
        group: str,
        *,
        ids: Sequence[str] | None = None,
        remove: bool = False,
        limit: int = 100,
    ) -> list[Event]:
        js, layout = self._jsc, self._layout
        subject = layout.dead_subject(group_key(group))
        wanted = set(ids) if ids is not None else None
        chosen: list[tuple[int, Event]] = []
        seq = 1
        try:
            while len(chosen) < limit:
                try:
                    found = await js.get_msg(layout.dead, seq, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    break
                assert found.seq is not None
                assert found.data is not None
                seq = found.seq + 1
                letter = decode_event(found.data)
                if wanted is None or letter.id in wanted:
                    chosen.append((found.seq, letter))
            if remove:
                for number, _ in chosen:
                    await js.delete_msg(layout.dead, number)
        except TRANSIENT as error:
            raise unavailable("reading dead letters", error) from error
        return [letter for _, letter in chosen]
