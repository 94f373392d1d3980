"""The embedded ledger: one SQLite file in WAL mode, shared by every worker on a machine."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from proxy.errors import LedgerError
from proxy.ledger.base import Entry, Row, Settlement
from proxy.models import Usage

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id                        TEXT PRIMARY KEY,
    upstream_request_id       TEXT,
    started_at                REAL NOT NULL,
    finished_at               REAL,
    team                      TEXT,
    cost_center               TEXT,
    key_id                    TEXT,
    user                      TEXT,
    endpoint                  TEXT,
    model_requested           TEXT,
    model                     TEXT,
    quality_requested         TEXT,
    quality                   TEXT,
    size_requested            TEXT,
    size                      TEXT,
    n_requested               INTEGER,
    n                         INTEGER,
    stream                    INTEGER NOT NULL DEFAULT 0,
    state                     TEXT NOT NULL,          -- reserved | settled
    outcome                   TEXT,
    status                    INTEGER,
    error_code                TEXT,
    downgrades                TEXT NOT NULL DEFAULT '',
    text_input_tokens         INTEGER NOT NULL DEFAULT 0,
    cached_text_input_tokens  INTEGER NOT NULL DEFAULT 0,
    image_input_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_image_input_tokens INTEGER NOT NULL DEFAULT 0,
    image_output_tokens       INTEGER NOT NULL DEFAULT 0,
    text_output_tokens        INTEGER NOT NULL DEFAULT 0,
    images                    INTEGER NOT NULL DEFAULT 0,
    estimated_nanos           INTEGER NOT NULL DEFAULT 0,
    reserved_nanos            INTEGER NOT NULL DEFAULT 0,  -- held while in flight, 0 once settled
    cost_nanos                INTEGER NOT NULL DEFAULT 0,
    flagged                   INTEGER NOT NULL DEFAULT 0,  -- charged without usage: reconcile
    latency_ms                REAL
);
CREATE INDEX IF NOT EXISTS requests_started ON requests (started_at);
CREATE INDEX IF NOT EXISTS requests_team_started ON requests (team, started_at);
CREATE INDEX IF NOT EXISTS requests_reserved ON requests (state) WHERE state = 'reserved';
"""

ENTRY_COLUMNS = (
    "id",
    "started_at",
    "endpoint",
    "team",
    "cost_center",
    "key_id",
    "user",
    "model_requested",
    "model",
    "quality_requested",
    "quality",
    "size_requested",
    "size",
    "n_requested",
    "n",
    "stream",
    "estimated_nanos",
    "downgrades",
)
SETTLEMENT_COLUMNS = (
    "finished_at",
    "outcome",
    "status",
    "text_input_tokens",
    "cached_text_input_tokens",
    "image_input_tokens",
    "cached_image_input_tokens",
    "image_output_tokens",
    "text_output_tokens",
    "images",
    "cost_nanos",
    "flagged",
    "upstream_request_id",
    "error_code",
    "latency_ms",
)


def _entry_values(entry: Entry) -> tuple[Any, ...]:
    return tuple(getattr(entry, c) for c in ENTRY_COLUMNS)


def _settlement_values(s: Settlement) -> tuple[Any, ...]:
    u = s.usage
    return (
        s.finished_at,
        s.outcome,
        s.status,
        u.text_input,
        u.cached_text_input,
        u.image_input,
        u.cached_image_input,
        u.image_output,
        u.text_output,
        u.images,
        s.cost_nanos,
        int(s.flagged),
        s.upstream_request_id,
        s.error_code,
        s.latency_ms,
    )


class SqliteLedger:
    """The Ledger on one SQLite file (WAL: readers never block the writer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.executescript(SCHEMA)
            async with db.execute("SELECT version FROM schema_version") as cursor:
                found = await cursor.fetchone()
            if found is None:
                await db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif found[0] > SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.path}: ledger schema version {found[0]} is newer than this "
                    f"Tollgate ({SCHEMA_VERSION}); upgrade Tollgate"
                )
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open ledger {self.path}: {exc}") from exc
        self._db = db

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise LedgerError("ledger is not open")
        return self._db

    async def _write(self, sql: str, values: Sequence[Any]) -> None:
        try:
            await self.db.execute(sql, values)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger write failed: {exc}") from exc

    async def reserve(self, entry: Entry) -> None:
        columns = (*ENTRY_COLUMNS, "state", "reserved_nanos")
        await self._write(
            f"INSERT INTO requests ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            (*_entry_values(entry), "reserved", entry.estimated_nanos),
        )

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        assignments = ", ".join(f"{c} = ?" for c in SETTLEMENT_COLUMNS)
        await self._write(
            f"UPDATE requests SET {assignments}, state = 'settled', reserved_nanos = 0 "
            "WHERE id = ?",
            (*_settlement_values(settlement), request_id),
        )

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        columns = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
        await self._write(
            f"INSERT INTO requests ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            (*_entry_values(entry), *_settlement_values(settlement), "settled"),
        )

    async def reclaim(self, started_before: float, now: float) -> int:
        try:
            cursor = await self.db.execute(
                "UPDATE requests SET state = 'settled', reserved_nanos = 0, "
                "outcome = 'upstream_error', error_code = 'abandoned', flagged = 1, "
                "finished_at = ? WHERE state = 'reserved' AND started_at < ?",
                (now, started_before),
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger write failed: {exc}") from exc
        return cursor.rowcount

    async def rows(self, since: float = 0.0) -> list[Row]:
        columns = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
        async with self.db.execute(
            f"SELECT {', '.join(columns)} FROM requests WHERE started_at >= ? ORDER BY started_at",
            (since,),
        ) as cursor:
            found = await cursor.fetchall()
        return [_row(tuple(r)) for r in found]

    async def ping(self) -> None:
        try:
            await self.db.execute("SELECT 1")
        except (sqlite3.Error, ValueError) as exc:
            raise LedgerError(f"ledger unreachable: {exc}") from exc

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None


def _row(values: tuple[Any, ...]) -> Row:
    e = dict(zip(ENTRY_COLUMNS, values[: len(ENTRY_COLUMNS)], strict=True))
    s = dict(zip(SETTLEMENT_COLUMNS, values[len(ENTRY_COLUMNS) : -1], strict=True))
    e["stream"] = bool(e["stream"])
    entry = Entry(**e)
    if values[-1] == "reserved":
        return Row(entry, None)
    usage = Usage(
        text_input=s["text_input_tokens"],
        cached_text_input=s["cached_text_input_tokens"],
        image_input=s["image_input_tokens"],
        cached_image_input=s["cached_image_input_tokens"],
        image_output=s["image_output_tokens"],
        text_output=s["text_output_tokens"],
        images=s["images"],
    )
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
