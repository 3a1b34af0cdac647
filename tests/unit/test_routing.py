from __future__ import annotations

import logging

import pytest

from callboard import DELIVERY_ID, Event, EventRouter, InvalidTopicError, SubTopicEventRouter
from callboard.extensions import SubscriberPoint
from callboard.testing import RecordingEventsService


def github_event(event: Event) -> str | None:
    return event.header("x-github-event")


async def test_a_router_republishes_on_the_computed_topic(events: RecordingEventsService) -> None:
    router = EventRouter(
        events,
        id="kind-router",
        topics=["orders", "refunds"],
        destination=lambda e: f"sorted.{e.payload['kind']}" if e.payload.get("kind") else None,
    )
    subscription = await router.subscribe()
    assert subscription.id == "kind-router"
    assert subscription.topics == ("orders", "refunds")

    original = Event(topic="orders", payload={"kind": "big"}, metadata={"x-a": "1"})
    await events.publish(original)
    await events.publish(Event(topic="refunds", payload={}))  # no destination: dropped
    await events.drain()

    routed = events.published_on("sorted.big")
    assert len(routed) == 1
    assert routed[0].payload == original.payload
    assert routed[0].metadata == original.metadata
    assert routed[0].id != original.id
    assert [e.topic for e in events.published] == ["orders", "refunds", "sorted.big"]


async def test_subscribe_is_idempotent(events: RecordingEventsService) -> None:
    router = EventRouter(events, id="r", topics="a", destination=lambda e: "b")
    first = await router.subscribe()
    assert await router.subscribe() is first
    assert len(events.subscribed) == 1
    await events.publish(Event(topic="a"))
    await events.drain()
    assert len(events.published_on("b")) == 1


async def test_sub_topic_router(events: RecordingEventsService) -> None:
    router = SubTopicEventRouter(events, topic="github", sub_topic=github_event)
    assert router.id == "github-router"
    await router.subscribe()
    pushes: list[Event] = []

    async def on_push(event: Event) -> None:
        pushes.append(event)

    await events.subscribe("ci", "github.push", on_push)
    await events.publish(
        Event(topic="github", payload={"ref": "main"}, metadata={"X-GitHub-Event": "push"})
    )
    await events.publish(Event(topic="github", payload={}))  # no header: dropped
    await events.drain()

    assert [e.payload for e in pushes] == [{"ref": "main"}]
    assert pushes[0].header("x-github-event") == "push"
    assert [e.topic for e in events.published] == ["github", "github", "github.push"]


async def test_sub_topic_router_with_its_own_id(events: RecordingEventsService) -> None:
    router = SubTopicEventRouter(events, topic="gitlab", sub_topic=lambda e: "x", id="custom")
    assert (await router.subscribe()).id == "custom"


async def test_an_invalid_sub_topic_is_dropped_with_a_warning(
    events: RecordingEventsService, caplog: pytest.LogCaptureFixture
) -> None:
    router = SubTopicEventRouter(events, topic="github", sub_topic=github_event)
    await router.subscribe()
    with caplog.at_level(logging.WARNING, logger="callboard.routing"):
        await events.publish(Event(topic="github", metadata={"x-github-event": "pull request"}))
        await events.publish(Event(topic="github", metadata={"x-github-event": "a.b"}))
        await events.drain()
    assert [e.topic for e in events.published] == ["github", "github", "github.a.b"]
    assert "'pull request' is not a valid topic segment" in caplog.text
    assert await events.dead_letters("github-router") == []


async def test_a_routed_redelivery_is_routed_once(events: RecordingEventsService) -> None:
    await SubTopicEventRouter(events, topic="github", sub_topic=github_event).subscribe()
    for _ in range(2):
        event = Event(topic="github", metadata={"x-github-event": "push", DELIVERY_ID: "d1"})
        await events.publish(event)
    await events.drain()
    assert len(events.published_on("github.push")) == 1


def test_router_topics_are_checked() -> None:
    with pytest.raises(InvalidTopicError):
        EventRouter(
            RecordingEventsService(), id="r", topics="bad topic", destination=lambda e: None
        )


def test_a_module_sub_topic_router_has_the_same_rule(caplog: pytest.LogCaptureFixture) -> None:
    point = SubscriberPoint()
    point.add_sub_topic_router(
        id="AzureRouter", topic="azureDevOps", sub_topic=lambda e: e.payload.get("eventType")
    )
    (route,) = point.routers
    assert (route.id, route.topics) == ("AzureRouter", ("azureDevOps",))
    destination = route.destination
    assert destination(Event(topic="azureDevOps", payload={"eventType": "git.push"})) == (
        "azureDevOps.git.push"
    )
    assert destination(Event(topic="azureDevOps", payload={"eventType": ""})) is None
    assert destination(Event(topic="azureDevOps", payload={})) is None
    with caplog.at_level(logging.WARNING, logger="callboard.routing"):
        assert destination(Event(topic="azureDevOps", payload={"eventType": "a b"})) is None
    assert "'AzureRouter'" in caplog.text
    assert "'a b' is not a valid topic segment" in caplog.text
