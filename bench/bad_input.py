#!/usr/bin/env python3
"""Bad-input matrix: malformed and hostile webhook requests against ``callboard serve``.

Starts ``callboard serve`` on a free loopback port with the topic ``plain`` and the GitHub module
(secret ``bad-input-secret``), once on SQLite and once on PostgreSQL when 127.0.0.1:5432 answers,
sends each case of the table below over a raw socket (so truncated bodies and odd framing reach
the server as written) and prints case -> status, then the totals. A 5xx is a failure: the exit
status is 1 when any case got one.

    python bench/bad_input.py
    python bench/bad_input.py --no-postgres
    python bench/bad_input.py --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

``-`` in the status column means the server closed the connection without an answer (a client
that never finished its body gets none).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from run import postgres_execute, wait_for

SECRET = b"bad-input-secret"
PLAIN = "/api/events/http/plain"
GITHUB = "/api/events/http/github"
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Case:
    name: str
    path: str = PLAIN
    body: bytes = b"{}"
    content_type: str | None = JSON
    method: str = "POST"
    headers: list[tuple[str, str]] = field(default_factory=list)
    #: Bytes of the body actually sent (the rest is promised by Content-Length, never sent).
    send: int | None = None
    sign: bool = False


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def github_signature(body: bytes) -> list[tuple[str, str]]:
    digest = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    return [
        ("X-Hub-Signature-256", f"sha256={digest}"),
        ("X-GitHub-Event", "push"),
        ("X-GitHub-Delivery", str(uuid.uuid4())),
    ]


def cases() -> Iterator[Case]:
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        yield Case(f"method {method} plain", method=method)
        yield Case(f"method {method} github", GITHUB, method=method)
    for path in ("/api/events/http/nope", "/api/events/http/", "/api/events/http/plain/x"):
        yield Case(f"unknown topic {path}", path)
    yield Case("topic with %00", "/api/events/http/pl%00ain")
    yield Case("topic of 4000 characters", "/api/events/http/" + "t" * 4000)
    for charset in (
        *("base64", "hex", "rot13", "zlib", "bz2", "punycode", "unicode_escape"),
        *("raw_unicode_escape", "idna", "undefined", "utf-7", "uu", "nope", "utf-8\\x00"),
    ):
        yield Case(
            f"json charset={charset}", body=b"e30=", content_type=f"{JSON}; charset={charset}"
        )
        yield Case(
            f"form charset={charset}", body=b"a=1", content_type=f"{FORM}; charset={charset}"
        )
    yield Case("no content type", content_type=None)
    yield Case("empty content type", content_type="")
    yield Case("text/plain", body=b"hello", content_type="text/plain")
    yield Case("application/xml", body=b"<a/>", content_type="application/xml")
    yield Case("multipart", body=b"--x--", content_type="multipart/form-data; boundary=x")
    yield Case("two content types", headers=[("Content-Type", "text/plain")])
    yield Case("content type of 8000 characters", content_type=JSON + "; x=" + "y" * 8000)
    for depth in (250, 251, 254, 255, 1024, 1025, 5000):
        yield Case(f"json nested {depth} arrays", body=nested(depth))
    yield Case("json nested 300 objects", body=b'{"a":' * 300 + b"1" + b"}" * 300)
    yield Case("json string holding 10000 brackets", body=b'"' + b"[" * 10_000 + b'"')
    yield Case("json \\u0000 in a value", body=b'{"a": "x\\u0000"}')
    yield Case("json \\u0000 in a key", body=b'{"\\u0000": 1}')
    yield Case("json \\\\u0000 (no NUL)", body=b'{"a": "\\\\u0000"}')
    yield Case("json raw NUL byte", body=b'{"a": "\x00"}')
    yield Case(
        "json utf-16 with \\u0000",
        body='{"a": "\\u0000"}'.encode("utf-16"),
        content_type=f"{JSON}; charset=utf-16",
    )
    yield Case("form %00 value", body=b"a=x%00y", content_type=FORM)
    yield Case("form %00 key", body=b"a%00=1", content_type=FORM)
    yield Case("form payload with \\u0000", body=b"payload=%5B%22%5Cu0000%22%5D", content_type=FORM)
    yield Case("json lone high surrogate", body=b'["\\ud800"]')
    yield Case("json lone low surrogate", body=b'["\\udc00"]')
    yield Case("form utf-8 surrogate", body=b"a=%ED%A0%80", content_type=FORM)
    yield Case(
        "form unicode_escape surrogate",
        body=b"a=\\ud800",
        content_type=f"{FORM}; charset=unicode_escape",
    )
    yield Case(
        "form utf-16-le lone surrogate", body=b"a=%00%D8", content_type=f"{FORM}; charset=utf-16-le"
    )
    yield Case("json 2**64", body=b"[18446744073709551616]")
    yield Case("json -2**63-1", body=b"[-9223372036854775809]")
    yield Case("json 10**30", body=b"[1000000000000000000000000000000]")
    yield Case("json 2**64-1 (kept)", body=b"[18446744073709551615]")
    yield Case("json 1e400", body=b"[1e400]")
    yield Case("json 4400-digit integer", body=b"[" + b"9" * 4400 + b"]")
    yield Case("json 5000-digit string", body=b'["' + b"9" * 5000 + b'"]')
    yield Case("json NaN", body=b"[NaN]")
    yield Case("json empty", body=b"")
    yield Case("json truncated", body=b'{"a": [1, 2')
    yield Case("json trailing comma", body=b"[1,]")
    yield Case("json single quotes", body=b"{'a': 1}")
    yield Case("json binary garbage", body=bytes(range(256)))
    yield Case("json invalid utf-8", body=b'["\xff\xfe"]')
    yield Case("json utf-8 BOM", body=b"\xef\xbb\xbf{}")
    yield Case("json latin-1 without charset", body='["Zoë"]'.encode("latin-1"))
    yield Case("json utf-32", body="[1]".encode("utf-32"), content_type=f"{JSON}; charset=utf-32")
    yield Case("form broken", body=b"a=1&&=", content_type=FORM)
    yield Case("form payload not json", body=b"payload=%7Bbad", content_type=FORM)
    yield Case("body cut short (half sent)", body=b'{"a": "' + b"x" * 1000 + b'"}', send=500)
    yield Case("body never sent", body=b"{}", send=0)
    yield Case("declared length over the limit", headers=[("Content-Length-Override", "")])
    yield Case("github unsigned", GITHUB)
    yield Case("github unsigned bad json", GITHUB, body=b"{nope")
    yield Case("github unsigned charset=base64", GITHUB, content_type=f"{JSON}; charset=base64")
    yield Case("github unsigned text/plain", GITHUB, content_type="text/plain")
    yield Case("github unsigned no content type", GITHUB, content_type=None)
    yield Case("github unsigned nested 1024", GITHUB, body=nested(1024))
    yield Case("github unsigned \\u0000", GITHUB, body=b'["\\u0000"]')
    yield Case("github signature malformed", GITHUB, headers=[("X-Hub-Signature-256", "sha256=zz")])
    yield Case("github signature empty", GITHUB, headers=[("X-Hub-Signature-256", "")])
    yield Case(
        "github signature wrong", GITHUB, headers=[("X-Hub-Signature-256", "sha256=" + "0" * 64)]
    )
    yield Case(
        "github signature sha1 only", GITHUB, headers=[("X-Hub-Signature", "sha1=" + "0" * 40)]
    )
    yield Case(
        "github signature non-latin-1", GITHUB, headers=[("X-Hub-Signature-256", "sha256=é")]
    )
    yield Case("github signed ok", GITHUB, sign=True)
    yield Case("github signed bad json", GITHUB, body=b"{nope", sign=True)
    yield Case("github signed \\u0000", GITHUB, body=b'["\\u0000"]', sign=True)
    yield Case("github signed nested 1024", GITHUB, body=nested(1024), sign=True)
    yield Case("github signed 2**64", GITHUB, body=b"[18446744073709551616]", sign=True)
    yield Case(
        "github signed charset=rot13", GITHUB, content_type=f"{JSON}; charset=rot13", sign=True
    )
    yield Case("github signed text/plain", GITHUB, content_type="text/plain", sign=True)
    yield Case(
        "github signed form \\u0000 payload",
        GITHUB,
        body=b"payload=%5B%22%5Cu0000%22%5D",
        content_type=FORM,
        sign=True,
    )
    yield Case("github signed, body changed", GITHUB, body=b'{"a": 2}', sign=True, send=-1)
    yield Case("header of 12 KB", headers=[("X-Big", "v" * 12_000)])
    yield Case("60 headers of 500 bytes", headers=[(f"X-H{i}", "v" * 500) for i in range(60)])
    yield Case("header with NUL-free control bytes", headers=[("X-Ctl", "a\x01\x7fb")])
    yield Case("repeated headers", headers=[("X-Rep", str(i)) for i in range(50)])


def request_bytes(case: Case, host: str) -> bytes:
    body = case.body
    headers = [("Host", host), ("Connection", "close")]
    if case.content_type is not None:
        headers.append(("Content-Type", case.content_type))
    if case.sign:
        headers += github_signature(body)
    extra = [(k, v) for k, v in case.headers if k != "Content-Length-Override"]
    headers += extra
    length = len(body)
    if any(k == "Content-Length-Override" for k, _ in case.headers):
        length = 1 << 40
    if case.method in ("POST", "PUT", "PATCH"):
        headers.append(("Content-Length", str(length)))
    sent = body
    if case.send is not None:
        sent = body[: case.send] if case.send >= 0 else b'{"a": 3}'  # -1: another body, same size
    head = f"{case.method} {case.path} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers
    )
    if case.method not in ("POST", "PUT", "PATCH"):
        sent = b""
    return head.encode("latin-1", "replace") + b"\r\n" + sent


def send(port: int, case: Case) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        try:
            connection.sendall(request_bytes(case, f"127.0.0.1:{port}"))
            if case.send is not None and case.send >= 0:
                connection.shutdown(socket.SHUT_WR)  # the rest of the body never comes
            answer = connection.recv(64)
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            return "-"
    parts = answer.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 and answer.startswith(b"HTTP/") else "-"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(broker: str, label: str, workdir: Path) -> list[tuple[str, str]]:
    port = free_port()
    config = workdir / f"{label}.yaml"
    config.write_text(
        json.dumps(
            {
                "backend": {"listen": {"host": "127.0.0.1", "port": port}},
                "logging": {"level": "warning"},
                "events": {
                    "broker": broker,
                    "http": {"topics": ["plain"]},
                    "modules": {"github": {"webhookSecret": SECRET.decode()}},
                },
            }
        )
    )
    log = workdir / f"{label}.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "callboard", "serve", "--config", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz")
        return [(case.name, send(port, case)) for case in cases()]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(15)


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="callboard-bad-input-"))
    runs = {"sqlite": run(f"sqlite:///{workdir / 'bad.db'}", "sqlite", workdir)}
    if not args.no_postgres and reachable("127.0.0.1", 5432):
        schema = f"callboard_badinput_{uuid.uuid4().hex[:8]}"
        try:
            runs["postgresql"] = run(f"{args.postgres_url}?schema={schema}", "postgresql", workdir)
        finally:
            postgres_execute(args.postgres_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    labels = list(runs)
    names = [name for name, _ in runs[labels[0]]]
    width = max(map(len, names))
    print(f"{'case':<{width}}  " + "  ".join(f"{label:>10}" for label in labels))
    for index, name in enumerate(names):
        print(f"{name:<{width}}  " + "  ".join(f"{runs[lb][index][1]:>10}" for lb in labels))
    failures = 0
    for label in labels:
        statuses = [status for _, status in runs[label]]
        errors = sum(status.startswith("5") for status in statuses)
        failures += errors
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status] = counts.get(status, 0) + 1
        summary = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        print(f"{label}: {len(statuses)} cases, {errors} answered 5xx ({summary})")
    print(f"server logs in {workdir}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
