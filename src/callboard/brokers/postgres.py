"""The durable broker for many instances: PostgreSQL, through asyncpg.

``postgresql://user@host:5432/db?schema=callboard`` (``schema`` defaults to ``callboard``; other
query parameters go to asyncpg, which reads libpq's, e.g. ``sslmode``, and passes the ones it does
not know to the server as settings).

Design
------
The domain is ``SqlBroker``'s (``sql/broker.py``); this module holds the PostgreSQL store: its
connections (an asyncpg pool and a ``LISTEN`` connection) and its statements (``postgres_ops``,
``sql/postgres/``). The tables mirror the SQLite broker's, with ``leased_batches`` beside
``leases`` for events handed out and not acknowledged.

- Publishing: one commit of the broker's group-commit engine writes its batch in one transaction
  (``INSERT ... SELECT FROM unnest``) under a per-schema advisory lock, notifies, commits
  (synchronously) and only then are the publishes answered, so a ``202`` means the event is on
  disk. The lock makes seqs visible in order across instances (see ``postgres_ops``), which is
  what lets a position move safely. Under load a commit waits for the callers of the previous one
  to come back (at most ``PUBLISH_REGROUP``), so they share it (``callboard.group_commit``).
- Consuming: a claim locks the group's row (claims of one group take turns), re-leases expired or
  handed-back leases (``FOR UPDATE SKIP LOCKED``), then leases the next matching events after the
  position, as ONE row of ``leased_batches`` for the lot, and moves the position. A batch whose
  lease runs out or is handed back is split into single ``leases`` of its events not
  acknowledged yet, which are handed out one by one (``0003_leased_batches.sql``); releasing some
  events of a batch moves them to single leases at once. Lease times are the server's
  (``now()``), so the instances' clocks play no part; a lease left more than a lease ahead by the
  server's clock moving back is brought back to a lease from now by the next renewal of any
  instance. Claims and acknowledgements commit without waiting for the disk
  (``synchronous_commit = off``): one lost in a server crash only means its events are handed
  out again.
- Statements: a publish batch, a claim and an acknowledgement batch are each ONE statement (the
  functions of ``0002_operations.sql`` to ``0004_plain_publish.sql``) outside a transaction
  block, so autocommitted; asyncpg prepares each once per connection and sends the batches'
  arrays in the binary format: one round trip each, and the driver's Python work once per
  operation. asyncpg was chosen over psycopg for that work: about half the client CPU per
  statement (``bench/pg_driver.py``).
- Wake-ups: ONE ``LISTEN`` connection per broker (``postgres_listener``) wakes local consumers on
  other instances' commits; while it is down consumers poll every ``fallback_poll`` seconds. A
  broker wakes its own consumers of its own publishes (and its listener skips their
  notifications) once the publishers of the commit have been answered.
- Failures: driver errors become ``BrokerUnavailable`` (connection, timeout) or ``BrokerError``
  at this boundary, and data the server refuses to store (a NUL in text) ``InvalidEventError``,
  for that event's publish alone (``postgres_ops.refused_data``); connects and statements time
  out quickly so the HTTP ingress can answer 503 at once, and the pool replaces a connection
  that broke when it is next lent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from callboard.brokers import postgres_ops as ops
from callboard.brokers.base import (
    Capabilities,
    Delivery,
    EventPage,
    EventQuery,
    RetentionPolicy,
    Start,
)
from callboard.brokers.postgres_listener import Listener
from callboard.brokers.sql import Expired, StoredEvent
from callboard.brokers.sql.backlog import Span, StoreState, Tally
from callboard.brokers.sql.broker import SqlBroker
from callboard.brokers.sql.eventlog import EventFacts
from callboard.brokers.sql.retention import RetentionRange
from callboard.brokers.sql.store import Wake
from callboard.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    InvalidEventError,
    SubscriptionError,
)
from callboard.events import Event
from callboard.logs import OneLine

logger = logging.getLogger("callboard.brokers.postgres")

T = TypeVar("T")

#: Seconds a publish commit waits, at most, for the callers of the previous one to come back
#: (``callboard.group_commit``): a commit waits for the disk (about 1.5 ms here), and callers
#: taking turns in two halves would each wait for two of them.
PUBLISH_REGROUP = 0.001

#: What says the server cannot be reached or is going away, rather than refusing a statement:
#: connection failures (class 08, a connection lost in the middle of a statement included),
#: operator intervention (57: shutdown, restart, a statement cancelled by ``statement_timeout``)
#: and a server full of connections.
_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)
#: What leaves a connection unfit to lend again: the failures above, and the driver finding it
#: closed or in the middle of another operation.
_BROKEN = (*_UNAVAILABLE, asyncpg.InterfaceError, asyncpg.InternalClientError)


class PostgresBroker(SqlBroker):
    """Durable broker on PostgreSQL. ``postgresql://...`` in configuration."""

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = "callboard",
        lease: float = 30.0,
        poll_interval: float = 2.0,
        retention: RetentionPolicy | None = None,
        pool_size: int = 10,
        timeout: float = 3.0,
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.timeout = timeout
        self.postgres = PostgresStore(
            conninfo,
            schema=schema,
            pool_size=pool_size,
            timeout=timeout,
            fallback_poll=min(poll_interval, 0.5),
        )
        super().__init__(
            self.postgres,
            lease=lease,
            poll_interval=poll_interval,
            retention=retention,
            capabilities=Capabilities(durable=True, shared=True, replay=True),
            log=logger,
            publish_regroup=PUBLISH_REGROUP,
        )

    @classmethod
    def from_url(cls, url: str, *, retention: RetentionPolicy | None = None) -> PostgresBroker:
        parts = urlsplit(url)
        params = dict(parse_qsl(parts.query))
        schema = params.pop("schema", "callboard")
        if not schema.isidentifier():
            raise ConfigError("events.broker", f"schema {schema!r} is not a plain SQL identifier")
        conninfo = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(params)))
        return cls(conninfo, schema=schema, retention=retention)


