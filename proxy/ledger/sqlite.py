"""The embedded ledger: one SQLite file in WAL mode, shared by every worker on a machine.

Reservations are atomic across processes: each runs in a `BEGIN IMMEDIATE`
transaction, which takes SQLite's single write lock, so the totals a decision
reads cannot change before its reservation is written. Per-period totals are
kept in `budget_usage` (one row per counter), so a decision reads a handful of
rows instead of summing the month's requests. Where and when those transactions
run (inline on the event loop, or on aiosqlite's thread), the reads (on a connection
of their own), the checkpoints and the WAL's bound: see `sqlite_connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import sqlite3
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.core.rates import Counts, Plan, Slot
from proxy.ledger import codecs, flags, migrations, overlaps, rate_counts, sqlite_batches
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
from proxy.ledger.dialect import SQLITE
from proxy.ledger.kept import RepeatGuard
from proxy.ledger.sqlite_connections import Connections
from proxy.ledger.sqlite_kept import KeptAnswers
from proxy.ledger.sqlite_reports import summed
from proxy.ledger.statements import (
    COPY_BATCH,
    EXPORT_BATCH,
    KEYS,
    TOTALS,
    add_to_counters,
    marks,
    names,
    statements,
)

T = TypeVar("T")
SCHEMA_VERSION = migrations.SCHEMA_VERSION
SQL = statements(SQLITE)
LONG_WRITE = 100
"""Rows past which a write runs on the thread rather than inline on the loop."""
READ_CHUNK = 200
"""Counters read by one statement at most."""


class SqliteLedger(KeptAnswers):
    """The Ledger on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.owner: Owner | None = None
        self.file = Connections(self.path)
        self.read_uri = f"{self.path.resolve().as_uri()}?mode=ro"
        """Where the reports' and exports' connections of their own read the file: set by
        `open_to_read` to what reads it in a directory its user may not write."""
        self._snapshot: tuple[int, ...] | None = None
        """The file's `file_state` when `open_to_read` read it as an immutable snapshot,
        checked again on `close`: a writer that starts meanwhile goes unseen."""
        self._held: dict[str, tuple[int, str, Usage]] = {}
        """What each reservation of this process not yet settled holds: (reserved nanos,
        counters text, usage), as written in its row."""

    async def open(self) -> None:
        """Open the file (created if need be) and bring its schema up to date: the embedded
        ledger migrates itself, one process, nobody else to coordinate with."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            await self.file.open()
            found = await self.file.on_thread(_migrate)
        except (sqlite3.Error, OSError) as exc:
            await self.file.close()
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        if found > SCHEMA_VERSION:
            await self.file.close()
            raise LedgerError(
                f"{self.path}: ledger schema version {found} is newer than this "
                f"Tollgate's ({SCHEMA_VERSION}); upgrade Tollgate"
            )

    async def open_to_read(self) -> None:
        """Open the file to read it only, when its schema is current: no write lock taken,
        nothing written, so that a command showing the ledger neither waits for the
        proxy's writers nor holds them, and reads a file its user may only read. A schema
        behind is brought up to date as `open` does (taking the write lock once), and
        one ahead is refused: what every command did before."""
        before = file_state(self.path)
        version, uri = reading(self.path)
        if version != SCHEMA_VERSION:
            await self.open()
            return
        self.read_uri = uri
        if IMMUTABLE in uri:
            self._snapshot = before
        try:
            await self.file.open_reading(uri)
        except sqlite3.Error as exc:
            await self.file.close()
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc

    async def reserve(
        self,
        read: Sequence[Counter],
        choose: Chooser,
        pace: Plan | None = None,
        guard: RepeatGuard | None = None,
    ) -> Reservation:
        owner = self.owner.id if self.owner else None

        def run(conn: sqlite3.Connection) -> Reservation:
            if guard is not None:
                # In the write transaction: every reservation before this one is seen.
                sql = SQL.first_by_key if guard.key is not None else SQL.first_by_content
                latest = conn.execute(sql, guard.params()).fetchone()
                guard.arrived(latest[0] if latest else None)
            reservation = choose(_read_totals(conn, read))  # pure: it may run twice
            entry, usage = reservation.entry, reservation.usage
            if pace is not None:
                counts = rate_counts.read_sqlite(conn, pace)
                paced = pace.admit(entry, usage, counts, pace.at)
                rate_counts.add_sqlite(conn, paced.adds)
                reservation = replace(reservation, paced=paced)
            written = reservation.written
            text = written.text if written else codecs.reservation_text(reservation)
            values = codecs.reservation_values(
                entry, usage, text, owner, reservation.project, reservation.mainline_nanos
            )
            conn.execute(SQL.insert_reservation, values)
            if written:
                conn.executemany(_UPSERT, written.rows)
            else:
                _add(conn, text, codecs.reserved(entry, usage))
            held.append((entry.estimated_nanos, text, usage))
            return reservation

        held: list[tuple[int, str, Usage]] = []
        reservation = await self._request_write(run)
        self._held[reservation.entry.id] = held[-1]
        return reservation

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        # What this process reserved it knows: no need to read the row back, unless the
        # reservation was reclaimed meanwhile (then the update finds no reserved row).
        held = self._held.pop(request_id, None)
        values = (*codecs.settlement_values(settlement), request_id)
        rows: list[tuple[Any, ...]] | None = None
        if held is not None and codecs.shared(held[1]):
            # A batch naming users, released (never created): the rows of their thousands
            # of counters worked out on a thread, and written on the ledger's.
            release, text, usage = held
            deltas = codecs.settled(settlement, release, 0, usage)
            rows = await asyncio.to_thread(codecs.counter_rows, text, deltas)

        def run(conn: sqlite3.Connection) -> None:
            if held is not None and conn.execute(SQL.settle_reserved, values).rowcount == 1:
                release, text, usage = held
                if rows is not None:
                    conn.executemany(_UPSERT, rows)
                else:
                    _add(conn, text, codecs.settled(settlement, release, 0, usage))
                return
            found = conn.execute(SQL.settling, (request_id,)).fetchone()
            change = flags.settlement(request_id, found, settlement)
            if change is not None:
                conn.execute(SQL.settle, values)
                _add(conn, *change)

        if rows is not None and len(rows) > LONG_WRITE:
            await self.file.transaction(run, long=True)
        else:
            await self._request_write(run)

    def _request_write(self, run: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
        """A reservation's or settlement's transaction: in the group commit of this turn of
        the loop (`Connections.together`) while other requests of this process are in
        flight; alone, at once (waiting a turn of the loop would only add latency)."""
        return self.file.together(run) if self._held else self.file.transaction(run)

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        await self.file.write(SQL.record, codecs.record_values(entry, settlement))

    async def reclaim(
        self,
        now: float,
        *,
        started_before: float = 0.0,
        older_than_s: float = math.inf,
        owners: Sequence[str] = (),
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            stale = conn.execute(*SQL.stale(now, started_before, older_than_s, owners)).fetchall()
            for request_id, bound, text in stale:
                self._held.pop(request_id, None)
                conn.execute(SQL.forget_claimed, (request_id, request_id))
                conn.execute(SQL.reclaim, (now, request_id))
                _add(conn, text, codecs.reclaimed(bound))
            if owners:
                conn.execute(*SQL.forget(owners))
            return len(stale)

        return await self.file.transaction(run)

    async def flagged(self, start: float, end: float) -> list[Flagged]:
        return [Flagged(*r) for r in await self.file.fetch(SQL.flagged, (start, end))]

    async def resolve(self, request_id: str, cost_nanos: int, now: float, note: str = "") -> int:
        def run(conn: sqlite3.Connection) -> int:
            found = conn.execute(SQL.resolving, (request_id,)).fetchone()
            flags.settling(request_id, sqlite_batches.still_settling(conn, request_id))
            charged, text, deltas = flags.resolution(request_id, found, cost_nanos)
            sql = SQL.resolve_free if cost_nanos == 0 else SQL.resolve
            conn.execute(sql, (cost_nanos, now, note, request_id))
            _add(conn, text, deltas, charged)
            return charged

        return await self.file.transaction(run)

    async def register(self, owner: Owner) -> None:
        self.owner = owner
        await self.heartbeat()

    async def heartbeat(self) -> None:
        if self.owner is not None:
            owner = self.owner
            await self.file.write(SQL.heartbeat, (owner.id, owner.host, owner.pid))

    async def owners(self) -> list[Owner]:
        # A heartbeat later than the clock's now was beaten before the machine last booted
        # (or by an earlier Tollgate, which wrote its wall clock): silent since.
        return [
            Owner(o, host, pid, silent if silent >= 0 else math.inf)
            for o, host, pid, silent in await self.file.fetch(SQL.owners, ())
        ]

    async def unregister(self) -> None:
        if self.owner is not None:
            await self.file.write(SQL.unregister, (self.owner.id,))

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        return await self.file.read(lambda conn: _read_totals(conn, counters))

    async def rows(self, since: float = 0.0) -> list[Row]:
        return [codecs.row(r) for r in await self.file.fetch(SQL.rows, (since,))]

    async def summarize(
        self,
        start: float,
        end: float,
        by: Sequence[GroupColumn],
        bucket_seconds: int | None = None,
    ) -> list[Aggregate]:
        sql, width = SQL.summary(by, bucket_seconds)
        found = await asyncio.to_thread(summed, self.read_uri, sql, start, end, width)
        return codecs.aggregates(found, width)

    async def export(self, start: float, end: float) -> AsyncGenerator[dict[str, Any], None]:
        # Its own read-only connection: a long read must not hold the writers' connection.
        # A batch at a time, each its own statement (keyset: after the last row sent), so
        # between two batches it holds no snapshot: a client reading slowly never keeps the
        # WAL from being checkpointed, which writers wait for once the WAL is at its bound.
        # Each row comes once, as it was when its batch was read (rows are placed by when
        # they started, which nothing changes).
        try:
            db = await aiosqlite.connect(self.read_uri, uri=True)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        try:
            batch = await _fetch_dicts(db, SQL.export_first, (start, end, EXPORT_BATCH))
            while batch:
                for found in batch:
                    yield found
                if len(batch) < EXPORT_BATCH:
                    break
                at, after = batch[-1]["started_at"], batch[-1]["id"]
                following = (at, at, after, end, EXPORT_BATCH)
                batch = await _fetch_dicts(db, SQL.export_next, following)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc
        finally:
            await db.close()

    async def export_columns(self) -> list[str]:
        try:
            async with (
                aiosqlite.connect(self.read_uri, uri=True) as db,
                db.execute(SQL.export_columns) as cursor,
            ):
                return [d[0] for d in cursor.description]
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc

    async def hold(self, request_id: str, response_id: str, project: str | None = None) -> None:
        # What this process holds in `_held` stays as it is: the row is still the same
        # reservation, which its settlement replaces as any other.
        values = (response_id, codecs.project_value(project), request_id)

        def run(conn: sqlite3.Connection) -> None:
            if conn.execute(SQL.hold, values).rowcount == 0:
                raise LedgerError(f"no request {request_id}")

        await self.file.transaction(run)

    async def claim(self, request_id: str, batch_id: str, project: str | None = None) -> bool:
        values = (batch_id, codecs.project_value(project), request_id)

        def run(conn: sqlite3.Connection) -> bool:
            # Under the file's write lock (`BEGIN IMMEDIATE`): no other claim runs between
            # the look and the hold.
            if conn.execute(SQL.claimed_by, (batch_id, request_id)).fetchone() is not None:
                return False
            if conn.execute(SQL.hold, values).rowcount == 0:
                raise LedgerError(f"no request {request_id}")
            return True

        claimed: bool = await self.file.transaction(run)
        return claimed

    async def lost_batches(self, since: float) -> list[tuple[HeldEntry, str]]:
        found = await self.file.fetch(SQL.lost_batches, (float(since),))
        return [(codecs.held_entry(tuple(r[:-1])), r[-1]) for r in found]

    async def seeking(self, request_id: str, code: str) -> None:
        await self.file.write(SQL.seeking, (code, request_id))

    async def unanswered(self, team: str, request_id: str, before: float) -> list[float]:
        found = await self.file.fetch(SQL.unanswered, (team, request_id, float(before)))
        return [float(r[0]) for r in found]

    async def name_response(
        self, request_id: str, response_id: str, project: str | None = None
    ) -> None:
        values = (response_id, codecs.project_value(project), request_id)

        def run(conn: sqlite3.Connection) -> None:
            if conn.execute(SQL.name_response, values).rowcount == 0:
                raise LedgerError(f"no request {request_id}")

        await self.file.transaction(run)

    async def rate_counts(self, plan: Plan) -> Counts:
        return await self.file.read(lambda conn: rate_counts.read_sqlite(conn, plan))

    async def rate_windows(self, slots: Sequence[Slot]) -> dict[Slot, int]:
        return await self.file.read(lambda conn: rate_counts.windows_sqlite(conn, slots))

    async def forget_counts(self, before: float) -> int:
        return await self.file.transaction(lambda conn: rate_counts.forget_sqlite(conn, before))

    async def open_batches(self) -> list[OpenBatch]:
        return [OpenBatch(*r) for r in await self.file.fetch(SQL.open_batches, ())]

    async def holding(self, before: float) -> list[Holding]:
        return [Holding(*r) for r in await self.file.fetch(SQL.holding, (float(before),))]

    async def held(self) -> list[tuple[str, str]]:
        if self.owner is None:
            return []
        return [(r[0], r[1]) for r in await self.file.fetch(SQL.held, (self.owner.id,))]

    async def adopt(self, owners: Sequence[str]) -> int:
        if self.owner is None:
            return 0
        sql, values = SQL.adopt(self.owner.id, owners)
        adopted: int = await self.file.transaction(lambda conn: conn.execute(sql, values).rowcount)
        return adopted

    async def held_entry(self, request_id: str) -> HeldEntry | None:
        found = await self.file.fetch(SQL.held_entry, (request_id,))
        return codecs.held_entry(found[0]) if found else None

    async def response(self, response_id: str) -> ResponseRow | None:
        found = await self.file.fetch(SQL.response, (response_id,))
        return codecs.response_row(response_id, found[0]) if found else None

    async def own(self, obj: StoredObject, lines: Sequence[BatchLine] = ()) -> None:
        rows = codecs.line_values(obj.id, lines)

        def run(conn: sqlite3.Connection) -> None:
            if conn.execute(SQL.own, codecs.object_values(obj)).rowcount == 0:
                [(team,)] = conn.execute(SQL.owner_of, (obj.id,)).fetchall()
                flags.owned_already(obj, team)
                return
            conn.executemany(SQL.insert_line, rows)

        # A file's 50,000 lines are written off the loop, which goes on serving meanwhile.
        await self.file.transaction(run, long=len(rows) > LONG_WRITE)

    async def stored(self, object_id: str) -> StoredObject | None:
        found = await self.file.fetch(SQL.stored, (object_id,))
        return codecs.stored_object(found[0]) if found else None

    async def teams_of(self, object_ids: Sequence[str]) -> dict[str, str]:
        if not object_ids:
            return {}
        return {r[0]: r[1] for r in await self.file.fetch(*SQL.teams_of(object_ids))}

    async def owns_any(self, team: str, kind: ObjectKind) -> bool:
        return bool(await self.file.fetch(SQL.owns_any, (team, kind)))

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
        return [codecs.stored_object(r) for r in await self.file.fetch(sql, values)]

    async def batch_lines(self, file_id: str) -> dict[str, BatchLine]:
        return await self.file.fetch_as(SQL.batch_lines, (file_id,), codecs.batch_lines)

    async def settle_batch(
        self, request_id: str, lines: Sequence[BilledLine], outcome: Settlement
    ) -> int:
        # A chunk of lines a transaction past `CHUNK_LINES`, so that no worker's
        # reservation waits for 50,000 rows (see `sqlite_batches`); on the thread whatever
        # the number of lines: a batch naming 50,000 users releases 100,000 counters,
        # billed lines or none (a batch that expired before any ran).
        billed = await codecs.billed_off_loop(lines)
        written = await sqlite_batches.settle_batch(self.file, request_id, billed, outcome)
        self._held.pop(request_id, None)
        return written

    async def claim_alert(self, key: str, now: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL.claim_alert, (key, now)).rowcount == 1

        return await self.file.transaction(run)

    async def ping(self) -> None:
        """Raises unless the file reads, and its last write transaction committed: a disk
        that refuses writes leaves every new request refused, so the process is not ready."""
        try:
            await self.file.read(lambda conn: conn.execute("SELECT 1").fetchone())
        except LedgerError as exc:
            raise LedgerError(f"ledger unreachable: {exc}") from exc
        if self.file.failing is not None:
            raise LedgerUnavailable(f"ledger writes failing: {self.file.failing}")

    async def close(self) -> None:
        await self.file.close()
        if self._snapshot is not None and file_state(self.path) != self._snapshot:
            # A proxy started while the snapshot was read: its writes, in a WAL the snapshot
            # never reads, are missing from what was shown (and a checkpoint may have
            # rewritten pages under it).
            raise LedgerError(
                f"ledger {self.path} was written while it was read (a proxy started): what "
                "was read may miss its latest writes; run the command again"
            )

    # -- copies: the whole history, out and in ------------------------------------------

    async def dump(self, table: str) -> AsyncIterator[Batch]:
        """The rows of `table` as stored, a batch at a time, with their column names."""
        async with self.file.db.execute(f"SELECT * FROM {table}") as cursor:
            columns = [d[0] for d in cursor.description]
            while found := await cursor.fetchmany(COPY_BATCH):
                yield columns, [_typed(columns, tuple(r)) for r in found]

    async def restore(self, tables: AsyncIterable[tuple[str, Batch]]) -> None:
        """Write `tables`' rows into this empty ledger, in one transaction: all or nothing."""
        async with self.file.exclusive() as db:
            async with db.execute(SQL.contents) as cursor:
                found = await cursor.fetchone()
            Contents(*(found or (0, 0, 0, 0, 0))).refuse_to_merge(str(self.path))
            await db.execute("DELETE FROM budget_usage")
            async for table, (columns, batch) in tables:
                sql = f"INSERT INTO {table} ({names(columns)}) VALUES ({marks(len(columns))})"
                await db.executemany(sql, batch)

    async def contents(self) -> Contents:
        [found] = await self.file.fetch(SQL.contents, ())
        return Contents(*(int(v) for v in found))


