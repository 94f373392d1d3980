"""The ledger's rate-limit counts (`rate_counts`, schema version 7): what each scope used
of each limit in each window, read and added to in the transaction that reserves a
request (see `proxy.core.rates`), so that the counts of every worker and replica are one.

A team's count against an organization limit that teams have shares of keeps the team's
promise beside it (`promise`), and the limit's key (`grp`). What the other teams used of
their promises is summed over the teams that hold a share in the configuration in force,
each count capped at its promise now (`Promise.others`): one primary-key search each.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from proxy.core.rates import Add, Counts, Plan, Promise, Slot
from proxy.ledger.dialect import POSTGRES, SQLITE

_PROMISE = (
    "SELECT COALESCE(SUM(CASE WHEN r.used < j.promise THEN r.used ELSE j.promise END), 0) "
    "FROM (SELECT json_extract(value, '$[0]') AS slot, json_extract(value, '$[1]') AS promise "
    "FROM json_each(?)) AS j JOIN rate_counts AS r ON r.slot = j.slot "
    "AND r.start > ? AND r.start < ?"
)
_PG_PROMISE = (
    "SELECT COALESCE(SUM(LEAST(r.used, k.promise)), 0) FROM unnest($1::text[], $2::bigint[]) "
    "AS k(slot, promise) JOIN rate_counts AS r ON r.slot = k.slot "
    "AND r.start > $3 AND r.start < $4"
)
_ADD = (
    "INSERT INTO rate_counts (slot, start, used, team, grp, promise) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (slot, start) DO UPDATE "
    "SET used = rate_counts.used + excluded.used, promise = excluded.promise"
)
_FORGET = "DELETE FROM rate_counts WHERE start < ?"
_PG_READ = (
    "SELECT DISTINCT r.slot, r.start, r.used FROM unnest($1::text[], $2::float8[], "
    "$3::float8[]) AS k(slot, low, high) JOIN rate_counts AS r ON r.slot = k.slot "
    "AND r.start > k.low AND r.start < k.high"
)
# Every limit's count at once (the rate gauges): one parameter, however many slots, each
# found through the primary key.
_SQLITE_WINDOWS = (
    "SELECT DISTINCT r.slot, r.start, r.used FROM json_each(?) AS j JOIN rate_counts AS r "
    "ON r.slot = json_extract(j.value, '$[0]') AND r.start > json_extract(j.value, '$[1]') "
    "AND r.start < json_extract(j.value, '$[2]')"
)


@functools.lru_cache(maxsize=32)
def _sqlite_read(count: int) -> str:
    one = "(slot = ? AND start > ? AND start < ?)"
    return f"SELECT slot, start, used FROM rate_counts WHERE {' OR '.join([one] * count)}"


def _ranges(slots: Sequence[Slot]) -> list[tuple[str, float, float]]:
    return [(s.key, *s.bounds()) for s in slots]


def _add_values(add: Add) -> tuple[Any, ...]:
    return (add.slot.key, add.slot.start, add.amount, add.team, add.group, add.promise)


def _used(slots: Sequence[Slot], rows: Sequence[Sequence[Any]]) -> dict[Slot, int]:
    """Each slot's count: the sum of the rows of its key within its `Slot.bounds` (its own
    row, and those of other time zones' days that overlap its day)."""
    by_key: dict[str, list[tuple[float, int]]] = {}
    for key, start, used in rows:
        by_key.setdefault(key, []).append((float(start), int(used)))
    found = {}
    for slot in slots:
        low, high = slot.bounds()
        total = sum(used for start, used in by_key.get(slot.key, ()) if low < start < high)
        if total:
            found[slot] = total
    return found


def _counts(
    slots: Sequence[Slot], rows: Sequence[Sequence[Any]], kept: dict[Promise, int]
) -> Counts:
    return Counts(_used(slots, rows), kept)


# -- SQLite (inside a `BEGIN IMMEDIATE` transaction, or a plain read) -----------------


def read_sqlite(conn: sqlite3.Connection, plan: Plan) -> Counts:
    slots = plan.slots
    values = [v for r in _ranges(slots) for v in r]
    rows = conn.execute(_sqlite_read(len(slots)), values).fetchall() if slots else []
    kept = {
        p: int(conn.execute(_PROMISE, (json.dumps(p.others), *p.window)).fetchone()[0])
        for p in plan.promises
    }
    return _counts(slots, rows, kept)


def windows_sqlite(conn: sqlite3.Connection, slots: Sequence[Slot]) -> dict[Slot, int]:
    rows = conn.execute(_SQLITE_WINDOWS, (json.dumps(_ranges(slots)),))
    return _used(slots, rows.fetchall())


def add_sqlite(conn: sqlite3.Connection, adds: Sequence[Add]) -> None:
    conn.executemany(_ADD, [_add_values(a) for a in adds])


def forget_sqlite(conn: sqlite3.Connection, before: float) -> int:
    return conn.execute(_FORGET, (before,)).rowcount


# -- PostgreSQL (asyncpg; inside the reservation's transaction, under its lock) --------

PG_ADD = POSTGRES.text(_ADD)
PG_FORGET = POSTGRES.text(_FORGET)
assert SQLITE.text(_ADD) == _ADD


async def read_postgres(conn: Any, plan: Plan) -> Counts:
    slots = plan.slots
    rows = []
    if slots:
        found = await conn.fetch(_PG_READ, *map(list, zip(*_ranges(slots), strict=True)))
        rows = [tuple(r) for r in found]
    kept = {
        p: int(
            await conn.fetchval(
                _PG_PROMISE, [k for k, _ in p.others], [n for _, n in p.others], *p.window
            )
        )
        for p in plan.promises
    }
    return _counts(slots, rows, kept)


async def windows_postgres(conn: Any, slots: Sequence[Slot]) -> dict[Slot, int]:
    if not slots:
        return {}
    found = await conn.fetch(_PG_READ, *map(list, zip(*_ranges(slots), strict=True)))
    return _used(slots, [tuple(r) for r in found])


async def add_postgres(conn: Any, adds: Sequence[Add]) -> None:
    await conn.executemany(PG_ADD, [_add_values(a) for a in adds])
