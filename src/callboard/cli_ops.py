"""The operations commands: ``subscriptions``, ``dead-letters``, ``replay``, ``events``, ``tail``
and ``publish``.

They read only what they use of the configuration (``events.broker``, ``events.retention``,
``logging``: ``config.load_store_config``), say which store they opened (``store: ...`` on
standard error, passwords masked), and never make a store: a SQLite file that does not exist is
an error naming it, since opening it would create an empty one and every answer would then be
about that empty store (``serve`` and ``migrate`` alone create it). What they name and is not
there (a subscription, a dead letter, an event, the store) ends them with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from callboard.brokers import open_broker
from callboard.brokers.base import MAX_PAGE, Broker, EventQuery
from callboard.bus import admin as ops
from callboard.bus import cli_events
from callboard.config import Config, load_store_config
from callboard.errors import ConfigError
from callboard.logs import configure_logging
from callboard.terminal import progress

#: The commands of this module.
OPERATIONS = frozenset({"subscriptions", "dead-letters", "replay", "events", "tail", "publish"})

#: The broker the commands open when the configuration names none: the one ``serve`` makes.
DEFAULT_STORE = "sqlite:///callboard.db"

#: Where the bus token is read from when ``--token`` is not given.
TOKEN_VARIABLE = "CALLBOARD_TOKEN"


def parse_since(value: str, option: str = "--since") -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age: ``30s``, ``10m``, ``2h``, ``1d``."""
    match = re.fullmatch(r"(\d+)\s*([smhd])", value.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return datetime.now(UTC) - timedelta(seconds=int(match.group(1)) * unit)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            option, f"expected an ISO 8601 time or an age like 10m or 2h, got {value!r}"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    """Run an operations command; its exit code (errors are raised, ``cli.main`` reports them)."""
    url = getattr(args, "url", None)
    if url:
        return _remote(args, url)
    config = _store_config(args)
    configure_logging(config.logging.level, config.logging.format)
    store = config.events.broker
    print(cli_events.store_line(store), file=sys.stderr)
    cli_events.require_store(store)
    broker = open_broker(store, retention=config.events.retention.policy())
    ops.require_durable(broker, store)
    with contextlib.suppress(KeyboardInterrupt):  # tail runs until interrupted
        asyncio.run(_on(broker, args))
    return 0


def _store_config(args: argparse.Namespace) -> Config:
    config = load_store_config(args.config)
    if "broker" not in config.events.model_fields_set:
        config = config.model_copy(
            update={"events": config.events.model_copy(update={"broker": DEFAULT_STORE})}
        )
    return config


async def _on(broker: Broker, args: argparse.Namespace) -> None:
    await broker.start()
    try:
        await _command(broker, args)
    finally:
        await broker.close()


async def _command(broker: Broker, args: argparse.Namespace) -> None:
    command = args.command
    if command == "subscriptions":
        if args.delete:
            print(await ops.delete_subscription(broker, args.delete, force=args.force))
        else:
            print(await ops.list_subscriptions(broker))
    elif command == "dead-letters" and args.action == "list":
        print(await ops.list_dead_letters(broker, args.subscription, args.limit))
    elif command == "dead-letters":
        with progress("redriving") as shown:
            done = await ops.redrive(broker, args.subscription, args.ids, progress=shown)
        print(done)
    elif command == "replay":
        with progress("replaying") as shown:
            result = await ops.replay(
                broker,
                args.subscription,
                parse_since(args.since),
                topics=args.topics,
                progress=shown,
            )
        print(f"replayed {result.delivered} events on {list(result.topics)} to {args.subscription}")
    elif command == "events" and args.action == "show":
        print(await cli_events.show_event(broker, args.id, as_json=args.json))
    elif command == "events":
        query = EventQuery(
            topics=tuple(args.topics or ()),
            since=None if args.since is None else parse_since(args.since),
            until=None if args.until is None else parse_since(args.until, "--until"),
            before=args.before,
            limit=args.limit,
        )
        await cli_events.list_events(broker, query, _print, as_json=args.json)
    elif command == "tail":
        start = None if args.since is None else parse_since(args.since)
        await cli_events.tail(broker, tuple(args.patterns), start, _print, as_json=args.json)
    else:
        print(await _publish(broker, args))


async def _publish(broker: Broker, args: argparse.Namespace) -> str:
    payload = cli_events.read_payload(args.data)
    metadata = cli_events.read_metadata(args.metadata or ())
    return await cli_events.publish(broker, args.topic, payload, metadata)


def _remote(args: argparse.Namespace, url: str) -> int:
    """``publish`` and ``tail`` through a server's bus (``--url``)."""
    from callboard.bus.remote import RemoteBroker

    if args.command not in ("publish", "tail"):
        raise ConfigError("--url", f"{args.command} reads the store itself; --url is not for it")
    if getattr(args, "since", None):
        raise ConfigError(
            "--since",
            "the bus delivers only what is published from now on; drop --url to "
            "read the history from the store",
        )
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    broker = RemoteBroker(url.rstrip("/"), token)
    print(f"server: {url}", file=sys.stderr)

    async def remote() -> None:
        await broker.start()
        try:
            if args.command == "publish":
                print(await _publish(broker, args))
            else:
                patterns = tuple(args.patterns)
                await cli_events.tail_remote(broker, patterns, _print, as_json=args.json)
        finally:
            await broker.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(remote())
    return 0


def _print(line: str) -> None:
    print(line, flush=True)


def add_parsers(commands: Any, config_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    """The parsers of ``publish``, ``tail`` and ``events`` (``subscriptions``, ``dead-letters``
    and ``replay`` are ``cli``'s, which gives ``config_argument``, the ``--config`` option)."""
    publish = commands.add_parser(
        "publish", help="publish an event through the configured broker or a server (--url)"
    )
    config_argument(publish)
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument(
        "--data",
        "-d",
        metavar="JSON",
        help="the payload: JSON text, @FILE for a file's, - for standard input's (default null)",
    )
    publish.add_argument(
        "--metadata", "-m", action="append", metavar="KEY=VALUE", help="a metadata entry (repeat)"
    )
    _remote_arguments(publish)

    tail = commands.add_parser("tail", help="print events as they are stored, until Ctrl-C")
    config_argument(tail)
    tail.add_argument("patterns", nargs="*", metavar="PATTERN", help="topic patterns (all)")
    tail.add_argument("--since", metavar="TIME", help="print the history first: 10m, 2h, or ISO")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    _remote_arguments(tail)

    events = commands.add_parser("events", help="look up the events the store keeps")
    actions = events.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the stored events, newest first")
    show = actions.add_parser("show", help="an event: payload, metadata, outcome per subscription")
    for action in (listing, show):
        config_argument(action)
        action.add_argument("--json", action="store_true", help="JSON instead of text")
    listing.add_argument("--topic", dest="topics", action="append", metavar="PATTERN")
    listing.add_argument("--since", metavar="TIME", help="stored since: 10m, 2h, or ISO 8601")
    listing.add_argument("--until", metavar="TIME", help="stored before: 10m, 2h, or ISO 8601")
    listing.add_argument(
        "--limit", type=_page_size, default=50, help=f"at most this many (1 to {MAX_PAGE})"
    )
    listing.add_argument(
        "--before", type=int, metavar="SEQ", help="the next page: events stored before this one"
    )
    show.add_argument("id", metavar="ID")


def _page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_PAGE}")
    return int(value)


def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", metavar="URL", help="a callboard server (http://host:port) instead of the store"
    )
    parser.add_argument(
        "--token", metavar="TOKEN", help=f"the server's bus token (default: ${TOKEN_VARIABLE})"
    )
