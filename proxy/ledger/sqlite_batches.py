"""A finished batch's settlement on the SQLite ledger, in transactions of `CHUNK_LINES` lines.

SQLite has one write lock per file, which every worker process shares: the 50,000 rows of
a batch written in one transaction kept every worker's reservations waiting for it (0.8 to
1.1 s). So a batch of more than `CHUNK_LINES` billed lines is written a chunk at a time,
each chunk its own transaction, with a pause between two (`between_chunks`) in which the
other writers take the lock:

1. the first transaction claims the settlement: the reservation's row names this call
   (`billing_by`, a token of its own) and writes the first chunk;
2. each chunk is inserted in state `billing` and counted on the reservation's row
   (`billed_lines`);
3. the last transaction turns the reservation's row into the first billed line's, makes
   the `billing` rows `settled`, and moves the counters (the reservation's release and the
   lines' spend), all at once.

Until the last transaction commits nothing a reader counts has changed: reports, the
reconciliation, the flagged rows and the reclaims read `settled` or `reserved` rows only,
and the counters are those of the reservation, whole. A `billing` row is neither: it is
counted nowhere, so a line is never counted twice (its row and the reservation) nor half
(its row and not the counters). Only the audit export (every row) shows them, in that state.

A settlement that stops half-way (an error, the process killed) leaves the reservation
reserved, its counters whole, and `billing` rows that count for nothing. Whoever settles
the batch next (a retry, the process that adopts it after a restart) finds the row claimed
by another call: it claims it for itself and deletes those rows first, a chunk a
transaction, then writes its own. A call whose claim was taken over stops at its next
transaction and writes nothing more (`settle_batch` answers 0, as for a batch settled by
another). So the rows the last transaction makes `settled` are always those of the call
that sums them into the counters: every line once, exactly, however many calls began.

A batch of `CHUNK_LINES` lines or fewer (or one whose rows name another response id than
its reservation's) is settled in one transaction, as before (`at_once`), which also
deletes the `billing` rows a chunked call left.
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
from proxy.ledger.statements import add_to_counters, marks, statements

SQL = statements(SQLITE)
UPSERT = add_to_counters(f"VALUES ({marks(len(codecs.KEY_COLUMNS) + 6)})")
"""Add a row's deltas to a counter (its key, then its deltas in `TOTALS_COLUMNS` order)."""
CHUNK_LINES = 2_000
"""Billed lines a transaction writes at most (see `bench.batches`)."""
CHUNK_PAUSE_S = 0.01
"""The pause between two chunks' transactions: SQLite's lock is not handed over in turn,
and a worker waiting for it sleeps between tries, 10 to 100 ms; without a pause it would
find the lock taken again nearly every time."""
BILLING = "billing"
"""The state of a billed line's row written before its batch's last transaction."""

_STATE = codecs.BILL_COLUMNS.index("state")
_RESPONSE = codecs.BILL_COLUMNS.index("response_id")
PROGRESS = "SELECT state, billing_by, billed_lines FROM requests WHERE id = ?"
CLAIM = "UPDATE requests SET billing_by = ?, billed_lines = 0 WHERE id = ?"
ADVANCE = "UPDATE requests SET billed_lines = ? WHERE id = ?"
DONE = "UPDATE requests SET billing_by = NULL, billed_lines = 0 WHERE id = ?"
BILL = SQL.bill
FORGET_SOME = (
    "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests "
    f"WHERE response_id = ? AND state = '{BILLING}' LIMIT ?)"
)
FORGET_ALL = f"DELETE FROM requests WHERE response_id = ? AND state = '{BILLING}'"
SETTLE_ALL = f"UPDATE requests SET state = 'settled' WHERE response_id = ? AND state = '{BILLING}'"

Step = Literal["more", "done", "lost"]


