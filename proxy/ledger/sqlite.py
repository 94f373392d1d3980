"""The embedded ledger: one SQLite file in WAL mode, shared by every worker on a machine.

Reservations are atomic across processes: each runs in a `BEGIN IMMEDIATE`
transaction, which takes SQLite's single write lock, so the totals a decision
reads cannot change before its reservation is written. Per-period totals are
kept in `budget_usage` (one row per counter), so a decision reads a handful of
rows instead of summing the month's requests.

Writes run on the event loop's own thread. A transaction here takes about 0.1 ms
and never waits on the disk (WAL with `synchronous = NORMAL` appends to the page
cache), while handing it to a thread and back cost twice that in wake-ups alone.
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
import json
import logging
import operator
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from proxy.core.errors import LedgerError, LedgerUnavailable
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.ledger import migrations
from proxy.ledger.base import Chooser, Flagged, Owner, Reservation, Row
from proxy.ledger.counters import with_organization
from proxy.ledger.flags import FLAGGED_COLUMNS, RECLAIM_SET, resolvable, settled_already
from proxy.ledger.sqlite_reports import SqliteReports

T = TypeVar("T")
log = logging.getLogger("tollgate")

CHECKPOINT_EVERY = 500
"""Commits on the loop's connection between two checkpoints of the WAL on the thread."""
INLINE_ATTEMPTS = 3
"""Tries on the loop's connection, one turn of the loop apart, before the thread takes over."""
LOCK_WAIT_MS = 30_000
"""How long the thread's connection waits for the write lock before giving up."""
WAL_LIMIT_BYTES = 64 * 1024 * 1024
"""The WAL file's bound: no transaction starts writing once the file has reached it (a
reserve and its settle write about 37 KB of WAL, so this is some 1,800 requests)."""


class _Busy(Exception):
    """Another connection holds the write lock: try later, or where waiting is allowed."""


class _WalFull(Exception):
    """The WAL has reached `WAL_LIMIT_BYTES`: nothing was written; checkpoint, then retry."""


# The schema lives in migrations.py: ordered steps, applied when the ledger opens.
SCHEMA_VERSION = migrations.SCHEMA_VERSION

ENTRY_COLUMNS = (
    "id", "started_at", "endpoint", "team", "cost_center", "key_id", "user",
    "model_requested", "model", "quality_requested", "quality", "size_requested", "size",
    "n_requested", "n", "stream", "estimated_nanos", "downgrades",
)  # fmt: skip
USAGE_COLUMNS = (
    "text_input_tokens", "cached_text_input_tokens", "image_input_tokens",
    "cached_image_input_tokens", "image_output_tokens", "text_output_tokens", "images",
)  # fmt: skip
SETTLEMENT_COLUMNS = (
    "finished_at", "outcome", "status", *USAGE_COLUMNS, "cost_nanos", "flagged",
    "upstream_request_id", "error_code", "latency_ms",
)  # fmt: skip
TOTALS_COLUMNS = (
    "spent_nanos", "reserved_nanos", "text_input_tokens", "image_input_tokens",
    "image_output_tokens", "total_tokens",
)  # fmt: skip


_entry_values: Callable[[Entry], tuple[Any, ...]] = operator.attrgetter(*ENTRY_COLUMNS)
"""An entry's values in `ENTRY_COLUMNS` order (one C call)."""


def _usage_values(u: Usage) -> tuple[int, ...]:
    return (
        u.text_input, u.cached_text_input, u.image_input, u.cached_image_input,
        u.image_output, u.text_output, u.images,
    )  # fmt: skip


def _settlement_values(s: Settlement) -> tuple[Any, ...]:
    return (
        s.finished_at, s.outcome, s.status, *_usage_values(s.usage), s.cost_nanos,
        int(s.flagged), s.upstream_request_id, s.error_code, s.latency_ms,
    )  # fmt: skip


def _token_deltas(usage: Usage, sign: int) -> tuple[int, int, int, int]:
    """What `usage` adds to a counter's token columns (negative to take it back)."""
    return (
        sign * (usage.text_input + usage.cached_text_input),
        sign * (usage.image_input + usage.cached_image_input),
        sign * usage.image_output,
        sign * usage.total_tokens,
    )


def _settled_tokens(actual: Usage, reserved: Usage) -> tuple[int, ...]:
    """What a settlement adds to a counter's token columns: the usage metered, less the
    estimate its reservation added."""
    added, taken_back = _token_deltas(actual, 1), _token_deltas(reserved, -1)
    return tuple(a + b for a, b in zip(added, taken_back, strict=True))


def _counter_key(c: Counter) -> list[Any]:
    return [c.scope, c.team, c.user, c.period, c.start]


