"""Flagged rows: requests whose true cost Tollgate could not know, and their resolution.

A request is flagged when it was charged without a metered usage: its bound after a
crash, a timeout or a reset once it was sent (`outcome_unknown`, `upstream_timeout`,
`upstream_unavailable`, `deadline_exceeded`), a broken or usage-less answer, or a
per-image price. The operator compares them with OpenAI's Costs API (`tollgate
reconcile`), then sets the true cost with `tollgate ledger resolve`; the counters move
by the difference and the row stays flagged, with when and why it was resolved.

    rows = await flagged_rows(ledger_url, first, last)
    before = await resolve(ledger_url, request_id, cost_nanos, note, now)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from proxy.core.errors import InvalidRequest
from proxy.core.models import usd_text
from proxy.core.pricing import to_nanos
from proxy.finance.costs_api import midnight
from proxy.finance.reports import aligned
from proxy.ledger import open_ledger, reading_ledger
from proxy.ledger.base import Flagged

MOST_RESOLVED_USD = Decimal(1_000_000_000)
"""The most one request is resolved at: no request costs near it (a batch's whole bound
included), and the ledger's 64-bit columns hold it in nano-dollars (2**63 is $9.2 billion)."""


def parse_usd(text: str) -> int:
    """A cost in USD as nano-dollars (rounded up, as every charge is)."""
    wrong = InvalidRequest(f"{text!r} is not an amount in USD, e.g. 0.0196.", param="cost")
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise wrong from exc
    if not value.is_finite() or value < 0:
        raise wrong
    if value > MOST_RESOLVED_USD:
        raise InvalidRequest(
            f"{text!r} is more than ${MOST_RESOLVED_USD:,} for one request: the cost is in "
            "USD, e.g. 0.0196.",
            param="cost",
        )
    return to_nanos(value)


async def flagged_rows(
    ledger_url: str, first: date | None, last: date | None, *, unresolved: bool = False
) -> list[Flagged]:
    """The flagged rows started on the UTC days `first`..`last` (either open-ended)."""
    start = midnight(first) if first else 0.0
    end = midnight(last + timedelta(days=1)) if last else float("inf")
    async with reading_ledger(ledger_url) as ledger:
        rows = await ledger.flagged(start, end)
    return [r for r in rows if r.resolved_at is None] if unresolved else rows


async def resolve(ledger_url: str, request_id: str, cost_nanos: int, note: str, now: float) -> int:
    """Set the true cost of a flagged row; the cost it had before."""
    ledger = await open_ledger(ledger_url)
    try:
        return await ledger.resolve(request_id, cost_nanos, now, note)
    finally:
        await ledger.close()


def _utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def as_json(rows: Sequence[Flagged]) -> dict[str, Any]:
    return {
        "flagged": [
            {
                "id": r.id,
                "team": r.team,
                "started_utc": _utc(r.started_at),
                "reserved_usd": usd_text(r.estimated_nanos),
                "charged_usd": usd_text(r.cost_nanos),
                "outcome": r.outcome,
                "error_code": r.error_code,
                "upstream_request_id": r.upstream_request_id,
                "resolved_utc": _utc(r.resolved_at),
                "resolution": r.resolution,
            }
            for r in rows
        ],
        "unresolved": sum(1 for r in rows if r.resolved_at is None),
        "unresolved_charged_usd": usd_text(
            sum(r.cost_nanos for r in rows if r.resolved_at is None)
        ),
    }


def as_table(rows: Sequence[Flagged]) -> str:
    head = ("ID", "TEAM", "STARTED (UTC)", "RESERVED", "CHARGED", "ERROR CODE", "UPSTREAM ID",
            "RESOLVED")  # fmt: skip
    lines = [head]
    for r in rows:
        resolved = "-" if r.resolved_at is None else f"{_utc(r.resolved_at)} {r.resolution or ''}"
        lines.append((
            r.id, r.team or "-", _utc(r.started_at) or "", f"${usd_text(r.estimated_nanos)}",
            f"${usd_text(r.cost_nanos)}", r.error_code or "-", r.upstream_request_id or "-",
            resolved.strip(),
        ))  # fmt: skip
    out = aligned(lines)
    if not rows:
        out.append("(no flagged rows)")
    pending = [r for r in rows if r.resolved_at is None]
    out.append("")
    out.append(
        f"{len(pending)} unresolved, charged ${usd_text(sum(r.cost_nanos for r in pending))}: "
        "compare with OpenAI's Costs API (`tollgate reconcile`), then "
        "`tollgate ledger resolve ID --cost USD` (or `--free`)."
    )
    return "\n".join(out) + "\n"
