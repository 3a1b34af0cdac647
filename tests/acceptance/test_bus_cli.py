"""``callboard subscriptions``, ``dead-letters`` and ``replay`` against a durable store."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from callboard.brokers import open_broker
from callboard.cli import main
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.events import Event

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("callboard.brokers.sqlite") is None,
    reason="needs the durable SQLite broker",
)


async def _seed(url: str) -> list[str]:
    async with DefaultEventsService(open_broker(url), retry=RetryPolicy(attempts=1)) as service:
        calls = 0
        failed_thrice = asyncio.Event()

        async def broken(event: Event) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                failed_thrice.set()
            raise ValueError("boom")

        failing = await service.subscribe("svc.bad", "orders.*", broken)
        idle = await service.subscribe("svc.idle", "orders.created", lambda e: asyncio.sleep(0))
        for n in range(3):
            await service.publish(Event(topic="orders.created", payload=n))
        await asyncio.wait_for(failed_thrice.wait(), 20)
        await failing.close()  # finishes the delivery in progress: the last dead letter
        await idle.close()
        letters = await service.dead_letters("svc.bad")
        assert len(letters) == 3
        return [letter.id for letter in letters]


@pytest.fixture
def config(tmp_path: Path) -> tuple[str, list[str]]:
    url = f"sqlite:///{tmp_path / 'cb.db'}"
    ids = asyncio.run(_seed(url))
    path = tmp_path / "callboard.yaml"
    path.write_text(f"events:\n  broker: {url}\n")
    return str(path), ids


def test_subscriptions_are_listed_with_topics_and_lag(
    config: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["subscriptions", "-c", config[0]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SUBSCRIPTION", "TOPICS", "IN", "FLIGHT", "LAG", "LOST"]
    assert out[1].split() == ["svc.bad", "orders.*", "0", "0", "0"]


def test_dead_letters_are_listed_and_redriven(
    config: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, ids = config
    assert main(["dead-letters", "list", "--subscription", "svc.bad", "-c", path]) == 0
    listed = capsys.readouterr().out
    assert all(id in listed for id in ids)
    assert "ValueError: boom" in listed
    redrive = ["dead-letters", "redrive", "--subscription", "svc.bad", "--id", ids[0]]
    assert main([*redrive, "-c", path]) == 0
    assert "redrove 1 dead letters" in capsys.readouterr().out
    assert main(["dead-letters", "list", "--subscription", "svc.bad", "-c", path]) == 0
    assert ids[0] not in capsys.readouterr().out


def test_replay_delivers_kept_events_again(
    config: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["replay", "--subscription", "svc.idle", "--since", "1h", "-c", config[0]]
    assert main(command) == 0
    assert "replayed 3 events on ['orders.created'] to svc.idle" in capsys.readouterr().out
    # The group the replay read with is gone: only the two subscriptions remain.
    assert main(["subscriptions", "-c", config[0]]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["svc.bad", "svc.idle"]


def test_a_subscription_is_deleted_with_its_dead_letters(
    config: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = config[0]
    # Made by an events service: a server may consume it, which the command cannot see.
    assert main(["subscriptions", "--delete", "svc.bad", "-c", path]) == 2
    assert "pass --force to delete it anyway" in capsys.readouterr().err
    assert main(["subscriptions", "--delete", "svc.bad", "--force", "-c", path]) == 0
    assert "deleted subscription svc.bad" in capsys.readouterr().out
    assert main(["subscriptions", "-c", path]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["svc.idle"]
    # Gone with the subscription: naming it now is an error, not an empty list.
    assert main(["dead-letters", "list", "--subscription", "svc.bad", "-c", path]) == 1
    assert "no subscription 'svc.bad' in the store" in capsys.readouterr().err
    assert main(["subscriptions", "--delete", "svc.bad", "-c", path]) == 1
    assert "no subscription 'svc.bad' to delete" in capsys.readouterr().err


def test_memory_broker_has_nothing_to_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "memory.yaml"
    path.write_text("events:\n  broker: memory://\n")
    assert main(["subscriptions", "-c", str(path)]) == 2
    assert "nothing to inspect from a separate process" in capsys.readouterr().err