async def migrate(path: str) -> tuple[int, int]:
    """Bring the schema of the ledger file at `path` up to date; (version before, after)."""
    before = schema_version(path)
    ledger = SqliteLedger(path)
    await ledger.open()  # the embedded ledger migrates itself when it opens
    await ledger.close()
    return before, SCHEMA_VERSION


def schema_version(path: str | Path) -> int:
    """The schema version of the ledger file at `path` (0: no file, or no schema yet),
    read without creating the file or writing to it."""
    return reading(path)[0]


def reading(path: str | Path) -> tuple[int, str]:
    """(The schema version of the ledger file at `path`, the URI that reads it without
    writing), read so: 0 and no URI when there is no file, 0 when it holds no schema.

    `mode=ro`, which reads a WAL file beside the processes writing it. SQLite refuses
    that (SQLITE_READONLY_DIRECTORY) when no process has the file open, so that there is
    no `-shm` file, and its directory is not writable by this user: no writer can be
    running then, and the file is read as `immutable` (a snapshot, with no locks). A
    `-wal` left beside it without its `-shm` (a copy) is refused by SQLite (CANTOPEN)
    before that: `immutable` would not read its writes."""
    if not Path(path).is_file():
        return 0, ""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        try:
            return _version_at(uri), uri
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_READONLY_DIRECTORY:
                raise
        uri += IMMUTABLE
        return _version_at(uri), uri
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from exc


