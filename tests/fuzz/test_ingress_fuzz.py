"""Property tests of the webhook ingress: whatever arrives, never a 5xx, and every 202 is an event.

Random paths, methods, media types with random parameters and charsets, bodies (JSON-like
documents with NUL, lone surrogates, huge integers and deep nesting; forms; random bytes) and
headers go through httpx's ASGI transport to ``create_app``, on the memory broker, on SQLite
and, when it is reachable, on PostgreSQL. Half of the requests to ``github`` are signed, so
bodies are parsed after a signature was accepted as well as refused before.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callboard import CallboardApp, Event, create_app
from callboard.config import parse_config
from callboard.testing import sign_github
from tests.services import POSTGRES_URL, drop_postgres_schema, require_service

SECRET = "fuzz-secret"
TOPICS = ("plain", "a.b", "github")
PREFIX = "/api/events/http/"
FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CHARSETS = [
    *("utf-8", "UTF8", "utf-16", "utf-16-le", "utf-32", "latin-1", "ascii", "shift_jis"),
    *("base64", "hex", "rot13", "zlib", "punycode", "unicode_escape", "idna", "undefined"),
    *("utf-7", "raw_unicode_escape", "uu", "nope", ""),
]
OTHER_METHODS = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
MEDIA_TYPES = [
    *("application/json", "application/x-www-form-urlencoded", "text/plain"),
    *("Application/JSON", "multipart/form-data", "application/xml", ""),
]

# --- strategies -------------------------------------------------------------------------------

_big_ints = st.sampled_from([2**53 + 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30])
_texts = st.text(
    st.characters(codec=None, categories=None, exclude_characters=None), max_size=20
) | st.sampled_from(["\x00", "a\x00b", "\ud800", "\\u0000", "\\\\u0000", "é", "\ufeff"])
_scalars = st.none() | st.booleans() | st.integers() | _big_ints | st.floats() | _texts
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
    max_leaves=20,
)


def _dump(document: Any) -> bytes:
    # The standard library writes NaN, surrogates (escaped) and huge integers: all hostile.
    return json.dumps(document, ensure_ascii=True).encode()


def _nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"k":': "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


_json_bodies = st.builds(_dump, _documents)
_deep_bodies = st.builds(
    _nested,
    st.integers(0, 1100) | st.sampled_from([250, 251, 254, 255, 1024, 1025]),
    st.sampled_from(["[", '{"k":']),
)
_form_bodies = st.dictionaries(st.text(max_size=8), _texts, max_size=4).map(
    lambda fields: "&".join(
        f"{quote_from_bytes(k.encode('utf-8', 'surrogatepass'))}="
        f"{quote_from_bytes(v.encode('utf-8', 'surrogatepass'))}"
        for k, v in fields.items()
    ).encode()
)
_payload_forms = _json_bodies.map(lambda raw: b"payload=" + quote_from_bytes(raw).encode())
_bodies = st.one_of(
    _json_bodies,
    _json_bodies,
    _deep_bodies,
    _form_bodies,
    _payload_forms,
    st.binary(max_size=200),
    _json_bodies.map(lambda raw: raw[: len(raw) // 2]),  # truncated
    _json_bodies.flatmap(
        lambda raw: st.sampled_from(["utf-16", "utf-32", "latin-1"]).map(
            lambda codec: raw.decode().encode(codec, "surrogatepass")
        )
    ),
)


@st.composite
def _content_types(draw: st.DrawFn) -> bytes | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    kind = draw(st.sampled_from(MEDIA_TYPES) | st.text(max_size=10))
    params = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["charset", "Charset", "boundary", "x"]) | st.text(max_size=5),
                st.sampled_from(CHARSETS) | st.text(max_size=10),
            ),
            max_size=3,
        )
    )
    text = kind + "".join(f"; {key}={value}" for key, value in params)
    return text.encode("utf-8", "surrogatepass")


_header_names = st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789-_!#$%&'*+.^`|~", min_size=1, max_size=20
)
_header_values = st.binary(max_size=40).map(
    lambda raw: bytes(b for b in raw if b not in b"\r\n\x00").strip()
) | st.builds(lambda n: b"v" * n, st.integers(0, 20_000))


@dataclass(frozen=True)
class Attempt:
    method: str
    path: str
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


@st.composite
def attempts(draw: st.DrawFn) -> Attempt:
    # Mostly known topics, POST and a JSON or form media type, so most requests reach a parser.
    if draw(st.integers(0, 9)) < 8:
        topic = draw(st.sampled_from(TOPICS))
    else:
        topic = draw(st.sampled_from(["nope", "", "github/x", "plain/"]) | st.text(max_size=12))
    method = "POST" if draw(st.integers(0, 9)) < 8 else draw(st.sampled_from(OTHER_METHODS))
    body = draw(_bodies)
    headers = draw(st.lists(st.tuples(_header_names.map(str.encode), _header_values), max_size=5))
    if draw(st.integers(0, 9)) < 6:
        content_type: bytes | None = draw(
            st.sampled_from([b"application/json", b"application/x-www-form-urlencoded"])
        )
    else:
        content_type = draw(_content_types())
    if content_type is not None:
        headers.append((b"content-type", content_type))
    if topic == "github" and draw(st.integers(0, 9)) < 7:
        signed = sign_github(body, SECRET)
        headers += [
            (name.lower().encode(), value.encode())
            for name, value in signed.items()
            if name != "Content-Type"
        ]
    path = PREFIX + quote_from_bytes(topic.encode("utf-8", "surrogatepass"))
    return Attempt(method, path, body, headers)


# --- the app under test -----------------------------------------------------------------------


class Target:
    """A started callboard whose subscriber counts the events on the ingress topics."""

    def __init__(self, broker: str) -> None:
        config = parse_config(
            {
                "events": {
                    "broker": broker,
                    "http": {"topics": ["plain", "a.b"], "detectRedeliveries": False},
                    "modules": {"github": {"webhookSecret": SECRET}},
                }
            }
        )
        self.app: CallboardApp = create_app(config, use_entry_points=False)
        self.accepted = 0
        self.delivered = 0
        self.statuses: dict[int, int] = {}
        self._lifespan = self.app.board.lifespan()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://callboard.test"
        )

    async def start(self) -> None:
        await self._lifespan.__aenter__()

        async def count(event: Event) -> None:
            self.delivered += 1

        await self.app.board.events.subscribe("fuzz-counter", list(TOPICS), count)

    async def send(self, attempt: Attempt) -> int:
        request = self._client.build_request(
            attempt.method, attempt.path, content=attempt.body, headers=attempt.headers
        )
        response = await self._client.send(request)
        status = response.status_code
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 202:
            self.accepted += 1
        return status

    async def all_delivered(self) -> bool:
        for _ in range(500):  # up to ~10 s for the durable brokers
            if self.delivered >= self.accepted:
                return self.delivered == self.accepted
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        await self._client.aclose()
        await self._lifespan.__aexit__(None, None, None)


def fuzz(broker: str) -> None:
    loop = asyncio.new_event_loop()
    target = Target(broker)
    try:
        loop.run_until_complete(target.start())

        @FUZZ
        @given(attempt=attempts())
        def never_a_server_error(attempt: Attempt) -> None:
            status = loop.run_until_complete(target.send(attempt))
            assert status < 500, attempt

        never_a_server_error()
        assert loop.run_until_complete(target.all_delivered()), (target.accepted, target.delivered)
        assert target.accepted > 0, target.statuses  # the strategies do reach the broker
    finally:
        loop.run_until_complete(target.close())
        loop.close()


def test_memory_broker() -> None:
    fuzz("memory://")


def test_sqlite_broker(tmp_path: Path) -> None:
    fuzz(f"sqlite:///{tmp_path / 'fuzz.db'}")


@pytest.fixture
def schema() -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"callboard_test_{uuid.uuid4().hex[:12]}"
    yield name
    drop_postgres_schema(name)


@pytest.mark.postgres
def test_postgres_broker(schema: str) -> None:
    fuzz(f"{POSTGRES_URL}?schema={schema}")
