"""What a settlement or a resolution finds in the row it replaces, and what it adds to the
row's counters: one rule for each, so the backends cannot drift apart. A reservation
reclaimed at its bound is settled and flagged; a settlement arriving after the reclaim
replaces what the reclaim charged; an operator's resolution corrects a flagged row; a
batch's reservation becomes the rows of its billed lines; an object recorded twice keeps
its first owner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.core.errors import LedgerError, NoReservation
from proxy.core.models import Settlement, Usage
from proxy.ledger import codecs
from proxy.ledger.base import RECLAIMED, StoredObject
from proxy.ledger.codecs import NO_TOKENS, Deltas, settled, token_deltas, usage_of


def settled_already(state: str, error_code: str | None, resolved_at: float | None) -> bool:
    """Whether a settlement finds nothing to replace: the row is settled, and neither by a
    reclaim nor still unresolved (a retry whose first attempt committed unseen)."""
    return state != "reserved" and (error_code not in RECLAIMED or resolved_at is not None)


def settlement(
    request_id: str, found: Sequence[Any] | None, outcome: Settlement
) -> tuple[str, Deltas] | None:
    """(counters text, deltas) of settling the row read by `settling` (None: settled
    already, nothing to do). LedgerError if there is no such row."""
    if found is None:
        raise NoReservation(f"no reservation {request_id}")
    state, error_code, resolved_at, charged, reserved, counters_text, *usage = found
    if settled_already(state, error_code, resolved_at):
        return None
    # What the row holds: the reservation (nothing charged yet), or the bound a
    # reclaim charged before the answer came, which this settlement replaces.
    release = reserved if state == "reserved" else 0
    return counters_text, settled(outcome, release, charged, usage_of(usage))


def resolution(
    request_id: str, found: Sequence[Any] | None, cost_nanos: int
) -> tuple[int, str, Deltas]:
    """(cost charged before, counters text, deltas) of resolving the row read by
    `resolving` at `cost_nanos` (0: nothing was billed, so its usage is taken back too).
    LedgerError unless it is a settled flagged row."""
    if found is None:
        raise LedgerError(f"no request {request_id}")
    state, flagged, charged, counters_text, *usage = found
    if state != "settled":
        raise LedgerError(f"request {request_id} is still in flight: nothing to resolve yet")
    if not flagged:
        raise LedgerError(f"request {request_id} is not flagged: its cost is known")
    tokens = token_deltas(usage_of(usage), -1) if cost_nanos == 0 else NO_TOKENS
    return int(charged), counters_text, (cost_nanos - int(charged), 0, tokens)


def settling(request_id: str, batch: str | None) -> None:
    """LedgerError if the row `request_id` is a line of the batch reservation `batch` (read
    by `still_settling`; None: none) still being settled a chunk at a time: its counters
    move with the batch's in the settlement's last transaction, or a settlement replaces
    it (a ledger copied half-way)."""
    if batch is not None:
        raise LedgerError(
            f"request {request_id} is a line of batch reservation {batch}, still being "
            "settled: resolve it once the settlement has ended"
        )


def owned_already(obj: StoredObject, team: str) -> None:
    """An object recorded again (`team`: its first owner) is left as it was; LedgerError if
    another team claims it."""
    if team != obj.team:
        raise LedgerError(f"{obj.kind} {obj.id} belongs to another team")


@dataclass(frozen=True, slots=True)
class BatchWrites:
    """What settling a batch writes, in one transaction (see `batch`)."""

    billed: bool
    """Whether any line was billed."""
    reservation: tuple[Any, ...]
    """What the reservation's row becomes: the first billed line's (`bill_first` values) or,
    when no line was billed, settled at no cost (`settle_reserved` values)."""
    others: list[tuple[Any, ...]]
    """`bill` rows: the other billed lines, each with its batch's project."""
    counters: list[tuple[Any, ...]]
    """One row per counter touched, in lock order: its key, then its deltas."""

    @property
    def rows(self) -> int:
        return len(self.others) + 1


def batch(
    request_id: str, found: Sequence[Any] | None, lines: codecs.Billed, outcome: Settlement
) -> BatchWrites | None:
    """What settling the batch reservation read by `settling_batch` by its billed `lines`
    writes (None: it is no longer reserved, nothing to do). LedgerError if there is no such
    row."""
    if found is None:
        raise NoReservation(f"no reservation {request_id}")
    state, bound, text, batch_id, project, *usage = found
    if state != "reserved":
        return None
    counters = codecs.batch_settled(lines, text, int(bound), usage_of(usage))
    if not lines.rows:
        # Nothing billed: nothing charged, nothing used, whatever the outcome says.
        free = Settlement(
            outcome.finished_at, outcome.outcome, outcome.status, Usage(), 0,
            outcome.flagged, outcome.upstream_request_id, outcome.error_code,
            outcome.latency_ms, 0, outcome.response_id,
        )  # fmt: skip
        return BatchWrites(False, (*codecs.settlement_values(free), request_id), [], counters)
    first, *others = codecs.with_batch_id(lines.rows, batch_id)
    taken = [v for c, v in zip(codecs.BILLED_COLUMNS, first, strict=True) if c in TAKEN]
    # The first line's row is the reservation's, which keeps its project; the others are
    # billed to the same project.
    billed = [(*row, project) for row in others]
    return BatchWrites(True, (*taken, request_id), billed, counters)


TAKEN = frozenset(codecs.BILL_FIRST_COLUMNS)
