"""A finished batch's settlement on the SQLite ledger, in transactions of `CHUNK_LINES` lines.

SQLite has one write lock per file, which every worker process shares: the 50,000 rows of
a batch written in one transaction kept every worker's reservations waiting for them (0.8
to 1.3 s). So a batch of more than `CHUNK_LINES` billed lines is written a chunk at a
time, each chunk its own transaction, with a pause between two (`between_chunks`) in
which the other writers take the lock:

1. the first transaction claims the settlement, its reservation's row naming this call
   (`billing_by`, a token of its own), and writes the first chunk;
2. each chunk's rows are written as they will stay (settled, each naming the call that
   wrote it in `billing_by`), and counted on the reservation's row: how many
   (`billed_lines`) and what they cost (`billed_nanos`);
3. the last transaction turns the reservation's row into the first billed line's and
   moves the counters: the reservation released, the lines' spend added, all at once. It
   writes a few rows, whatever the number of lines (none is rewritten).

Meanwhile nothing is counted twice. The counters are the reservation's, whole, until the
last transaction: a budget never sees a line's spend beside the bound that holds it, and
settled spend never passes a hard limit the reservation was decided against. A report
sums the settled rows, so it sees the lines written so far, and what the reservation
still holds is its bound less what they cost (`holding`, which the reconciliation and the
project reports add): the two together are the bound, as before and after. A row written
half-way cannot be resolved until the batch is settled (`still_settling`): its counters
are not moved yet.

A settlement that stops half-way (an error, the process killed) leaves the reservation
reserved, its counters whole, and the rows it wrote. Whoever settles the batch next (a
retry, the process that adopts it after a restart) finds the row claimed by another call:
it claims it for itself and deletes the rows of every other call first, a chunk a
transaction, then writes its own. Until they are all deleted the row goes on counting
those left (`billed_lines`, `billed_nanos`), so that a report and what the reservation
holds still add up to its bound. A call whose claim was taken over stops at its next
transaction and writes nothing more (`settle_batch` answers 0, as for a batch settled by
another). So the rows the counters are moved for are always those of the call that sums
them: every line once, exactly, however many calls began; a line's row is never written
twice (the claim and each chunk are checked under the write lock).

A batch of `CHUNK_LINES` lines or fewer (or one whose rows name another response id than
its reservation's) is settled in one transaction, as before (`at_once`), which also
deletes the rows a chunked call left.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from proxy.core.errors import LedgerError
from proxy.core.models import Settlement
from proxy.ledger import codecs, flags
from proxy.ledger.dialect import SQLITE
from proxy.ledger.flags import BatchWrites
from proxy.ledger.sqlite_connections import Connections
from proxy.ledger.statements import add_to_counters, marks, names, statements

SQL = statements(SQLITE)
UPSERT = add_to_counters(f"VALUES ({marks(len(codecs.KEY_COLUMNS) + 6)})")
"""Add a row's deltas to a counter (its key, then its deltas in `TOTALS_COLUMNS` order)."""
CHUNK_LINES = 2_000
"""Billed lines a transaction writes at most (see `bench.batches`)."""
CHUNK_PAUSE_S = 0.03
"""The pause between two chunks' transactions. SQLite hands its lock to no one in turn: a
worker waiting for it (its thread's connection, with a busy timeout) sleeps between tries,
1 to 25 ms apart in its first 128 ms of waiting, then 50 and 100 ms. A pause longer than
25 ms is seen by a worker that began waiting during the chunk before, if that chunk ended
within 100 ms (one of `CHUNK_LINES` lines takes 30 to 80 ms on a loaded 2-core machine);
with 10 ms a worker waited 0.9 s, as long as for the whole batch in one transaction
(`bench.batches`). This process's own writers take the lock inline meanwhile."""

