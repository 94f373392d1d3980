"""The PostgreSQL ledger's connections: an asyncpg pool, its errors translated, and
transactions retried.

`postgres.PostgresLedger` says what each transaction locks, reads and writes; `Pool` says
how it reaches the database. Apart because these are the driver's mechanics, the same
whatever the statements: the pool's size and timeouts, which errors mean the database
cannot be reached, and the retries on a serialization failure (40001) or a deadlock
(40P01).

Errors: an unreachable database is `LedgerUnavailable` (the web layer answers
503; a settlement retries it), anything else is `LedgerError`. The pool
reconnects by itself when the database comes back. A connection found broken
(`LOST`: closed, reset, ended by the server) is `LedgerConnectionLost`, and the
pool's other connections are expired with it: what broke one (a fail-over, a
NAT or load balancer that dropped idle connections without a word, a restart)
most likely broke the others, each of which would otherwise be found dead by a
request in turn, answered 503. The transaction that found it runs again once,
on a fresh connection, if it had not sent its commit (the server rolled it
back); so does a read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from proxy.core.errors import LedgerConnectionLost, LedgerError, LedgerUnavailable

T = TypeVar("T")

POOL_SIZE = 10
"""Connections per process unless the URL says `?pool_size=N`."""
CONNECT_TIMEOUT_S = 5.0
ACQUIRE_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 2.0
RETRIES = 8
IDLE_IN_TRANSACTION = "20s"
"""How long the server lets one of Tollgate's sessions sit idle inside a transaction before
it ends the session (`idle_in_transaction_session_timeout`), rolling the transaction back.
Tollgate's transactions are short and never wait on anything but the database; one idle
this long belongs to a process that stopped without its connection closing (paused,
stalled, its host frozen). Every transaction that writes counters takes the same first
lock: held for as long as that process stays stopped, it would stop every replica."""
LOCK_WAIT = "15s"
"""How long a statement may wait for a lock (`lock_timeout`), shorter than
`IDLE_IN_TRANSACTION`: the statements a stopped process had sent before it stopped, still
waiting for the first lock, give up before the session holding it is ended, rather than
take the lock in turn, each for `IDLE_IN_TRANSACTION` more. A writer waits milliseconds for
it otherwise; one that waited this long is answered as when the ledger is unreachable."""

UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection cut in the middle of a statement
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    # The server ended a session idle inside a transaction (`IDLE_IN_TRANSACTION`), or a
    # statement waited too long for a lock (`LOCK_WAIT`): rolled back, nothing written.
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.exceptions.LockNotAvailableError,
)
LOST = (
    ConnectionError,  # closed, reset, refused
    asyncpg.InterfaceError,  # "connection is closed"
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.exceptions.AdminShutdownError,  # pg_terminate_backend, a fast shutdown
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # starting up, shutting down
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.exceptions.IdleSessionTimeoutError,
)
"""The errors of a connection that is gone, after which the pool's idle connections are
probably gone too (`Pool.expire_connections`: each is replaced on its next acquire). Not a
timeout (a pool busy to its size, a slow statement), a lock waited for too long, a
cancelled statement or too many connections: the connections themselves are sound, and
replacing them would only add connections to a server short of them."""


def split_url(url: str) -> tuple[str, int]:
    """The DSN for asyncpg and the pool size (`?pool_size=N`, which PostgreSQL must not see).

    Other query parameters pass to the server as settings, e.g. `?search_path=tollgate`
    (`?lock_timeout=30s` replaces `LOCK_WAIT`, say)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    size = POOL_SIZE
    for name, value in query:
        if name == "pool_size":
            if not value.isdigit() or int(value) < 1:
                raise LedgerError(f"pool_size must be a positive integer, not {value!r}")
            size = int(value)
    rest = urlencode([(n, v) for n, v in query if n != "pool_size"])
    return urlunsplit(parts._replace(query=rest)), size


