"""``callboard serve`` with several worker processes (``backend.workers``).

The parent process serves nothing: it checks that the port is free and the broker is shared,
then starts the workers and looks after them. Each worker is a fresh interpreter (multiprocessing's
``spawn``) running the same application with its own broker connection and subscriptions, and
listening on a socket of its own bound with ``SO_REUSEPORT`` to the same address, so the kernel
spreads new connections over the workers evenly (a shared accept queue favours whichever worker
is idle first, which keep-alive connections then stay with).

- A worker that dies is started again, after a delay that doubles with each quick death (so a
  crash loop does not spin) and starts over once a worker has lived a while.
- SIGTERM or SIGINT stops every worker as one process stops: each drains within the graceful
  timeout; one still running after it (and the events service's shutdown) is killed.
- The subscriptions run in every worker as competing consumers of the broker's groups, so the
  broker must be one that several processes share (``Capabilities.shared``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from callboard import __version__
from callboard.config import Config
from callboard.errors import ConfigError

logger = logging.getLogger("callboard.workers")

#: One of ``socket.getaddrinfo``'s answers.
_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]

#: Seconds before a dead worker is started again, doubling with each quick death, up to the most.
FIRST_DELAY = 0.5
MOST_DELAY = 30.0
#: A worker that lived this many seconds died of something new: its delay starts over.
STEADY = 30.0
#: Seconds beyond the graceful timeout a worker has to finish stopping before it is killed.
STOP_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is told: the configuration, its place, where its siblings are."""

    config: Config
    index: int
    count: int
    host: str
    port: int
    #: The private directory of the workers' sockets to one another (see ``peers``).
    peers: Path


#: A worker's body, run in its own process: serve ``spec``, and send ``("up", pid)`` on the
#: connection once serving, or ``("error", message)`` if it cannot listen.
WorkerMain = Callable[[WorkerSpec, Connection], None]


def require_shared_broker(config: Config) -> None:
    """Refuse several workers on a broker that keeps its events inside one process."""
    from callboard.app import build

    broker = build(config).events.broker
    if broker.capabilities.shared:
        return
    scheme = config.events.broker.partition("://")[0]
    raise ConfigError(
        "backend.workers",
        f"{config.backend.workers} workers (--workers) need a broker that several processes "
        f"share, and {scheme}:// keeps its events inside one process: an event taken by one "
        "worker would never reach the subscribers of the others. Use sqlite:///FILE, "
        "postgresql:// or callboard+http://, or a single worker",
    )