_COST = codecs.BILL_COLUMNS.index("cost_nanos")
_RESPONSE = codecs.BILLED_COLUMNS.index("response_id")
PROGRESS = "SELECT state, billing_by, billed_lines FROM requests WHERE id = ?"
CLAIM = "UPDATE requests SET billing_by = ?, billed_lines = 0, billed_nanos = 0 WHERE id = ?"
TAKE_OVER = "UPDATE requests SET billing_by = ? WHERE id = ?"
"""A claim on a row another call claimed: its `billed_lines` and `billed_nanos` still count
the lines other calls wrote, until they are deleted (`FORGOTTEN`)."""
FORGOTTEN = "UPDATE requests SET billed_lines = ?, billed_nanos = billed_nanos - ? WHERE id = ?"
ADVANCE = "UPDATE requests SET billed_lines = ?, billed_nanos = billed_nanos + ? WHERE id = ?"
DONE = SQL.billed_done
BILL = (
    f"INSERT INTO requests ({names([*codecs.BILL_COLUMNS, 'billing_by'])}) "
    f"VALUES ({marks(len(codecs.BILL_COLUMNS) + 1)})"
)
"""A billed line's row written a chunk at a time: `bill`'s, and the call that wrote it."""
FORGET_ALL = SQL.forget_billed
"""(batch id, token, reservation id): the rows other calls of the batch's settlement wrote."""
FORGET_SOME = (
    "SELECT rowid, cost_nanos FROM requests WHERE "
    f"{FORGET_ALL.removeprefix('DELETE FROM requests WHERE ')} LIMIT ?"
)
"""(batch id, token, reservation id, limit): some of the rows `FORGET_ALL` deletes, and
what each cost."""
FORGET_ROW = "DELETE FROM requests WHERE rowid = ?"
STILL_SETTLING = SQL.still_settling
"""(id,): the batch reservation still being settled that the row is a line of."""

Step = Literal["more", "done", "lost"]


@dataclass
class _Call:
    """One chunked settlement's progress, as this call knows it."""

    request_id: str
    batch_id: str
    found: tuple[Any, ...]
    """The reservation's row as `settling_batch` read it when the writes were worked out."""
    writes: BatchWrites
    token: str
    pending: list[tuple[Any, ...]]
    """`writes.others`, each naming this call (`BILL` rows)."""
    claimed: bool = False
    clearing: bool = False
    """Rows of other calls may still be left to delete."""
    written: int = 0


async def between_chunks() -> None:
    """What happens between two chunks' transactions: a pause for the other writers."""
    await asyncio.sleep(CHUNK_PAUSE_S)


async def settle_batch(
    file: Connections, request_id: str, billed: codecs.Billed, outcome: Settlement
) -> int:
    """Settle the batch reservation `request_id` by its `billed` lines: how many rows it
    became (0: settled already, by this call or another)."""
    read = await file.fetch(SQL.settling_batch, (request_id,))
    found = tuple(read[0]) if read else None
    if found is not None and found[0] != "reserved":
        return 0  # settled for good: a row never goes back to reserved
    batch_id = found[3] if found is not None else None
    if found is None or batch_id is None or not _chunkable(billed.rows, batch_id):

        def whole(conn: sqlite3.Connection) -> int:
            return at_once(conn, request_id, billed, outcome)

        return await file.transaction(whole, long=True)
    token = secrets.token_hex(8)
    writes = await asyncio.to_thread(flags.batch, request_id, found, billed, outcome)
    if writes is None:
        return 0
    pending = await asyncio.to_thread(lambda: [(*r, token) for r in writes.others])
    call = _Call(request_id, batch_id, found, writes, token, pending)
    while True:
        step = await file.transaction(lambda conn: _step(conn, call, billed, outcome), long=True)
        if step == "done":
            return writes.rows
        if step == "lost":
            return 0
        await between_chunks()


def at_once(
    conn: sqlite3.Connection, request_id: str, billed: codecs.Billed, outcome: Settlement
) -> int:
    """The whole settlement in one transaction (on `conn`, inside it)."""
    found = conn.execute(SQL.settling_batch, (request_id,)).fetchone()
    writes = flags.batch(request_id, found, billed, outcome)
    if writes is None:
        return 0
    _, claimed_by, _ = conn.execute(PROGRESS, (request_id,)).fetchone()
    if claimed_by is not None:
        # A chunked settlement that stopped half-way: its rows are replaced by these.
        conn.execute(FORGET_ALL, (found[3], "", request_id))
        conn.execute(DONE, (request_id,))
    _write(conn, writes, chunked=False)
    return writes.rows


