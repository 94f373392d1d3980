"""The ledger: one row per request, the source of truth for spend.

Rows are written twice for forwarded requests: `reserve` when the estimate is
taken (the row holds the reservation) and `settle` when the answer is metered.
Rejections and client errors are written once, with `record`. Every backend
keeps the same interface; nothing above it knows which one it talks to.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from proxy.core.errors import LedgerError
from proxy.core.models import Entry, Settlement
from proxy.ledger.base import Ledger, Owner, Reservation, Row
from proxy.ledger.migrations import SCHEMA_VERSION
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.retry import settle_patiently
from proxy.ledger.sqlite import SqliteLedger

__all__ = [
    "Entry",
    "Ledger",
    "Owner",
    "PostgresLedger",
    "Reservation",
    "Row",
    "Settlement",
    "SqliteLedger",
    "migrate_ledger",
    "open_ledger",
    "settle_patiently",
]


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


async def open_ledger(url: str) -> Ledger:
    """Open the ledger named by `url`: `sqlite:///path.db` (its schema brought up to date)
    or `postgresql://…` (initialised when empty; a schema behind is refused until
    `tollgate ledger migrate` brings it up to date)."""
    if url.startswith("sqlite:///"):
        ledger = SqliteLedger(url.removeprefix("sqlite:///"))
        await ledger.open()
        return ledger
    if url.startswith(POSTGRES_SCHEMES):
        shared = PostgresLedger(url)
        await shared.open()
        return shared
    raise LedgerError(
        f"unsupported ledger URL {url!r}: use sqlite:///path.db or postgresql://host/database"
    )


async def migrate_ledger(url: str) -> tuple[int, int]:
    """Bring the schema of the ledger at `url` up to date; (version before, version after)."""
    if url.startswith(POSTGRES_SCHEMES):
        shared = PostgresLedger(url)
        await shared.connect()
        try:
            return await shared.migrate()
        finally:
            await shared.close()
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        before = _sqlite_version(Path(path))
        ledger = SqliteLedger(path)
        await ledger.open()  # the embedded ledger migrates itself when it opens
        await ledger.close()
        return before, SCHEMA_VERSION
    raise LedgerError(f"unsupported ledger URL {url!r}")


def _sqlite_version(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            found = db.execute("SELECT max(version) FROM schema_version").fetchone()
        except sqlite3.Error:
            return 0
    return int(found[0] or 0)
