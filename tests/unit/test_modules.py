from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from callboard import (
    Callboard,
    ConfigError,
    Event,
    EventsService,
    MemoryBroker,
    Module,
    ModuleContext,
    ModuleError,
    Rejection,
    WebhookRequest,
    build,
    module,
)
from callboard.config import parse_config
from callboard.modules import ENTRY_POINT_GROUP, import_module_object, resolve_modules

SAMPLE = """
from callboard import module

@module("alpha")
def alpha(context):
    pass

@module("beta")
def beta(context):
    pass

class Holder:
    @module("nested")
    def nested(context):
        pass

not_a_module = object()
"""


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    (tmp_path / "cb_sample_modules.py").write_text(SAMPLE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("cb_sample_modules")
    sys.modules.pop("cb_sample_modules", None)


@dataclass
class FakeEntryPoint:
    name: str
    value: str


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *values: str) -> list[str]:
    asked: list[str] = []

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        asked.append(group)
        return [FakeEntryPoint(v.rpartition(":")[2], v) for v in values]

    monkeypatch.setattr("callboard.modules.entry_points", entry_points)
    return asked


def test_import_by_dotted_path(sample: ModuleType) -> None:
    assert import_module_object("cb_sample_modules:alpha") is sample.alpha
    assert import_module_object("cb_sample_modules:Holder.nested").name == "nested"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("cb_sample_modules", "expected 'package.module:attribute'"),
        (":alpha", "expected 'package.module:attribute'"),
        ("cb_sample_modules:", "expected 'package.module:attribute'"),
        ("no_such_package_here:alpha", "cannot be imported"),
        ("cb_sample_modules:gamma", "cannot be imported"),
        ("cb_sample_modules:not_a_module", "is not a module"),
    ],
)
def test_import_errors_name_the_spec(sample: ModuleType, spec: str, problem: str) -> None:
    with pytest.raises(ModuleError) as caught:
        import_module_object(spec)
    assert caught.value.module == spec
    assert problem in str(caught.value)


def test_modules_come_from_code_config_and_entry_points_in_order(
    sample: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = fake_entry_points(monkeypatch, "cb_sample_modules:beta", "cb_sample_modules:alpha")

    @module("in-code")
    def in_code(context: ModuleContext) -> None:
        pass

    config = parse_config({"events": {"load": ["cb_sample_modules:alpha"]}}, env={})
    found = resolve_modules(config, [in_code])
    assert [m.name for m in found] == ["in-code", "alpha", "beta"]
    assert asked == [ENTRY_POINT_GROUP]
    assert [m.name for m in resolve_modules(config, [in_code], use_entry_points=False)] == [
        "in-code",
        "alpha",
    ]


def test_two_modules_with_one_name_are_refused(
    sample: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_entry_points(monkeypatch)
    impostor = module("alpha")(lambda context: None)
    config = parse_config({"events": {"load": ["cb_sample_modules:alpha"]}}, env={})
    with pytest.raises(ModuleError, match="two different modules have this name") as caught:
        resolve_modules(config, [impostor])
    assert caught.value.module == "alpha"


def test_a_module_section_nobody_claims_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch)
    config = parse_config({"events": {"modules": {"githib": {"webhookSecret": "x"}}}}, env={})
    with pytest.raises(ConfigError) as caught:
        resolve_modules(config)
    assert caught.value.path == "events.modules.githib"
    assert "events.load" in str(caught.value)


def test_a_module_section_goes_to_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch)
    seen: list[dict[str, Any]] = []

    @module("custom")
    def custom(context: ModuleContext) -> None:
        seen.append(dict(context.config))

    config = parse_config({"events": {"modules": {"custom": {"key": "value"}}}}, env={})
    build(config, modules=[custom])
    assert seen == [{"key": "value"}]


class Settings(BaseModel):
    model_config = {"extra": "forbid"}
    secret: str
    retries: int = 3


def test_module_settings_errors_name_the_key() -> None:
    context = ModuleContext("custom", {"secret": "s", "retries": "many"})
    with pytest.raises(ConfigError) as caught:
        context.settings(Settings)
    assert caught.value.path == "events.modules.custom.retries"
    assert ModuleContext("custom", {"secret": "s"}).settings(Settings).retries == 3
    with pytest.raises(ConfigError) as missing:
        ModuleContext("custom", {}).settings(Settings)
    assert missing.value.path == "events.modules.custom.secret"