class PostgresStore:
    """The ``SqlStore`` of a PostgreSQL schema: ``postgres_ops`` on a pool of connections."""

    def __init__(
        self, conninfo: str, *, schema: str, pool_size: int, timeout: float, fallback_poll: float
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.label = f"the PostgreSQL broker on schema {schema!r}"
        # A retention batch competes with publishes for the database's CPU and WAL: short ones
        # (a batch of 1,000 took 5-10 ms and raised the ingest p99 several times over).
        self.retention_step: float | None = 0.006
        self.timeout = timeout
        #: How often consumers look for events while the notification connection is down.
        self.fallback_poll = fallback_poll
        self.q = ops.Queries(schema)
        self._pool_size = pool_size
        #: An ``asyncpg.Pool`` while open (asyncpg ships no type information).
        self._pool: Any = None
        #: Marks this store's notifications, which its own listener skips: the broker wakes its
        #: own consumers of its own publishes.
        self._origin = uuid.uuid4().hex
        #: The ``LISTEN`` connection while watching.
        self.listener: Listener | None = None

    async def open(self) -> None:
        await self._open_pool()

    async def close(self) -> None:
        await self._close_pool()

    async def migrate(self) -> list[str]:
        """Create the schema or apply what is missing (``callboard migrate``); what was applied."""
        if self._pool is not None:
            return await self._migrate()
        await self._open_pool()
        try:
            return await self._migrate()
        finally:
            await self._close_pool()

    async def check(self) -> None:
        if self._pool is None:
            raise BrokerUnavailable(f"{self.label} is not connected")
        # A pooled connection (a new one if the pool has to reconnect) and one round trip.
        await self.run(_ping)

    async def insert_events(
        self, batch: list[tuple[StoredEvent, str | None]]
    ) -> list[bool | BaseException]:
        try:
            return list(await self.run(ops.insert_events, batch, self._origin))
        except InvalidEventError:
            if len(batch) == 1:
                raise
        # PostgreSQL refused some event of the batch, and the whole statement with it: store the
        # events one by one, so that only the refused one's publish fails.
        results: list[bool | BaseException] = []
        for item in batch:
            try:
                results.extend(await self.run(ops.insert_events, [item], self._origin))
            except InvalidEventError as error:
                results.append(error)
        return results

    async def keep_dead_letter(self, group: str, event: StoredEvent) -> None:
        await self.run(ops.keep_dead_letter, group, event)

    async def deliver_to(self, group: str, event: StoredEvent) -> None:
        if not await self.run(ops.exists, group):
            raise SubscriptionError(f"no subscription {group!r} to deliver to")
        # The publishing statement: under the publishing lock, and notified to every instance.
        await self.run(ops.insert_events, [(event, group)], self._origin)

    async def join(
        self, group: str, patterns: Sequence[str], start: Start, owner: str | None
    ) -> bool:
        return await self.run(ops.join, group, patterns, start, owner)

    async def claim(self, group: str, consumer: str, limit: int, lease: float) -> list[Delivery]:
        return await self.run(ops.claim, group, consumer, limit, lease)

    async def ack(self, batch: list[tuple[str, str, int]]) -> list[bool]:
        return await self.run(ops.ack, batch)

    async def release(self, group: str, consumer: str, seqs: Sequence[int] | None) -> bool:
        return await self.run(ops.release, group, consumer, seqs)

    async def renew(self, consumers: list[str], lease: float) -> None:
        await self.run(ops.renew, consumers, lease)

    async def dead_letters(
        self, group: str, ids: Sequence[str] | None, remove: bool, limit: int
    ) -> list[Event]:
        return await self.run(ops.dead_letters, group, ids, remove, limit)

    async def due(self, lease: float) -> dict[str, bool]:
        return await self.run(ops.due)

    async def backlog_state(self) -> StoreState:
        return await self.run(ops.backlog_state)

    async def tally_events(
        self, counts: Sequence[Span], rows: Sequence[Span], bucket: int
    ) -> Tally:
        return await self.run(ops.tally_events, counts, rows, bucket, limit=30.0)

    async def delete_subscription(self, group: str) -> bool:
        return await self.run(ops.delete_subscription, group)

    async def find_events(self, query: EventQuery) -> EventPage:
        return await self.run(ops.find_events, query, limit=30.0)

    async def event_facts(self, event_id: str) -> EventFacts:
        return await self.run(ops.event_facts, event_id)

    async def expire_range(self, policy: RetentionPolicy) -> RetentionRange | None:
        return await self.run(ops.expire_range, policy)

    async def expire(
        self, policy: RetentionPolicy, bounds: RetentionRange, after: int
    ) -> Expired | None:
        return await self.run(ops.expire, policy, bounds, after, limit=30.0)

    async def watch(self, wake: Wake) -> None:
        """Listen for other instances' notifications; poll while the listener is down."""
        listener = Listener(
            self.conninfo, self.q.channel, wake, connect_timeout=self.timeout, origin=self._origin
        )
        self.listener = listener
        listening = asyncio.create_task(listener.run(), name="callboard-postgres-listener")
        try:
            while True:
                await asyncio.sleep(self.fallback_poll)
                if not listener.up:
                    wake(None, ())
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
            self.listener = None

    async def _open_pool(self) -> None:
        # Added once: ``addFilter`` skips a filter it already has.
        logging.getLogger("asyncpg.pool").addFilter(_one_line)
        try:
            self._pool = await asyncpg.create_pool(
                self.conninfo,
                min_size=1,
                max_size=self._pool_size,
                timeout=self.timeout,
                server_settings={
                    "application_name": "callboard",
                    # Short statements: a stuck server makes a publish fail fast (503), not hang.
                    "statement_timeout": str(int(self.timeout * 1000)),
                },
                reset=_reset,
            )
        except (TimeoutError, *_UNAVAILABLE, asyncpg.PostgresError) as error:
            raise BrokerUnavailable(
                f"cannot connect to PostgreSQL for the broker within {self.timeout}s; "
                f"check events.broker and that the server is up ({_reason(error)})"
            ) from error
        except asyncpg.InterfaceError as error:  # a parameter of the URL asyncpg cannot use
            raise ConfigError(
                "events.broker", f"asyncpg refused the PostgreSQL URL: {error}"
            ) from error

    async def _close_pool(self) -> None:
        """Close the pool politely, or abruptly once ``timeout`` is up (a server gone silent)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except TimeoutError:
            pool.terminate()

    async def _migrate(self) -> list[str]:
        applied = await self.run(ops.migrate, limit=None)
        if applied:
            logger.info("applied migrations to schema %r: %s", self.schema, ", ".join(applied))
        return applied

    async def run(
        self, operation: Callable[..., Awaitable[T]], *args: Any, limit: float | None = 0.0
    ) -> T:
        """Run an operation on a pooled connection, translating driver errors.

        Once it holds a connection the operation has ``limit`` seconds (0: the broker's
        ``timeout``; ``None``: no limit). A server that stops answering without closing the
        connection (a network partition, a frozen host) then fails the caller with
        ``BrokerUnavailable`` instead of hanging it; the operation is cancelled in the background,
        where the driver gives its connection up.
        """
        if limit is None:
            async with self._connection() as connection:
                return await operation(connection, self.q, *args)
        acquired: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def run() -> T:
            async with self._connection() as connection:
                acquired.set_result(None)
                return await operation(connection, self.q, *args)

        work = asyncio.ensure_future(run())
        work.add_done_callback(_retrieve)  # read by nobody once given up on
        patience = limit or self.timeout
        try:
            first: list[asyncio.Future[Any]] = [work, acquired]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await asyncio.wait([work], timeout=patience)
        except asyncio.CancelledError:
            work.cancel()
            raise
        if not work.done():
            work.cancel()
            raise BrokerUnavailable(f"PostgreSQL did not answer within {patience}s")
        return work.result()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[ops.Connection]:
        # A connection that broke is closed, and the pool connects anew when it next lends that
        # slot. (A connection that broke while idle is found closed then too.)
        try:
            async with self._pool.acquire(timeout=self.timeout) as connection:
                try:
                    yield connection
                except _BROKEN:
                    # asyncpg may not have closed it yet: a terminated backend's error arrives
                    # before its socket closes, and lent again at once the connection would fail
                    # the next operation too. Drop it now (unless asyncpg, finding it closed,
                    # has taken it back already).
                    with contextlib.suppress(asyncpg.InterfaceError):
                        connection.terminate()
                    raise
        except TimeoutError as error:
            raise BrokerUnavailable(
                f"PostgreSQL is unreachable (no connection within {self.timeout}s)"
            ) from error
        except _UNAVAILABLE as error:
            raise BrokerUnavailable(f"PostgreSQL failed: {error}") from error
        except asyncpg.PostgresError as error:
            raise BrokerError(f"PostgreSQL refused a broker statement: {error}") from error
        except asyncpg.InterfaceError as error:
            if _closed(error):
                raise BrokerUnavailable(f"PostgreSQL failed: {error}") from error
            raise BrokerError(f"the broker misused its PostgreSQL driver: {error}") from error
        except asyncpg.InternalClientError as error:
            # A connection left mid-operation by a failure; it was dropped above.
            raise BrokerUnavailable(f"PostgreSQL connection unusable: {error}") from error


async def _reset(connection: Any) -> None:
    """The pool's reset: no round trip on a release, unless a transaction was left open.

    asyncpg's default reset (``RESET ALL``, unlisten, unlock advisory locks...) costs a round trip
    per operation; the operations of ``postgres_ops`` leave nothing in the session: their
    transactions end and their advisory locks and settings are transaction-level. Only an
    operation cancelled while its rollback was under way could leave a transaction open, and the
    next one would run inside it: end it.
    """
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


async def _ping(connection: Any, q: ops.Queries) -> None:
    await connection.fetchval("SELECT 1")


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


#: asyncpg's pool logs each failed reconnect during an outage with a traceback: one line.
_one_line = OneLine((TimeoutError, *_UNAVAILABLE))


def _closed(error: asyncpg.InterfaceError) -> bool:
    """Whether the driver refused because the connection or the pool is closed (or closing)."""
    return "closed" in str(error) or "closing" in str(error)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # Reading the outcome of an operation nobody awaits any more keeps asyncio quiet about it.
    if not task.cancelled():
        task.exception()
