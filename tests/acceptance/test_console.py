"""The web console over ASGI: access, every page, and the actions (redrive, replay)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from callboard import CallboardApp, Event, ModuleContext, create_app, load_config, module
from callboard.console.live import Dropped, Watcher
from callboard.events import utc_now
from tests.services import POSTGRES_URL, drop_postgres_schema, require_service

TOKEN = "console-token-1"
OTHER_TOKEN = "other-token-22"
HTML = {"accept": "text/html"}
BEARER = {"authorization": f"Bearer {TOKEN}"}


class Inbox:
    """The module's subscriber: fails an event while ``failing``, records the others."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.failing = True

    async def on_event(self, event: Event) -> None:
        if event.payload == {"fail": True} and self.failing:
            raise RuntimeError("refused by the inbox")
        self.events.append(event)


def console_app(
    inbox: Inbox, broker: str, *, open: bool = False, secret: str | None = None
) -> CallboardApp:
    @module("inbox")
    def register(context: ModuleContext) -> None:
        context.subscribers.add_subscription("inbox", ["plain"], inbox.on_event)

    auth: dict[str, Any] = {
        "externalAccess": [
            {"type": "static", "options": {"token": TOKEN, "subject": "ops"}},
            {"type": "static", "options": {"token": OTHER_TOKEN, "subject": "other"}},
        ],
        "dangerouslyDisableDefaultAuthPolicy": open,
    }
    events: dict[str, Any] = {
        "broker": broker,
        "http": {"topics": ["plain"]},
        "delivery": {"attempts": 1, "initialDelayMs": 0},
    }
    if secret is not None:
        events["load"] = []
        events["modules"] = {"github": {"webhookSecret": secret}}
    config = load_config(overrides={"backend": {"auth": auth}, "events": events})
    return create_app(config, modules=[register], use_entry_points=secret is not None)


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'callboard.db'}"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"cb_console_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{POSTGRES_URL}?schema={schema}"
    finally:
        drop_postgres_schema(schema)


@pytest.fixture
def app(inbox: Inbox, broker_url: str) -> CallboardApp:
    return console_app(inbox, broker_url)


@asynccontextmanager
async def running(app: CallboardApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with (
        app.board.lifespan(),
        httpx.AsyncClient(transport=transport, base_url="http://callboard") as client,
    ):
        yield client


@pytest.fixture
async def client(app: CallboardApp) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as client:
        yield client


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"never happened: {what}")


async def log_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    page = await client.get("/console/login", headers=HTML)
    csrf = client.cookies["callboard_csrf"]
    assert f'value="{csrf}"' in page.text
    return await client.post(
        "/console/login",
        data={"csrf": csrf, "token": token, "next": "/console/subscriptions"},
        headers={"origin": "http://callboard"},
    )


async def dead_letter(app: CallboardApp, client: httpx.AsyncClient) -> str:
    """Publish an event the inbox fails; the id of the dead letter it becomes."""
    before = {letter.id for letter in await app.board.events.dead_letters("inbox")}
    answer = await client.post("/api/events/http/plain", json={"fail": True})
    assert answer.status_code == 202
    new: list[str] = []

    async def found() -> bool:
        letters = await app.board.events.dead_letters("inbox")
        new[:] = [letter.id for letter in letters if letter.id not in before]
        return bool(new)

    await until(found, "the event became a dead letter")
    return new[0]


# -- access --------------------------------------------------------------------------------------