IMMUTABLE = "&immutable=1"
"""What `reading` adds to the URI of a file it reads as a snapshot."""


def file_state(path: Path) -> tuple[int, ...]:
    """What a writer changes of the ledger file at `path`: its inode, size and modification
    time, and whether a `-wal` is beside it (a writer has it open, or crashed); empty when
    there is no file."""
    try:
        found = path.stat()
    except OSError:
        return ()
    wal = Path(f"{path}-wal").exists()
    return found.st_ino, found.st_size, found.st_mtime_ns, int(wal)


def _version_at(uri: str) -> int:
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        try:
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise
    return int(found[0] or 0)


def _migrate(conn: sqlite3.Connection) -> int:
    """Apply the pending migrations in one transaction; the version found."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("SELECT version FROM schema_version").fetchone()
        version = int(found[0]) if found is not None else 0
        for sql in migrations.pending(version, migrations.SQLITE):
            conn.execute(sql)
        if found is None:
            conn.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif version < SCHEMA_VERSION:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return version


_UPSERT = sqlite_batches.UPSERT


def _read_totals(conn: sqlite3.Connection, counters: Sequence[Counter]) -> dict[Counter, Totals]:
    """The totals of `counters` (organization counters are rows of their own), each with
    the rows of other zones' windows that overlap it (`proxy.ledger.overlaps`): an OR of
    primary-key ranges, which SQLite answers with one index search each, in one statement
    per `READ_CHUNK` counters (SQLite refuses an expression deeper than 1,000: every
    budget of 1,000 teams, as the gauges read them, would be one)."""
    found: list[tuple[Any, ...]] = []
    for at in range(0, len(counters), READ_CHUNK):
        chunk = counters[at : at + READ_CHUNK]
        keys = [v for c in chunk for v in (*codecs.counter_key(c)[:4], *overlaps.bounds(c))]
        found += conn.execute(_totals_query(len(chunk)), keys).fetchall()
    return overlaps.totals_of(counters, found)


@functools.lru_cache(maxsize=64)
def _totals_query(count: int) -> str:
    prefix = [f"{names([c])} = ?" for c in codecs.KEY_COLUMNS[:4]]
    one = f"({' AND '.join([*prefix, 'start > ?', 'start < ?'])})"
    return f"SELECT {KEYS}, {TOTALS} FROM budget_usage WHERE {' OR '.join([one] * count)}"


def _add(
    conn: sqlite3.Connection, counters_text: str, deltas: codecs.Deltas, spent_before: int = 0
) -> None:
    """Add to a reservation's counters (its row's `counters` text) and to the
    organization's counters of the same periods (`spent_before`: what the row charged
    before, see `codecs.counter_rows`).

    Every counter of a row without users' shares gets the same deltas: one statement
    writes them all (`_counters_upsert`), for about half of what a statement a counter
    cost SQLite (each step's cursors, each counter's text keys bound and copied)."""
    one = None if codecs.shared(counters_text) else _counters_upsert(counters_text)
    if one is None:
        conn.executemany(_UPSERT, codecs.counter_rows(counters_text, deltas, spent_before))
        return
    sql, keys = one
    spent, held, tokens = deltas
    conn.execute(sql, (*keys, spent, held, *tokens))


ONE_STATEMENT_COUNTERS = 64
"""Counters past which a row's counters are written a statement each (none but a batch's
users' shares come near: a request's are at most its team's, its user's and the
organization's of each period)."""


