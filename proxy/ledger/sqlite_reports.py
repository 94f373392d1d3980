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

from proxy.errors import LedgerError
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
        # Its own read-only connection: a long read must not hold the writers' connection,
        # and WAL gives it one consistent snapshot while requests keep being written.
        try:
            db = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        try:
            async with db.execute(
                "SELECT * FROM requests WHERE started_at >= ? AND started_at < ? "
                "ORDER BY started_at, id",
                (start, end),
            ) as cursor:
                names = [d[0] for d in cursor.description]
                while batch := await cursor.fetchmany(EXPORT_BATCH):
                    for row in batch:
                        yield dict(zip(names, row, strict=True))
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger read failed: {exc}") from exc
        finally:
            await db.close()
