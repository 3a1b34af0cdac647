"""EventBridge out: the events of subscribed topics put on an event bus, in batches.

Configuration, ``events.modules.awsEventBridge.awsEventBridgePublishingEventConsumer.<instance>``::

    eventBusName: default           # a bus name or ARN
    topics: [github.>]              # callboard topic patterns, required
    source: callboard               # the events' Source (and the CloudEvents source)
    region: eu-west-1               # endpoint, accessKeyId, secretAccessKey: bridges/aws.py
    format: json                    # or cloudevents
    concurrency: 10                 # handler calls gathered into one PutEvents

Each event becomes an entry with ``Source`` = ``source``, ``DetailType`` = the event's topic,
``Time`` = the event's time and ``Detail`` = its payload. EventBridge takes only a JSON object
as detail: any other payload is sent as ``{"payload": <payload>}``. The metadata does not go out
in ``json`` format; ``cloudevents`` sends the whole event as a structured CloudEvent (detail).
Batching, retries and dead letters: ``callboard.bridges.aws_out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import orjson
from pydantic import Field

from callboard.bridges.aws_out import Encode, Entry, Refusal, Send, Target, register_instances
from callboard.bridges.aws_out import text_size as size
from callboard.cloud_events import to_attributes
from callboard.events import Event
from callboard.extensions import FunctionModule, ModuleContext
from callboard.settings import Section

if TYPE_CHECKING:
    from types_aiobotocore_events.client import EventBridgeClient
    from types_aiobotocore_events.type_defs import PutEventsRequestEntryTypeDef

NAME = "awsEventBridge"
#: Bytes EventBridge counts for an entry's ``Time``.
TIME_SIZE = 14


class BusTarget(Target):
    event_bus_name: str = Field(default="default", alias="eventBusName", min_length=1)


class Settings(Section):
    instances: dict[str, BusTarget] = Field(
        default={}, alias="awsEventBridgePublishingEventConsumer"
    )


def encoder(target: BusTarget) -> Encode:
    """How an event becomes a ``PutEvents`` entry for ``target``."""

    def encode(event: Event) -> Entry:
        detail: Any
        if target.format == "cloudevents":
            detail = to_attributes(event, source=target.source)
        else:
            payload = event.payload
            detail = payload if isinstance(payload, dict) else {"payload": payload}
        text = orjson.dumps(detail).decode()
        fields: dict[str, Any] = {
            "Source": target.source,
            "DetailType": event.topic,
            "Detail": text,
            "Time": event.time,
            "EventBusName": target.event_bus_name,
        }
        return Entry(fields, TIME_SIZE + size(target.source, event.topic, text))

    return encode


def sender(bus: EventBridgeClient, target: BusTarget) -> tuple[Send, Encode]:
    """``PutEvents`` on ``target``'s bus, and the entries it takes."""

    async def send(entries: Sequence[Entry]) -> list[Refusal | None]:
        request = [cast("PutEventsRequestEntryTypeDef", entry.fields) for entry in entries]
        answer = await bus.put_events(Entries=request)
        # One result per entry, in order: an error code, or an event id.
        return [
            (result["ErrorCode"], result.get("ErrorMessage", "")) if "ErrorCode" in result else None
            for result in answer["Entries"]
        ]

    return send, encoder(target)


def _register(context: ModuleContext) -> None:
    register_instances(context, context.settings(Settings).instances, "events", sender)


module = FunctionModule(NAME, _register)
