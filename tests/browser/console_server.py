"""A real ``callboard serve`` for the console's browser tests and screenshots, and the browser.

``serving(directory)`` starts the server on SQLite with the ``inbox`` module
(``tests.browser.support``), topics ``plain`` and ``github``, and one static token; it stops it
with SIGTERM at the end. ``browser()`` launches Debian's chromium through Playwright.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from playwright.sync_api import Browser, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "console-browser-token"
SECRET = "browser-webhook-secret"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass(frozen=True, slots=True)
class Served:
    url: str
    directory: Path
    log: Path

    @property
    def record(self) -> Path:
        """The ids of the events the ``inbox`` subscription handled, one a line."""
        return self.directory / "inbox.log"

    @property
    def heal(self) -> Path:
        """Created, the ``inbox`` subscription stops failing ``{"fail": true}``."""
        return self.directory / "heal"

    def handled(self) -> list[str]:
        if not self.record.exists():
            return []
        return self.record.read_text(encoding="utf-8").split()

    def post(self, topic: str, payload: object, headers: dict[str, str] | None = None) -> int:
        answer = httpx.post(f"{self.url}/api/events/http/{topic}", json=payload, headers=headers)
        return answer.status_code


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _config(directory: Path) -> Path:
    path = directory / "callboard.yaml"
    path.write_text(
        f"""
backend:
  auth:
    externalAccess:
      - type: static
        options: {{token: {TOKEN}, subject: operator}}
events:
  broker: "sqlite:///{directory / "callboard.db"}"
  http:
    topics: [plain]
  delivery:
    attempts: 2
    initialDelayMs: 10
  shutdownTimeoutMs: 3000
  load: ["tests.browser.support:inbox"]
  modules:
    github:
      webhookSecret: {SECRET}
    inbox:
      record: "{directory / "inbox.log"}"
      heal: "{directory / "heal"}"
""",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[Served]:
    """A ``callboard serve`` process, ready; stopped (and checked to stop cleanly) at the end."""
    port = _free_port()
    log = directory / "server.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("CALLBOARD_CONFIG", None)
    command = [sys.executable, "-m", "callboard", "serve", "--config", str(_config(directory))]
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(f"http://127.0.0.1:{port}", directory, log)
    try:
        _wait_ready(served, process)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
                raise AssertionError(
                    f"the server did not stop on SIGTERM:\n{log.read_text()}"
                ) from None


def _wait_ready(served: Served, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited:\n{served.log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(served.url + "/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"the server did not become ready:\n{served.log.read_text()}")


@contextlib.contextmanager
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
