"""What ``callboard serve`` logs: ready once it listens, refusals, the access log, JSON lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from callboard.testing import sign_github

pytestmark = pytest.mark.slow

SECRET = "serve-logs-secret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(directory: Path, config: str, *args: str) -> subprocess.Popen[str]:
    path = directory / "callboard.yaml"
    path.write_text(config, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CALLBOARD_CONFIG"}
    return subprocess.Popen(
        [sys.executable, "-m", "callboard", "serve", "--config", str(path), *args],
        cwd=directory,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def read_until(process: subprocess.Popen[str], marker: str) -> list[str]:
    """Lines of the server's log up to the first that holds ``marker``."""
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # ends when the process exits
        lines.append(line)
        if marker in line:
            return lines
    pytest.fail("the server exited before logging " + repr(marker) + ":\n" + "".join(lines))


def test_ready_is_logged_once_the_port_accepts_connections(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    config = f'events:\n  broker: "sqlite:///{tmp_path / "e.db"}"\n'
    process = start(tmp_path, config, "--port", str(port))
    processes.append(process)
    lines = read_until(process, "ready, listening on")
    # Told it is ready, a client connects at once: no retrying.
    assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    started = [i for i, line in enumerate(lines) if "callboard started: broker" in line]
    assert started, lines
    assert started[0] < len(lines) - 1  # the service started before the ready line
    assert f"ready, listening on http://127.0.0.1:{port}" in lines[-1]
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)


def test_a_busy_port_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "callboard.yaml"
    config.write_text(f'events:\n  broker: "sqlite:///{tmp_path / "e.db"}"\n', encoding="utf-8")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "callboard", "serve", "-c", str(config), "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"callboard: backend.listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert not (tmp_path / "e.db").exists()  # nothing was started


def test_json_logs_with_the_access_log_and_refusals(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    config = (
        "backend:\n  accessLog: true\n"
        f'events:\n  broker: "sqlite:///{tmp_path / "e.db"}"\n'
        f"  modules:\n    github:\n      webhookSecret: {SECRET}\n"
    )
    process = start(tmp_path, config, "--port", str(port), "--log-format", "json")
    processes.append(process)
    read_until(process, "ready, listening on")
    url = f"http://127.0.0.1:{port}/api/events/http/github"
    body = b'{"zen": "hello"}'
    good = httpx.post(url, content=body, headers=sign_github(body, SECRET, delivery="ok-1"))
    forged = sign_github(body, "a-wrong-secret", delivery="forged-2")
    bad = httpx.post(url + "?token=query-secret", content=body, headers=forged)
    assert (good.status_code, bad.status_code) == (202, 403)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=20)

    assert "\x1b[" not in err  # no colour codes in JSON lines
    entries = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    access = [e for e in entries if e["logger"] == "callboard.access"]
    webhooks = [e for e in access if e["path"].startswith("/api/events/http/")]
    assert [(e["method"], e["path"], e["status"]) for e in webhooks] == [
        ("POST", "/api/events/http/github", 202),
        ("POST", "/api/events/http/github", 403),
    ]
    assert all(e["duration_ms"] >= 0 and e["client"].startswith("127.0.0.1:") for e in webhooks)
    [refused] = [e for e in entries if e["message"].startswith("refused a webhook")]
    assert refused["level"] == "warning"
    assert (refused["topic"], refused["status"], refused["delivery_id"]) == (
        "github",
        403,
        "forged-2",
    )
    assert "query-secret" not in err
    assert forged["X-Hub-Signature-256"].removeprefix("sha256=") not in err
    assert SECRET not in err


def test_the_access_log_is_off_by_default(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    config = f'events:\n  broker: "sqlite:///{tmp_path / "e.db"}"\n  http:\n    topics: [plain]\n'
    process = start(tmp_path, config, "--port", str(port))
    processes.append(process)
    read_until(process, "ready, listening on")
    assert httpx.post(f"http://127.0.0.1:{port}/api/events/http/plain", json={}).status_code == 202
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=20)
    assert "callboard.access" not in err
    assert "/api/events/http/plain" not in err
