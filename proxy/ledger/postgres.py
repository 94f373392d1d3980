"""The shared ledger: PostgreSQL through an asyncpg connection pool, for several replicas.

Atomic reservations across replicas rest on row locks taken in one fixed order.
Every transaction that writes counters (reserve, settle, reclaim, a batch's
settlement) first locks the organization's `total` counter row, which it writes
anyway: since schema version 2 the organization's counters are real `budget_usage`
rows, updated in the same transaction as the team rows they sum (see
`migrations.py`). Then, in lock order
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

How transactions reach the database (the pool, its errors, the retries): see
`postgres_pool`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.core.rates import Counts, Plan, Slot
from proxy.ledger import codecs, flags, migrations, rate_counts
from proxy.ledger.base import (
    Aggregate,
    Batch,
    BatchLine,
    BilledLine,
    Chooser,
    Contents,
    FirstAttempt,
    Flagged,
    GroupColumn,
    KeptAnswer,
    KeptTail,
    OpenBatch,
    Owner,
    Reservation,
    ResponseRow,
    Row,
    StoredObject,
)
from proxy.ledger.dialect import POSTGRES
from proxy.ledger.postgres_pool import Pool, redacted, split_url
from proxy.ledger.statements import (
    COPY_BATCH,
    EXPORT_BATCH,
    KEYS,
    TOTALS,
    add_to_counters,
    statements,
)

SCHEMA_VERSION = migrations.SCHEMA_VERSION
SQL = statements(POSTGRES)
MIGRATION_LOCK = 0x7011_6A7E
"""The advisory lock that keeps two migrations (`tollgate ledger migrate`, or replicas
initialising an empty database together) from interleaving."""


class PostgresLedger:
    """The Ledger on a PostgreSQL database shared by every replica."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dsn, self.pool_size = split_url(url)
        self.name = redacted(url)
        self.db = Pool(self.dsn, self.pool_size, self.name)
        self.owner: Owner | None = None

    # -- opening, schema -------------------------------------------------------

    async def open(self) -> None:
        """Connect, initialise an empty database (no Tollgate tables at all), and refuse a
        database that cannot be reached or a schema this Tollgate cannot use (one behind
        still needs `tollgate ledger migrate`)."""
        await self.db.connect()
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
        async with self.db.connection() as conn:
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
        async with self.db.connection() as conn, conn.transaction():
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
        async with self.db.connection() as conn, conn.transaction():
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

    # -- the Ledger protocol ---------------------------------------------------

    async def reserve(
        self, read: Sequence[Counter], choose: Chooser, pace: Plan | None = None
    ) -> Reservation:
        owner = self.owner.id if self.owner else None

        async def work(conn: Any) -> Reservation:
            # Two statements, not one: the read's snapshot must be taken once the lock is
            # held, or it would miss counter rows the previous holder inserted.
            await _lock_counters(conn)
            # Choosing again after a retry is fine: the chooser is a pure function of totals.
            reservation = choose(await _read(conn, read, lock=True))
            entry, usage = reservation.entry, reservation.usage
            if pace is not None:
                # Under the same lock as the budgets: every reservation takes turns, so
                # the counts read cannot change before the ones admitted are added.
                counts = await rate_counts.read_postgres(conn, pace)
                paced = pace.admit(entry, usage, counts, entry.started_at)
                await rate_counts.add_postgres(conn, paced.adds)
                reservation = replace(reservation, paced=paced)
            text = codecs.counters_text(reservation.counters)
            values = codecs.reservation_values(entry, usage, text, owner)
            await _write_and_add(
                conn, SQL.insert_reservation, values, text, codecs.reserved(entry, usage)
            )
            return reservation

        return await self.db.transaction(work)

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        values = (*codecs.settlement_values(settlement), request_id)

        async def work(conn: Any) -> None:
            await _lock_counters(conn)
            found = await conn.fetchrow(SQL.settling, request_id)
            change = flags.settlement(request_id, _values(found), settlement)
            if change is not None:
                await _write_and_add(conn, SQL.settle, values, *change)

        await self.db.transaction(work)

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        await self.db.execute(SQL.record, *codecs.record_values(entry, settlement))

    async def reclaim(
        self, now: float, *, started_before: float = 0.0, owners: Sequence[str] = ()
    ) -> int:
        async def work(conn: Any) -> int:
            await _lock_counters(conn)
            sql, values = SQL.stale(started_before, owners)
            stale = await conn.fetch(sql, *values)
            for request_id, bound, text in (tuple(r) for r in stale):
                reclaim = (float(now), request_id)
                await _write_and_add(conn, SQL.reclaim, reclaim, text, codecs.reclaimed(bound))
            if owners:
                sql, values = SQL.forget(owners)
                await conn.execute(sql, *values)
            return len(stale)

        return await self.db.transaction(work)

    async def flagged(self, start: float, end: float) -> list[Flagged]:
        found = await self.db.fetch(SQL.flagged, float(start), float(end))
        return [Flagged(*tuple(r)) for r in found]

    async def resolve(self, request_id: str, cost_nanos: int, now: float, note: str = "") -> int:
        async def work(conn: Any) -> int:
            await _lock_counters(conn)
            found = await conn.fetchrow(SQL.resolving, request_id)
            charged, text, deltas = flags.resolution(request_id, _values(found), cost_nanos)
            sql = SQL.resolve_free if cost_nanos == 0 else SQL.resolve
            await _write_and_add(
                conn, sql, (cost_nanos, float(now), note, request_id), text, deltas
            )
            return charged

        return await self.db.transaction(work)

    async def register(self, owner: Owner, now: float) -> None:
        self.owner = owner
        await self.heartbeat(now)

    async def heartbeat(self, now: float) -> None:
        if self.owner is not None:
            owner = self.owner
            await self.db.execute(SQL.heartbeat, owner.id, owner.host, owner.pid, float(now))

    async def owners(self) -> list[Owner]:
        return [Owner(*tuple(r)) for r in await self.db.fetch(SQL.owners)]

    async def unregister(self) -> None:
        if self.owner is not None:
            await self.db.execute(SQL.unregister, self.owner.id)

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        async with self.db.connection() as conn:
            return await _read(conn, counters, lock=False)

    async def rows(self, since: float = 0.0) -> list[Row]:
        return [codecs.row(tuple(r)) for r in await self.db.fetch(SQL.rows, float(since))]

    async def summarize(
        self,
        start: float,
        end: float,
        by: Sequence[GroupColumn],
        bucket_seconds: int | None = None,
    ) -> list[Aggregate]:
        sql, width = SQL.summary(by, bucket_seconds)
        return codecs.aggregates(await self.db.fetch(sql, float(start), float(end)), width)

    async def export(self, start: float, end: float) -> AsyncGenerator[dict[str, Any], None]:
        # One snapshot for the whole export, read through a server-side cursor in batches.
        async with (
            self.db.connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = conn.cursor(SQL.export, float(start), float(end), prefetch=EXPORT_BATCH)
            async for record in cursor:
                yield dict(record.items())

    async def hold(self, request_id: str, response_id: str) -> None:
        if await self.db.execute(SQL.hold, response_id, request_id) == "UPDATE 0":
            raise LedgerError(f"no request {request_id}")

    async def first_attempt(
        self, team: str, since: float, *, content: str | None = None, key: str | None = None
    ) -> FirstAttempt | None:
        if key is not None:
            found = await self.db.fetch(SQL.first_by_key, team, key, float(since))
        elif content is not None:
            found = await self.db.fetch(SQL.first_by_content, team, content, float(since))
        else:
            return None
        return codecs.first_attempt(tuple(found[0])) if found else None

    async def keep_answer(self, answer: KeptAnswer, store_bytes: int) -> bool:
        size = len(answer.body)
        if size > store_bytes:
            return False
        values = codecs.answer_values(answer)

        async def work(conn: Any) -> None:
            # Replicas keeping answers together take turns: each sums what the one before
            # it left, so the bound holds whatever their number (readers never wait).
            await conn.execute(KEEP_LOCK_SQL)
            await _forget(conn, answer.request_id)
            await conn.execute(SQL.make_room_chunks, store_bytes - size)
            await conn.execute(SQL.make_room, store_bytes - size)
            await conn.execute(SQL.keep_answer, *values)

        await self.db.transaction(work)
        return True

    async def append_chunk(
        self, request_id: str, seq: int, chunk: bytes, now: float, store_bytes: int
    ) -> bool:
        size = len(chunk)

        async def work(conn: Any) -> bool:
            await conn.execute(KEEP_LOCK_SQL)  # as keep_answer: the bound is summed in turn
            grown = await conn.execute(
                SQL.grow_stream, size, float(now), request_id, size, store_bytes
            )
            if grown == "UPDATE 0":
                await _forget(conn, request_id)  # gone already, or too large to keep
                return False
            await conn.execute(SQL.make_room_chunks, store_bytes)
            await conn.execute(SQL.make_room, store_bytes)
            if not await conn.fetch(SQL.still_kept, request_id):
                return False  # newer answers took the room
            await conn.execute(SQL.keep_chunk, request_id, seq, chunk)
            return True

        kept: bool = await self.db.transaction(work)
        return kept

    async def end_stream(self, request_id: str) -> bool:
        return await self.db.execute(SQL.end_stream, request_id) == "UPDATE 1"

    async def forget_answer(self, request_id: str) -> None:
        async def work(conn: Any) -> None:
            await conn.execute(KEEP_LOCK_SQL)
            await _forget(conn, request_id)

        await self.db.transaction(work)

    async def kept_answer(self, request_id: str) -> KeptAnswer | None:
        found = await self.db.fetch(SQL.kept_answer, request_id)
        if not found:
            return None
        chunks = await self.db.fetch(SQL.kept_chunks, request_id, -1)
        return codecs.kept_answer(tuple(found[0]), [tuple(c) for c in chunks])

    async def kept_tail(self, request_id: str, after: int) -> KeptTail | None:
        # From the start, its body too (a whole answer's, or what a stream kept whole).
        whole = after < 0
        found = await self.db.fetch(SQL.kept_answer if whole else SQL.kept_head, request_id)
        if not found:
            return None
        chunks = [tuple(c) for c in await self.db.fetch(SQL.kept_chunks, request_id, after)]
        read = codecs.kept_answer if whole else codecs.kept_head
        return KeptTail(read(tuple(found[0]), chunks), chunks[-1][0] if chunks else after)

    async def rate_counts(self, plan: Plan) -> Counts:
        async with self.db.connection() as conn:
            return await rate_counts.read_postgres(conn, plan)

    async def rate_windows(self, slots: Sequence[Slot]) -> dict[Slot, int]:
        async with self.db.connection() as conn:
            return await rate_counts.windows_postgres(conn, slots)

    async def forget_counts(self, before: float) -> int:
        status = await self.db.execute(rate_counts.PG_FORGET, float(before))
        return int(status.rsplit(" ", 1)[1])

    async def forget_answers(self, kept_before: float) -> int:
        async def work(conn: Any) -> int:
            await conn.execute(KEEP_LOCK_SQL)
            await conn.execute(SQL.forget_chunks_before, float(kept_before))
            status: str = await conn.execute(SQL.forget_answers, float(kept_before))
            return int(status.rsplit(" ", 1)[1])

        forgotten: int = await self.db.transaction(work)
        return forgotten

    async def open_batches(self) -> list[OpenBatch]:
        return [OpenBatch(*r) for r in await self.db.fetch(SQL.open_batches)]

    async def held(self) -> list[tuple[str, str]]:
        if self.owner is None:
            return []
        return [(r[0], r[1]) for r in await self.db.fetch(SQL.held, self.owner.id)]

    async def adopt(self, owners: Sequence[str]) -> int:
        if self.owner is None:
            return 0
        sql, values = SQL.adopt(self.owner.id, owners)

        async def work(conn: Any) -> int:
            status: str = await conn.execute(sql, *values)
            return int(status.rsplit(" ", 1)[1])

        return await self.db.transaction(work)

    async def held_entry(self, request_id: str) -> tuple[Entry, Usage] | None:
        found = await self.db.fetch(SQL.held_entry, request_id)
        return codecs.held_entry(tuple(found[0])) if found else None

    async def response(self, response_id: str) -> ResponseRow | None:
        found = await self.db.fetch(SQL.response, response_id)
        return codecs.response_row(response_id, tuple(found[0])) if found else None

    async def own(self, obj: StoredObject, lines: Sequence[BatchLine] = ()) -> None:
        rows = codecs.line_values(obj.id, lines)

        async def work(conn: Any) -> None:
            if await conn.execute(SQL.own, *codecs.object_values(obj)) == "INSERT 0 0":
                flags.owned_already(obj, await conn.fetchval(SQL.owner_of, obj.id))
                return
            if rows:  # COPY: a file's 50,000 lines in one round trip
                await conn.copy_records_to_table("batch_lines", records=rows, columns=LINES)

        await self.db.transaction(work)

    async def stored(self, object_id: str) -> StoredObject | None:
        found = await self.db.fetch(SQL.stored, object_id)
        return codecs.stored_object(tuple(found[0])) if found else None

    async def teams_of(self, object_ids: Sequence[str]) -> dict[str, str]:
        if not object_ids:
            return {}
        sql, values = SQL.teams_of(object_ids)
        return {r[0]: r[1] for r in await self.db.fetch(sql, *values)}

    async def batch_lines(self, file_id: str) -> dict[str, BatchLine]:
        return codecs.batch_lines(await self.db.fetch(SQL.batch_lines, file_id))

    async def settle_batch(
        self, request_id: str, lines: Sequence[BilledLine], outcome: Settlement
    ) -> int:
        billed = codecs.billed(lines)

        async def work(conn: Any) -> int:
            await _lock_counters(conn)
            found = await conn.fetchrow(SQL.settling_batch, request_id)
            writes = flags.batch(request_id, _values(found), billed, outcome)
            if writes is None:
                return 0
            sql = SQL.bill_first if writes.billed else SQL.settle_reserved
            await conn.execute(sql, *writes.reservation)
            if writes.others:
                await conn.copy_records_to_table("requests", records=writes.others, columns=BILLED)
            if writes.counters:
                # One statement for every counter, in lock order (the rows come in that order).
                deltas = [list(c) for c in list(zip(*writes.counters, strict=True))[5:]]
                keys = _key_arrays([c[:5] for c in writes.counters])
                await conn.execute(ADD_SQL, *keys, *deltas)
            return writes.rows

        return await self.db.transaction(work)

    async def claim_alert(self, key: str, now: float) -> bool:
        return await self.db.execute(SQL.claim_alert, key, float(now)) == "INSERT 0 1"

    async def ping(self) -> None:
        await self.db.ping()

    async def close(self) -> None:
        await self.db.close()

    # -- copies: the whole history, out and in ------------------------------------------

    async def dump(self, table: str) -> AsyncIterator[Batch]:
        """The rows of `table` as stored, a batch at a time, from one snapshot."""
        async with (
            self.db.connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            columns: list[str] | None = None
            batch: list[tuple[Any, ...]] = []
            async for record in conn.cursor(f"SELECT * FROM {table}", prefetch=COPY_BATCH):
                columns = columns or list(record.keys())
                batch.append(tuple(record.values()))
                if len(batch) == COPY_BATCH:
                    yield columns, batch
                    batch = []
            if columns and batch:
                yield columns, batch

    async def restore(self, tables: AsyncIterable[tuple[str, Batch]]) -> None:
        """Write `tables`' rows into this empty ledger, in one transaction: all or nothing."""
        async with self.db.connection() as conn, conn.transaction():
            found = await conn.fetchrow(SQL.contents)
            Contents(*(int(v) for v in found)).refuse_to_merge(self.name)
            await conn.execute("DELETE FROM budget_usage")
            async for table, (columns, batch) in tables:
                await conn.copy_records_to_table(table, records=batch, columns=columns)

    async def contents(self) -> Contents:
        async with self.db.connection() as conn:
            found = await conn.fetchrow(SQL.contents)
        return Contents(*(int(v) for v in found))


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


async def migrate(url: str) -> tuple[int, int]:
    """Bring the schema of the ledger at `url` up to date; (version before, version after)."""
    shared = PostgresLedger(url)
    await shared.db.connect()
    try:
        return await shared.migrate()
    finally:
        await shared.close()


def _values(found: Any) -> tuple[Any, ...] | None:
    return tuple(found) if found is not None else None


async def _forget(conn: Any, request_id: str) -> None:
    """Forget the answer kept for `request_id`, and its chunks."""
    await conn.execute(SQL.forget_chunks, request_id)
    await conn.execute(SQL.forget_answer, request_id)


async def _lock_counters(conn: Any) -> None:
    """Take the first lock of every counter writer (see the module's docstring)."""
    await conn.execute(LOCK_SQL, *codecs.counter_key(codecs.ORGANIZATION_TOTAL))


LOCK_SQL = (
    f"INSERT INTO budget_usage ({KEYS}) VALUES ($1, $2, $3, $4, $5) "
    f"ON CONFLICT ({KEYS}) DO UPDATE SET spent_nanos = budget_usage.spent_nanos"
)
KEEP_LOCK_SQL = "LOCK TABLE kept_answers IN SHARE ROW EXCLUSIVE MODE"
"""Taken by each `keep_answer` first: it conflicts with itself and with other writes of
kept answers, not with reads."""
UNNEST_KEYS = "unnest({}::text[], {}::text[], {}::text[], {}::text[], {}::float8[])"
"""Counters' keys from five arrays, a column each (see `_key_arrays`)."""
READ_SQL = (
    f"SELECT {KEYS}, {TOTALS} FROM budget_usage WHERE ({KEYS}) IN "
    f"(SELECT * FROM {UNNEST_KEYS.format('$1', '$2', '$3', '$4', '$5')}) "
    'ORDER BY scope, team COLLATE "C", "user" COLLATE "C", period, start'
)


ADD_SQL = add_to_counters(
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], "
    + ", ".join(f"${i}::bigint[]" for i in range(6, 6 + len(codecs.TOTALS_COLUMNS)))
    + ")"
)
"""Add to each counter of five key arrays (see `_key_arrays`) the deltas of as many arrays,
one per `TOTALS_COLUMNS` column."""
LINES = list(codecs.LINE_COLUMNS)
BILLED = list(codecs.BILLED_COLUMNS)


async def _read(conn: Any, counters: Sequence[Counter], *, lock: bool) -> dict[Counter, Totals]:
    """The totals of `counters`; with `lock`, their rows that exist locked, in lock order."""
    if not counters:
        return {}
    wanted = sorted({codecs.counter_key(c) for c in counters})
    sql = READ_SQL + (" FOR UPDATE" if lock else "")
    found = await conn.fetch(sql, *_key_arrays(wanted))
    return codecs.totals_of(counters, (tuple(r) for r in found))


def _key_arrays(keys: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Counters' keys column by column, as `UNNEST_KEYS` reads them."""
    return [[k[i] for k in keys] for i in range(4)] + [[float(k[4]) for k in keys]]


async def _write_and_add(
    conn: Any, sql: str, args: Sequence[Any], counters_text: str, deltas: codecs.Deltas
) -> None:
    """`sql` (with `args`) and the counters' additions in one statement, one round trip:
    the request row's write as a data-modifying `WITH`, which PostgreSQL always runs, then
    the counters' upsert, row by row in lock order. The organization's total row, locked
    first, keeps every writer in line, so the order of the two parts within it does not
    matter."""
    spent, held, tokens = deltas
    await conn.execute(
        _with_counters(sql, len(args), len(tokens)),
        *args,
        *_key_arrays(codecs.written_keys(counters_text)),
        spent,
        held,
        *tokens,
    )


@functools.lru_cache(maxsize=64)
def _with_counters(sql: str, count: int, tokens: int) -> str:
    """`sql`, whose parameters are the first `count`, then the counters' upsert (see
    `_write_and_add`)."""
    keys = UNNEST_KEYS.format(*(f"${i}" for i in range(count + 1, count + 6)))
    values = ", ".join(f"${i}::bigint" for i in range(count + 6, count + 8 + tokens))
    source = f"SELECT s, t, u, p, st, {values} FROM {keys} AS k(s, t, u, p, st)"
    return f"WITH written AS ({sql}) {add_to_counters(source)}"
