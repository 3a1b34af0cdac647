"""The screenshots of ``docs/console.md``: ``python -m tests.browser.screenshots [directory]``.

Starts a real server (as the browser tests do), sends it a few webhooks, lets one event fail
into the dead letters, and photographs each page of the console in Debian's chromium into
``docs/images/console-<page>.png``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.browser.console_server import ROOT, TOKEN, Served, browser, serving

VIEWPORT = {"width": 1200, "height": 720}


def _wait(check: object, what: str) -> None:
    for _ in range(400):
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _shoot(page: Page, out: Path, name: str) -> None:
    page.screenshot(path=str(out / f"console-{name}.png"))
    print(f"wrote {out / f'console-{name}.png'}")


def _traffic(served: Served) -> None:
    for n, repository in enumerate(["api", "web", "docs"]):
        served.post("plain", {"repository": repository, "build": 100 + n, "status": "passed"})
    served.post("plain", {"fail": True})
    served.post("github", {"zen": "unsigned"}, {"x-github-delivery": "72d3162e-cc78-11e3"})
    served.post("nowhere", {})
    _wait(lambda: len(served.handled()) >= 3, "the inbox handled the events")


def take(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory, serving(Path(directory)) as served:
        _traffic(served)
        with browser() as chromium:
            context = chromium.new_context(base_url=served.url, viewport=VIEWPORT)  # type: ignore[arg-type]
            page = context.new_page()
            page.goto("/console/live")
            page.get_by_label("Token").fill(TOKEN)
            _shoot(page, out, "login")
            page.get_by_role("button", name="Log in").click()
            expect(page.locator("#live-status")).to_contain_text("watching")
            for n in range(4):
                served.post("plain", {"repository": "api", "deploy": n, "environment": "staging"})
            expect(page.locator(".live-event")).to_have_count(4)
            page.locator(".live-event").first.locator("summary").click()
            _shoot(page, out, "live")

            page.goto("/console/events?topic=plain")
            _shoot(page, out, "events")
            page.locator("table tbody tr a").last.click()
            expect(page.locator(".state").first).to_be_visible()
            _shoot(page, out, "event")

            page.goto("/console/subscriptions")
            since = (datetime.now(UTC) - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%S")
            row = page.locator("tr", has_text="inbox")
            row.locator('input[name="since"]').fill(since)
            row.get_by_role("button", name="Replay…").click()
            expect(page.locator("#confirm")).to_contain_text("Replay to inbox?")
            _shoot(page, out, "subscriptions")

            page.goto("/console/dead-letters?subscription=inbox")
            expect(page.locator("td.error").first).to_be_visible()
            _shoot(page, out, "dead-letters")

            page.goto("/console/ingress")
            _shoot(page, out, "ingress")
            context.close()


if __name__ == "__main__":
    take(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "images")
