"""How the SQLite ledger's transactions reach the file: three connections, the write lock,
checkpoints and the WAL's bound.

`sqlite.SqliteLedger` says what each transaction reads and writes; `Connections` says where
and when it runs. Apart because these are SQLite's own mechanics, the same whatever the
rows and counters: they can be read and tuned on their own.

Every write transaction is `BEGIN IMMEDIATE` … `COMMIT`, which takes SQLite's single write
lock, shared by every worker process on the machine.

Writes run on the event loop's own thread. A transaction here is short and never
waits on the disk (WAL with `synchronous = NORMAL` appends to the page cache), while
handing it to a thread and back costs more in wake-ups alone than the transaction
itself (`bench/ledger.py` measures it).
The loop never waits for a lock either: that connection has no busy timeout, and
a transaction that finds the write lock taken (another worker is writing) is
tried again after the loop's next turn, then handed to aiosqlite's thread, whose
connection waits for the lock. Checkpoints, which do wait on the disk, run on that
thread every `CHECKPOINT_EVERY` commits.

Reads run on a third connection, on a thread of its own (`read`): a budget read must not
wait in line behind a transaction writing a batch's 50,000 lines on the writers' thread.
In WAL mode a reader never waits for the writer nor blocks it; it sees what had committed
when its read began, so a read issued once a write's transaction has returned sees it.
A read that decides a write is made inside the write's transaction, never here. The
migrations, `exclusive` and the checkpoints stay on the writers' thread, and so does a
copy's reading of whole tables (`SqliteLedger.dump`): its statement stays open across
awaits, and here it would hold every later read to its snapshot.

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
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from proxy.core.errors import LedgerError, LedgerUnavailable

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


BOOT_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
"""Linux's clock since boot (suspended time included); elsewhere the monotonic clock."""


def ledger_clock() -> float:
    """The SQLite ledger's clock (`Dialect.clock`, the SQL function `ledger_clock()` of its
    connections): seconds since the machine booted. Every process sharing the file runs on
    this machine (WAL mode needs its shared memory), so all read the same clock, and no
    change of the wall clock (a step of NTP, an operator's `date -s`) moves it: a process's
    heartbeat judged by it is never seconds or hours old because the clock jumped."""
    return time.clock_gettime(BOOT_CLOCK)


Gathered = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
"""A work of a group commit and the future its caller awaits."""


class _Busy(Exception):
    """Another connection holds the write lock: try later, or where waiting is allowed."""


class _WalFull(Exception):
    """The WAL has reached `WAL_LIMIT_BYTES`: nothing was written; checkpoint, then retry."""


class _WalLost(Exception):
    """The WAL file the connections write, or its shared-memory index, is no longer the one
    at its path: nothing was written (see `Wal`)."""


class Wal:
    """The WAL file the connections write and its shared-memory index (`-shm`): their paths,
    and the files (inodes) first found there.

    SQLite never removes either while a connection has the database open. The WAL removed
    from under the connections (a cleanup script, an operator tidying `-wal` files) goes on
    taking their commits, in a file no other process sees and that is gone once they close:
    a `kill -9` then loses every row written since the last checkpoint, billed requests
    among them. The index removed (taken for a stale lock file), the next process that
    opens the database (`tollgate report`, a backup) makes one of its own, sees no other
    connection, and checkpoints and resets the WAL as it closes, under the commits that go
    on: they are lost alike. `size` says so (`_WalLost`), under the write lock, before
    anything is written."""

    __slots__ = ("inodes", "path", "paths")

    def __init__(self, path: str, index: str) -> None:
        self.path = path
        self.paths = (path, index)
        self.inodes: list[int | None] = [None, None]

    def size(self) -> int:
        """The WAL file's size: what it has held since it was last truncated (0 before it
        is made); `_WalLost` if the file at either path is gone or another one."""
        size = 0
        for at, path in enumerate(self.paths):
            try:
                found = os.stat(path)
            except FileNotFoundError:
                if self.inodes[at] is not None:
                    raise _WalLost from None
                continue
            if self.inodes[at] is None:
                self.inodes[at] = found.st_ino
            elif found.st_ino != self.inodes[at]:
                raise _WalLost
            if at == 0:
                size = found.st_size
        return size


