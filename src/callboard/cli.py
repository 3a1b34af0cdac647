"""The ``callboard`` command: ``serve``, ``check-config`` and ``migrate``; the operations
commands are ``cli_ops``'s."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from callboard import __version__
from callboard.brokers import redact_url
from callboard.config import Config, load_config
from callboard.errors import CallboardError, ConfigError, NotFoundError
from callboard.logs import configure_logging

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    import uvicorn

    from callboard.app import CallboardApp
    from callboard.workers import WorkerSpec

logger = logging.getLogger("callboard.cli")

#: The commands ``cli_ops`` runs: they read the store and only the configuration of it.
OPERATIONS = frozenset({"subscriptions", "dead-letters", "replay", "events", "tail", "publish"})

#: The broker ``serve`` runs on when the configuration names none: durable, next to the process.
SERVE_BROKER = "sqlite:///callboard.db"
#: Files ``serve`` keeps beside its connections (brokers, logs, the listening socket).
RESERVED_FILES = 256


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="YAML configuration file; several merge in order, later wins",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callboard", description="The callboard events backend.")
    parser.add_argument("--version", action="version", version=f"callboard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the events backend")
    _config_argument(serve)
    serve.add_argument("--host", help="overrides backend.listen.host")
    serve.add_argument("--port", type=int, help="overrides backend.listen.port")
    serve.add_argument("--log-format", choices=["text", "json"], help="overrides logging.format")
    serve.add_argument(
        "--workers",
        metavar="N",
        help="serving processes, or 'auto' (one per core); overrides backend.workers",
    )

    check = commands.add_parser(
        "check-config", help="validate configuration and modules, then exit"
    )
    _config_argument(check)
    check.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1) on what is otherwise a warning: unknown or misspelt keys",
    )

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the broker's schema (events.broker), then exit"
    )
    _config_argument(migrate)
    _admin_parsers(commands)
    from callboard.cli_ops import add_parsers

    add_parsers(commands, _config_argument)
    return parser


def _admin_parsers(commands: Any) -> None:
    subs = commands.add_parser(
        "subscriptions", help="list the broker's subscriptions with their topics and lag"
    )
    _config_argument(subs)
    subs.add_argument(
        "--delete",
        metavar="ID",
        help="forget this subscription instead: its position, leases and dead letters. A "
        "server consuming it stops consuming it (its /readyz and /metrics say so until it "
        "restarts): stop its subscribers first",
    )
    subs.add_argument(
        "--force",
        action="store_true",
        help="with --delete: delete a subscription that a server's events service owns or "
        "that has events in flight",
    )

    letters = commands.add_parser(
        "dead-letters", help="list or redrive a subscription's dead letters"
    )
    actions = letters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="show the dead letters, oldest first")
    redrive = actions.add_parser("redrive", help="deliver dead letters to the subscription again")
    for action in (listing, redrive):
        _config_argument(action)
        action.add_argument("--subscription", required=True, metavar="ID")
    listing.add_argument("--limit", type=int, default=100)
    redrive.add_argument(
        "--id", dest="ids", action="append", metavar="ID", help="only this dead letter (repeat)"
    )

    replay = commands.add_parser(
        "replay", help="deliver the kept events since a time to a subscription again"
    )
    _config_argument(replay)
    replay.add_argument("--subscription", required=True, metavar="ID")
    replay.add_argument(
        "--since", required=True, metavar="TIME", help="ISO 8601 time, or an age: 30m, 2h, 1d"
    )
    replay.add_argument(
        "--topic",
        dest="topics",
        action="append",
        metavar="PATTERN",
        help="topics to replay (repeat); default: the subscription's own",
    )


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    listen: dict[str, object] = {}
    if getattr(args, "host", None):
        listen["host"] = args.host
    if getattr(args, "port", None) is not None:
        listen["port"] = args.port
    backend: dict[str, object] = {"listen": listen} if listen else {}
    if getattr(args, "workers", None) is not None:
        backend["workers"] = args.workers
    if backend:
        overrides["backend"] = backend
    if getattr(args, "log_format", None):
        overrides["logging"] = {"format": args.log_format}
    config = load_config(args.config, overrides=overrides)
    if "broker" not in config.events.model_fields_set:
        # The library default stays in-memory; the server is durable unless told otherwise.
        config = config.model_copy(
            update={"events": config.events.model_copy(update={"broker": SERVE_BROKER})}
        )
    return config


def serve(config: Config) -> int:
    if config.backend.workers > 1:
        from callboard.workers import Supervisor

        return Supervisor(config, serve_worker).run()
    from callboard.app import create_app
    from callboard.workers import listeners

    listen = config.backend.listen
    try:
        # Bound before anything starts: a port in use is one line, and nothing to undo.
        sockets = listeners(listen.host, listen.port, reuse_port=False)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(
            "backend.listen", f"cannot listen on {listen.host}:{listen.port}: {reason}"
        ) from None
    try:
        server = _server(config, create_app(config), announce=True)
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
    return 0 if server.started else 1


def serve_worker(spec: WorkerSpec, reports: Connection) -> None:
    """One worker of ``serve`` with ``backend.workers`` > 1, in a process of its own."""
    from callboard.app import create_app
    from callboard.peers import Peers
    from callboard.workers import listeners

    config = spec.config
    configure_logging(config.logging.level, config.logging.format)
    try:
        sockets = listeners(spec.host, spec.port)
    except OSError as error:
        reports.send(("error", f"cannot listen on {spec.host}:{spec.port}: {error.strerror}"))
        sys.exit(1)
    app = create_app(config, peers=Peers(spec.peers, spec.index, spec.count))
    server = _server(config, app, on_started=lambda: reports.send(("up", os.getpid())))
    server.run(sockets=sockets)
    sys.exit(0 if server.started else 1)


def _server(
    config: Config,
    app: CallboardApp,
    on_started: Callable[[], None] | None = None,
    *,
    announce: bool = False,
) -> uvicorn.Server:
    """The uvicorn server of ``serve``, bounded by ``backend.server``.

    ``announce``: log "ready" with the address once the application has started and its
    sockets accept connections (a worker of several leaves that to the supervisor).
    """
    import uvicorn

    from callboard.gc_tuning import tune_for_serving
    from callboard.http_protocol import ServerLimits, protocol_for

    listen = config.backend.listen
    bounds = config.backend.server
    limits = ServerLimits(
        max_request_line_bytes=bounds.max_request_line_bytes,
        max_header_bytes=bounds.max_header_bytes,
        max_headers_bytes=bounds.max_headers_bytes,
        max_header_count=bounds.max_header_count,
        headers_timeout=bounds.headers_timeout_ms / 1000,
        body_timeout=bounds.body_timeout_ms / 1000,
        keep_alive_timeout=bounds.keep_alive_timeout_ms / 1000,
        max_connections=fit_open_files(bounds.max_connections),
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Held bus reads would keep their connections open until the graceful-shutdown
            # timeout; end them at once so shutdown only waits for real work.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.call_soon_threadsafe(app.bus.release_held_reads)
                loop.call_soon_threadsafe(app.console.end_streams)  # the live views' streams
            super().handle_exit(sig, frame)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                tune_for_serving()  # after start-up: what it built stays alive (see gc_tuning)
                if announce:
                    bound = sockets[0].getsockname() if sockets else (listen.host, listen.port)
                    logger.info(
                        "callboard %s ready, listening on http://%s:%d",
                        __version__,
                        listen.host,
                        bound[1],
                    )
                if on_started is not None:
                    on_started()

    if config.backend.access_log:
        from callboard.access_log import AccessLog

        served: Any = AccessLog(app)
    else:
        served = app
    return Server(
        uvicorn.Config(
            served,
            host=listen.host,
            port=listen.port,
            lifespan="on",
            # One socket write per response instead of two (head, then body), and the bounds of
            # backend.server on every connection.
            http=protocol_for(limits),
            # The protocol keeps this deadline itself, without uvicorn's timer per request.
            timeout_keep_alive=max(1, round(limits.keep_alive_timeout)),
            access_log=False,
            log_config=None,
            # callboard reads no client address, so X-Forwarded-* handling is work for nothing.
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=int(config.events.shutdown_timeout_ms / 1000) + 1,
        )
    )


def fit_open_files(max_connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` toward the hard one so ``max_connections`` fit.

    Without room for its connections the process meets ``EMFILE`` on accept, and asyncio then
    stops accepting for a second at a time: every new connection is reset. Returns how many
    connections fit, which is less than asked (with a warning) when the hard limit is too low.
    """
    import resource

    needed = max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft != infinite and soft < needed:
        target = needed if hard == infinite else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            logger.warning("could not raise the open-files limit to %d: %s", target, error)
    if soft == infinite or soft >= needed:
        return max_connections
    fitting = max(soft - RESERVED_FILES, 1)
    logger.warning(
        "backend.server.maxConnections is %d but the process may open only %d files "
        "(RLIMIT_NOFILE, hard limit %s): at most %d connections are kept open; raise the hard "
        "limit (ulimit -Hn, systemd LimitNOFILE=) or lower backend.server.maxConnections",
        max_connections,
        soft,
        "unlimited" if hard == infinite else hard,
        fitting,
    )
    return fitting


