"""Finance reads of the PostgreSQL ledger: the same grouped sums and audit export as SQLite's.

The SQL is `sqlite_reports`' with PostgreSQL's spelling: `"user"` is quoted (a
reserved word), buckets use `floor()` and sums of BIGINT come back as NUMERIC,
which are turned into ints, so a report reads the same on either backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from proxy.ledger.base import Aggregate, GroupColumn
from proxy.ledger.summaries import EXPORT_BATCH, GROUP_SQL, aggregates, summary_sql

PG_GROUP_SQL: dict[GroupColumn, str] = {**GROUP_SQL, "user": '"user"'}


class PostgresReports:
    """The report half of `PostgresLedger` (which provides `_connection`)."""

    def _connection(self) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def summarize(
        self,
        start: float,
        end: float,
        by: Sequence[GroupColumn],
        bucket_seconds: int | None = None,
    ) -> list[Aggregate]:
        keys = [PG_GROUP_SQL[c] for c in by]
        if bucket_seconds is not None:
            keys.append(f"floor(started_at / {int(bucket_seconds)})::bigint")
        sql = summary_sql(keys, "$1", "$2")
        async with self._connection() as conn:
            found = await conn.fetch(sql, float(start), float(end))
        return aggregates(found, len(keys))

    async def export(self, start: float, end: float) -> AsyncGenerator[dict[str, Any], None]:
        # One snapshot for the whole export, read through a server-side cursor in batches.
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            cursor = conn.cursor(
                "SELECT * FROM requests WHERE started_at >= $1 AND started_at < $2 "
                'ORDER BY started_at, id COLLATE "C"',
                float(start),
                float(end),
                prefetch=EXPORT_BATCH,
            )
            async for record in cursor:
                yield dict(record.items())
