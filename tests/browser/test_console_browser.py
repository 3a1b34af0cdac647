"""The web console in Debian's chromium, against a real ``callboard serve`` on SQLite.

Skipped when ``/usr/bin/chromium`` is missing, except under CI (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.console_server import CHROMIUM, TOKEN, Served, browser, serving

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; CI must install it (see .ci/run)")
    pytest.skip(f"{CHROMIUM} is missing", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("console")) as served:
        yield served


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with browser() as launched:
        yield launched


@pytest.fixture
def page(chromium: Browser, served: Served) -> Iterator[Page]:
    context = chromium.new_context(base_url=served.url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The content security policy's refusals, among others, are reported here.
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        yield page
    finally:
        context.close()
    assert errors == [], errors


def log_in(page: Page, to: str = "/console/live") -> None:
    page.goto(to)
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("header .who")).to_contain_text("service=operator")


def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(300):
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"never happened: {what}")


def test_a_webhook_appears_live_and_opens_to_its_payload(page: Page, served: Served) -> None:
    log_in(page)
    expect(page.locator("#live-status")).to_contain_text("watching every topic")
    assert served.post("plain", {"hello": "browser"}, {"x-request-id": "r1"}) == 202
    item = page.locator(".live-event", has_text="plain").first
    expect(item).to_be_visible()
    item.locator("summary").click()
    expect(item.locator("pre").first).to_contain_text('"hello": "browser"')

    # Paused, new events wait; resumed, they are shown.
    page.get_by_role("button", name="Pause").click()
    assert served.post("plain", {"while": "paused"}) == 202
    expect(page.locator("#live-status")).to_contain_text("paused: 1 events waiting")
    expect(page.locator(".live-event", has_text="paused")).to_have_count(0)
    page.get_by_role("button", name="Resume").click()
    page.locator(".live-event").first.locator("summary").click()
    expect(page.locator(".live-event").first).to_contain_text('"while": "paused"')

    # Filtered by topic (the server filters; the acceptance tests check what it leaves out).
    page.get_by_label("Topics").fill("plain")
    page.get_by_role("button", name="Watch").click()
    expect(page.locator("#live-status")).to_contain_text("watching plain")
    assert served.post("plain", {"filtered": "in"}) == 202
    page.locator(".live-event").first.locator("summary").click()
    expect(page.locator(".live-event").first).to_contain_text('"filtered": "in"')


def test_an_event_is_found_and_shows_its_delivery(page: Page, served: Served) -> None:
    log_in(page, "/console/events")
    assert served.post("plain", {"find": "me"}) == 202
    eventually(lambda: len(served.handled()) > 0, "the inbox handled an event")
    page.get_by_label("Topics").fill("plain")
    page.get_by_role("button", name="Search").click()
    page.locator("table tbody tr a").first.click()
    expect(page.get_by_role("heading", name="Outcomes")).to_be_visible()
    for _ in range(100):
        if page.locator(".state.delivered").count():
            break
        page.reload()
    expect(page.locator("table.outcomes")).to_contain_text("inbox")
    expect(page.locator(".state.delivered")).to_be_visible()


def test_replay_a_subscription_through_the_ui(page: Page, served: Served) -> None:
    assert served.post("plain", {"replay": "me"}) == 202
    eventually(lambda: len(served.handled()) > 0, "the inbox handled an event")
    before = set(served.handled())
    log_in(page, "/console/subscriptions")
    row = page.locator("tr", has_text="inbox")
    since = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    row.locator('input[name="since"]').fill(since)
    row.get_by_role("button", name="Replay…").click()
    confirm = page.locator("#confirm")
    expect(confirm).to_contain_text("Replay to inbox?")
    # Nothing is replayed before the confirmation: no event was handled twice (events of
    # earlier tests may still arrive for the first time).
    assert _handled_twice(served) == set()
    confirm.get_by_role("button", name="Replay").click()
    expect(page.locator(".notice")).to_contain_text("replayed")
    eventually(lambda: before <= _handled_twice(served), "the replayed events were handled")


def _handled_twice(served: Served) -> set[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for event_id in served.handled():
        (twice if event_id in seen else seen).add(event_id)
    return twice


def test_redrive_a_dead_letter_through_the_ui(page: Page, served: Served) -> None:
    assert served.post("plain", {"fail": True}) == 202
    log_in(page, "/console/dead-letters?subscription=inbox")
    for _ in range(100):
        if page.locator('input[name="id"]').count():
            break
        page.reload()
    expect(page.locator("td.error").first).to_contain_text("the inbox refused this event")
    served.heal.touch()
    handled = len(served.handled())
    page.locator('input[name="id"]').first.check()
    page.get_by_role("button", name="Redrive selected").click()
    expect(page.locator(".notice")).to_contain_text("redrove 1 dead letters")
    eventually(lambda: len(served.handled()) > handled, "the redriven event was handled")
    expect(page.get_by_text("inbox has no dead letters")).to_be_visible()


def test_the_ingress_page_counts_webhooks(page: Page, served: Served) -> None:
    assert served.post("plain", {"count": 1}) == 202
    assert served.post("github", {}, {"x-github-delivery": "gh-delivery-1"}) in (401, 403)
    log_in(page, "/console/ingress")
    expect(page.locator("table").first).to_contain_text("plain")
    expect(page.locator("body")).to_contain_text("gh-delivery-1")
