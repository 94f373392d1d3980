"""How the PostgreSQL ledger writes counters so that reservations are atomic across replicas.

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
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from proxy.core.models import Counter, Totals
from proxy.ledger import codecs, overlaps
from proxy.ledger.statements import KEYS, TOTALS, add_to_counters


async def lock_and_read(conn: Any, counters: Sequence[Counter]) -> dict[Counter, Totals]:
    """`lock_counters`, then `read_totals(counters, lock=True)`, in one statement (one round
    trip less while the first lock is held): an upsert of the organization's total row,
    then of each counter's row in lock order, returning what each holds. An upsert that
    finds a row locks its latest version, whoever committed it (unlike a read, which would
    see the statement's snapshot, taken before the lock was had); a counter without a row
    gets one at zero, which the reservation writes anyway.

    The same statement reads the rows of other time zones' windows that overlap each
    counter's (`proxy.ledger.overlaps`), in its snapshot: a round trip more under the first
    lock would cost a third of the reservations per second. Once every process runs the
    new zone, only settlements of earlier reservations write those rows, which take back
    at least what they add, so a snapshot older than the lock counts more, never less."""
    first = codecs.counter_key(codecs.ORGANIZATION_TOTAL)
    wanted = [first, *sorted({codecs.counter_key(c) for c in counters} - {first})]
    reaching = [c for c in counters if c.since is not None]
    rows = await conn.fetch(LOCK_READ_SQL, *key_arrays(wanted), *range_arrays(reaching))
    # The upserted rows (fresh: 1) last, so that they win over the snapshot's copies.
    found = [tuple(r)[1:] for r in sorted(rows, key=lambda r: r[0])]
    return overlaps.totals_of(counters, found)


async def lock_and_fetch(conn: Any, select: str, *args: Any) -> Any:
    """`lock_counters`, then the one row of `select` (a `SELECT … FOR UPDATE` of a request
    row, parameters `args`), in one statement: the upsert of the organization's total row
    runs first (an uncorrelated `EXISTS` is a one-time filter, evaluated before the scan),
    and `FOR UPDATE` returns the row's latest version even if it changed while the lock
    was awaited."""
    sql = _locked(select, len(args))
    return await conn.fetchrow(sql, *args, *codecs.counter_key(codecs.ORGANIZATION_TOTAL))


@functools.lru_cache(maxsize=16)
def _locked(select: str, count: int) -> str:
    assert select.endswith(" FOR UPDATE")
    keys = ", ".join(f"${i}" for i in range(count + 1, count + 6))
    return (
        f"WITH first_lock AS (INSERT INTO budget_usage ({KEYS}) VALUES ({keys}) "
        f"ON CONFLICT ({KEYS}) DO UPDATE SET spent_nanos = budget_usage.spent_nanos "
        f"RETURNING 1) {select.removesuffix(' FOR UPDATE')} "
        "AND EXISTS (SELECT 1 FROM first_lock) FOR UPDATE"
    )


async def lock_counters(conn: Any) -> None:
    """Take the first lock of every counter writer (see the module's docstring)."""
    await conn.execute(LOCK_SQL, *codecs.counter_key(codecs.ORGANIZATION_TOTAL))


LOCK_SQL = (
    f"INSERT INTO budget_usage ({KEYS}) VALUES ($1, $2, $3, $4, $5) "
    f"ON CONFLICT ({KEYS}) DO UPDATE SET spent_nanos = budget_usage.spent_nanos"
)
UNNEST_KEYS = "unnest({}::text[], {}::text[], {}::text[], {}::text[], {}::float8[])"
"""Counters' keys from five arrays, a column each (see `key_arrays`)."""
UNNEST_RANGES = (
    "unnest({}::text[], {}::text[], {}::text[], {}::text[], {}::float8[], {}::float8[]) "
    'AS k(s, t, u, p, low, high) ON scope = k.s AND team = k.t AND "user" = k.u '
    "AND period = k.p AND start > k.low AND start < k.high"
)
"""The rows in each counter's `overlaps.bounds`, from six arrays (see `range_arrays`)."""
LOCK_READ_SQL = (
    f"WITH locked AS (INSERT INTO budget_usage ({KEYS}) SELECT s, t, u, p, st FROM "
    f"{UNNEST_KEYS.format('$1', '$2', '$3', '$4', '$5')} WITH ORDINALITY AS k(s, t, u, p, st, i) "
    f"ORDER BY i ON CONFLICT ({KEYS}) DO UPDATE SET spent_nanos = budget_usage.spent_nanos "
    f"RETURNING {KEYS}, {TOTALS}) SELECT 1 AS fresh, * FROM locked UNION ALL "
    f"SELECT 0, {KEYS}, {TOTALS} FROM budget_usage JOIN "
    + UNNEST_RANGES.format("$6", "$7", "$8", "$9", "$10", "$11")
)
"""Upsert the counters' rows in the order given (the caller's lock order), returning each
(fresh 1), and the rows of other zones' windows that overlap them (fresh 0)."""
READ_SQL = (
    f"SELECT {KEYS}, {TOTALS} FROM budget_usage JOIN "
    + UNNEST_RANGES.format("$1", "$2", "$3", "$4", "$5", "$6")
    + ' ORDER BY scope, team COLLATE "C", "user" COLLATE "C", period, start'
)
"""The rows in each counter's `overlaps.bounds`, in lock order."""


ADD_SQL = add_to_counters(
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], "
    + ", ".join(f"${i}::bigint[]" for i in range(6, 6 + len(codecs.TOTALS_COLUMNS)))
    + ")"
)
"""Add to each counter of five key arrays (see `key_arrays`) the deltas of as many arrays,
one per `TOTALS_COLUMNS` column."""


async def read_totals(
    conn: Any, counters: Sequence[Counter], *, lock: bool
) -> dict[Counter, Totals]:
    """The totals of `counters`; with `lock`, their rows that exist locked, in lock order."""
    if not counters:
        return {}
    found = await _in_bounds(conn, counters, " FOR UPDATE OF budget_usage" if lock else "")
    return overlaps.totals_of(counters, found)


async def _in_bounds(conn: Any, counters: Sequence[Counter], lock: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await conn.fetch(READ_SQL + lock, *range_arrays(counters))]


def range_arrays(counters: Sequence[Counter]) -> list[list[Any]]:
    """Counters' key prefixes and `overlaps.bounds`, column by column (`UNNEST_RANGES`)."""
    ranges = sorted({(*codecs.counter_key(c)[:4], *overlaps.bounds(c)) for c in counters})
    columns: list[list[Any]] = [[r[i] for r in ranges] for i in range(4)]
    return columns + [[float(r[i]) for r in ranges] for i in (4, 5)]


def key_arrays(keys: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Counters' keys column by column, as `UNNEST_KEYS` reads them."""
    return [[k[i] for k in keys] for i in range(4)] + [[float(k[4]) for k in keys]]


async def write_and_add(
    conn: Any,
    sql: str,
    args: Sequence[Any],
    counters_text: str,
    deltas: codecs.Deltas,
    spent_before: int = 0,
    *,
    rows: Sequence[tuple[Any, ...]] | None = None,
) -> None:
    """`sql` (with `args`) and the counters' additions in one statement, one round trip:
    the request row's write as a data-modifying `WITH`, which PostgreSQL always runs, then
    the counters' upsert, row by row in lock order. The organization's total row, locked
    first, keeps every writer in line, so the order of the two parts within it does not
    matter. `spent_before`: what the row charged before (see `codecs.counter_rows`);
    `rows`: those counter rows of `deltas`, when worked out already (`codecs.written`)."""
    spent, held, tokens = deltas
    if codecs.shared(counters_text):
        # A batch's users' shares: each counter adds its own deltas (`codecs.counter_rows`),
        # worked out on a thread: 100,000 rows for 50,000 users under a daily per-user
        # budget, which kept the event loop from every other request of the process.
        await conn.execute(sql, *args)
        added = await asyncio.to_thread(_shared_arrays, counters_text, deltas, spent_before, rows)
        await add_counters(conn, added)
        return
    await conn.execute(
        _with_counters(sql, len(args), len(tokens)),
        *args,
        *key_arrays(codecs.written_keys(counters_text)),
        spent,
        held,
        *tokens,
    )


ADD_AT_ONCE = 10_000
"""Counters added by one statement at most: asyncpg encodes a statement's arguments on the
event loop, which the 100,000 counters of a batch naming 50,000 users kept a quarter of a
second in one statement."""


async def add_counters(conn: Any, added: Sequence[list[Any]]) -> None:
    """Add to counters (`added_arrays`), `ADD_AT_ONCE` a statement, in their order (the lock
    order, as they come), so that the event loop turns between statements."""
    for at in range(0, len(added[0]), ADD_AT_ONCE):
        await conn.execute(ADD_SQL, *(column[at : at + ADD_AT_ONCE] for column in added))


def added_arrays(rows: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Counter rows (a key, then deltas in `TOTALS_COLUMNS` order) as `ADD_SQL`'s arrays."""
    deltas = [list(c) for c in list(zip(*rows, strict=True))[5:]]
    return [*key_arrays([r[:5] for r in rows]), *deltas]


def _shared_arrays(
    text: str, deltas: codecs.Deltas, spent_before: int, rows: Sequence[tuple[Any, ...]] | None
) -> list[list[Any]]:
    """`added_arrays` of the counter rows of a shared counters `text` (`rows`, when worked
    out already)."""
    return added_arrays(codecs.counter_rows(text, deltas, spent_before) if rows is None else rows)


@functools.lru_cache(maxsize=64)
def _with_counters(sql: str, count: int, tokens: int) -> str:
    """`sql`, whose parameters are the first `count`, then the counters' upsert (see
    `write_and_add`)."""
    keys = UNNEST_KEYS.format(*(f"${i}" for i in range(count + 1, count + 6)))
    values = ", ".join(f"${i}::bigint" for i in range(count + 6, count + 8 + tokens))
    source = f"SELECT s, t, u, p, st, {values} FROM {keys} AS k(s, t, u, p, st)"
    return f"WITH written AS ({sql}) {add_to_counters(source)}"
