"""SNS out: the events of subscribed topics published to an SNS topic, in batches.

Configuration, ``events.modules.awsSns.awsSnsPublishingEventConsumer.<instance>``::

    topicArn: arn:aws:sns:eu-west-1:123456789012:orders     # required
    topics: [orders.>]              # callboard topic patterns, required
    region: eu-west-1               # endpoint, accessKeyId, secretAccessKey: bridges/aws.py
    format: json                    # or cloudevents
    source: callboard               # the CloudEvents source
    concurrency: 10                 # handler calls gathered into one PublishBatch
    attributes:
      forward: true                 # metadata as message attributes
      whitelist: []                 # only these (all when empty)
      blacklist: []                 # never these

The message is the payload as JSON (or a structured CloudEvent); its attributes are the event's
metadata (a list as ``String.Array``) and ``callboard-topic``, the event's topic, for SNS
subscription filter policies. Metadata whose name SNS does not allow, or with an empty value, is
left out. A FIFO topic (``.fifo``) gets the event's topic as message group and a hash of its id
as deduplication id, so a retried event is not delivered twice. SNS delivers at most 10
attributes to an SQS queue with raw message delivery: name them in ``whitelist`` there.
Batching, retries and dead letters: ``callboard.bridges.aws_out``.
"""

from __future__ import annotations

import hashlib
import re
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
    from types_aiobotocore_sns.client import SNSClient
    from types_aiobotocore_sns.type_defs import (
        MessageAttributeValueTypeDef,
        PublishBatchRequestEntryTypeDef,
    )

NAME = "awsSns"
#: The attribute that carries the event's topic.
TOPIC_ATTRIBUTE = "callboard-topic"
#: Names SNS accepts for message attributes.
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")
_RESERVED = ("aws.", "amazon.")


class Attributes(Section):
    forward: bool = True
    whitelist: tuple[str, ...] = ()
    blacklist: tuple[str, ...] = ()

    def allows(self, name: str) -> bool:
        if not self.forward or name.lower() in (n.lower() for n in self.blacklist):
            return False
        return not self.whitelist or name.lower() in (n.lower() for n in self.whitelist)


class SnsTarget(Target):
    topic_arn: str = Field(alias="topicArn", pattern=r"^arn:[^:]+:sns:")
    attributes: Attributes = Attributes()


class Settings(Section):
    instances: dict[str, SnsTarget] = Field(default={}, alias="awsSnsPublishingEventConsumer")


def _attribute_value(value: str | list[str]) -> MessageAttributeValueTypeDef | None:
    if isinstance(value, list):
        return {"DataType": "String.Array", "StringValue": orjson.dumps(value).decode()}
    return {"DataType": "String", "StringValue": value} if value else None


def encoder(target: SnsTarget) -> Encode:
    """How an event becomes a ``PublishBatch`` entry for ``target``."""
    fifo = target.topic_arn.endswith(".fifo")

    def encode(event: Event) -> Entry:
        document = (
            to_attributes(event, source=target.source)
            if target.format == "cloudevents"
            else event.payload
        )
        message = orjson.dumps(document).decode()
        attributes: dict[str, MessageAttributeValueTypeDef] = {
            TOPIC_ATTRIBUTE: {"DataType": "String", "StringValue": event.topic}
        }
        for name, value in event.metadata.items():
            allowed = _ATTRIBUTE_NAME.fullmatch(name) and not name.startswith(_RESERVED)
            converted = (
                _attribute_value(value) if allowed and target.attributes.allows(name) else None
            )
            if converted is not None:
                attributes.setdefault(name, converted)
        fields: dict[str, Any] = {"Message": message, "MessageAttributes": attributes}
        if fifo:
            fields["MessageGroupId"] = event.topic
            fields["MessageDeduplicationId"] = hashlib.sha256(event.id.encode()).hexdigest()
        counted = size(message) + sum(
            size(name, value["DataType"], value.get("StringValue"))
            for name, value in attributes.items()
        )
        return Entry(fields, counted)

    return encode


def sender(sns: SNSClient, target: SnsTarget) -> tuple[Send, Encode]:
    """``PublishBatch`` to ``target``'s topic, and the entries it takes."""

    async def send(entries: Sequence[Entry]) -> list[Refusal | None]:
        request = [
            cast("PublishBatchRequestEntryTypeDef", {"Id": str(index), **entry.fields})
            for index, entry in enumerate(entries)
        ]
        answer = await sns.publish_batch(
            TopicArn=target.topic_arn, PublishBatchRequestEntries=request
        )
        failed = {
            failure["Id"]: (failure.get("Code", ""), failure.get("Message", ""))
            for failure in answer.get("Failed", [])
        }
        return [failed.get(str(index)) for index in range(len(entries))]

    return send, encoder(target)


def _register(context: ModuleContext) -> None:
    register_instances(context, context.settings(Settings).instances, "sns", sender)


module = FunctionModule(NAME, _register)