async def test_a_browser_without_a_session_is_sent_to_the_login_page(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.get("/console/events?topic=plain", headers=HTML)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login?next=%2Fconsole%2Fevents%3Ftopic%3Dplain"
    assert (await client.get("/", headers=HTML)).headers["location"] == "/console/live"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer not-a-token"}, {"authorization": "Basic b3BzOm9wcw=="}],
)
async def test_a_caller_without_a_valid_token_is_refused(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for path in ("/console/live", "/console/events", "/console/live/stream"):
        answer = await client.get(path, headers=headers)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in answer.text


async def test_a_bearer_token_of_backend_auth_opens_every_page(client: httpx.AsyncClient) -> None:
    for path, heading in [
        ("/console/live", "<h1>Live</h1>"),
        ("/console/events", "<h1>Events</h1>"),
        ("/console/subscriptions", "<h1>Subscriptions</h1>"),
        ("/console/dead-letters", "<h1>Dead letters</h1>"),
        ("/console/ingress", "<h1>Ingress</h1>"),
    ]:
        answer = await client.get(path, headers=BEARER)
        assert answer.status_code == 200, path
        assert heading in answer.text
        assert "service=ops" in answer.text
        assert answer.headers["x-frame-options"] == "DENY"
    static = await client.get("/console/static/htmx.min.js")
    assert static.status_code == 200
    assert (await client.get("/console/static/htmx.LICENSE")).status_code == 200


async def test_a_token_entered_once_gives_a_session_cookie(client: httpx.AsyncClient) -> None:
    answer = await log_in(client)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/subscriptions"
    cookie = next(v for k, v in answer.headers.multi_items() if v.startswith("callboard_session="))
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    page = await client.get("/console/subscriptions", headers=HTML)
    assert page.status_code == 200
    assert "service=ops" in page.text
    # Logging out ends it.
    out = await client.post(
        "/console/logout", data={"csrf": client.cookies["callboard_csrf"]}, headers=HTML
    )
    assert out.status_code == 303
    assert (await client.get("/console/subscriptions", headers=HTML)).status_code == 303


async def test_a_wrong_token_a_forged_cookie_and_a_foreign_login_are_refused(
    client: httpx.AsyncClient,
) -> None:
    wrong = await log_in(client, "not-the-token")
    assert wrong.status_code == 403
    assert "not one of" in wrong.text
    assert "callboard_session" not in client.cookies
    # A session cookie for another subject, with the MAC of one's own token, is refused.
    assert (await log_in(client, OTHER_TOKEN)).status_code == 303
    genuine = client.cookies["callboard_session"]
    _subject, expires, mac = genuine.split(".")
    forged = f"b3Bz.{expires}.{mac}"  # "ops", signed for "other"
    client.cookies.set("callboard_session", forged, path="/console")
    assert (await client.get("/console/live", headers=HTML)).status_code == 303
    # A login posted from another site is refused even with the right token.
    client.cookies.clear()
    await client.get("/console/login", headers=HTML)
    foreign = await client.post(
        "/console/login",
        data={"csrf": client.cookies["callboard_csrf"], "token": TOKEN},
        headers={"origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    assert "callboard_session" not in client.cookies


async def test_the_open_policy_opens_the_console(inbox: Inbox, tmp_path: Path) -> None:
    app = console_app(inbox, f"sqlite:///{tmp_path / 'open.db'}", open=True)
    async with running(app) as client:
        answer = await client.get("/console/subscriptions", headers=HTML)
        assert answer.status_code == 200
        assert "anonymous" in answer.text
        # A token presented and wrong is still refused.
        bad = await client.get("/console/live", headers={"authorization": "Bearer nope-nope"})
        assert bad.status_code == 401


# -- actions and their checks ---------------------------------------------------------------------


async def test_an_action_without_the_csrf_token_or_from_another_origin_is_refused(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    letter = await dead_letter(app, client)
    await log_in(client)
    csrf = client.cookies["callboard_csrf"]
    missing = await client.post(
        "/console/redrive", data={"subscription": "inbox", "id": letter}, headers=HTML
    )
    assert missing.status_code == 403
    assert "CSRF" in missing.text
    wrong = await client.post(
        "/console/redrive",
        data={"subscription": "inbox", "id": letter, "csrf": "x" + csrf},
        headers=HTML,
    )
    assert wrong.status_code == 403
    foreign = await client.post(
        "/console/redrive",
        data={"subscription": "inbox", "id": letter, "csrf": csrf},
        headers={"origin": "https://evil.example", **HTML},
    )
    assert foreign.status_code == 403
    assert len(await app.board.events.dead_letters("inbox")) == 1


async def test_redrive_a_chosen_dead_letter_from_the_page(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    letter = await dead_letter(app, client)
    await log_in(client)
    page = await client.get("/console/dead-letters", headers=HTML)
    assert page.status_code == 200
    assert "RuntimeError: refused by the inbox" in page.text
    assert f'value="{letter}"' in page.text
    inbox.failing = False
    answer = await client.post(
        "/console/redrive",
        data={"subscription": "inbox", "id": letter, "csrf": client.cookies["callboard_csrf"]},
        headers={"origin": "http://callboard", **HTML},
    )
    assert answer.status_code == 303
    done = await client.get(answer.headers["location"], headers=HTML)
    assert "redrove 1 dead letters" in done.text

    async def handled() -> bool:
        return any(e.payload == {"fail": True} for e in inbox.events)

    await until(handled, "the redriven event reached the inbox")
    assert await app.board.events.dead_letters("inbox") == []


async def test_redrive_all_with_a_bearer_token(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    await dead_letter(app, client)
    await dead_letter(app, client)
    inbox.failing = False
    answer = await client.post(
        "/console/redrive", data={"subscription": "inbox", "all": "yes"}, headers=BEARER
    )
    assert answer.status_code == 303
    assert "redrove+2+dead+letters" in answer.headers["location"]
    missing = await client.post(
        "/console/redrive", data={"subscription": "nobody", "all": "yes"}, headers=BEARER
    )
    assert missing.status_code == 404


async def test_replay_asks_for_a_confirmation_then_delivers_again(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    since = (utc_now() - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert (await client.post("/api/events/http/plain", json={"n": 1})).status_code == 202

    async def received() -> bool:
        return len(inbox.events) == 1

    await until(received, "the event reached the inbox")
    preview = await client.post(
        "/console/replay", data={"subscription": "inbox", "since": since}, headers=BEARER
    )
    assert preview.status_code == 200
    assert "Replay to inbox?" in preview.text
    assert "(1 events)" in preview.text
    assert len(inbox.events) == 1  # nothing replayed before the confirmation
    confirmed = await client.post(
        "/console/replay",
        data={"subscription": "inbox", "since": since, "confirm": "yes"},
        headers=BEARER,
    )
    assert confirmed.status_code == 303
    assert "replayed+1+events" in confirmed.headers["location"]

    async def again() -> bool:
        return len(inbox.events) == 2

    await until(again, "the replayed event reached the inbox")
    assert inbox.events[0].id == inbox.events[1].id
    unknown = await client.post(
        "/console/replay", data={"subscription": "nobody", "since": since}, headers=BEARER
    )
    assert unknown.status_code == 404


# -- the pages' contents ----------------------------------------------------------------------------


async def test_events_are_found_by_topic_and_id_and_show_their_outcomes(
    app: CallboardApp, client: httpx.AsyncClient, inbox: Inbox
) -> None:
    sent = await client.post(
        "/api/events/http/plain", json={"hello": "world"}, headers={"x-request-id": "abc"}
    )
    assert sent.status_code == 202

    async def received() -> bool:
        return len(inbox.events) == 1

    await until(received, "the event reached the inbox")
    event = inbox.events[0]
    found = await client.get("/console/events", params={"topic": "plain"}, headers=BEARER)
    assert event.id in found.text
    none = await client.get("/console/events", params={"topic": "other.>"}, headers=BEARER)
    assert event.id not in none.text
    assert "No stored event matches" in none.text
    bad = await client.get("/console/events", params={"since": "yesterday"}, headers=BEARER)
    assert "not a time" in bad.text
    by_id = await client.get("/console/events", params={"id": event.id}, headers=BEARER)
    assert event.id in by_id.text

    async def delivered() -> bool:
        page = await client.get(f"/console/events/{event.id}", headers=BEARER)
        return 'class="state delivered"' in page.text

    await until(delivered, "the event page shows the delivery")
    page = await client.get(f"/console/events/{event.id}", headers=BEARER)
    assert "&#34;hello&#34;: &#34;world&#34;" in page.text or '"hello": "world"' in page.text
    assert "inbox" in page.text
    missing = await client.get("/console/events/no-such-event", headers=BEARER)
    assert missing.status_code == 404


async def test_events_are_paged(app: CallboardApp, client: httpx.AsyncClient) -> None:
    for n in range(55):
        await app.board.events.publish(Event(topic="plain", payload={"n": n}))
    first = await client.get("/console/events", headers=BEARER)
    older = re.search(r'href="(/console/events\?before=[^"]+)" rel="next"', first.text)
    assert older is not None
    second = await client.get(older.group(1).replace("&amp;", "&"), headers=BEARER)
    assert second.text.count("<tr>") == 55 - 50 + 1  # the header row and five events


async def test_a_broker_without_history_says_so(inbox: Inbox) -> None:
    app = console_app(inbox, "memory://")
    async with running(app) as client:
        answer = await client.get("/console/events", headers=BEARER)
        assert "keeps no searchable history" in answer.text
        subscriptions = await client.get("/console/subscriptions", headers=BEARER)
        assert subscriptions.status_code == 200
        assert "inbox" in subscriptions.text


async def test_subscriptions_show_their_figures(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    page = await client.get("/console/subscriptions", headers=BEARER)
    row = re.search(r"<tr>\s*<td>inbox</td>(.*?)</tr>", page.text, re.DOTALL)
    assert row is not None
    cells = re.findall(r'<td class="num[^"]*">(\d+)</td>', row.group(1))
    assert cells == ["0", "0", "0", "1"]  # backlog, in flight, lost, one consumer here
    assert "<code>plain</code>" in row.group(1)


async def test_the_ingress_page_counts_answers_and_shows_refusals_without_secrets(
    inbox: Inbox, tmp_path: Path
) -> None:
    secret = "webhook-secret-value"
    app = console_app(inbox, f"sqlite:///{tmp_path / 'in.db'}", secret=secret)
    async with running(app) as client:
        for _ in range(3):
            assert (await client.post("/api/events/http/plain", json={})).status_code == 202
        refused = await client.post(
            "/api/events/http/github",
            content=b"{}",
            headers={
                "content-type": "application/json",
                "x-github-event": "push",
                "x-github-delivery": "delivery-77",
                "x-hub-signature-256": "sha256=" + "0" * 64,
            },
        )
        assert refused.status_code in (401, 403)
        assert (await client.post("/api/events/http/nowhere", json={})).status_code == 404
        page = await client.get("/console/ingress", headers=BEARER)
        text = page.text
        plain = re.search(r"<code>plain</code></td>\s*<td class=\"num\">(\d+)</td>", text)
        assert plain is not None
        assert plain.group(1) == "3"
        assert "delivery-77" in text
        assert f"{refused.status_code}: 1" in text
        assert secret not in text
        assert "0" * 64 not in text


async def test_the_live_stream_carries_new_events_to_the_browser(
    app: CallboardApp, client: httpx.AsyncClient
) -> None:
    await watch_one_event(app, client)


async def test_the_live_stream_works_on_the_memory_broker(inbox: Inbox) -> None:
    app = console_app(inbox, "memory://")
    async with running(app) as client:
        await watch_one_event(app, client)


async def watch_one_event(app: CallboardApp, client: httpx.AsyncClient) -> None:
    """Watch ``plain`` through the stream; an event published there reaches the watcher."""
    frames: list[bytes] = []
    gone = asyncio.Event()
    started = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            assert (b"content-type", b"text/event-stream; charset=utf-8") in message["headers"]
        elif message.get("body"):
            frames.append(message["body"])
            started.set()
            if b"event: event" in message["body"]:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/console/live/stream",
        "raw_path": b"/console/live/stream",
        "query_string": b"topic=plain",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"host", b"callboard")],
        "server": ("callboard", 80),
        "client": ("127.0.0.1", 1),
    }
    stream = asyncio.create_task(app(scope, receive, send))
    await started.wait()
    assert app.console.tap.watchers == 1
    tap = app.console.tap.id
    await app.board.events.publish(Event(topic="other", payload={"skip": True}))
    sent = await client.post(
        "/api/events/http/plain", json={"live": 1}, headers={"x-github-delivery": "d-1"}
    )
    assert sent.status_code == 202
    await asyncio.wait_for(stream, 10)
    data = next(f for f in frames if f.startswith(b"event: event"))
    event = orjson.loads(data.split(b"data: ", 1)[1])
    assert event["topic"] == "plain"
    assert event["payload"] == {"live": 1}
    assert set(event) == {"id", "topic", "time", "deliveryId", "payload", "metadata"}
    # The last watcher gone, the tap's group is gone from the broker too.
    assert app.console.tap.watchers == 0
    listed = await client.get("/console/subscriptions", headers=BEARER)
    assert tap not in listed.text


async def test_a_watcher_that_falls_behind_loses_events_and_is_told() -> None:
    watcher = Watcher(("plain",), size=2)
    for n in range(5):
        watcher.offer(Event(topic="plain", payload=n))
    watcher.offer(Event(topic="elsewhere"))
    assert await watcher.next() == Dropped(3)
    kept = [await watcher.next(), await watcher.next()]
    assert [e.payload for e in kept if isinstance(e, Event)] == [0, 1]
    watcher.end()
    assert await watcher.next() is None
