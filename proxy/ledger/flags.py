"""What both backends write and check for flagged rows: a reclaim, a late settlement, a
resolution. One text for each, so the backends cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from proxy.core.errors import LedgerError
from proxy.core.models import Usage
from proxy.ledger.base import OUTCOME_UNKNOWN, RECLAIMED, Flagged

FLAGGED_COLUMNS = ", ".join(f.name for f in fields(Flagged))
"""The requests columns a `Flagged` is read from, in its fields' order."""

RECLAIM_SET = (
    "state = 'settled', cost_nanos = reserved_nanos, reserved_nanos = 0, "
    f"outcome = 'upstream_error', error_code = '{OUTCOME_UNKNOWN}', flagged = 1"
)
"""What a reclaim sets on a reservation (its `finished_at` aside): charged its bound."""


def settled_already(state: str, error_code: str | None, resolved_at: float | None) -> bool:
    """Whether a settlement finds nothing to replace: the row is settled, and neither by a
    reclaim nor still unresolved (a retry whose first attempt committed unseen)."""
    return state != "reserved" and (error_code not in RECLAIMED or resolved_at is not None)


def resolvable(request_id: str, found: Sequence[Any] | None) -> tuple[int, str, Usage]:
    """(cost charged, counters text, usage) of the row `resolve` read (state, flagged, cost,
    counters, usage columns…), once it is known to be a settled flagged row."""
    if found is None:
        raise LedgerError(f"no request {request_id}")
    state, flagged, charged, counters_text, *usage = found
    if state != "settled":
        raise LedgerError(f"request {request_id} is still in flight: nothing to resolve yet")
    if not flagged:
        raise LedgerError(f"request {request_id} is not flagged: its cost is known")
    return int(charged), counters_text, Usage(*usage)
