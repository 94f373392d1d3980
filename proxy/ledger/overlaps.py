"""What a counter holds, read with the counters of other time zones that overlap it.

Counters are kept per window, each named by its start, and windows are computed in the
configured `timezone`. When the configuration moves to another zone (a reload, a restart),
the current period's window gets a new start: a counter of its own would hold nothing of
the spend already counted in the period, under the former zone, and let a team spend its
limit again. A decision therefore reads, for each counter, every row of the same scope and
period whose window overlaps its own (`Counter.since`, `Counter.until`): in a ledger that
only ever saw one zone, that is its own row alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from proxy.core.models import Counter, Totals

NOTHING = Totals()
"""A counter without a row (a frozen value: one serves them all)."""
HALF_SECOND = 0.5
"""Window starts are whole seconds: a range this wide around one holds it alone."""


def bounds(c: Counter) -> tuple[float, float]:
    """The starts, both excluded, of the rows that count toward `c`."""
    if c.since is None or c.until is None:
        return c.start - HALF_SECOND, c.start + HALF_SECOND
    return c.since, c.until


def totals_of(counters: Sequence[Counter], found: Iterable[Sequence[Any]]) -> dict[Counter, Totals]:
    """The totals of `counters` from the `budget_usage` rows found (key, then totals
    columns; a row found twice counts once, as its last copy: a caller that reads a row
    both in a snapshot and locked puts the locked one last): each counter's sum of the
    rows in its `bounds`; a counter without any holds nothing yet."""
    rows = {tuple(row[:5]): row[5:] for row in found}
    by_prefix: dict[tuple[Any, ...], list[tuple[float, Sequence[int]]]] = {}
    for key, values in rows.items():
        by_prefix.setdefault(key[:4], []).append((float(key[4]), values))
    totals: dict[Counter, Totals] = {}
    for c in counters:
        candidates = by_prefix.get((c.scope, c.team, c.user, c.period))
        if candidates is None:
            totals[c] = NOTHING
            continue
        low, high = bounds(c)
        summed = [values for start, values in candidates if low < start < high]
        if len(summed) == 1:  # a ledger that only ever saw one zone: the counter's own row
            totals[c] = Totals(*summed[0])
        else:
            totals[c] = Totals(*map(sum, zip(*summed, strict=True))) if summed else NOTHING
    return totals
