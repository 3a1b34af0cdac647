"""A module's dead letters kept through the events service (``DeadLetterSink``), on every
broker: listed under their source as a subscription's are (on a durable broker: the in-memory
one forgets a group when its last consumer leaves), a subscription that never has a backlog."""

from __future__ import annotations

import pytest

from callboard.brokers.base import Broker
from callboard.deadletters import read_dead_letters
from callboard.default_service import DefaultEventsService
from callboard.events import Event
from tests.contract.kit import BrokerKit

SOURCE = "awsSqs.orders"


async def test_a_module_s_dead_letters_are_listed_under_their_source(
    kit: BrokerKit, broker: Broker
) -> None:
    if kit.name == "remote":
        # The bus refuses a group on a '$' topic, and reads dead letters of groups only.
        pytest.skip("the bus of another server keeps no dead letters of a module's own")
    ops = kit.admin(broker)
    events = DefaultEventsService(broker)
    original = Event(topic="orders", payload="{not json")
    await events.dead_letter(SOURCE, original, "PoisonMessage: not JSON")
    await events.publish(Event(topic="orders", payload={"n": 1}))
    if broker.capabilities.durable:
        infos = {info.name: info for info in await ops.subscriptions()}
        assert SOURCE in infos
        assert infos[SOURCE].backlog == 0, "the group reads only its own dead-letter topic"
    [letter] = await read_dead_letters(ops, SOURCE)
    assert letter.event.payload == "{not json"
    assert letter.event.topic == "orders"
    assert letter.error == "PoisonMessage: not JSON"