def _counters(text: str) -> list[Counter]:
    return [Counter(*item) for item in json.loads(text)]


def _counters_text(counters: Sequence[Counter]) -> str:
    """How a reservation keeps its counters in its row (for its settlement and reclaim)."""
    return json.dumps([_counter_key(c) for c in counters])


@functools.lru_cache(maxsize=4096)
def _written_keys(text: str) -> tuple[tuple[Any, ...], ...]:
    """The budget_usage keys a reservation's writes touch, in lock order, from its row's
    `counters` text. Every request of a team, user and period writes the same ones, so
    they are worked out once (a string's hash is cached; a tuple of Counters' is not)."""
    return tuple(tuple(_counter_key(c)) for c in with_organization(_counters(text)))


class SqliteLedger(SqliteReports):
    """The Ledger on one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self.owner: Owner | None = None
        # The thread's connection: its statements must not interleave with a transaction.
        self._lock = asyncio.Lock()
        self._commits = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._wal = f"{self.path}-wal"
        self._room = asyncio.Lock()
        self._thread_writes = 0
        self._held: dict[str, tuple[int, str, Usage]] = {}
        """What each reservation of this process not yet settled holds: (reserved nanos,
        counters text, usage), as written in its row."""
        self._thread_idle = asyncio.Event()
        self._thread_idle.set()

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
            await db.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            # The embedded ledger migrates itself: one process, nobody else to coordinate with.
            await db.execute("BEGIN IMMEDIATE")
            async with db.execute("SELECT version FROM schema_version") as cursor:
                found = await cursor.fetchone()
            version = found[0] if found is not None else 0
            for sql in migrations.pending(version, migrations.SQLITE):
                await db.execute(sql)
            if found is None:
                await db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                await db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            await db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        if found is not None and found[0] > SCHEMA_VERSION:
            await db.close()
            raise LedgerError(
                f"{self.path}: ledger schema version {found[0]} is newer than this "
                f"Tollgate's ({SCHEMA_VERSION}); upgrade Tollgate"
            )
        try:
            self._inline = _loop_connection(self.path)
        except sqlite3.Error as exc:
            await db.close()
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        self._db = db

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise LedgerError("ledger is not open")
        return self._db

    async def reserve(self, read: Sequence[Counter], choose: Chooser) -> Reservation:
        owner = self.owner.id if self.owner else None

        def run(conn: sqlite3.Connection) -> Reservation:
            reservation = choose(_read_totals(conn, read))  # pure: it may run twice
            entry, usage = reservation.entry, reservation.usage
            counters_text = _counters_text(reservation.counters)
            conn.execute(
                _INSERT_RESERVATION,
                (
                    *_entry_values(entry),
                    *_usage_values(usage),
                    "reserved",
                    entry.estimated_nanos,
                    counters_text,
                    owner,
                ),
            )
            _add(conn, counters_text, 0, entry.estimated_nanos, _token_deltas(usage, 1))
            held.append((entry.estimated_nanos, counters_text, usage))
            return reservation

        held: list[tuple[int, str, Usage]] = []
        reservation = await self._transaction(run)
        self._held[reservation.entry.id] = held[-1]
        return reservation

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        # What this process reserved it knows: no need to read the row back, unless the
        # reservation was reclaimed meanwhile (then the update finds no reserved row).
        held = self._held.pop(request_id, None)

        def run(conn: sqlite3.Connection) -> None:
            if held is not None:
                updated = conn.execute(
                    _SETTLE_RESERVED, (*_settlement_values(settlement), request_id)
                )
                if updated.rowcount == 1:
                    release, counters_text, held_usage = held
                    _settle_counters(conn, counters_text, settlement, release, held_usage)
                    return
            found = conn.execute(_SETTLED_BEFORE, (request_id,)).fetchone()
            if found is None:
                raise LedgerError(f"no reservation {request_id}")
            state, error_code, resolved_at, charged, reserved, counters_text, *usage = found
            if settled_already(state, error_code, resolved_at):
                return
            # What the row holds: the reservation (nothing charged yet), or the bound a
            # reclaim charged before the answer came, which this settlement replaces.
            release = reserved if state == "reserved" else 0
            conn.execute(_SETTLE, (*_settlement_values(settlement), request_id))
            tokens = _settled_tokens(settlement.usage, Usage(*usage))
            _add(conn, counters_text, settlement.cost_nanos - charged, -release, tokens)

        await self._transaction(run)

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        columns = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
        await self._write(
            f"INSERT INTO requests ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            (
                *_entry_values(entry),
                *_settlement_values(settlement),
                "settled",
            ),
        )

    async def reclaim(
        self, now: float, *, started_before: float = 0.0, owners: Sequence[str] = ()
    ) -> int:
        marks = ", ".join("?" * len(owners))

        def run(conn: sqlite3.Connection) -> int:
            stale = conn.execute(
                "SELECT id, reserved_nanos, counters FROM requests WHERE state = 'reserved' "
                f"AND (started_at < ? OR owner IN ({marks}))",
                (started_before, *owners),
            ).fetchall()
            for request_id, reserved, counters_text in stale:
                self._held.pop(request_id, None)
                conn.execute(_RECLAIM, (now, request_id))
                # Reserved becomes spent; the estimated usage it holds stays counted.
                _add(conn, counters_text, reserved, -reserved, (0, 0, 0, 0))
            if owners:
                conn.execute(f"DELETE FROM processes WHERE owner IN ({marks})", tuple(owners))
            return len(stale)

        return await self._transaction(run)

    async def flagged(self, start: float, end: float) -> list[Flagged]:
        async with self._lock, self.db.execute(_FLAGGED, (start, end)) as cursor:
            return [Flagged(*row) for row in await cursor.fetchall()]

    async def resolve(self, request_id: str, cost_nanos: int, now: float, note: str = "") -> int:
        def run(conn: sqlite3.Connection) -> int:
            found = conn.execute(_RESOLVABLE, (request_id,)).fetchone()
            charged, counters_text, usage = resolvable(request_id, found)
            free = cost_nanos == 0
            conn.execute(_RESOLVE_FREE if free else _RESOLVE, (cost_nanos, now, note, request_id))
            tokens = _token_deltas(usage, -1) if free else (0, 0, 0, 0)
            _add(conn, counters_text, cost_nanos - charged, 0, tokens)
            return charged

        return await self._transaction(run)

    async def register(self, owner: Owner, now: float) -> None:
        self.owner = owner
        await self.heartbeat(now)

    async def heartbeat(self, now: float) -> None:
        if self.owner is None:
            return
        await self._write(
            "INSERT INTO processes (owner, host, pid, heartbeat_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (self.owner.id, self.owner.host, self.owner.pid, now),
        )

    async def owners(self) -> list[Owner]:
        async with (
            self._lock,
            self.db.execute(
                "SELECT owner, host, pid, heartbeat_at FROM processes UNION "
                "SELECT DISTINCT owner, '', 0, 0 FROM requests WHERE state = 'reserved' "
                "AND owner IS NOT NULL AND owner NOT IN (SELECT owner FROM processes)"
            ) as cursor,
        ):
            return [Owner(*row) for row in await cursor.fetchall()]

    async def unregister(self) -> None:
        if self.owner is not None:
            await self._write("DELETE FROM processes WHERE owner = ?", (self.owner.id,))

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        return await self._on_thread(lambda conn: _read_totals(conn, counters))

    async def rows(self, since: float = 0.0) -> list[Row]:
        columns = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
        async with self.db.execute(
            f"SELECT {', '.join(columns)} FROM requests WHERE started_at >= ? ORDER BY started_at",
            (since,),
        ) as cursor:
            found = await cursor.fetchall()
        return [_row(tuple(r)) for r in found]

    async def claim_alert(self, key: str, now: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO alerts_sent (key, sent_at) VALUES (?, ?)", (key, now)
            )
            return cursor.rowcount == 1

        return await self._transaction(run)

    async def ping(self) -> None:
        try:
            await self.db.execute("SELECT 1")
        except (sqlite3.Error, ValueError) as exc:
            raise LedgerError(f"ledger unreachable: {exc}") from exc

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

    # -- on the connection's thread -------------------------------------------

    async def _on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on aiosqlite's thread in one hop (one hop per statement would wait for
        a turn of the busy event loop each time, with the lock held). aiosqlite has no public
        call for this; `_execute` is what its own methods use."""
        async with self._lock:
            done: T = await self.db._execute(work, self.db._conn)  # type: ignore[no-untyped-call]
            return done

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
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
        """One try at `_transaction` (raising `_WalFull`, with nothing written, if the WAL
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
            return await self._on_thread(lambda conn: _atomically(conn, work, self._wal, wait=True))
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
            await self._on_thread(checkpoint)
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
                return await self._on_thread(truncate)
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    return False
                raise LedgerError(f"ledger checkpoint failed: {exc}") from exc

    async def _write(self, sql: str, values: Sequence[Any]) -> None:
        await self._transaction(lambda conn: conn.execute(sql, values))


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


_SETTLE = (
    f"UPDATE requests SET {', '.join(f'{c} = ?' for c in SETTLEMENT_COLUMNS)}, "
    "state = 'settled', reserved_nanos = 0 WHERE id = ?"
)
_SETTLE_RESERVED = _SETTLE + " AND state = 'reserved'"
_SETTLED_BEFORE = (
    "SELECT state, error_code, resolved_at, cost_nanos, reserved_nanos, counters, "
    f"{', '.join(USAGE_COLUMNS)} FROM requests WHERE id = ?"
)
_RECLAIM = f"UPDATE requests SET {RECLAIM_SET}, finished_at = ? WHERE id = ?"
_FLAGGED = (
    f"SELECT {FLAGGED_COLUMNS} FROM requests "
    "WHERE flagged = 1 AND state = 'settled' AND started_at >= ? AND started_at < ? "
    "ORDER BY started_at, id"
)
_RESOLVABLE = (
    f"SELECT state, flagged, cost_nanos, counters, {', '.join(USAGE_COLUMNS)} "
    "FROM requests WHERE id = ?"
)
_RESOLVE = "UPDATE requests SET cost_nanos = ?, resolved_at = ?, resolution = ? WHERE id = ?"
_RESOLVE_FREE = (
    "UPDATE requests SET cost_nanos = ?, resolved_at = ?, resolution = ?, "
    + ", ".join(f"{c} = 0" for c in USAGE_COLUMNS)
    + " WHERE id = ?"
)
_RESERVATION_COLUMNS = (
    *ENTRY_COLUMNS, *USAGE_COLUMNS, "state", "reserved_nanos", "counters", "owner",
)  # fmt: skip
_INSERT_RESERVATION = (
    f"INSERT INTO requests ({', '.join(_RESERVATION_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_RESERVATION_COLUMNS))})"
)
_UPSERT = (
    f"INSERT INTO budget_usage (scope, team, user, period, start, {', '.join(TOTALS_COLUMNS)}) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (scope, team, user, period, start) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in TOTALS_COLUMNS)
)


def _read_totals(conn: sqlite3.Connection, counters: Sequence[Counter]) -> dict[Counter, Totals]:
    """The totals of `counters` (organization counters are rows of their own), in one
    statement: an OR of primary keys, which SQLite answers with one index search each."""
    if not counters:
        return {}
    found = {
        tuple(row[:5]): Totals(*row[5:])
        for row in conn.execute(_totals_query(len(counters)), _flat_keys(counters))
    }
    return {c: found.get(tuple(_counter_key(c)), Totals()) for c in counters}


@functools.lru_cache(maxsize=64)
def _totals_query(count: int) -> str:
    one = "(scope = ? AND team = ? AND user = ? AND period = ? AND start = ?)"
    return (
        f"SELECT scope, team, user, period, start, {', '.join(TOTALS_COLUMNS)} "
        f"FROM budget_usage WHERE {' OR '.join([one] * count)}"
    )


def _flat_keys(counters: Sequence[Counter]) -> list[Any]:
    return [value for c in counters for value in _counter_key(c)]


def _add(
    conn: sqlite3.Connection,
    counters_text: str,
    spent: int,
    reserved: int,
    tokens: tuple[int, ...],
) -> None:
    """Add to a reservation's counters (its row's `counters` text) and to the
    organization's counters of the same periods."""
    conn.executemany(
        _UPSERT, [(*key, spent, reserved, *tokens) for key in _written_keys(counters_text)]
    )


