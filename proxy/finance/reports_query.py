"""One report request, as the CLI flags and `GET /admin/report` spell it, and its answer.

    query = ReportQuery.parse(start="2026-11-01", end=None, by="team,model", fmt="csv")
    answer = await run(query, ledger, config, now)

Both front ends call this, so `tollgate report` and the admin API give the same bytes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import cast

from proxy.core.errors import InvalidRequest
from proxy.core.settings import Config
from proxy.finance import reports, statement
from proxy.finance.reports import MEDIA_TYPES, AuditFormat, Dimension, Format, Period
from proxy.ledger.base import Ledger


@dataclass(frozen=True, slots=True)
class ReportQuery:
    start: str | None = None
    end: str | None = None
    by: tuple[Dimension, ...] = ()
    fmt: str = "table"
    statement: str | None = None
    """A month, `YYYY-MM`: the chargeback statement instead of a report."""
    audit: bool = False
    """Every row of the period (CSV or JSON lines) instead of sums."""
    excel: bool = False
    """A CSV starts with a byte-order mark, for spreadsheets (plain UTF-8 otherwise)."""

    @classmethod
    def parse(
        cls,
        *,
        start: str | None = None,
        end: str | None = None,
        by: str | None = None,
        fmt: str = "table",
        statement: str | None = None,
        audit: bool = False,
        excel: bool = False,
    ) -> ReportQuery:
        allowed = ("csv", "jsonl") if audit else reports.FORMATS
        if fmt not in allowed:
            raise InvalidRequest(
                f"format {fmt!r} is not one of {', '.join(allowed)}"
                + (" (for --audit)" if audit else ""),
                param="format",
            )
        if excel and fmt != "csv":
            raise InvalidRequest(
                f"excel adds a byte-order mark to CSV only, not to {fmt!r}.", param="excel"
            )
        if statement and audit:
            raise InvalidRequest("choose --statement or --audit, not both.", param="audit")
        # A statement is its month, grouped its own way: a period or grouping given with it
        # would be answered with other numbers than those asked for, silently.
        for name, value in (("from", start), ("to", end), ("by", by)):
            if statement and value:
                raise InvalidRequest(
                    f"--statement covers its month, grouped by cost center and team: drop "
                    f"--{name}, or drop --statement for a report.",
                    param=name,
                )
        return cls(start, end, reports.parse_by(by), fmt, statement, audit, excel)


@dataclass(frozen=True, slots=True)
class Answer:
    media_type: str
    body: str | None = None
    stream: AsyncGenerator[str, None] | None = None
    """The audit export, chunk by chunk (body is None)."""


async def run(query: ReportQuery, ledger: Ledger, config: Config, now: float) -> Answer:
    media = MEDIA_TYPES[query.fmt]
    if query.statement:
        month = Period.month(query.statement, config.timezone)
        built = await statement.build(ledger, config, month)
        return Answer(media, statement.render(built, query.fmt, query.excel))
    period = Period.parse(query.start, query.end, config.timezone, now)
    if query.audit:
        fmt = cast(AuditFormat, query.fmt)
        return Answer(media, stream=reports.audit(ledger, period, fmt, query.excel))
    report = await reports.summarize(ledger, period, query.by)
    return Answer(media, reports.render(report, cast(Format, query.fmt), query.excel))
