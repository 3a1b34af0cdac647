"""What the two outbound AWS bridges (SNS, EventBridge) share: settings, batching, wiring.

Each named instance is one subscription, ``<module>.<instance>``, of the configured topics. A
subscription's handler gets one event, so batches are made of handler calls under way together:
the subscription runs ``concurrency`` consumers (10 by default), and their calls are gathered by
a group commit (``callboard.group_commit``): a lone event goes out at once, and the events that
arrive while a request is on its way ride the next one, within the services' limits (10
entries and 256 KB a request, ``MAX_ENTRIES`` and ``MAX_BYTES``). Each call waits for its own
entry's answer: an entry the service refused, or a request that failed, raises
``BridgeFailed`` for that event alone, which the shared delivery policy retries and then
dead-letters. An event too large for the service is refused before any request.

With ``concurrency`` above 1 the order of events is not kept; ``concurrency: 1`` keeps it, one
event per request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import Field, field_validator

from callboard.bridges.aws import ClientSettings, Service, client, refusal, require_sdk
from callboard.errors import BridgeFailed, InvalidTopicError
from callboard.events import Event
from callboard.extensions import ModuleContext
from callboard.group_commit import GroupCommit
from callboard.service import EventsService, Subscription
from callboard.topics import normalize_patterns

logger = logging.getLogger("callboard.bridges.aws")

#: The most entries of one SNS ``PublishBatch`` or EventBridge ``PutEvents`` request, and of
#: bytes in one request (the entries' sizes summed).
MAX_ENTRIES = 10
MAX_BYTES = 256 * 1024


class Target(ClientSettings):
    """One instance: which callboard topics go out, and how."""

    #: Callboard topic patterns (``orders.>``) whose events go out.
    topics: tuple[str, ...] = Field(min_length=1)
    #: ``json``: the payload as it is; ``cloudevents``: a structured CloudEvent (JSON).
    format: Literal["json", "cloudevents"] = "json"
    #: EventBridge's ``Source``; the CloudEvents ``source`` in either bridge.
    source: str = Field(default="callboard", min_length=1)
    #: Handler calls under way at once, gathered into requests.
    concurrency: int = Field(default=MAX_ENTRIES, ge=1, le=100)

    @field_validator("topics")
    @classmethod
    def _patterns(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return normalize_patterns(topics)
        except InvalidTopicError as error:
            raise ValueError(str(error)) from None


@dataclass(frozen=True, slots=True)
class Entry:
    """One event as the service's request entry (without its ``Id``), and its size in bytes."""

    fields: dict[str, Any]
    size: int


#: A refusal of one entry: the service's error code and message.
Refusal = tuple[str, str]
#: Sends one request of entries; per entry, ``None`` (taken) or its refusal.
Send = Callable[[Sequence[Entry]], Awaitable[Sequence[Refusal | None]]]
#: Makes an event's entry (its size is checked against ``MAX_BYTES`` when it is sent).
Encode = Callable[[Event], Entry]
T = TypeVar("T", bound="Target")
#: Given the SDK client and an instance's settings: how to send, and how to encode.
Make = Callable[[Any, T], tuple[Send, Encode]]


def text_size(*texts: str | None) -> int:
    """Bytes the services count for these strings (UTF-8)."""
    return sum(len(text.encode()) for text in texts if text)


class Batcher:
    """Gathers entries of concurrent calls into requests within the limits."""

    def __init__(self, send: Send, what: str) -> None:
        self._send = send
        self._what = what
        self._commit: GroupCommit[Entry, None] = GroupCommit(self._flush, MAX_ENTRIES)

    async def put(self, entry: Entry) -> None:
        """Send ``entry``; returns once the service took it, raises ``BridgeFailed`` if not."""
        if entry.size > MAX_BYTES:
            raise BridgeFailed(
                f"{self._what} takes at most {MAX_BYTES} bytes an entry; this one has {entry.size}",
                code="TooLarge",
            )
        await self._commit.submit(entry)

    def _refused(self, refusal: Refusal) -> BridgeFailed:
        code, message = refusal
        return BridgeFailed(f"{self._what} refused it: {code}: {message}", code=code)

    async def _flush(self, entries: list[Entry]) -> list[BridgeFailed | None]:
        results: list[BridgeFailed | None] = []
        for request in within_bytes(entries):
            try:
                answers = await self._send(request)
            except Exception as error:
                refused = refusal(error)
                failure = (
                    BridgeFailed(f"{self._what} could not be reached: {error}")
                    if refused is None
                    else self._refused(refused)
                )
                results += [failure] * len(request)
                continue
            results += [None if answer is None else self._refused(answer) for answer in answers]
        return results


def within_bytes(entries: Sequence[Entry]) -> list[list[Entry]]:
    """``entries`` in order, cut into requests of at most ``MAX_BYTES`` each."""
    requests: list[list[Entry]] = []
    size = 0
    for entry in entries:
        if not requests or size + entry.size > MAX_BYTES:
            requests.append([])
            size = 0
        requests[-1].append(entry)
        size += entry.size
    return requests


class OutBridge(Generic[T]):
    """One instance running: its client, its subscription, its batcher."""

    def __init__(self, subscription: str, target: T, service: Service, make: Make[T]) -> None:
        self.subscription = subscription
        self.target = target
        self._service = service
        self._make = make
        self._stack = AsyncExitStack()
        self._running: Subscription | None = None

    async def start(self, events: EventsService) -> None:
        sdk = await self._stack.enter_async_context(client(self._service, self.target))
        send, encode = self._make(sdk, self.target)
        batcher = Batcher(send, f"{self._service} ({self.subscription})")

        async def handle(event: Event) -> None:
            await batcher.put(encode(event))

        self._running = await events.subscribe(
            self.subscription, self.target.topics, handle, concurrency=self.target.concurrency
        )
        logger.info("sending topics %s out by %s", list(self.target.topics), self.subscription)

    async def stop(self) -> None:
        """Finish the calls under way, then close the client."""
        if self._running is not None:
            await self._running.close()
            self._running = None
        await self._stack.aclose()


def register_instances(
    context: ModuleContext, instances: Mapping[str, T], service: Service, make: Make[T]
) -> None:
    """Run an ``OutBridge`` per instance, subscribed as ``<module>.<instance>``."""
    require_sdk(context.name)
    for instance, target in instances.items():
        bridge = OutBridge(f"{context.name}.{instance}", target, service, make)
        context.lifecycle.on_start(bridge.start)
        context.lifecycle.on_stop(bridge.stop)