def test_a_module_failing_to_register_is_named() -> None:
    @module("broken")
    def broken(context: ModuleContext) -> None:
        raise RuntimeError("no luck")

    with pytest.raises(ModuleError, match="module 'broken': failed to register: no luck"):
        build(modules=[broken], use_entry_points=False)


def test_a_class_based_module_meets_the_protocol() -> None:
    class Plain:
        name = "plain"

        def register(self, context: ModuleContext) -> None:
            context.ingress.add_ingress("plain")

    plain: Module = Plain()
    assert set(build(modules=[plain], use_entry_points=False).ingress.ingresses) == {"plain"}


def test_only_one_module_may_set_the_broker() -> None:
    broker = MemoryBroker()

    @module("one")
    def one(context: ModuleContext) -> None:
        context.broker.set_broker(lambda: broker)

    @module("two")
    def two(context: ModuleContext) -> None:
        context.broker.set_broker(MemoryBroker)

    assert build(modules=[one], use_entry_points=False).events.broker is broker
    with pytest.raises(ModuleError, match="module 'one' already does") as caught:
        build(modules=[one, two], use_entry_points=False)
    assert caught.value.module == "two"


def test_two_modules_may_not_add_one_ingress() -> None:
    first = module("first")(lambda context: context.ingress.add_ingress("github"))
    second = module("second")(lambda context: context.ingress.add_ingress("github"))
    with pytest.raises(ModuleError, match="module 'first' already added") as caught:
        build(modules=[first, second], use_entry_points=False)
    assert caught.value.module == "second"


async def test_a_module_ingress_keeps_its_validator_when_config_names_the_topic_too() -> None:
    async def refuse(request: WebhookRequest) -> Rejection | None:
        return Rejection(401)

    secured = module("secured")(
        lambda context: context.ingress.add_ingress("github", validator=refuse)
    )
    config = parse_config({"events": {"http": {"topics": ["github", "plain"]}}}, env={})
    board = build(config, modules=[secured], use_entry_points=False)
    assert board.ingress.ingresses["github"].validator is refuse
    assert board.ingress.ingresses["plain"].validator is None


class Journal:
    """Records what modules did, in order."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def module(self, name: str, *, fail_start: bool = False) -> Module:
        entries = self.entries

        @module(name)
        def register(context: ModuleContext) -> None:
            async def start(events: EventsService) -> None:
                entries.append(f"start {name}")
                if fail_start:
                    raise RuntimeError("cannot reach the provider")

            async def stop() -> None:
                entries.append(f"stop {name}")

            context.lifecycle.on_start(start)
            context.lifecycle.on_stop(stop)

        return register


async def test_modules_start_in_order_and_stop_in_reverse() -> None:
    journal = Journal()
    board = build(
        modules=[journal.module("a"), journal.module("b"), journal.module("c")],
        use_entry_points=False,
    )
    assert not board.ready
    async with board.lifespan():
        assert board.ready
        assert journal.entries == ["start a", "start b", "start c"]
    assert not board.ready
    assert journal.entries[3:] == ["stop c", "stop b", "stop a"]


async def test_a_module_failing_to_start_is_named_and_the_others_are_stopped() -> None:
    journal = Journal()
    board = build(
        modules=[journal.module("a"), journal.module("b", fail_start=True), journal.module("c")],
        use_entry_points=False,
    )
    with pytest.raises(ModuleError) as caught:
        await board.start()
    assert caught.value.module == "b"
    assert "module 'b': failed to start: cannot reach the provider" in str(caught.value)
    assert journal.entries == ["start a", "start b", "stop b", "stop a"]
    assert not board.ready


async def test_module_subscriptions_routers_and_hooks_run_with_the_app() -> None:
    got: list[Event] = []
    published_at_start: list[bool] = []

    class Counter:
        topics = ("github.push",)

        async def on_event(self, event: Event) -> None:
            got.append(event)

    @module("wiring")
    def wiring(context: ModuleContext) -> None:
        context.subscribers.add_router(
            id="github-router", topics="github", destination=lambda e: f"github.{e.payload}"
        )
        context.subscribers.add_subscriber(Counter(), id="counter")

        async def on_start(events: EventsService) -> None:
            published_at_start.append(await events.publish(Event(topic="github", payload="push")))

        context.lifecycle.on_start(on_start)

    board: Callboard = build(modules=[wiring], use_entry_points=False)
    async with board.lifespan():
        assert {s.id for s in board.events.subscriptions} == {"github-router", "counter"}
        assert isinstance(board.events.broker, MemoryBroker)
        await board.events.broker.drain()
    assert published_at_start == [True]
    assert [e.topic for e in got] == ["github.push"]
