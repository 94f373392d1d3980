"""`tollgate ledger copy`: move a ledger's history to another backend, losing nothing.

Every row of `requests` (settled and in flight), every `budget_usage` counter
(team, user and organization, so budgets carry on where they were) and every
alert already sent (so no alert is sent twice) is copied as stored, in batches,
into one transaction on the target: it holds all of it or, on any error, none.
The live-process registry is not copied; a reservation copied in flight belongs
to a process the target never saw alive, so the first Tollgate that starts on
the target settles it at its bound (flagged `outcome_unknown`), as after a crash.

The target is brought to this Tollgate's schema first and must be empty: copy
refuses to merge two histories (run it again on a fresh database).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from proxy.core.errors import LedgerError
from proxy.ledger.postgres import PostgresLedger, cols
from proxy.ledger.sqlite import SqliteLedger

TABLES = ("requests", "budget_usage", "alerts_sent")
BATCH = 5000
COUNTED = "NOT (scope = 'organization' AND period = 'total' AND start = 0)"
"""Counters but the zero row migrations create, which an empty ledger holds."""


@dataclass(frozen=True, slots=True)
class Copied:
    """What a copy moved, as counted back on the target."""

    requests: int
    counters: int
    alerts: int
    cost_nanos: int


async def copy_ledger(
    source: SqliteLedger | PostgresLedger, target: SqliteLedger | PostgresLedger
) -> Copied:
    """Copy every row of `source` into the empty `target` (both open, at the same schema)."""
    if isinstance(target, PostgresLedger):
        async with target._connection() as conn, conn.transaction():
            await _refuse_non_empty(target.name, lambda sql: conn.fetchval(sql))
            await conn.execute("DELETE FROM budget_usage")
            for table in TABLES:
                async for names, batch in _batches(source, table):
                    await conn.copy_records_to_table(table, records=batch, columns=names)
        return await _counted(target)
    db = target.db
    await db.execute("BEGIN IMMEDIATE")
    try:

        async def scalar(sql: str) -> Any:
            async with db.execute(sql) as cursor:
                found = await cursor.fetchone()
            return found[0] if found else None

        await _refuse_non_empty(str(target.path), scalar)
        await db.execute("DELETE FROM budget_usage")
        for table in TABLES:
            async for names, batch in _batches(source, table):
                marks = ", ".join("?" * len(names))
                await db.executemany(f"INSERT INTO {table} ({cols(names)}) VALUES ({marks})", batch)
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")
    return await _counted(target)


async def _refuse_non_empty(name: str, scalar: Any) -> None:
    held = {
        "requests": await scalar("SELECT count(*) FROM requests"),
        "alerts": await scalar("SELECT count(*) FROM alerts_sent"),
        "counters": await scalar(f"SELECT count(*) FROM budget_usage WHERE {COUNTED}"),
    }
    if any(held.values()):
        found = ", ".join(f"{count} {what}" for what, count in held.items() if count)
        raise LedgerError(
            f"{name} is not empty ({found}): ledger copy does not merge histories; "
            "copy into a fresh database (or drop its Tollgate tables) and run it again"
        )


async def _batches(
    source: SqliteLedger | PostgresLedger, table: str
) -> AsyncIterator[tuple[list[str], list[tuple[Any, ...]]]]:
    """The rows of `table` in `source`, a batch at a time, with their column names."""
    if isinstance(source, PostgresLedger):
        async with (
            source._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            names: list[str] | None = None
            batch: list[tuple[Any, ...]] = []
            async for record in conn.cursor(f"SELECT * FROM {table}", prefetch=BATCH):
                names = names or list(record.keys())
                batch.append(tuple(record.values()))
                if len(batch) == BATCH:
                    yield names, batch
                    batch = []
            if names and batch:
                yield names, batch
        return
    async with source.db.execute(f"SELECT * FROM {table}") as cursor:
        names = [d[0] for d in cursor.description]
        while rows := await cursor.fetchmany(BATCH):
            yield names, [_typed(table, names, tuple(r)) for r in rows]


def _typed(table: str, names: list[str], row: tuple[Any, ...]) -> tuple[Any, ...]:
    # SQLite may hand back an integer from a REAL column; PostgreSQL's binary COPY wants floats.
    floats = {"started_at", "finished_at", "latency_ms", "start", "sent_at", "heartbeat_at"}
    return tuple(
        float(v) if n in floats and isinstance(v, int) else v
        for n, v in zip(names, row, strict=True)
    )


async def _counted(ledger: SqliteLedger | PostgresLedger) -> Copied:
    sql = [
        "SELECT count(*) FROM requests",
        f"SELECT count(*) FROM budget_usage WHERE {COUNTED}",
        "SELECT count(*) FROM alerts_sent",
        "SELECT coalesce(sum(cost_nanos), 0) FROM requests",
    ]
    if isinstance(ledger, PostgresLedger):
        async with ledger._connection() as conn:
            values = [int(await conn.fetchval(s)) for s in sql]
    else:
        values = []
        for s in sql:
            async with ledger.db.execute(s) as cursor:
                found = await cursor.fetchone()
            values.append(int(found[0]) if found else 0)
    return Copied(*values)


async def copy_between(source_url: str, target_url: str) -> Copied:
    """Migrate the ledger at `target_url`, then copy the one at `source_url` into it."""
    from proxy.ledger import migrate_ledger, open_ledger

    if source_url == target_url:
        raise LedgerError("ledger copy: --from and --to name the same ledger")
    await migrate_ledger(target_url)
    source = await open_ledger(source_url)
    try:
        target = await open_ledger(target_url)
        try:
            assert isinstance(source, SqliteLedger | PostgresLedger)
            assert isinstance(target, SqliteLedger | PostgresLedger)
            return await copy_ledger(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