def listeners(host: str, port: int, *, reuse_port: bool = True) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` on ``port`` (0: one the kernel picks)."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in _addresses(host, port):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Every address on one port: the first one bound decides it when asked for 0.
            sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _addresses(host: str, port: int) -> list[_AddrInfo]:
    """``host``'s addresses to listen on, each once (``localhost``: IPv4 and IPv6)."""
    unique: dict[str, _AddrInfo] = {}
    for entry in socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    ):
        unique.setdefault(str(entry[4][0]), entry)
    return list(unique.values())


def free_port(host: str, port: int) -> int:
    """The port the workers will share: ``port``, or one the kernel picks for 0.

    Bound without ``SO_REUSEPORT``, so any process listening there (another callboard with
    workers included) makes it fail, as one line naming ``backend.listen``.
    """
    try:
        probes = listeners(host, port, reuse_port=False)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError("backend.listen", f"cannot listen on {host}:{port}: {reason}") from None
    chosen: int = probes[0].getsockname()[1]
    for probe in probes:
        probe.close()
    return chosen


@dataclass(frozen=True, slots=True)
class _Run:
    """A worker's current process and the end of its report pipe."""

    process: BaseProcess
    reports: Connection
    started_at: float


@dataclass(slots=True)
class _Worker:
    index: int
    run: _Run | None = None
    #: Deaths in a row, each after a short life: they set the delay before the next start.
    quick_deaths: int = 0
    #: When to start it (``time.monotonic()``); ``None`` while it runs.
    due: float | None = 0.0


class Supervisor:
    """Runs ``backend.workers`` workers until SIGTERM or SIGINT; ``run()`` returns the exit code."""

    def __init__(self, config: Config, main: WorkerMain) -> None:
        self.config = config
        self.main = main
        self.count = config.backend.workers
        self.context = multiprocessing.get_context("spawn")
        self.workers = [_Worker(index) for index in range(self.count)]
        self._stop_reason: str | None = None
        self._listen_error: str | None = None
        #: Some worker has served: from then on, a worker that dies is started again.
        self._served = False
        self._address = ""
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    def run(self) -> int:
        listen = self.config.backend.listen
        require_shared_broker(self.config)
        port = free_port(listen.host, listen.port)
        directory = Path(tempfile.mkdtemp(prefix="callboard-workers-"))  # mode 0700
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in stops}
        self._address = f"http://{listen.host}:{port}"
        try:
            spec = WorkerSpec(self.config, 0, self.count, listen.host, port, directory)
            return self._supervise(spec)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._wake_read)
            os.close(self._wake_write)
            shutil.rmtree(directory, ignore_errors=True)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_reason is None:
            self._stop_reason = signal.Signals(sig).name
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"!")

    def _supervise(self, template: WorkerSpec) -> int:
        failure: str | None = None
        while self._stop_reason is None and failure is None:
            now = time.monotonic()
            for worker in self.workers:
                if worker.run is None and worker.due is not None and worker.due <= now:
                    self._start(worker, template)
            failure = self._watch(self._next_wake(now))
        code = self._stop_all()
        if self._listen_error is not None:
            raise ConfigError("backend.listen", self._listen_error)
        if failure is not None:
            logger.error("%s; stopping", failure)
            return 1
        return code

    def _next_wake(self, now: float) -> float | None:
        due = [w.due for w in self.workers if w.run is None and w.due is not None]
        return max(0.0, min(due) - now) if due else None

    def _start(self, worker: _Worker, template: WorkerSpec) -> None:
        reports, sender = self.context.Pipe(duplex=False)
        spec = WorkerSpec(
            template.config, worker.index, self.count, template.host, template.port, template.peers
        )
        process = self.context.Process(
            target=self.main, args=(spec, sender), name=f"callboard-worker-{worker.index}"
        )
        process.start()
        sender.close()
        worker.run, worker.due = _Run(process, reports, time.monotonic()), None

    def _watch(self, timeout: float | None) -> str | None:
        """Wait for a report, a death or a signal; what makes the whole server stop, if any."""
        running = [(w, w.run) for w in self.workers if w.run is not None]
        waitables: list[Connection | int] = [self._wake_read]
        for _, run in running:
            waitables += [run.process.sentinel, run.reports]
        ready = wait(waitables, timeout)
        if self._wake_read in ready:
            os.read(self._wake_read, 64)
        for worker, run in running:
            failure = None
            if run.reports in ready:
                failure = self._report(worker, run)
            if failure is None and run.process.sentinel in ready and not run.process.is_alive():
                failure = self._died(worker, run)
            if failure is not None:
                return failure
        return None

    def _report(self, worker: _Worker, run: _Run) -> str | None:
        try:
            kind, detail = run.reports.recv()
        except (EOFError, OSError):
            return None  # the worker is gone; its death says the rest
        if kind == "error":
            self._listen_error = str(detail)
            return self._listen_error
        if not self._served:
            # The first worker accepts connections: the address answers from now on.
            logger.info(
                "callboard %s ready, listening on %s with %d workers",
                __version__,
                self._address,
                self.count,
            )
        self._served = True
        logger.info("worker %d serving (pid %s)", worker.index, detail)
        return None

    def _died(self, worker: _Worker, run: _Run) -> str | None:
        run.process.join()
        run.reports.close()
        worker.run = None
        how = _exit_status(run.process.exitcode)
        if self._stop_reason is not None:
            return None
        if not self._served:
            # No worker has served yet: one that cannot start will not start on a second try
            # either (its log above says why).
            return f"worker {worker.index} exited with {how} before it served"
        lived = time.monotonic() - run.started_at
        worker.quick_deaths = 0 if lived >= STEADY else worker.quick_deaths + 1
        delay = (
            0.0
            if worker.quick_deaths == 0
            else min(MOST_DELAY, FIRST_DELAY * 2 ** (worker.quick_deaths - 1))
        )
        worker.due = time.monotonic() + delay
        logger.error(
            "worker %d (pid %s) exited with %s; starting it again in %.1fs",
            worker.index,
            run.process.pid,
            how,
            delay,
        )
        return None

    def _stop_all(self) -> int:
        """SIGTERM every worker and wait for them; 0 when every one stopped by itself."""
        running = [(w, w.run) for w in self.workers if w.run is not None]
        for _, run in running:
            with contextlib.suppress(OSError):
                os.kill(run.process.pid or 0, signal.SIGTERM)
        shutdown = self.config.events.shutdown_timeout_ms / 1000
        # uvicorn's graceful timeout (see cli.serve), then the events service's own shutdown.
        deadline = time.monotonic() + (shutdown + 1) + shutdown + STOP_MARGIN
        code = 0
        for worker, run in running:
            run.process.join(max(0.0, deadline - time.monotonic()))
            if run.process.is_alive():
                logger.error("worker %d did not stop in time; killed", worker.index)
                run.process.kill()
                run.process.join()
                code = 1
            run.reports.close()
            worker.run = None
        logger.info("all workers stopped (%s)", self._stop_reason or "a worker failed")
        return code


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
