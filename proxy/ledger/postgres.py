"""The shared ledger: PostgreSQL through an asyncpg connection pool, for several replicas.

How reservations stay atomic across replicas (the lock order every counter writer
follows): see `postgres_counters`. The answers kept for repeats: `postgres_kept`. How
transactions reach the database (the pool, its errors, the retries): `postgres_pool`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.core.rates import Counts, Plan, Slot
from proxy.ledger import codecs, flags, migrations, rate_counts, redacted
from proxy.ledger.base import (
    Aggregate,
    Batch,
    BatchLine,
    BilledLine,
    Chooser,
    Contents,
    Flagged,
    GroupColumn,
    HeldEntry,
    Holding,
    ObjectKind,
    OpenBatch,
    Owner,
    Reservation,
    ResponseRow,
    Row,
    StoredObject,
)
from proxy.ledger.dialect import POSTGRES
from proxy.ledger.kept import RepeatGuard
from proxy.ledger.postgres_counters import (
    add_counters,
    added_arrays,
    lock_and_fetch,
    lock_and_read,
    lock_counters,
    read_totals,
    write_and_add,
)
from proxy.ledger.postgres_kept import KeptAnswers
from proxy.ledger.postgres_pool import Pool, split_url
from proxy.ledger.postgres_schema import Schema
from proxy.ledger.statements import (
    COPY_BATCH,
    EXPORT_BATCH,
    statements,
)

SCHEMA_VERSION = migrations.SCHEMA_VERSION
SQL = statements(POSTGRES)
WAITS_ON_ITS_READER = "SET LOCAL idle_in_transaction_session_timeout = 0"
"""Run first in a transaction that pauses on whoever reads it (an export written to a pipe
nobody drains yet, a copy into a slower ledger): such a pause is no stopped process, and
ending the session then (`postgres_pool.IDLE_IN_TRANSACTION`) would cut the copy short. It
takes no lock a reservation waits for."""


class PostgresLedger(Schema, KeptAnswers):
    """The Ledger on a PostgreSQL database shared by every replica."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = redacted(url)
        try:
            self.dsn, self.pool_size = split_url(url)
        except ValueError as exc:  # urlsplit's, e.g. an unclosed `[` of an IPv6 host
            raise LedgerError(f"cannot read the ledger URL {self.name}: {exc}") from exc
        self.db = Pool(self.dsn, self.pool_size, self.name)
        self.owner: Owner | None = None
        self._shared: dict[str, tuple[int, str, Usage, float]] = {}
        """The batch reservations naming users this process made and has neither held
        nor settled yet: (bound, counters text, usage, started at). Released (the batch
        never created), their users' counter rows are worked out before the first lock.
        Forgotten once held or settled, or once old enough for a reclaim (`reclaim`)."""

    # -- opening (the schema: see `postgres_schema`) ---------------------------

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

    # -- the Ledger protocol ---------------------------------------------------

    async def reserve(
        self,
        read: Sequence[Counter],
        choose: Chooser,
        pace: Plan | None = None,
        guard: RepeatGuard | None = None,
    ) -> Reservation:
        owner = self.owner.id if self.owner else None

        async def work(conn: Any) -> Reservation:
            # Choosing again after a retry is fine: the chooser is a pure function of totals.
            totals = await lock_and_read(conn, read)
            if guard is not None:
                # Read after the lock every reservation takes (and, at READ COMMITTED, in a
                # snapshot of its own): every reservation before this one is seen.
                sql = SQL.first_by_key if guard.key is not None else SQL.first_by_content
                latest = await conn.fetchrow(sql, *guard.params())
                guard.arrived(latest[0] if latest else None)
            reservation = choose(totals)
            entry, usage = reservation.entry, reservation.usage
            if pace is not None:
                # Under the same lock as the budgets: every reservation takes turns, so
                # the counts read cannot change before the ones admitted are added.
                counts = await rate_counts.read_postgres(conn, pace)
                paced = pace.admit(entry, usage, counts, pace.at)
                await rate_counts.add_postgres(conn, paced.adds)
                reservation = replace(reservation, paced=paced)
            written = reservation.written
            text = written.text if written else codecs.reservation_text(reservation)
            values = codecs.reservation_values(
                entry, usage, text, owner, reservation.project, reservation.mainline_nanos
            )
            await write_and_add(
                conn,
                SQL.insert_reservation,
                values,
                text,
                codecs.reserved(entry, usage),
                rows=written.rows if written else None,
            )
            made.append((entry.estimated_nanos, text, usage, entry.started_at))
            return reservation

        made: list[tuple[int, str, Usage, float]] = []
        reservation = await self.db.transaction(work)
        if codecs.shared(made[-1][1]):
            self._shared[reservation.entry.id] = made[-1]
        return reservation

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        values = (*codecs.settlement_values(settlement), request_id)
        ahead: tuple[str, codecs.Deltas, list[list[Any]]] | None = None
        if (mine := self._shared.pop(request_id, None)) is not None:
            # A batch naming users released: its users' counter rows (100,000 for 50,000
            # users under a daily per-user budget) worked out on a thread before the
            # transaction, whose first lock every replica's writers wait for. Used if the
            # row is still the reservation this process made.
            bound, text, usage, _ = mine
            deltas = codecs.settled(settlement, bound, 0, usage)
            added = await asyncio.to_thread(
                lambda: added_arrays(codecs.counter_rows(text, deltas, 0))
            )
            ahead = (text, deltas, added)

        async def work(conn: Any) -> None:
            found = await lock_and_fetch(conn, SQL.settling, request_id)
            change = flags.settlement(request_id, _values(found), settlement)
            if change is None:
                return
            if ahead is not None and change == ahead[:2]:
                await conn.execute(SQL.settle, *values)
                await add_counters(conn, ahead[2])
                return
            await write_and_add(conn, SQL.settle, values, *change)

        await self.db.transaction(work)

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        await self.db.execute(SQL.record, *codecs.record_values(entry, settlement))

    async def reclaim(
        self,
        now: float,
        *,
        started_before: float = 0.0,
        older_than_s: float = math.inf,
        owners: Sequence[str] = (),
    ) -> int:
        async def work(conn: Any) -> int:
            await lock_counters(conn)
            sql, values = SQL.stale(now, started_before, older_than_s, owners)
            stale = await conn.fetch(sql, *values)
            for request_id, bound, text in (tuple(r) for r in stale):
                reclaim = (float(now), request_id)
                await conn.execute(SQL.forget_claimed, request_id, request_id)
                await write_and_add(conn, SQL.reclaim, reclaim, text, codecs.reclaimed(bound))
            if owners:
                sql, values = SQL.forget(owners)
                await conn.execute(sql, *values)
            return len(stale)

        count = await self.db.transaction(work)
        # This process's reservations started before `started_before`, or `older_than_s`
        # before `now` (its own clock, which wrote them), are no longer what it reserved:
        # held or settled (forgotten already), or reclaimed, here or by another replica.
        # Forgotten: a batch's counters text is megabytes for 50,000 users.
        before = max(started_before, now - older_than_s)
        for request_id, (*_, started_at) in list(self._shared.items()):
            if started_at < before:
                del self._shared[request_id]
        return count

    async def flagged(self, start: float, end: float) -> list[Flagged]:
        found = await self.db.fetch(SQL.flagged, float(start), float(end))
        return [Flagged(*tuple(r)) for r in found]

    async def resolve(self, request_id: str, cost_nanos: int, now: float, note: str = "") -> int:
        async def work(conn: Any) -> int:
            await lock_counters(conn)
            found = await conn.fetchrow(SQL.resolving, request_id)
            # A line of a SQLite ledger's chunked settlement, copied before it ended: the
            # settlement here replaces it (`settle_batch`), its counters never moved.
            flags.settling(request_id, await conn.fetchval(SQL.still_settling, request_id))
            charged, text, deltas = flags.resolution(request_id, _values(found), cost_nanos)
            sql = SQL.resolve_free if cost_nanos == 0 else SQL.resolve
            args = (cost_nanos, float(now), note, request_id)
            await write_and_add(conn, sql, args, text, deltas, charged)
            return charged

        return await self.db.transaction(work)

    async def register(self, owner: Owner) -> None:
        self.owner = owner
        await self.heartbeat()

    async def heartbeat(self) -> None:
        if self.owner is not None:
            owner = self.owner
            await self.db.execute(SQL.heartbeat, owner.id, owner.host, owner.pid)

    async def owners(self) -> list[Owner]:
        return [Owner(*tuple(r)) for r in await self.db.fetch(SQL.owners)]

    async def unregister(self) -> None:
        if self.owner is not None:
            await self.db.execute(SQL.unregister, self.owner.id)

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        async with self.db.connection() as conn:
            return await read_totals(conn, counters, lock=False)

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
            await conn.execute(WAITS_ON_ITS_READER)
            cursor = conn.cursor(SQL.export, float(start), float(end), prefetch=EXPORT_BATCH)
            async for record in cursor:
                yield dict(record.items())

    async def export_columns(self) -> list[str]:
        async with self.db.connection() as conn:
            statement = await conn.prepare(SQL.export_columns)
            return [a.name for a in statement.get_attributes()]

    async def hold(self, request_id: str, response_id: str, project: str | None = None) -> None:
        self._shared.pop(request_id, None)  # settled by its lines (`settle_batch`)
        values = (response_id, codecs.project_value(project), request_id)
        if await self.db.execute(SQL.hold, *values) == "UPDATE 0":
            raise LedgerError(f"no request {request_id}")

    async def claim(self, request_id: str, batch_id: str, project: str | None = None) -> bool:
        values = (batch_id, codecs.project_value(project), request_id)

        async def work(conn: Any) -> bool:
            # One claim of a batch at a time, whatever the replica: the look and the hold
            # under a lock of the batch's id, held until the transaction ends.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"claim:{batch_id}")
            if await conn.fetchval(SQL.claimed_by, batch_id, request_id) is not None:
                return False
            if await conn.execute(SQL.hold, *values) == "UPDATE 0":
                raise LedgerError(f"no request {request_id}")
            return True

        claimed: bool = await self.db.transaction(work)
        if claimed:
            self._shared.pop(request_id, None)  # settled by its lines (`settle_batch`)
        return claimed

    async def lost_batches(self, since: float) -> list[tuple[HeldEntry, str]]:
        found = await self.db.fetch(SQL.lost_batches, float(since))
        return [(codecs.held_entry(tuple(r)[:-1]), r[-1]) for r in found]

    async def seeking(self, request_id: str, code: str) -> None:
        await self.db.execute(SQL.seeking, code, request_id)

    async def unanswered(self, team: str, request_id: str, before: float) -> list[float]:
        found = await self.db.fetch(SQL.unanswered, team, request_id, float(before))
        return [float(r[0]) for r in found]

    async def name_response(
        self, request_id: str, response_id: str, project: str | None = None
    ) -> None:
        values = (response_id, codecs.project_value(project), request_id)
        if await self.db.execute(SQL.name_response, *values) == "UPDATE 0":
            raise LedgerError(f"no request {request_id}")

    async def rate_counts(self, plan: Plan) -> Counts:
        async with self.db.connection() as conn:
            return await rate_counts.read_postgres(conn, plan)

    async def rate_windows(self, slots: Sequence[Slot]) -> dict[Slot, int]:
        async with self.db.connection() as conn:
            return await rate_counts.windows_postgres(conn, slots)

    async def forget_counts(self, before: float) -> int:
        status = await self.db.execute(rate_counts.PG_FORGET, float(before))
        return int(status.rsplit(" ", 1)[1])

    async def open_batches(self) -> list[OpenBatch]:
        return [OpenBatch(*r) for r in await self.db.fetch(SQL.open_batches)]

    async def holding(self, before: float) -> list[Holding]:
        return [Holding(*tuple(r)) for r in await self.db.fetch(SQL.holding, float(before))]

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

    async def held_entry(self, request_id: str) -> HeldEntry | None:
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

    async def owns_any(self, team: str, kind: ObjectKind) -> bool:
        return bool(await self.db.fetch(SQL.owns_any, team, kind))

    async def objects_past(
        self,
        team: str,
        kind: ObjectKind,
        project: str | None,
        purpose: str | None,
        newest: bool,
        edge: float,
        limit: int,
    ) -> list[StoredObject]:
        sql, values = SQL.objects_past(
            team, kind, codecs.project_value(project), purpose, newest, edge, limit
        )
        return [codecs.stored_object(tuple(r)) for r in await self.db.fetch(sql, *values)]

    async def batch_lines(self, file_id: str) -> dict[str, BatchLine]:
        # Decoded on a thread: tens of thousands of lines took the event loop a second.
        return await asyncio.to_thread(
            codecs.batch_lines, await self.db.fetch(SQL.batch_lines, file_id)
        )

    async def settle_batch(
        self, request_id: str, lines: Sequence[BilledLine], outcome: Settlement
    ) -> int:
        self._shared.pop(request_id, None)  # settled here by its lines, if never held
        billed = await codecs.billed_off_loop(lines)
        # What it writes is worked out on a thread, before the transaction, from its
        # reservation's row as read now: the release of a batch naming 50,000 users is
        # 100,000 counter rows, which kept the event loop from every other request of the
        # process, and every replica's writers waiting for the first lock meanwhile. The
        # transaction finds the row unchanged unless another replica settled it meanwhile.
        seen = [tuple(r) for r in await self.db.fetch(SETTLING_BATCH, request_id)]
        ahead = (
            await asyncio.to_thread(_batch_writes, request_id, seen[0], billed, outcome)
            if seen
            else None
        )

        async def work(conn: Any) -> int:
            await lock_counters(conn)
            found = _values(await conn.fetchrow(SQL.settling_batch, request_id))
            writes = (
                ahead
                if seen and found == seen[0]
                else await asyncio.to_thread(_batch_writes, request_id, found, billed, outcome)
            )
            if writes is None:
                return 0
            written, added = writes
            # Lines a SQLite ledger's chunked settlement wrote before it stopped and the
            # ledger was copied here (none otherwise): these lines replace them.
            batch_id = found[3] if found is not None else None
            await conn.execute(SQL.forget_billed, batch_id, "", request_id)
            await conn.execute(SQL.billed_done, request_id)
            sql = SQL.bill_first if written.billed else SQL.settle_reserved
            await conn.execute(sql, *written.reservation)
            if written.others:
                await conn.copy_records_to_table("requests", records=written.others, columns=BILLED)
            if added:
                await add_counters(conn, added)  # in lock order (the rows come in that order)
            return written.rows

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
            await conn.execute(WAITS_ON_ITS_READER)
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
            await conn.execute(WAITS_ON_ITS_READER)  # here, on the ledger it copies from
            found = await conn.fetchrow(SQL.contents)
            Contents(*(int(v) for v in found)).refuse_to_merge(self.name)
            await conn.execute("DELETE FROM budget_usage")
            async for table, (columns, batch) in tables:
                await conn.copy_records_to_table(table, records=batch, columns=columns)

    async def contents(self) -> Contents:
        async with self.db.connection() as conn:
            found = await conn.fetchrow(SQL.contents)
        return Contents(*(int(v) for v in found))