def still_settling(conn: sqlite3.Connection, request_id: str) -> str | None:
    """The id of the batch reservation whose settlement is writing the row `request_id`
    (None: the row is not one of a settlement under way)."""
    found = conn.execute(STILL_SETTLING, (request_id,)).fetchone()
    return str(found[0]) if found else None


def _chunkable(rows: Sequence[tuple[Any, ...]], batch_id: str) -> bool:
    """Whether the rows can be written a chunk at a time: more than a chunk of them besides
    the first, each found again by its batch's id (as a stopped settlement's rows are)."""
    return len(rows) > CHUNK_LINES + 1 and all(r[_RESPONSE] in (batch_id, None) for r in rows)


def _step(
    conn: sqlite3.Connection, call: _Call, billed: codecs.Billed, outcome: Settlement
) -> Step:
    """One transaction of a chunked settlement: claim it, delete other calls' rows, write a
    chunk, or end it (see the module's docstring)."""
    state, claimed_by, written = conn.execute(PROGRESS, (call.request_id,)).fetchone()
    if state != "reserved":
        return "lost"  # settled by another call meanwhile
    if claimed_by != call.token:
        if call.claimed:
            return "lost"  # another call took the settlement over: it writes every line
        call.claimed, call.clearing = True, claimed_by is not None
        # Taken over, the row goes on counting the other calls' lines until they are
        # deleted: a report sums them meanwhile, and the reservation holds the rest.
        conn.execute(TAKE_OVER if call.clearing else CLAIM, (call.token, call.request_id))
        written = written if call.clearing else 0
    elif not call.clearing and written != call.written:
        raise LedgerError(f"batch {call.request_id}: {written} lines written, not {call.written}")
    others = (call.batch_id, call.token, call.request_id)
    if call.clearing:
        forgotten = conn.execute(FORGET_SOME, (*others, CHUNK_LINES)).fetchall()
        conn.executemany(FORGET_ROW, [(rowid,) for rowid, _ in forgotten])
        call.clearing = len(forgotten) == CHUNK_LINES
        if call.clearing:
            cost = sum(c for _, c in forgotten)
            conn.execute(FORGOTTEN, (written - len(forgotten), cost, call.request_id))
        else:  # none left: none counted
            conn.execute(CLAIM, (call.token, call.request_id))
        return "more"
    if written < len(call.pending):
        chunk = call.pending[written : written + CHUNK_LINES]
        conn.executemany(BILL, chunk)
        call.written = written + len(chunk)
        cost = sum(r[_COST] for r in chunk)
        conn.execute(ADVANCE, (call.written, cost, call.request_id))
        return "more"
    found = conn.execute(SQL.settling_batch, (call.request_id,)).fetchone()
    if tuple(found) != call.found:
        # The row changed since the rows were worked out (its project named again, say):
        # they are replaced by the whole settlement worked out from it now.
        conn.execute(FORGET_ALL, (call.batch_id, "", call.request_id))
        conn.execute(DONE, (call.request_id,))
        return "done" if at_once(conn, call.request_id, billed, outcome) else "lost"
    _write(conn, call.writes, chunked=True)
    conn.execute(DONE, (call.request_id,))
    return "done"


def _write(conn: sqlite3.Connection, writes: BatchWrites, *, chunked: bool) -> None:
    """The reservation's row replaced, the other lines' rows written (unless `chunked`:
    written already) and the counters moved."""
    conn.execute(SQL.bill_first if writes.billed else SQL.settle_reserved, writes.reservation)
    if not chunked:
        conn.executemany(SQL.bill, writes.others)
    conn.executemany(UPSERT, writes.counters)
