"""The ``callboard`` command, run as a separate process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

RECORDER = """
import gc
import json
from pathlib import Path
from typing import Any

from callboard import module


@module("recorder")
def recorder(context):
    path = Path(context.config["path"])

    async def on_event(event):
        with path.open("a", encoding="utf-8") as out:
            # How the serving process's collector is set while it delivers (see gc_tuning).
            collector = {"young": gc.get_threshold()[0], "frozen": gc.get_freeze_count() > 0}
            record = {"topic": event.topic, "payload": event.payload, "gc": collector}
            out.write(json.dumps(record) + "\\n")

    context.subscribers.add_subscription("recorder", ">", on_event)


@module("exploding")
def exploding(context):
    async def start(events):
        raise RuntimeError("the provider is unreachable")

    context.lifecycle.on_start(start)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callboard", *args],
        cwd=cwd,
        env=environment(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def environment(modules_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(modules_dir), env.get("PYTHONPATH")]))
    env.pop("CALLBOARD_CONFIG", None)
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "cb_cli_modules.py").write_text(RECORDER, encoding="utf-8")
    return tmp_path


def write_config(directory: Path, text: str, name: str = "callboard.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


class Server:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                pytest.fail(f"the server exited with {self.process.returncode}:\n{err}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # waiting for another process to start listening
        pytest.fail("the server did not become ready")

    def stop(self, timeout: float = 20) -> tuple[int, str]:
        """Send SIGTERM; the exit code and what the server logged."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 30) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, err


@pytest.fixture
def serve(workdir: Path) -> Iterator[Server]:
    servers: list[Server] = []

    def start(*configs: Path, extra: tuple[str, ...] = ()) -> Server:
        port = free_port()
        args = [sys.executable, "-m", "callboard", "serve", "--port", str(port)]
        for config in configs:
            args += ["--config", str(config)]
        process = subprocess.Popen(
            [*args, *extra],
            cwd=workdir,
            env=environment(workdir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        server = Server(process, port)
        servers.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.communicate()


def test_serve_accepts_webhooks_and_shuts_down_cleanly_on_sigterm(
    workdir: Path, serve: object
) -> None:
    received = workdir / "received.jsonl"
    config = write_config(
        workdir,
        f"""
events:
  http:
    topics: [github, plain]
  load: ["cb_cli_modules:recorder"]
  modules:
    recorder:
      path: {json.dumps(str(received))}
""",
    )
    server: Server = serve(config, extra=("--log-format", "json"))  # type: ignore[operator]
    server.wait_ready()

    response = httpx.post(
        server.url + "/api/events/http/github",
        json={"ref": "main"},
        headers={"X-GitHub-Event": "push"},
    )
    assert response.status_code == 202
    assert response.json() == {"status": "accepted"}
    assert response.headers["content-length"] == str(len(response.content))
    assert httpx.post(server.url + "/api/events/http/nope", json={}).status_code == 404
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}

    deadline = time.monotonic() + 10
    while not received.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the subscriber runs in the other process
    assert json.loads(received.read_text(encoding="utf-8")) == {
        "topic": "github",
        "payload": {"ref": "main"},
        # Started, the server froze what start-up built and collects young objects less often.
        "gc": {"young": 10_000, "frozen": True},
    }
    metrics = httpx.get(server.url + "/metrics").text
    assert 'callboard_ingress_requests_total{status="202",topic="github"} 1.0' in metrics

    code, err = server.stop()
    # uvicorn ends by re-raising the signal it handled, so the parent sees SIGTERM.
    assert code in (0, -signal.SIGTERM), err
    assert "Application shutdown complete." in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in lines]
    assert any(m.startswith("callboard started: broker") for m in messages), err
    ready = [m for m in messages if " ready, listening on http://127.0.0.1:" in m]
    assert len(ready) == 1, err
    assert all({"level", "logger", "message", "time"} <= set(entry) for entry in lines)
    assert "Traceback" not in err


def test_a_module_failing_to_start_stops_serve_with_its_name(workdir: Path, serve: object) -> None:
    config = write_config(workdir, 'events:\n  load: ["cb_cli_modules:exploding"]\n')
    server: Server = serve(config)  # type: ignore[operator]
    code, err = server.wait_exit()  # it stops by itself
    assert code != 0
    assert "module 'exploding' failed to start" in err
    assert "the provider is unreachable" in err


def test_serve_refuses_a_bad_config(workdir: Path) -> None:
    config = write_config(workdir, "backend:\n  listen:\n    port: 99999\n")
    result = run("serve", "--config", str(config), cwd=workdir)
    assert result.returncode == 2
    assert "backend.listen.port" in result.stderr


def test_check_config_accepts_good_files_merged_in_order(workdir: Path) -> None:
    base = write_config(workdir, "events:\n  http:\n    topics: [github, gitlab]\n", "base.yaml")
    local = write_config(
        workdir,
        "backend:\n  listen:\n    port: 7500\nevents:\n  http:\n    topics: [plain]\n",
        "local.yaml",
    )
    result = run("check-config", "--config", str(base), str(local), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "127.0.0.1:7500" in result.stdout
    assert "topics:  plain" in result.stdout


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("events:\n  http:\n    bodyLimit: huge\n", "events.http.bodyLimit"),
        ("events:\n  http:\n    topics: [github, 'bad topic']\n", "events.http.topics.1"),
        ("events:\n  http:\n    topic: [github]\n", "events.http.topic"),
        ("events:\n  broker: nosuch://x\n", "events.broker"),
        ("events:\n  modules:\n    githib: {}\n", "events.modules.githib"),
        (
            "events:\n  modules:\n    x:\n      secret: ${CALLBOARD_UNSET_VARIABLE}\n",
            "events.modules.x.secret",
        ),
    ],
)
def test_check_config_names_the_wrong_key(workdir: Path, text: str, key: str) -> None:
    result = run("check-config", "--config", str(write_config(workdir, text)), cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.startswith(f"callboard: {key}: "), result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_of_a_misspelt_key_and_strict_refuses_it(workdir: Path) -> None:
    config = str(write_config(workdir, "evnets:\n  http:\n    topics: [github]\n"))
    lenient = run("check-config", "--config", config, cwd=workdir)
    assert lenient.returncode == 0, lenient.stderr
    assert "evnets: callboard does not read this key; did you mean 'events'?" in lenient.stderr
    strict = run("check-config", "--strict", "--config", config, cwd=workdir)
    assert strict.returncode == 1
    assert strict.stderr.startswith("callboard: evnets: "), strict.stderr
    assert "configuration OK" not in strict.stdout


def test_check_config_names_a_module_that_cannot_be_loaded(workdir: Path) -> None:
    config = write_config(workdir, 'events:\n  load: ["cb_cli_modules:missing"]\n')
    result = run("check-config", "--config", str(config), cwd=workdir)
    assert result.returncode == 2
    assert "cb_cli_modules:missing" in result.stderr


def test_check_config_of_a_missing_file(workdir: Path) -> None:
    result = run("check-config", "--config", str(workdir / "absent.yaml"), cwd=workdir)
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr


def test_sigterm_ends_held_bus_reads_at_once(serve: Any, workdir: Path) -> None:
    config = write_config(
        workdir,
        "backend:\n  auth:\n    dangerouslyDisableDefaultAuthPolicy: true\n"
        "events:\n  broker: 'memory://'\n  notifyTimeoutMs: 60000\n  shutdownTimeoutMs: 20000\n",
    )
    server = serve(config)
    server.wait_ready()
    bus = server.url + "/api/events/bus/v1/subscriptions/reader"
    assert httpx.put(bus, json={"topics": ["plain"]}, timeout=5).status_code == 201
    with httpx.Client(timeout=30) as client, client.stream("GET", bus + "/events") as held:
        assert held.status_code == 202
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert held.read() == b""
        code, err = server.wait_exit(timeout=15)
    # Without the release the held read would keep the server up for the graceful timeout.
    assert time.monotonic() - started < 5, err
    assert code in (0, -signal.SIGTERM), err


def test_deleting_a_subscription_a_server_consumes_stops_it_visibly(
    workdir: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from callboard.cli import main

    config = write_config(
        workdir,
        f"""
events:
  broker: sqlite:///{workdir / "cb.db"}
  http:
    topics: [plain]
  load: ["cb_cli_modules:recorder"]
  modules:
    recorder:
      path: {json.dumps(str(workdir / "received.jsonl"))}
""",
    )
    server: Server = serve(config)
    server.wait_ready()
    delete = ["subscriptions", "--delete", "recorder", "-c", str(config)]

    # The server's own subscription: the command cannot see the server, so it asks for --force.
    assert main(delete) == 2
    refused = capsys.readouterr().err
    assert "subscription 'recorder' belongs to a server's events service" in refused
    assert "--force" in refused
    assert httpx.get(server.url + "/readyz").status_code == 200

    assert main([*delete, "--force"]) == 0
    deleted = capsys.readouterr().out
    assert "deleted subscription recorder" in deleted
    assert "report it as stopped in /readyz and /metrics" in deleted

    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/readyz").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)  # the server finds the group gone at its next claim, in its own process
    ready = httpx.get(server.url + "/readyz")
    assert ready.status_code == 503, server.stop()[1]
    assert ready.json() == {
        "status": "not ready",
        "stopped": [
            {"subscription": "recorder", "reason": "subscription 'recorder' no longer exists"}
        ],
    }
    metrics = httpx.get(server.url + "/metrics").text
    assert 'callboard_subscription_running{subscription="recorder"} 0.0' in metrics

    code, err = server.stop()
    assert code in (0, -signal.SIGTERM), err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if "subscription 'recorder' stopped" in line]
    assert len(stopped) == 1, err
    assert "ERROR" in stopped[0]
    assert "no longer exists" in stopped[0]