def check_config(config: Config, *, strict: bool = False) -> int:
    from callboard.app import build

    if strict and config.warnings:
        for warning in config.warnings:
            print(f"callboard: {warning}", file=sys.stderr)
        return 1
    board = build(config)
    print(
        "configuration OK\n"
        f"  listen:  {config.backend.listen.host}:{config.backend.listen.port}\n"
        f"  broker:  {redact_url(config.events.broker)}\n"
        f"  topics:  {', '.join(sorted(board.ingress.ingresses)) or '(none)'}\n"
        f"  modules: {', '.join(c.name for c in board.contexts) or '(none)'}\n"
        f"  push:    {', '.join(sorted(config.events.push)) or '(none)'}"
    )
    return 0


def migrate(config: Config) -> int:
    import asyncio

    from callboard.brokers import open_broker
    from callboard.brokers.base import BrokerAdmin

    url = config.events.broker
    broker = open_broker(url, retention=config.events.retention.policy())
    if not isinstance(broker, BrokerAdmin) or not broker.capabilities.durable:
        print(f"the broker {url.partition('://')[0]}:// keeps no schema; nothing to migrate")
        return 0
    from callboard.terminal import progress

    with progress("migrating"):  # a spinner on a terminal: an index on a large store takes time
        applied = asyncio.run(broker.migrate())
    print("schema up to date" + (f"; applied {', '.join(applied)}" if applied else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in OPERATIONS:
            from callboard.cli_ops import run

            return run(args)
        config = _load(args)
        configure_logging(config.logging.level, config.logging.format)
        if args.command == "serve":
            return serve(config)
        if args.command == "migrate":
            return migrate(config)
        return check_config(config, strict=getattr(args, "strict", False))
    except NotFoundError as error:
        print(f"callboard: {error}", file=sys.stderr)
        return 1
    except CallboardError as error:
        print(f"callboard: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