@functools.lru_cache(maxsize=4096)
def _counters_upsert(counters_text: str) -> tuple[str, tuple[Any, ...]] | None:
    """The statement adding the same deltas to every counter of `counters_text` (the
    organization's of its team's periods included: `codecs.written_keys`, in lock order),
    and the values of its keys; the deltas are its last six parameters. A value several
    keys share (a team's name, a period, a window's start) is bound once: the statement
    names its parameters by number. Every request of a team and user in a minute writes
    the same counters, and those of every team alike the same statement. None when there
    is none to write, or too many for one statement."""
    rows = codecs.written_keys(counters_text)
    if not rows or len(rows) > ONE_STATEMENT_COUNTERS:
        return None
    numbers: dict[tuple[type, Any], int] = {}
    for key in rows:
        for value in key:
            numbers.setdefault((type(value), value), len(numbers) + 1)
    shape = tuple(tuple(numbers[type(v), v] for v in key) for key in rows)
    return _upsert_of_shape(shape, len(numbers)), tuple(v for _, v in numbers)


@functools.lru_cache(maxsize=256)
def _upsert_of_shape(shape: tuple[tuple[int, ...], ...], keys: int) -> str:
    """One upsert of `shape`'s rows: each row's key parameters by number, then the deltas,
    parameters `keys` + 1 to `keys` + 6 of every row. One string for each shape, which
    the sqlite3 module's statement cache then finds by its hash, already computed."""
    deltas = [f"?{keys + n}" for n in range(1, len(codecs.TOTALS_COLUMNS) + 1)]
    values = ", ".join("(" + ", ".join([*(f"?{n}" for n in key), *deltas]) + ")" for key in shape)
    return add_to_counters(f"VALUES {values}")


def _typed(columns: list[str], found: tuple[Any, ...]) -> tuple[Any, ...]:
    # SQLite may hand back an integer from a REAL column; PostgreSQL's binary COPY wants floats.
    return tuple(
        float(v) if c in codecs.REAL_COLUMNS and isinstance(v, int) else v
        for c, v in zip(columns, found, strict=True)
    )


async def _fetch_dicts(
    db: aiosqlite.Connection, sql: str, values: Sequence[Any]
) -> list[dict[str, Any]]:
    async with db.execute(sql, values) as cursor:
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, found, strict=True)) for found in await cursor.fetchall()]
