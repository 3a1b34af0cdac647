"""``callboard publish``, ``tail`` and ``events``, and what every operations command shares: the
store it names, the refusal to make one, the configuration it needs, unknown names as errors.

Each test runs on a SQLite file and on a PostgreSQL schema of its own (``store``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from callboard.brokers import open_broker
from callboard.cli import main
from callboard.config import parse_config
from callboard.default_service import DefaultEventsService
from callboard.delivery import RetryPolicy
from callboard.events import Event
from tests.services import POSTGRES_URL, drop_postgres_schema, require_service


@dataclass(frozen=True)
class Store:
    url: str
    config: str
    #: What the ``store:`` line shows of it.
    shown: str


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        path = tmp_path / "cb.db"
        url = f"sqlite:///{path}"
        shown = f"store: sqlite:///{path}"
        schema = None
    else:
        require_service("PostgreSQL", "127.0.0.1", 5432)
        schema = f"cb_cli_{uuid.uuid4().hex[:10]}"
        # A password in the URL (trust authentication ignores it) is masked in the store line.
        url = POSTGRES_URL.replace("postgres@", "postgres:hunter2@") + f"?schema={schema}"
        shown = "store: " + url.replace("hunter2", "***")
    config = tmp_path / "callboard.yaml"
    config.write_text(f"events:\n  broker: {url}\n", encoding="utf-8")
    assert main(["migrate", "-c", str(config)]) == 0
    try:
        yield Store(url, str(config), shown)
    finally:
        if schema is not None:
            drop_postgres_schema(schema)


def published_id(out: str) -> str:
    words = out.split()
    assert words[0] == "published", out
    return words[1]


def test_published_events_are_listed_and_shown(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    data = '{"ref": "main", "n": 1}'
    command = ["publish", "github.push", "--data", data, "-m", "X-Source=cli", "-c", store.config]
    assert main(command) == 0
    out, err = capsys.readouterr()
    assert store.shown in err.splitlines()
    assert "hunter2" not in err
    first = published_id(out)
    assert main(["publish", "gitlab.push", "-c", store.config]) == 0
    second = published_id(capsys.readouterr().out)

    assert main(["events", "list", "--json", "-c", store.config]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["id"], e["topic"]) for e in listed] == [
        (second, "gitlab.push"),
        (first, "github.push"),
    ]
    assert listed[1]["payload"] == {"ref": "main", "n": 1}
    assert listed[1]["metadata"] == {"x-source": "cli"}
    assert listed[0]["payload"] is None

    assert main(["events", "list", "--topic", "github.*", "-c", store.config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert f"github.push  {first}" in lines[0]
    assert lines[0].endswith('{"ref":"main","n":1}')

    assert main(["events", "list", "--limit", "1", "-c", store.config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert second in lines[0]
    assert lines[1].startswith("… more: the next page is --before ")
    before = lines[1].rsplit(" ", 1)[1]
    assert main(["events", "list", "--limit", "1", "--before", before, "-c", store.config]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert first in lines[0]
    assert len(lines) == 1
    assert main(["events", "list", "--since", "1h", "--until", "1s", "-c", store.config]) == 0
    assert capsys.readouterr().out.strip() == "no events"

    assert main(["events", "show", first, "-c", store.config]) == 0
    shown = capsys.readouterr().out
    assert f"id:        {first}" in shown
    assert "x-source: cli" in shown
    assert '"ref": "main"' in shown
    assert "none reads its topic" in shown


def test_the_payload_comes_from_a_file_or_standard_input(
    store: Store,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = tmp_path / "body.json"
    body.write_text("[1, 2, 3]", encoding="utf-8")
    assert main(["publish", "numbers", "--data", f"@{body}", "-c", store.config]) == 0
    from_file = published_id(capsys.readouterr().out)
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"piped": true}'))
    assert main(["publish", "numbers", "--data", "-", "-c", store.config]) == 0
    from_stdin = published_id(capsys.readouterr().out)
    assert main(["events", "list", "--json", "-c", store.config]) == 0
    payloads = {
        e["id"]: e["payload"] for e in map(json.loads, capsys.readouterr().out.splitlines())
    }
    assert payloads == {from_file: [1, 2, 3], from_stdin: {"piped": True}}


def test_a_payload_that_is_not_json_is_refused_with_its_problem(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", "orders", "--data", '{"n": 1', "-c", store.config]) == 2
    err = capsys.readouterr().err
    assert (
        "--data: not valid JSON (the text given): Expecting ',' delimiter at line 1 column 8" in err
    )
    assert main(["publish", "orders", "--data", "@missing.json", "-c", store.config]) == 2
    assert "cannot read missing.json" in capsys.readouterr().err
    assert main(["events", "list", "-c", store.config]) == 0
    assert capsys.readouterr().out.strip() == "no events"


async def _seed(url: str) -> str:
    """One event on orders.created: subscription svc.bad dead-letters it, svc.idle takes it."""
    async with DefaultEventsService(open_broker(url), retry=RetryPolicy(attempts=1)) as service:
        failed = asyncio.Event()
        handled = asyncio.Event()

        async def broken(event: Event) -> None:
            failed.set()
            raise ValueError("boom")

        async def idle(event: Event) -> None:
            handled.set()

        failing = await service.subscribe("svc.bad", "orders.*", broken)
        taking = await service.subscribe("svc.idle", "orders.created", idle)
        sent = Event(topic="orders.created", payload={"n": 1})
        await service.publish(sent)
        await asyncio.wait_for(asyncio.gather(failed.wait(), handled.wait()), 20)
        await failing.close()  # finishes the delivery in progress: the dead letter
        await taking.close()
        return sent.id


def test_an_event_shows_what_became_of_it_per_subscription(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    sent = asyncio.run(_seed(store.url))
    assert main(["events", "show", sent, "-c", store.config]) == 0
    shown = capsys.readouterr().out
    assert "svc.bad: dead lettered, attempt 1" in shown
    assert "ValueError: boom" in shown
    assert "svc.idle: delivered" in shown
    assert main(["events", "show", sent, "--json", "-c", store.config]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {o["subscription"]: o["state"] for o in found["outcomes"]} == {
        "svc.bad": "dead_lettered",
        "svc.idle": "delivered",
    }
    (letter,) = [o["deadLetterId"] for o in found["outcomes"] if o["deadLetterId"]]
    redrive = ["dead-letters", "redrive", "--subscription", "svc.bad", "--id", letter]
    assert main([*redrive, "-c", store.config]) == 0
    assert "redrove 1 dead letters to svc.bad" in capsys.readouterr().out
    assert main(["events", "show", sent, "--json", "-c", store.config]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {o["subscription"]: o["state"] for o in found["outcomes"]} == {
        "svc.bad": "pending",  # delivered to it again, waiting for its subscriber
        "svc.idle": "delivered",
    }
    assert [e["target"] for e in found["stored"]] == ["svc.bad", None]


def test_unknown_names_are_errors_that_name_them(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_seed(store.url))
    cases = [
        (["events", "show", "no-such-event"], "no event 'no-such-event' in the store"),
        (
            ["dead-letters", "redrive", "--subscription", "svc.nope"],
            "no subscription 'svc.nope' in the store (there are: svc.bad, svc.idle)",
        ),
        (
            ["dead-letters", "redrive", "--subscription", "svc.bad", "--id", "nope"],
            "subscription 'svc.bad' has no dead letter nope",
        ),
        (["replay", "--subscription", "svc.nope", "--since", "1h"], "no subscription 'svc.nope'"),
        (["dead-letters", "list", "--subscription", "svc.nope"], "no subscription 'svc.nope'"),
    ]
    for command, message in cases:
        assert main([*command, "-c", store.config]) == 1, command
        assert message in capsys.readouterr().err
    # Nothing was redriven by the refused commands.
    assert main(["dead-letters", "list", "--subscription", "svc.bad", "-c", store.config]) == 0
    assert "ValueError: boom" in capsys.readouterr().out


def test_the_operations_commands_read_only_the_stores_configuration(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    variable = "CALLBOARD_TEST_UNSET_SECRET"
    assert variable not in os.environ
    config = tmp_path / "server.yaml"
    config.write_text(
        f"events:\n  broker: {store.url}\n"
        f"  modules:\n    github:\n      webhookSecret: ${{{variable}}}\n"
        "backend:\n  listen:\n    port: not-a-port\n",
        encoding="utf-8",
    )
    # What the server itself would refuse to start with:
    assert main(["check-config", "-c", str(config)]) == 2
    assert variable in capsys.readouterr().err
    asyncio.run(_seed(store.url))
    for command, expected in (
        (["subscriptions"], "svc.bad"),
        (["events", "list"], "orders.created"),
        (["dead-letters", "list", "--subscription", "svc.bad"], "ValueError: boom"),
    ):
        assert main([*command, "-c", str(config)]) == 0, capsys.readouterr().err
        assert expected in capsys.readouterr().out


def test_a_missing_sqlite_store_is_refused_not_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "elsewhere" / "cb.db"
    config = tmp_path / "callboard.yaml"
    config.write_text(f"events:\n  broker: sqlite:///{missing}\n", encoding="utf-8")
    for command in (
        ["subscriptions"],
        ["events", "list"],
        ["events", "show", "x"],
        ["dead-letters", "list", "--subscription", "a"],
        ["replay", "--subscription", "a", "--since", "1h"],
        ["publish", "orders"],
    ):
        assert main([*command, "-c", str(config)]) == 1, command
        err = capsys.readouterr().err
        assert f"the store {missing} does not exist" in err
        assert "run from the server's directory or pass --config" in err
    assert not missing.parent.exists()
    # Without a configuration: the server's default file, in the working directory.
    monkeypatch.chdir(tmp_path)
    assert main(["subscriptions"]) == 1
    assert f"store: sqlite:///{tmp_path / 'callboard.db'}" in capsys.readouterr().err
    assert not (tmp_path / "callboard.db").exists()


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("CALLBOARD_TOKEN", None)
    return subprocess.Popen(
        [sys.executable, "-m", "callboard", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        _, err = process.communicate(timeout=10)
        pytest.fail(f"tail ended ({process.returncode}): {err}")
    return line


@pytest.mark.slow
def test_tail_prints_the_history_then_what_comes_and_stops_on_ctrl_c(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", "orders.created", "-d", '{"n": 1}', "-c", store.config]) == 0
    assert main(["publish", "billing.paid", "-d", '{"n": 2}', "-c", store.config]) == 0
    capsys.readouterr()
    tail = _cli("tail", "orders.*", "--since", "1h", "--json", "-c", store.config, cwd=tmp_path)
    try:
        assert json.loads(_line(tail))["payload"] == {"n": 1}
        for n in (3, 4):
            assert (
                main(["publish", "orders.created", "-d", f'{{"n": {n}}}', "-c", store.config]) == 0
            )
            assert main(["publish", "billing.paid", "-d", "0", "-c", store.config]) == 0
        assert [json.loads(_line(tail))["payload"] for _ in range(2)] == [{"n": 3}, {"n": 4}]
        tail.send_signal(signal.SIGINT)
        _, err = tail.communicate(timeout=20)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.communicate()
    assert tail.returncode == 0, err
    assert store.shown in err
    assert "Traceback" not in err


@pytest.mark.slow
async def test_publish_and_tail_through_a_server(tmp_path: Path) -> None:
    from callboard.app import create_app
    from tests.contract.kits import served

    token = "cli-test-token"
    url = f"sqlite:///{tmp_path / 'server.db'}"
    config = parse_config(
        {
            "backend": {
                "auth": {
                    "externalAccess": [
                        {"type": "static", "options": {"token": token, "subject": "cli"}}
                    ]
                }
            },
            "events": {"broker": url},
        }
    )
    (tmp_path / "server.yaml").write_text(f"events:\n  broker: {url}\n", encoding="utf-8")
    env = {**os.environ, "CALLBOARD_TOKEN": token}

    async def cli(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "callboard", *args),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def line(stream: asyncio.StreamReader | None) -> str:
        assert stream is not None
        return (await asyncio.wait_for(stream.readline(), 30)).decode()

    async with served(create_app(config)) as address:
        tail = await cli("tail", "orders.*", "--url", address)
        try:
            while not (await line(tail.stderr)).startswith("tailing"):
                pass  # the first line names the server; then the tail's subscription is made
            publish = await cli("publish", "orders.created", "-d", '{"n": 7}', "--url", address)
            out, err = await publish.communicate()
            assert publish.returncode == 0, err
            assert out.decode().startswith("published ")
            assert json.loads((await line(tail.stdout)).rsplit("  ", 1)[1]) == {"n": 7}
        finally:
            tail.send_signal(signal.SIGINT)
            _, err = await tail.communicate()
        assert tail.returncode == 0, err
        # The tail's subscription went with it.
        lister = await cli("subscriptions", "-c", "server.yaml")
        out, _ = await lister.communicate()
        assert out.decode().strip() == "no subscriptions"