@dataclass
class _Call:
    """One chunked settlement's progress, as this call knows it."""

    request_id: str
    batch_id: str
    found: tuple[Any, ...]
    """The reservation's row as `settling_batch` read it when the writes were worked out."""
    writes: BatchWrites
    pending: list[tuple[Any, ...]]
    """`writes.others` in state `billing`."""
    token: str
    claimed: bool = False
    clearing: bool = False
    """Rows of another call are still to be deleted."""
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
    found = read[0] if read else None
    if found is not None and found[0] != "reserved":
        return 0  # settled for good: a row never goes back to reserved
    batch_id = found[3] if found is not None else None
    if found is None or not _chunkable(billed.rows, batch_id):

        def whole(conn: sqlite3.Connection) -> int:
            return at_once(conn, request_id, billed, outcome)

        return await file.transaction(whole, long=True)
    writes, pending = await asyncio.to_thread(_worked_out, request_id, found, billed, outcome)
    if writes is None:
        return 0
    assert batch_id is not None
    call = _Call(request_id, batch_id, tuple(found), writes, pending, secrets.token_hex(8))
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
        conn.execute(FORGET_ALL, (found[3],))
        conn.execute(DONE, (request_id,))
    _write(conn, writes)
    return writes.rows


def _chunkable(rows: Sequence[tuple[Any, ...]], batch_id: str | None) -> bool:
    """Whether the rows can be written a chunk at a time: more than a chunk of them, each
    found again by its batch's id (which is how a stopped settlement's rows are found)."""
    if batch_id is None or len(rows) <= CHUNK_LINES + 1:
        return False
    response = codecs.BILLED_COLUMNS.index("response_id")
    return all(r[response] in (batch_id, None) for r in rows)


def _worked_out(
    request_id: str, found: Sequence[Any], billed: codecs.Billed, outcome: Settlement
) -> tuple[BatchWrites | None, list[tuple[Any, ...]]]:
    """The writes (off the loop, before any lock) and the rows in state `billing`."""
    writes = flags.batch(request_id, found, billed, outcome)
    if writes is None:
        return None, []
    return writes, [(*r[:_STATE], BILLING, *r[_STATE + 1 :]) for r in writes.others]


def _step(
    conn: sqlite3.Connection, call: _Call, billed: codecs.Billed, outcome: Settlement
) -> Step:
    """One transaction of a chunked settlement: claim, delete another call's rows, write a
    chunk, or end (see the module's docstring)."""
    state, claimed_by, written = conn.execute(PROGRESS, (call.request_id,)).fetchone()
    if state != "reserved":
        return "lost"  # settled by another call meanwhile
    if claimed_by != call.token:
        if call.claimed:
            return "lost"  # another call took the settlement over: it writes every line
        conn.execute(CLAIM, (call.token, call.request_id))
        call.claimed, call.clearing = True, claimed_by is not None
        if call.clearing:
            return "more"
        written = 0
    elif written != call.written:
        raise LedgerError(f"batch {call.request_id}: {written} lines written, not {call.written}")
    if call.clearing:
        gone = conn.execute(FORGET_SOME, (call.batch_id, CHUNK_LINES)).rowcount
        call.clearing = gone == CHUNK_LINES
        return "more"
    if written < len(call.pending):
        chunk = call.pending[written : written + CHUNK_LINES]
        conn.executemany(BILL, chunk)
        call.written = written + len(chunk)
        conn.execute(ADVANCE, (call.written, call.request_id))
        return "more"
    found = conn.execute(SQL.settling_batch, (call.request_id,)).fetchone()
    if tuple(found) != call.found:
        # The row changed since the rows were worked out (its project named again, say):
        # they are replaced by the whole settlement worked out from it now.
        conn.execute(FORGET_ALL, (call.batch_id,))
        conn.execute(DONE, (call.request_id,))
        return "done" if at_once(conn, call.request_id, billed, outcome) else "lost"
    _write(conn, call.writes, pending=(call.batch_id, call.written))
    conn.execute(DONE, (call.request_id,))
    return "done"


def _write(
    conn: sqlite3.Connection, writes: BatchWrites, pending: tuple[str, int] | None = None
) -> None:
    """The reservation's row replaced, the other lines' rows written (or, `pending`: the
    batch id and count of those written a chunk at a time, made settled) and the counters
    moved."""
    conn.execute(SQL.bill_first if writes.billed else SQL.settle_reserved, writes.reservation)
    if pending is None:
        conn.executemany(SQL.bill, writes.others)
    else:
        batch_id, count = pending
        settled = conn.execute(SETTLE_ALL, (batch_id,)).rowcount
        if settled != count:
            raise LedgerError(f"batch {batch_id}: {settled} billing rows, not {count}")
    conn.executemany(UPSERT, writes.counters)
