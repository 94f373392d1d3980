"""The shared ledger: PostgreSQL through an asyncpg connection pool, for several replicas.

Atomic reservations across replicas rest on row locks taken in one fixed order.
Every transaction that writes counters (reserve, settle, reclaim) first locks the
organization's `total` counter row, which it writes anyway: since schema version
2 the organization's counters are real `budget_usage` rows, updated in the same
transaction as the team rows they sum (see `migrations.py`). Then, in lock order
(scope, team, user, period, start), it reads the counters a decision needs with
`SELECT … FOR UPDATE`, lets the chooser decide, inserts the request row and adds
to every counter it touches.

Why one first lock rather than locking only the rows read: a reservation adds to
counters its decision did not read (periods without a budget, the organization's
rows), and settlements add to counters in their own order; locking those after
the decision could deadlock two replicas. Writers would queue on the
organization's rows anyway, because every one of them updates those rows, so
taking that lock first costs no concurrency and makes deadlocks impossible. It
also closes the phantom problem of summing team rows: a team row inserted by
another replica cannot appear between a read and a commit. The lock is held for
a few round trips, far below the rate at which image requests arrive. Deadlocks
(40P01) and serialization failures (40001) are retried all the same, in case a
future query escapes this order.

Errors: an unreachable database is `LedgerUnavailable` (the web layer answers
503; a settlement retries it), anything else is `LedgerError`. The pool
reconnects by itself when the database comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.ledger import migrations
from proxy.ledger.base import Chooser, Flagged, Owner, Reservation, Row
from proxy.ledger.counters import ORGANIZATION_TOTAL, key, with_organization
from proxy.ledger.flags import FLAGGED_COLUMNS, RECLAIM_SET, resolvable, settled_already
from proxy.ledger.postgres_reports import PostgresReports
from proxy.ledger.sqlite import (
    ENTRY_COLUMNS,
    SETTLEMENT_COLUMNS,
    TOTALS_COLUMNS,
    USAGE_COLUMNS,
    _counter_key,
    _counters,
    _row,
    _settled_tokens,
    _settlement_values,
    _token_deltas,
    _usage_values,
)

T = TypeVar("T")

SCHEMA_VERSION = migrations.SCHEMA_VERSION
POOL_SIZE = 10
"""Connections per process unless the URL says `?pool_size=N`."""
CONNECT_TIMEOUT_S = 5.0
ACQUIRE_TIMEOUT_S = 10.0
PING_TIMEOUT_S = 2.0
RETRIES = 8
MIGRATION_LOCK = 0x7011_6A7E
"""The advisory lock that keeps two migrations (`tollgate ledger migrate`, or replicas
initialising an empty database together) from interleaving."""

UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection cut in the middle of a statement
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
)


def q(column: str) -> str:
    """A column name as PostgreSQL reads it (`user` is a reserved word)."""
    return '"user"' if column == "user" else column


def cols(columns: Sequence[str]) -> str:
    return ", ".join(q(c) for c in columns)


def marks(count: int, first: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(first, first + count))


KEY = 'scope = $1 AND team = $2 AND "user" = $3 AND period = $4 AND start = $5'
LOCK_SQL = (
    'INSERT INTO budget_usage (scope, team, "user", period, start) VALUES ($1, $2, $3, $4, $5) '
    'ON CONFLICT (scope, team, "user", period, start) '
    "DO UPDATE SET spent_nanos = budget_usage.spent_nanos"
)
READ_SQL = (
    f'SELECT scope, team, "user", period, start, {cols(TOTALS_COLUMNS)} FROM budget_usage '
    'WHERE (scope, team, "user", period, start) IN '
    "(SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[])) "
    'ORDER BY scope, team COLLATE "C", "user" COLLATE "C", period, start'
)


def split_url(url: str) -> tuple[str, int]:
    """The DSN for asyncpg and the pool size (`?pool_size=N`, which PostgreSQL must not see).

    Other query parameters pass to the server as settings, e.g. `?search_path=tollgate`."""
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


def redacted(url: str) -> str:
    """`url` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresLedger(PostgresReports):
    """The Ledger on a PostgreSQL database shared by every replica."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dsn, self.pool_size = split_url(url)
        self.name = redacted(url)
        self._pool: asyncpg.Pool | None = None
        self.owner: Owner | None = None

    # -- opening, schema -------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool, whatever the schema's version (connections open on first use)."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                # No floor: connections open on demand, so a database outage is not
                # also a stream of reconnection attempts in the background.
                min_size=0,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT_S,
                # Transactions are short; a statement stuck this long is a lost server.
                command_timeout=60,
                reset=_keep_session,
            )
        except UNAVAILABLE as exc:
            raise LedgerUnavailable(
                f"cannot reach the PostgreSQL ledger {self.name}: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"cannot open the PostgreSQL ledger {self.name}: {exc}") from exc

    async def open(self) -> None:
        """Connect, initialise an empty database (no Tollgate tables at all), and refuse a
        database that cannot be reached or a schema this Tollgate cannot use (one behind
        still needs `tollgate ledger migrate`)."""
        await self.connect()
        try:
            found = await self.version()
            if found == 0:
                found = await self._initialise()
        except LedgerUnavailable as exc:
            await self.close()
            raise LedgerUnavailable(
                f"cannot reach the PostgreSQL ledger {self.name}: {exc.__cause__ or exc}"
            ) from exc
        if found == SCHEMA_VERSION:
            return
        await self.close()
        if found < SCHEMA_VERSION:
            raise LedgerError(
                f"{self.name}: ledger schema version {found} is older than this Tollgate's "
                f"({SCHEMA_VERSION}): run `tollgate ledger migrate --ledger URL` first"
            )
        raise LedgerError(
            f"{self.name}: ledger schema version {found} is newer than this Tollgate's "
            f"({SCHEMA_VERSION}); upgrade Tollgate"
        )

    async def version(self) -> int:
        """The schema version the database is at (0: no Tollgate tables yet)."""
        async with self._connection() as conn:
            exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            if not exists:
                return 0
            found = await conn.fetchval("SELECT max(version) FROM schema_version")
        return int(found or 0)

    async def _initialise(self) -> int:
        """Bring an empty database to this Tollgate's version; the version found otherwise.

        Emptiness is decided under the migration lock, in the transaction that creates
        the tables: of two replicas starting together on an empty database, the second
        waits for the first's commit, then finds its tables and leaves them alone. A
        database with some Tollgate tables but no version is not empty: it is refused
        like any schema behind, for `tollgate ledger migrate` to finish."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if await conn.fetchval(_ANY_TABLE, list(migrations.TABLES)):
                if not await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
                    return 0
                return int(await conn.fetchval(_VERSION))
            await _apply(conn, 0)
        return SCHEMA_VERSION

    async def migrate(self) -> tuple[int, int]:
        """Apply the pending migrations in one transaction; (version before, version after)."""
        try:
            return await self._migrate()
        except LedgerUnavailable as exc:
            raise LedgerUnavailable(
                f"cannot reach the PostgreSQL ledger {self.name}: {exc.__cause__ or exc}"
            ) from exc

    async def _migrate(self) -> tuple[int, int]:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            found = int(await conn.fetchval(_VERSION))
            if found > SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.name}: ledger schema version {found} is newer than this Tollgate's "
                    f"({SCHEMA_VERSION}); upgrade Tollgate"
                )
            await _apply(conn, found)
        return found, SCHEMA_VERSION

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise LedgerError("ledger is not open")
        return self._pool

    # -- the Ledger protocol ---------------------------------------------------

    async def reserve(self, read: Sequence[Counter], choose: Chooser) -> Reservation:
        async def work(conn: Any) -> Reservation:
            # Two statements, not one: the read's snapshot must be taken once the lock is
            # held, or it would miss counter rows the previous holder inserted.
            await _lock_counters(conn)
            # Choosing again after a retry is fine: the chooser is a pure function of totals.
            reservation = choose(await _read(conn, read, lock=True))
            entry, usage = reservation.entry, reservation.usage
            columns = (*ENTRY_COLUMNS, *USAGE_COLUMNS, "state", "reserved_nanos", "counters")
            await _write_and_add(
                conn,
                f"INSERT INTO requests ({cols(columns)}, owner) VALUES ({marks(len(columns) + 1)})",
                [
                    *_entry_values(entry),
                    *_usage_values(usage),
                    "reserved",
                    entry.estimated_nanos,
                    json.dumps([_counter_key(c) for c in reservation.counters]),
                    self.owner.id if self.owner else None,
                ],
                reservation.counters,
                0,
                entry.estimated_nanos,
                _token_deltas(usage, 1),
            )
            return reservation

        return await self._transaction(work)

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        async def work(conn: Any) -> None:
            await _lock_counters(conn)
            found = await conn.fetchrow(
                "SELECT state, error_code, resolved_at, cost_nanos, reserved_nanos, counters, "
                f"{cols(USAGE_COLUMNS)} FROM requests WHERE id = $1 FOR UPDATE",
                request_id,
            )
            if found is None:
                raise LedgerError(f"no reservation {request_id}")
            state, error_code, resolved_at, charged, reserved, counters_text, *usage = tuple(found)
            if settled_already(state, error_code, resolved_at):
                return
            # What the row holds: the reservation (nothing charged yet), or the bound a
            # reclaim charged before the answer came, which this settlement replaces.
            release = reserved if state == "reserved" else 0
            assignments = ", ".join(f"{q(c)} = ${i}" for i, c in enumerate(SETTLEMENT_COLUMNS, 2))
            await _write_and_add(
                conn,
                f"UPDATE requests SET {assignments}, state = 'settled', reserved_nanos = 0 "
                "WHERE id = $1",
                [request_id, *_settlement_values(settlement)],
                _counters(counters_text),
                settlement.cost_nanos - charged,
                -release,
                _settled_tokens(settlement.usage, Usage(*usage)),
            )

        await self._transaction(work)

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        columns = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
        async with self._connection() as conn:
            await conn.execute(
                f"INSERT INTO requests ({cols(columns)}) VALUES ({marks(len(columns))})",
                *_entry_values(entry),
                *_settlement_values(settlement),
                "settled",
            )

    async def reclaim(
        self, now: float, *, started_before: float = 0.0, owners: Sequence[str] = ()
    ) -> int:
        async def work(conn: Any) -> int:
            await _lock_counters(conn)
            stale = await conn.fetch(
                "SELECT id, reserved_nanos, counters FROM requests "
                "WHERE state = 'reserved' AND (started_at < $1 OR owner = ANY($2::text[])) "
                "ORDER BY id FOR UPDATE",
                float(started_before),
                list(owners),
            )
            for request_id, reserved, counters_text in (tuple(r) for r in stale):
                # Reserved becomes spent; the estimated usage it holds stays counted.
                await _write_and_add(
                    conn,
                    f"UPDATE requests SET {RECLAIM_SET}, finished_at = $2 WHERE id = $1",
                    [request_id, float(now)],
                    _counters(counters_text),
                    reserved,
                    -reserved,
                    (0, 0, 0, 0),
                )
            if owners:
                await conn.execute(
                    "DELETE FROM processes WHERE owner = ANY($1::text[])", list(owners)
                )
            return len(stale)

        return await self._transaction(work)

    async def flagged(self, start: float, end: float) -> list[Flagged]:
        async with self._connection() as conn:
            found = await conn.fetch(
                f"SELECT {FLAGGED_COLUMNS} FROM requests "
                "WHERE flagged = 1 AND state = 'settled' AND started_at >= $1 "
                'AND started_at < $2 ORDER BY started_at, id COLLATE "C"',
                float(start),
                float(end),
            )
        return [Flagged(*tuple(r)) for r in found]

    async def resolve(self, request_id: str, cost_nanos: int, now: float, note: str = "") -> int:
        async def work(conn: Any) -> int:
            await _lock_counters(conn)
            found = await conn.fetchrow(
                f"SELECT state, flagged, cost_nanos, counters, {cols(USAGE_COLUMNS)} "
                "FROM requests WHERE id = $1 FOR UPDATE",
                request_id,
            )
            charged, counters_text, usage = resolvable(
                request_id, tuple(found) if found is not None else None
            )
            free = cost_nanos == 0
            zeroed = "".join(f", {c} = 0" for c in USAGE_COLUMNS) if free else ""
            await _write_and_add(
                conn,
                f"UPDATE requests SET cost_nanos = $2, resolved_at = $3, resolution = $4{zeroed} "
                "WHERE id = $1",
                [request_id, cost_nanos, float(now), note],
                _counters(counters_text),
                cost_nanos - charged,
                0,
                _token_deltas(usage, -1) if free else (0, 0, 0, 0),
            )
            return charged

        return await self._transaction(work)

    async def register(self, owner: Owner, now: float) -> None:
        self.owner = owner
        await self.heartbeat(now)

    async def heartbeat(self, now: float) -> None:
        if self.owner is None:
            return
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO processes (owner, host, pid, heartbeat_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                self.owner.id,
                self.owner.host,
                self.owner.pid,
                float(now),
            )

    async def owners(self) -> list[Owner]:
        async with self._connection() as conn:
            found = await conn.fetch(
                "SELECT owner, host, pid, heartbeat_at FROM processes UNION "
                "SELECT DISTINCT owner, '', 0, 0 FROM requests WHERE state = 'reserved' "
                "AND owner IS NOT NULL AND owner NOT IN (SELECT owner FROM processes)"
            )
        return [Owner(*tuple(r)) for r in found]

    async def unregister(self) -> None:
        if self.owner is not None:
            async with self._connection() as conn:
                await conn.execute("DELETE FROM processes WHERE owner = $1", self.owner.id)

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        async with self._connection() as conn:
            return await _read(conn, counters, lock=False)

    async def rows(self, since: float = 0.0) -> list[Row]:
        columns = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
        async with self._connection() as conn:
            found = await conn.fetch(
                f"SELECT {cols(columns)} FROM requests WHERE started_at >= $1 "
                'ORDER BY started_at, id COLLATE "C"',
                float(since),
            )
        return [_row(tuple(r)) for r in found]

    async def claim_alert(self, key: str, now: float) -> bool:
        async with self._connection() as conn:
            status = await conn.execute(
                "INSERT INTO alerts_sent (key, sent_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                key,
                float(now),
            )
        return bool(status == "INSERT 0 1")

    async def ping(self) -> None:
        pool = self.pool
        try:
            async with pool.acquire(timeout=PING_TIMEOUT_S) as conn:
                await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT_S)
        except UNAVAILABLE as exc:
            raise LedgerUnavailable(f"ledger unreachable: {exc or type(exc).__name__}") from exc
        except asyncpg.PostgresError as exc:
            raise LedgerUnavailable(f"ledger unreachable: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, *UNAVAILABLE):
                pool.terminate()

    # -- connections and transactions ------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; database errors become LedgerUnavailable or LedgerError."""
        pool = self.pool
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn
        except asyncpg.TransactionRollbackError:
            raise  # retried by _transaction
        except UNAVAILABLE as exc:
            raise LedgerUnavailable(f"ledger unreachable: {exc or type(exc).__name__}") from exc
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"ledger query failed: {exc}") from exc

    async def _transaction(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run `work` in a transaction, again on a serialization failure or a deadlock."""
        for attempt in range(RETRIES):
            try:
                async with self._connection() as conn, conn.transaction():
                    return await work(conn)
            except asyncpg.TransactionRollbackError as exc:
                if attempt == RETRIES - 1:
                    raise LedgerError(f"ledger too busy: {exc}") from exc
                await asyncio.sleep(0.005 * 2**attempt)
        raise AssertionError("unreachable")


_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"
_ANY_TABLE = "SELECT EXISTS (SELECT 1 FROM unnest($1::text[]) t WHERE to_regclass(t) IS NOT NULL)"
"""Whether any of the tables named exists on the connection's search path."""


async def _apply(conn: Any, found: int) -> None:
    """Take the schema from version `found` to this Tollgate's, in the caller's transaction."""
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
    for sql in migrations.pending(found, migrations.POSTGRES):
        await conn.execute(sql)
    await conn.execute("DELETE FROM schema_version")
    await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection goes back to the pool with: asyncpg has already rolled back any
    open transaction; the ledger sets no session state (no SET, LISTEN, session advisory
    lock or open cursor) for its default reset query to clear, which would cost a round
    trip per transaction."""


def _entry_values(entry: Entry) -> list[Any]:
    values = [getattr(entry, c) for c in ENTRY_COLUMNS]
    values[ENTRY_COLUMNS.index("stream")] = int(entry.stream)
    values[ENTRY_COLUMNS.index("started_at")] = float(entry.started_at)
    return values


async def _lock_counters(conn: Any) -> None:
    """Take the first lock of every counter writer (see the module's docstring)."""
    await conn.execute(LOCK_SQL, *key(ORGANIZATION_TOTAL))


async def _read(conn: Any, counters: Sequence[Counter], *, lock: bool) -> dict[Counter, Totals]:
    if not counters:
        return {}
    return _totals(
        counters, await _rows(conn, counters, READ_SQL + (" FOR UPDATE" if lock else ""))
    )


async def _rows(conn: Any, counters: Sequence[Counter], sql: str) -> dict[tuple[Any, ...], Totals]:
    """The `budget_usage` rows of `counters` that exist, by key."""
    wanted = sorted(set(counters), key=key)
    found = await conn.fetch(
        sql,
        [c.scope for c in wanted],
        [c.team for c in wanted],
        [c.user for c in wanted],
        [c.period for c in wanted],
        [float(c.start) for c in wanted],
    )
    return {tuple(r[:5]): Totals(*(int(v) for v in tuple(r)[5:])) for r in found}


def _totals(
    counters: Sequence[Counter], rows: dict[tuple[Any, ...], Totals]
) -> dict[Counter, Totals]:
    return {
        c: rows.get((c.scope, c.team, c.user, c.period, float(c.start)), Totals()) for c in counters
    }


async def _write_and_add(
    conn: Any,
    sql: str,
    args: list[Any],
    counters: Sequence[Counter],
    spent: int,
    reserved: int,
    tokens: tuple[int, ...],
) -> None:
    """`sql` (with `args`) and the counters' additions in one statement, one round trip:
    the request row's write as a data-modifying `WITH`, which PostgreSQL always runs, then
    the counters' upsert, row by row in lock order. The organization's total row, locked
    first, keeps every writer in line, so the order of the two parts within it does not
    matter."""
    rows = with_organization(counters)
    n = len(args)
    values = ", ".join(f"${i}::bigint" for i in range(n + 6, n + 8 + len(tokens)))
    await conn.execute(
        f"WITH written AS ({sql}) "
        f'INSERT INTO budget_usage (scope, team, "user", period, start, {cols(TOTALS_COLUMNS)}) '
        f"SELECT s, t, u, p, st, {values} FROM unnest(${n + 1}::text[], ${n + 2}::text[], "
        f"${n + 3}::text[], ${n + 4}::text[], ${n + 5}::float8[]) AS k(s, t, u, p, st) "
        'ON CONFLICT (scope, team, "user", period, start) DO UPDATE SET '
        + ", ".join(f"{c} = budget_usage.{c} + excluded.{c}" for c in TOTALS_COLUMNS),
        *args,
        [c.scope for c in rows],
        [c.team for c in rows],
        [c.user for c in rows],
        [c.period for c in rows],
        [float(c.start) for c in rows],
        spent,
        reserved,
        *tokens,
    )