class Connections:
    """The three connections to one SQLite file, and the transactions run on them.

    The loop's connection runs write transactions inline; aiosqlite's thread runs those
    that must wait for the write lock, and checkpoints; the read connection, on a thread
    of its own, the reads. Every write transaction keeps the WAL under its bound."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # The thread's connection: its statements must not interleave with a transaction.
        self._lock = asyncio.Lock()
        self._commits = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._wal = Wal(f"{path}-wal", f"{path}-shm")
        self._room = asyncio.Lock()
        self._thread_writes = 0
        self._thread_idle = asyncio.Event()
        self._thread_idle.set()
        self._gathering: list[Gathered] | None = None
        """The works of the group commit this turn of the loop gathers (see `together`)."""
        self._committing: set[asyncio.Task[None]] = set()
        self.failing: LedgerUnavailable | None = None
        """Why the last write transaction failed (a full disk, a lock held too long), until
        one commits: the ledger is not ready meanwhile (`/readyz`), though it reads."""
        self._lost: LedgerUnavailable | None = None
        """Set once the WAL file was found removed or replaced (`Wal`): every write from then
        on is refused, until the process restarts."""

    async def open(self) -> None:
        """Open the three connections (sqlite3.Error or OSError if the file cannot be)."""
        db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db = db
        await db.create_function("ledger_clock", 0, ledger_clock)
        await db.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        self._inline = _loop_connection(self.path)
        reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader = reader
        await reader.create_function("ledger_clock", 0, ledger_clock)
        # A reader finds the file busy only rarely (a process recovering the WAL after a
        # crash): it waits, as the writers' thread does. A write here would be a mistake,
        # refused rather than made.
        await reader.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")
        await reader.execute("PRAGMA query_only = ON")

    async def open_reading(self, uri: str) -> None:
        """Open the read connection alone, on `uri` (a read-only SQLite URI): what a command
        that only shows the ledger needs. It takes no lock a writer waits for, and the
        writes, which have no connection, are refused (LedgerError)."""
        reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        self._reader = reader
        await reader.create_function("ledger_clock", 0, ledger_clock)
        await reader.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise LedgerError("ledger is not open")
        return self._db

    async def close(self) -> None:
        if self._committing:
            await asyncio.gather(*self._committing, return_exceptions=True)
        if self._checkpoint is not None:
            with contextlib.suppress(LedgerError):
                await self._checkpoint
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._reader is not None:
            reader, self._reader = self._reader, None  # reads from now on are refused
            await reader.close()  # after those already queued

    async def on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on aiosqlite's thread in one hop (one hop per statement would wait for
        a turn of the busy event loop each time, with the lock held). aiosqlite has no public
        call for this; `_execute` is what its own methods use."""
        async with self._lock:
            done: T = await self.db._execute(work, self.db._conn)  # type: ignore[no-untyped-call]
            return done

    async def transaction(
        self, work: Callable[[sqlite3.Connection], T], *, long: bool = False
    ) -> T:
        """`work` inside `BEGIN IMMEDIATE` … `COMMIT` (ROLLBACK on any error, which propagates):
        SQLite's single write lock, so what it reads cannot change before it writes.

        On the loop's connection when the lock is free within `INLINE_ATTEMPTS` turns of the
        loop, else on the thread's; a `long` one (a whole batch input file's lines) always
        on the thread's, so that the loop goes on serving while it writes. `work` may run
        more than once: only its last run commits. A WAL found full makes room first
        (`_make_room`), for `LOCK_WAIT_MS` at most.
        """
        deadline: float | None = None
        pause = 0.001
        while True:
            if self._lost is not None:
                self.failing = self._lost
                raise self._lost
            try:
                result = await self._attempt(work, long)
            except _WalFull:
                pass
            except _WalLost:
                await self._save_lost_wal()
                continue
            except LedgerUnavailable as exc:
                self.failing = exc
                raise
            else:
                self.failing = None
                return result
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + LOCK_WAIT_MS / 1000
            try:
                made = await self._make_room()
            except LedgerUnavailable as exc:
                self.failing = exc
                raise
            if made:
                continue
            if loop.time() >= deadline:
                self.failing = LedgerUnavailable(
                    "ledger busy: its WAL is full and cannot be checkpointed"
                )
                raise self.failing
            # Another process's checkpoint is running, or a reader holds the WAL.
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def _attempt(self, work: Callable[[sqlite3.Connection], T], long: bool) -> T:
        """One try at `transaction` (raising `_WalFull`, with nothing written, if the WAL
        is at its limit).

        While this process has writes on the thread, they hold the lock (and wait for the
        GIL while holding it): a new one waits for them to end rather than find the lock
        taken and join the queue on the thread, which would keep the queue from emptying.
        """
        if self._thread_writes:
            await self._thread_idle.wait()
        for attempt in range(0 if long else INLINE_ATTEMPTS):
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

    async def _save_lost_wal(self) -> None:
        """The WAL file or its index was removed or replaced (`Wal`): copy what the WAL holds
        into the database file, which the connections still write (a checkpoint reads the
        WAL they have open, through the index they have mapped),
        so that no row committed so far is lost when they close or the process dies; then
        refuse every write: a new request is answered 503 and never forwarded, `/readyz` is
        not ready, and the requests in flight are left to the reclaim of the next start,
        which charges them their bound (a restart makes a new WAL)."""
        if self._lost is not None:
            return

        def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
            found: tuple[int, int, int] = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return found

        self._lost = LedgerUnavailable(
            f"ledger writes refused: its WAL file {self._wal.path} or its index (-shm) was "
            "removed or replaced while in use (what is written now would be lost); restart "
            "Tollgate"
        )
        try:
            busy, frames, copied = await self.on_thread(checkpoint)
        except (sqlite3.Error, ValueError) as exc:
            log.error("%s; saving the WAL into the database file failed: %s", self._lost, exc)
            return
        if busy or copied < frames:
            log.error("%s; the WAL was saved into the database file only in part", self._lost)
        else:
            log.error("%s; its %d page(s) were saved into the database file", self._lost, copied)

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
            if _wal_size(self._wal.path) < WAL_LIMIT_BYTES:
                return True
            try:
                return await self.on_thread(truncate)
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    return False
                # A disk that refuses the database file's writes (full, failing) is an
                # outage, which a settlement waits out, as it does a failing write.
                raise _failure("ledger checkpoint failed", exc) from exc

    async def together(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` in a write transaction shared with every other `together` of this turn of
        the loop (group commit): under load, the reservations and settlements of several
        requests pay for one `BEGIN IMMEDIATE` … `COMMIT`, and the pages they share (the
        newest rows of `requests`, its indexes, the counters) go into the WAL once.

        The transaction runs in a task of its own on the loop's next turn. Each `work` runs
        in a savepoint: one that raises is rolled back alone and its caller gets the error
        (a sqlite3.Error as a LedgerError), the others commit. A caller cancelled before its
        work ran has nothing written.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._gathering is None:
            self._gathering = []
            task = loop.create_task(self._commit_gathered())
            self._committing.add(task)
            task.add_done_callback(self._committing.discard)
        self._gathering.append((work, future))
        return await future

    async def _commit_gathered(self) -> None:
        gathered = [(w, f) for w, f in self._gathering or () if not f.done()]
        self._gathering = None
        if not gathered:
            return
        try:
            if len(gathered) == 1:  # alone: no savepoint needed
                work, future = gathered[0]
                outcomes = [(True, await self.transaction(work))]
            else:
                outcomes = await self.transaction(lambda conn: _each(conn, gathered))
        except BaseException as exc:
            outcomes = [(False, exc)] * len(gathered)
            if not isinstance(exc, Exception):
                for _, future in gathered:
                    future.cancel()
                raise
        for (_, future), (ok, value) in zip(gathered, outcomes, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def write(self, sql: str, values: Sequence[Any]) -> None:
        """One statement in a write transaction of its own."""
        await self.transaction(lambda conn: conn.execute(sql, values))

    async def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work`'s reads on the read connection's thread (reads wait on the disk), in one
        snapshot: what had committed when it began. For reads that no write depends on;
        those that decide a write are made inside its transaction."""
        reader = self._reader
        if reader is None:
            raise LedgerError("ledger is not open")
        try:
            done: T = await reader._execute(_snapshot, reader._conn, work)  # type: ignore[no-untyped-call]
        except sqlite3.Error as exc:
            raise _failure("ledger read failed", exc) from exc
        return done

    async def fetch(self, sql: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows `sql` reads (see `read`)."""
        return await self.fetch_as(sql, values, list)

    async def fetch_as(
        self, sql: str, values: Sequence[Any], decode: Callable[[Iterable[tuple[Any, ...]]], T]
    ) -> T:
        """The rows `sql` reads, made into objects by `decode`, both off the loop: tens of
        thousands of rows (a batch file's lines) took the event loop a second to decode.

        The cursor is closed even when `decode` stops early: an unfinished statement keeps
        its snapshot, past the end of its transaction, and the connection's later reads
        with it (they would miss what commits meanwhile)."""

        def read(conn: sqlite3.Connection) -> T:
            with contextlib.closing(conn.execute(sql, values)) as rows:
                return decode(rows)

        return await self.read(read)

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


def _each(conn: sqlite3.Connection, gathered: Sequence[Gathered]) -> list[tuple[bool, Any]]:
    """Run each work of a group commit in a savepoint of its own: (True, result), or
    (False, the exception) with what it wrote rolled back."""
    outcomes: list[tuple[bool, Any]] = []
    for work, future in gathered:
        if future.done():  # its caller was cancelled while the write lock was awaited
            outcomes.append((False, None))
            continue
        conn.execute("SAVEPOINT work")
        try:
            outcome: tuple[bool, Any] = (True, work(conn))
        except Exception as exc:
            if isinstance(exc, sqlite3.Error) and _is_busy(exc):
                raise  # the whole transaction is tried again
            conn.execute("ROLLBACK TO work")
            if isinstance(exc, sqlite3.Error):
                exc = _failure("ledger write failed", exc)
            outcome = (False, exc)
        conn.execute("RELEASE work")
        outcomes.append(outcome)
    return outcomes


def _snapshot(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """`work` in one read transaction on `conn`: its statements see the same commits (a
    budget read over 1,000 counters is several statements), the newest when it begins."""
    conn.execute("BEGIN")
    try:
        return work(conn)
    finally:
        conn.rollback()


def _loop_connection(path: Path) -> sqlite3.Connection:
    """The connection transactions run on, on the event loop's thread: it never waits for
    the write lock (`busy_timeout = 0`) and never checkpoints (that waits on the disk)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("ledger_clock", 0, ledger_clock)
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def _atomically(
    conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T], wal: Wal, wait: bool
) -> T:
    """`work` in one write transaction on `conn`. Without `wait`, finding the write lock
    taken raises `_Busy` (nothing written); with it, the connection's busy timeout applies.
    Finding the WAL file (`wal`) at `WAL_LIMIT_BYTES` raises `_WalFull` (nothing written):
    with the write lock held no other process can add to it before this commit; finding it
    removed or replaced raises `_WalLost` (nothing written)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        if _is_busy(exc):
            if not wait:
                raise _Busy from exc
            raise LedgerUnavailable(f"ledger busy: {exc}") from exc
        raise _failure("ledger unavailable", exc) from exc
    try:
        full = wal.size() >= WAL_LIMIT_BYTES
    except _WalLost:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    if full:
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
            raise _failure("ledger write failed", exc) from exc
        raise
    return result


def _wal_size(wal: str) -> int:
    """The WAL file's size: what it has held since it was last truncated."""
    try:
        return os.stat(wal).st_size
    except FileNotFoundError:
        return 0


OUTAGES = (
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
)
"""What the file's disk does, not the statement: full, failing, made read-only, or its
directory gone. Each may pass, as a database server's restart does."""


def _failure(what: str, exc: sqlite3.Error) -> LedgerError:
    """`exc` as the ledger's error: LedgerUnavailable for an outage of the disk, so that a
    settlement retries it (`settle_patiently`) rather than leave a billed request reserved,
    to be charged at its bound; LedgerError for the rest."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in OUTAGES:
        return LedgerUnavailable(f"{what}: {exc}")
    return LedgerError(f"{what}: {exc}")


def _is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, whatever the extended code."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
