"""The embedded ledger: one SQLite file in WAL mode, shared by every worker on a machine.

Reservations are atomic across processes: each runs in a `BEGIN IMMEDIATE`
transaction, which takes SQLite's single write lock, so the totals a decision
reads cannot change before its reservation is written. Per-period totals are
kept in `budget_usage` (one row per counter), so a decision reads a handful of
rows instead of summing the month's requests.

Writes run on the event loop's own thread. A transaction here is short and never
waits on the disk (WAL with `synchronous = NORMAL` appends to the page cache), while
handing it to a thread and back costs more in wake-ups alone than the transaction
itself (`bench/ledger.py` measures it).
The loop never waits for a lock either: that connection has no busy timeout, and
a transaction that finds the write lock taken (another worker is writing) is
tried again after the loop's next turn, then handed to aiosqlite's thread, whose
connection waits for the lock. Checkpoints, which do wait on the disk, run on that
thread every `CHECKPOINT_EVERY` commits, and so do reports and other reads.

The WAL is bounded whatever the scheduling: a transaction that finds the WAL file at
`WAL_LIMIT_BYTES` once it holds the write lock writes nothing, and the writer waits for a
TRUNCATE checkpoint before it tries again (see `_make_room`). The check is made under the
write lock every worker process shares, so the WAL file never grows past the limit plus
what one transaction writes, however many processes write and however late the
checkpoints on the thread run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.ledger import codecs, flags, migrations
from proxy.ledger.base import (
    Aggregate,
    Batch,
    Chooser,
    Contents,
    Flagged,
    GroupColumn,
    Owner,
    Reservation,
    Row,
)
from proxy.ledger.dialect import SQLITE
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
log = logging.getLogger("tollgate")

CHECKPOINT_EVERY = 500
"""Commits on the loop's connection between two checkpoints of the WAL on the thread."""
INLINE_ATTEMPTS = 3
"""Tries on the loop's connection, one turn of the loop apart, before the thread takes over."""
LOCK_WAIT_MS = 30_000
"""How long the thread's connection waits for the write lock before giving up."""
WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""The WAL file's bound: no transaction starts writing once the file has reached it (the
README says how many requests that is)."""
SCHEMA_VERSION = migrations.SCHEMA_VERSION
SQL = statements(SQLITE)


class _Busy(Exception):
    """Another connection holds the write lock: try later, or where waiting is allowed."""


class _WalFull(Exception):
    """The WAL has reached `WAL_LIMIT_BYTES`: nothing was written; checkpoint, then retry."""


class SqliteLedger:
    """The Ledger on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.owner: Owner | None = None
        self.file = Connections(self.path)
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

    async def reserve(self, read: Sequence[Counter], choose: Chooser) -> Reservation:
        owner = self.owner.id if self.owner else None

        def run(conn: sqlite3.Connection) -> Reservation:
            reservation = choose(_read_totals(conn, read))  # pure: it may run twice
            entry, usage = reservation.entry, reservation.usage
            text = codecs.counters_text(reservation.counters)
            conn.execute(
                SQL.insert_reservation, codecs.reservation_values(entry, usage, text, owner)
            )
            _add(conn, text, codecs.reserved(entry, usage))
            held.append((entry.estimated_nanos, text, usage))
            return reservation

        held: list[tuple[int, str, Usage]] = []
        reservation = await self.file.transaction(run)
        self._held[reservation.entry.id] = held[-1]
        return reservation

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        # What this process reserved it knows: no need to read the row back, unless the
        # reservation was reclaimed meanwhile (then the update finds no reserved row).
        held = self._held.pop(request_id, None)
        values = (*codecs.settlement_values(settlement), request_id)

        def run(conn: sqlite3.Connection) -> None:
            if held is not None and conn.execute(SQL.settle_reserved, values).rowcount == 1:
                release, text, usage = held
                _add(conn, text, codecs.settled(settlement, release, 0, usage))
                return
            found = conn.execute(SQL.settling, (request_id,)).fetchone()
            change = flags.settlement(request_id, found, settlement)
            if change is not None:
                conn.execute(SQL.settle, values)
                _add(conn, *change)

        await self.file.transaction(run)

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        await self.file.write(SQL.record, codecs.record_values(entry, settlement))

    async def reclaim(
        self, now: float, *, started_before: float = 0.0, owners: Sequence[str] = ()
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            stale = conn.execute(*SQL.stale(started_before, owners)).fetchall()
            for request_id, bound, text in stale:
                self._held.pop(request_id, None)
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
            charged, text, deltas = flags.resolution(request_id, found, cost_nanos)
            sql = SQL.resolve_free if cost_nanos == 0 else SQL.resolve
            conn.execute(sql, (cost_nanos, now, note, request_id))
            _add(conn, text, deltas)
            return charged

        return await self.file.transaction(run)

    async def register(self, owner: Owner, now: float) -> None:
        self.owner = owner
        await self.heartbeat(now)

    async def heartbeat(self, now: float) -> None:
        if self.owner is not None:
            owner = self.owner
            await self.file.write(SQL.heartbeat, (owner.id, owner.host, owner.pid, now))

    async def owners(self) -> list[Owner]:
        return [Owner(*r) for r in await self.file.fetch(SQL.owners, ())]

    async def unregister(self) -> None:
        if self.owner is not None:
            await self.file.write(SQL.unregister, (self.owner.id,))

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        return await self.file.on_thread(lambda conn: _read_totals(conn, counters))

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
        return codecs.aggregates(await self.file.fetch(sql, (start, end)), width)

    async def export(self, start: float, end: float) -> AsyncGenerator[dict[str, Any], None]:
        # Its own read-only connection: a long read must not hold the writers' connection.
        # A batch at a time, each its own statement (keyset: after the last row sent), so
        # between two batches it holds no snapshot: a client reading slowly never keeps the
        # WAL from being checkpointed, which writers wait for once the WAL is at its bound.
        # Each row comes once, as it was when its batch was read (rows are placed by when
        # they started, which nothing changes).
        try:
            db = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
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

    async def claim_alert(self, key: str, now: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(SQL.claim_alert, (key, now)).rowcount == 1

        return await self.file.transaction(run)

    async def ping(self) -> None:
        try:
            await self.file.db.execute("SELECT 1")
        except (sqlite3.Error, ValueError) as exc:
            raise LedgerError(f"ledger unreachable: {exc}") from exc

    async def close(self) -> None:
        await self.file.close()

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
            Contents(*(found or (0, 0, 0, 0))).refuse_to_merge(str(self.path))
            await db.execute("DELETE FROM budget_usage")
            async for table, (columns, batch) in tables:
                sql = f"INSERT INTO {table} ({names(columns)}) VALUES ({marks(len(columns))})"
                await db.executemany(sql, batch)

    async def contents(self) -> Contents:
        [found] = await self.file.fetch(SQL.contents, ())
        return Contents(*(int(v) for v in found))


class Connections:
    """The two connections to one SQLite file, and the write transactions run on them.

    The loop's connection runs transactions inline; aiosqlite's thread runs those that
    must wait for the write lock, reads, and checkpoints. Every transaction keeps the
    WAL under its bound."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        # The thread's connection: its statements must not interleave with a transaction.
        self._lock = asyncio.Lock()
        self._commits = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._wal = f"{path}-wal"
        self._room = asyncio.Lock()
        self._thread_writes = 0
        self._thread_idle = asyncio.Event()
        self._thread_idle.set()

    async def open(self) -> None:
        """Open both connections (sqlite3.Error or OSError if the file cannot be)."""
        db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db = db
        await db.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        self._inline = _loop_connection(self.path)

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise LedgerError("ledger is not open")
        return self._db

    async def close(self) -> None:
        if self._checkpoint is not None:
            with contextlib.suppress(LedgerError):
                await self._checkpoint
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on aiosqlite's thread in one hop (one hop per statement would wait for
        a turn of the busy event loop each time, with the lock held). aiosqlite has no public
        call for this; `_execute` is what its own methods use."""
        async with self._lock:
            done: T = await self.db._execute(work, self.db._conn)  # type: ignore[no-untyped-call]
            return done

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` inside `BEGIN IMMEDIATE` … `COMMIT` (ROLLBACK on any error, which propagates):
        SQLite's single write lock, so what it reads cannot change before it writes.

        On the loop's connection when the lock is free within `INLINE_ATTEMPTS` turns of the
        loop, else on the thread's. `work` may run more than once: only its last run commits.
        A WAL found full makes room first (`_make_room`), for `LOCK_WAIT_MS` at most.
        """
        deadline: float | None = None
        pause = 0.001
        while True:
            try:
                return await self._attempt(work)
            except _WalFull:
                pass
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + LOCK_WAIT_MS / 1000
            if await self._make_room():
                continue
            if loop.time() >= deadline:
                raise LedgerUnavailable("ledger busy: its WAL is full and cannot be checkpointed")
            # Another process's checkpoint is running, or a reader holds the WAL.
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def _attempt(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """One try at `transaction` (raising `_WalFull`, with nothing written, if the WAL
        is at its limit).

        While this process has writes on the thread, they hold the lock (and wait for the
        GIL while holding it): a new one waits for them to end rather than find the lock
        taken and join the queue on the thread, which would keep the queue from emptying.
        """
        if self._thread_writes:
            await self._thread_idle.wait()
        for attempt in range(INLINE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0)
            conn = self._inline
            if conn is None:
                raise LedgerError("ledger is not open")
            try:
                result = _atomically(conn, work, self._wal, wait=False)
            except _Busy:
                continue
            self._committed()
            return result
        self._thread_writes += 1
        self._thread_idle.clear()
        try:
            return await self.on_thread(lambda conn: _atomically(conn, work, self._wal, wait=True))
        finally:
            self._thread_writes -= 1
            if not self._thread_writes:
                self._thread_idle.set()

    def _committed(self) -> None:
        """Count a commit on the loop's connection; start a checkpoint every so many."""
        self._commits += 1
        if self._commits < CHECKPOINT_EVERY or self._checkpoint is not None:
            return
        self._commits = 0
        self._checkpoint = asyncio.get_running_loop().create_task(self._checkpoint_wal())

    async def _checkpoint_wal(self) -> None:
        """Copy the WAL back into the database file, off the loop (it waits on the disk).

        PASSIVE, so transactions go on meanwhile. The WAL starts over (from its beginning,
        the file keeping its size) when a checkpoint copied all of it before the next write,
        which writes appended meanwhile prevent: under sustained writes it is the limit that
        empties it (`_make_room`)."""

        def checkpoint(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

        try:
            await self.on_thread(checkpoint)
        except (LedgerError, sqlite3.Error, ValueError) as exc:
            log.warning("ledger checkpoint failed: %s", exc)
        finally:
            self._checkpoint = None

    async def _make_room(self) -> bool:
        """Empty the WAL file: a TRUNCATE checkpoint on the thread. It takes the write lock
        (waiting for it like the thread's transactions), so every process's writers wait
        while it copies the WAL into the database file, syncs both and truncates the WAL;
        it also waits for readers still reading from the WAL. False if it could not: another
        process's checkpoint was running, or readers held on for `LOCK_WAIT_MS`."""

        def truncate(conn: sqlite3.Connection) -> bool:
            busy, _frames, _copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return not busy

        async with self._room:  # one at a time: those waiting may find it done
            if _wal_size(self._wal) < WAL_LIMIT_BYTES:
                return True
            try:
                return await self.on_thread(truncate)
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    return False
                raise LedgerError(f"ledger checkpoint failed: {exc}") from exc

    async def write(self, sql: str, values: Sequence[Any]) -> None:
        """One statement in a write transaction of its own."""
        await self.transaction(lambda conn: conn.execute(sql, values))

    async def fetch(self, sql: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows `sql` reads, on the thread (reads wait on the disk)."""
        try:
            return await self.on_thread(lambda conn: conn.execute(sql, values).fetchall())
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[aiosqlite.Connection]:
        """The thread's connection in one write transaction held across awaits (a copy
        loading batches as they come); nothing else runs on it meanwhile."""
        async with self._lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")


async def migrate(path: str) -> tuple[int, int]:
    """Bring the schema of the ledger file at `path` up to date; (version before, after)."""
    before = _version(Path(path))
    ledger = SqliteLedger(path)
    await ledger.open()  # the embedded ledger migrates itself when it opens
    await ledger.close()
    return before, SCHEMA_VERSION


def _version(path: Path) -> int:
    """The schema version of the ledger file at `path` (0: none yet)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.Error:
            return 0
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


_UPSERT = add_to_counters(f"VALUES ({marks(len(codecs.KEY_COLUMNS) + 6)})")


def _read_totals(conn: sqlite3.Connection, counters: Sequence[Counter]) -> dict[Counter, Totals]:
    """The totals of `counters` (organization counters are rows of their own), in one
    statement: an OR of primary keys, which SQLite answers with one index search each."""
    if not counters:
        return {}
    keys = [value for c in counters for value in codecs.counter_key(c)]
    return codecs.totals_of(counters, conn.execute(_totals_query(len(counters)), keys))


@functools.lru_cache(maxsize=64)
def _totals_query(count: int) -> str:
    one = f"({' AND '.join(f'{names([c])} = ?' for c in codecs.KEY_COLUMNS)})"
    return f"SELECT {KEYS}, {TOTALS} FROM budget_usage WHERE {' OR '.join([one] * count)}"


def _add(conn: sqlite3.Connection, counters_text: str, deltas: codecs.Deltas) -> None:
    """Add to a reservation's counters (its row's `counters` text) and to the
    organization's counters of the same periods."""
    spent, held, tokens = deltas
    conn.executemany(
        _UPSERT, [(*key, spent, held, *tokens) for key in codecs.written_keys(counters_text)]
    )


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


def _loop_connection(path: Path) -> sqlite3.Connection:
    """The connection transactions run on, on the event loop's thread: it never waits for
    the write lock (`busy_timeout = 0`) and never checkpoints (that waits on the disk)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def _atomically(
    conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T], wal: str, wait: bool
) -> T:
    """`work` in one write transaction on `conn`. Without `wait`, finding the write lock
    taken raises `_Busy` (nothing written); with it, the connection's busy timeout applies.
    Finding the WAL file (`wal`) at `WAL_LIMIT_BYTES` raises `_WalFull` (nothing written):
    with the write lock held no other process can add to it before this commit."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        if _is_busy(exc):
            if not wait:
                raise _Busy from exc
            raise LedgerUnavailable(f"ledger busy: {exc}") from exc
        raise LedgerError(f"ledger unavailable: {exc}") from exc
    if _wal_size(wal) >= WAL_LIMIT_BYTES:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise _WalFull
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            if not wait and _is_busy(exc):
                raise _Busy from exc
            raise LedgerError(f"ledger write failed: {exc}") from exc
        raise
    return result


def _wal_size(wal: str) -> int:
    """The WAL file's size: what it has held since it was last truncated."""
    try:
        return os.stat(wal).st_size
    except FileNotFoundError:
        return 0


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, whatever the extended code."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