async def migrate(url: str) -> tuple[int, int]:
    """Bring the schema of the ledger at `url` up to date; (version before, version after)."""
    shared = PostgresLedger(url)
    await shared.db.connect()
    try:
        return await shared.migrate()
    finally:
        await shared.close()


async def version_of(url: str) -> int:
    """The schema version of the ledger at `url` (0: the database holds none), without
    initialising an empty database as opening it would."""
    shared = PostgresLedger(url)
    await shared.db.connect()
    try:
        return await shared.version()
    except LedgerUnavailable as exc:
        raise LedgerUnavailable(
            f"cannot reach the PostgreSQL ledger {shared.name}: {exc.__cause__ or exc}"
        ) from exc
    finally:
        await shared.close()


def _batch_writes(
    request_id: str, found: tuple[Any, ...] | None, billed: codecs.Billed, outcome: Settlement
) -> tuple[flags.BatchWrites, list[list[Any]]] | None:
    """`flags.batch`, with its counters as `add_counters` takes them (none: no counter)."""
    writes = flags.batch(request_id, found, billed, outcome)
    if writes is None:
        return None
    return writes, added_arrays(writes.counters) if writes.counters else []


def _values(found: Any) -> tuple[Any, ...] | None:
    return tuple(found) if found is not None else None


SETTLING_BATCH = SQL.settling_batch.removesuffix(" FOR UPDATE")
"""`settling_batch` unlocked: what a batch's settlement works out ahead of its transaction."""
LINES = list(codecs.LINE_COLUMNS)
BILLED = list(codecs.BILL_COLUMNS)
