"""Finance reads of the SQLite ledger: grouped sums for reports, and the streamed audit export.

The grouping happens in SQL (one pass over the period's rows, `GROUP BY` the asked
columns), so a report over a million rows returns a few hundred groups. Days and
months are local to the configured timezone, which SQLite knows nothing of: the
caller asks for fixed-width UTC buckets (`bucket_seconds`, a divisor of a day chosen
so that every local midnight in the period falls on a bucket edge) and folds the
buckets into local days in Python. The same SQL runs on PostgreSQL with `floor()`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.core.errors import LedgerError
from proxy.ledger.base import Aggregate, GroupColumn
from proxy.ledger.summaries import EXPORT_BATCH, GROUP_SQL, aggregates, summary_sql


class SqliteReports:
    """The report half of `SqliteLedger` (which provides `db` and `path`)."""

    path: Path

    @property
    def db(self) -> aiosqlite.Connection:
        raise NotImplementedError

    async def summarize(
        self,
        start: float,
        end: float,
        by: Sequence[GroupColumn],
        bucket_seconds: int | None = None,
    ) -> list[Aggregate]:
        keys = [GROUP_SQL[c] for c in by]
        if bucket_seconds is not None:
            # started_at is positive: CAST truncates, which is floor().
            keys.append(f"CAST(started_at / {int(bucket_seconds)} AS INTEGER)")
        sql = summary_sql(keys, "?", "?")
        try:
            async with self.db.execute(sql, (start, end)) as cursor:
                found = await cursor.fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc
        return aggregates(found, len(keys))

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
            batch = await _fetch(db, _EXPORT_FIRST, (start, end, EXPORT_BATCH))
            while batch:
                for row in batch:
                    yield row
                if len(batch) < EXPORT_BATCH:
                    break
                at, after = batch[-1]["started_at"], batch[-1]["id"]
                batch = await _fetch(db, _EXPORT_NEXT, (at, at, after, end, EXPORT_BATCH))
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc
        finally:
            await db.close()


_EXPORT_FIRST = (
    "SELECT * FROM requests WHERE started_at >= ? AND started_at < ? "
    "ORDER BY started_at, id LIMIT ?"
)
_EXPORT_NEXT = (
    "SELECT * FROM requests WHERE started_at >= ? AND (started_at > ? OR id > ?) "
    "AND started_at < ? ORDER BY started_at, id LIMIT ?"
)


async def _fetch(db: aiosqlite.Connection, sql: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    async with db.execute(sql, values) as cursor:
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]
