"""The ledger: one row per request, the source of truth for spend.

Rows are written twice for forwarded requests: `reserve` when the estimate is
taken (the row holds the reservation) and `settle` when the answer is metered.
Rejections and client errors are written once, with `record`. Every backend
keeps the same interface; nothing above it knows which one it talks to.
"""

from __future__ import annotations

from proxy.errors import LedgerError
from proxy.ledger.base import Entry, Ledger, Owner, Reservation, Row, Settlement
from proxy.ledger.sqlite import SqliteLedger

__all__ = [
    "Entry",
    "Ledger",
    "Owner",
    "Reservation",
    "Row",
    "Settlement",
    "SqliteLedger",
    "open_ledger",
]


async def open_ledger(url: str) -> Ledger:
    """Open the ledger named by `url` (`sqlite:///path.db`) and bring its schema up to date."""
    if url.startswith("sqlite:///"):
        ledger = SqliteLedger(url.removeprefix("sqlite:///"))
        await ledger.open()
        return ledger
    raise LedgerError(f"unsupported ledger URL {url!r}: use sqlite:///path.db")