class Pool:
    """The connections to one PostgreSQL database: a pool, whose errors are translated, and
    transactions retried on a serialization failure or a deadlock."""

    def __init__(self, dsn: str, size: int, name: str) -> None:
        self.dsn, self.size, self.name = dsn, size, name
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        """Open the pool, whatever the schema's version (connections open on first use)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                # No floor: connections open on demand, so a database outage is not
                # also a stream of reconnection attempts in the background.
                min_size=0,
                max_size=self.size,
                timeout=CONNECT_TIMEOUT_S,
                # Transactions are short; a statement stuck this long is a lost server.
                command_timeout=60,
                reset=_keep_session,
                server_settings=_settings(self.dsn),
            )
        except UNAVAILABLE as exc:
            raise LedgerUnavailable(
                f"cannot reach the PostgreSQL ledger {self.name}: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"cannot open the PostgreSQL ledger {self.name}: {exc}") from exc

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise LedgerError("ledger is not open")
        return self._pool

    async def ping(self) -> None:
        pool = self.pool
        try:
            async with pool.acquire(timeout=PING_TIMEOUT_S) as conn:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_S)
        except UNAVAILABLE as exc:
            raise await self._unavailable(pool, exc) from exc
        except asyncpg.PostgresError as exc:
            raise LedgerUnavailable(f"ledger unreachable: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, *UNAVAILABLE):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; database errors become LedgerUnavailable or LedgerError."""
        pool = self.pool
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn
        except asyncpg.TransactionRollbackError:
            raise  # retried by transaction()
        except UNAVAILABLE as exc:
            raise await self._unavailable(pool, exc) from exc
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"ledger query failed: {exc}") from exc

    async def _unavailable(self, pool: asyncpg.Pool, exc: BaseException) -> LedgerUnavailable:
        """The error to raise for `exc`, one of `UNAVAILABLE`; a connection lost expires
        the pool's others (see `LOST`)."""
        text = f"ledger unreachable: {str(exc) or type(exc).__name__}"
        if not isinstance(exc, LOST):
            return LedgerUnavailable(text)
        await pool.expire_connections()
        return LedgerConnectionLost(text)

    async def transaction(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run `work` in a transaction, again on a serialization failure or a deadlock, and
        once more (on a fresh connection) after its connection was lost before its commit
        was sent: the server rolled it back, nothing of it was written. Lost during the
        commit, it may have been written: that error propagates."""
        lost = False
        for attempt in range(RETRIES):
            committing = False
            try:
                async with self.connection() as conn, conn.transaction():
                    done = await work(conn)
                    committing = True
                return done
            except asyncpg.TransactionRollbackError as exc:
                if attempt == RETRIES - 1:
                    raise LedgerError(f"ledger too busy: {exc}") from exc
                await asyncio.sleep(0.005 * 2**attempt)
            except LedgerConnectionLost:
                if committing or lost or attempt == RETRIES - 1:
                    raise
                lost = True
        raise AssertionError("unreachable")

    async def execute(self, sql: str, *args: Any) -> str:
        """One statement on its own; its status (`INSERT 0 1`)."""
        async with self.connection() as conn:
            status: str = await conn.execute(sql, *args)
        return status

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """The rows of a query that writes nothing: read again, once, on a fresh connection
        after its connection was lost."""
        try:
            async with self.connection() as conn:
                found: list[Any] = await conn.fetch(sql, *args)
        except LedgerConnectionLost:
            async with self.connection() as conn:
                found = await conn.fetch(sql, *args)
        return found


def _settings(dsn: str) -> dict[str, str]:
    """The session settings Tollgate asks for, unless the ledger URL names them itself."""
    named = {name for name, _ in parse_qsl(urlsplit(dsn).query)}
    settings = {
        "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION,
        "lock_timeout": LOCK_WAIT,
    }
    return {k: v for k, v in settings.items() if k not in named}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection goes back to the pool with: asyncpg has already rolled back any
    open transaction; the ledger sets no session state (no SET, LISTEN, session advisory
    lock or open cursor) for its default reset query to clear, which would cost a round
    trip per transaction."""