def _settle_counters(
    conn: sqlite3.Connection,
    counters_text: str,
    settlement: Settlement,
    release: int,
    reserved_usage: Usage,
) -> None:
    """Replace what a reservation held in its counters by what its request cost."""
    tokens = _settled_tokens(settlement.usage, reserved_usage)
    _add(conn, counters_text, settlement.cost_nanos, -release, tokens)


def _row(values: tuple[Any, ...]) -> Row:
    e = dict(zip(ENTRY_COLUMNS, values[: len(ENTRY_COLUMNS)], strict=True))
    s = dict(zip(SETTLEMENT_COLUMNS, values[len(ENTRY_COLUMNS) : -1], strict=True))
    e["stream"] = bool(e["stream"])
    entry = Entry(**e)
    if values[-1] == "reserved":
        return Row(entry, None)
    usage = Usage(*(s[c] for c in USAGE_COLUMNS))
    settlement = Settlement(
        finished_at=s["finished_at"],
        outcome=s["outcome"],
        status=s["status"],
        usage=usage,
        cost_nanos=s["cost_nanos"],
        flagged=bool(s["flagged"]),
        upstream_request_id=s["upstream_request_id"],
        error_code=s["error_code"],
        latency_ms=s["latency_ms"] or 0.0,
    )
    return Row(entry, settlement)
