"""Finance reports over the ledger (README, "Finance reports"): spend and usage grouped by any
dimension.

    period = Period.parse("2026-11-01", "2026-11-30", "Europe/Paris")
    report = await summarize(ledger, period, parse_by("team,model"))
    text = render(report, "csv")

Only settled rows count: a request still in flight holds a reservation, not spend,
and shows up once it settles (in the period it started in). Every settled row is
a request, rejections and errors included (they cost nothing), so `--by outcome`
shows them. Money stays integer nano-dollars until it is printed as a decimal
string. The grouping is done by the ledger in SQL; this module folds UTC buckets
into local days and months and formats (pure, apart from `summarize`/`audit`).

A Responses API request is one row, billed under two models: grouped by model, quality
or size, its mainline model's part is shown under that model (see `parts`), so that
spend by model is what OpenAI bills each model; `requests` counts it once, under its
image model.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import math
import re
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo

from proxy.core.errors import InvalidRequest
from proxy.core.models import usd_text
from proxy.finance import parts
from proxy.ledger.base import Aggregate, GroupColumn, Ledger

Dimension = Literal[
    "team", "cost_center", "user", "key", "model", "quality", "size", "endpoint", "outcome",
    "day", "month",
]  # fmt: skip
DIMENSIONS: tuple[Dimension, ...] = get_args(Dimension)
Format = Literal["table", "csv", "json", "html"]
FORMATS: tuple[Format, ...] = get_args(Format)
AuditFormat = Literal["csv", "jsonl"]
COLUMN: dict[Dimension, GroupColumn] = {
    "team": "team",
    "cost_center": "cost_center",
    "user": "user",
    "key": "key_id",
    "model": "model",
    "quality": "quality",
    "size": "size",
    "endpoint": "endpoint",
    "outcome": "outcome",
}
DAY = 86_400
MEDIA_TYPES = {
    "table": "text/plain; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "html": "text/html; charset=utf-8",
    "jsonl": "application/x-ndjson",
}
CSV_BOM = "\ufeff"
"""Spreadsheets (Excel) read a CSV as UTF-8 only when it starts with a byte-order mark; a
CSV is plain UTF-8 without it unless asked (`--excel`), so that csv.DictReader, cut and
awk read the header as written."""


def csv_start(excel: bool) -> str:
    """What a CSV starts with: the byte-order mark for spreadsheets, else nothing."""
    return CSV_BOM if excel else ""


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
"""How a cell a spreadsheet runs as a formula starts (fullwidth signs too)."""
PLAIN_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)


def csv_cell(value: object) -> object:
    """`value` as a CSV cell that no spreadsheet runs: text that starts like a formula (a
    `user` a client sent, a cost center: `=HYPERLINK(...)`, `+cmd|...`) gets a leading
    apostrophe, as spreadsheets write text; numbers and every other value are unchanged.
    So does text that starts with an apostrophe, so that the user `'=1+1` is not written
    as `=1+1` is: a cell that starts with one is its value after it, and no other cell
    does (a script reads every value back exactly)."""
    if not isinstance(value, str) or not value.startswith((*FORMULA_STARTS, "'")):
        return value
    return value if PLAIN_NUMBER.fullmatch(value) else "'" + value


class CsvWriter:
    """`csv.writer` (quoted as needed) whose cells are `csv_cell`s. Lines end in LF, not
    RFC 4180's CRLF: `cut` and `awk` would read the last column's name as `cost_usd\r`
    (csv readers and spreadsheets take either). Each row is written with CRLF and its
    end replaced, because `csv` quotes a cell holding a CR only when CR is part of the
    line end: a bare CR in a cell would otherwise split the row for some readers."""

    def __init__(self, out: io.StringIO) -> None:
        self._out = out
        self._line = io.StringIO()
        self._writer = csv.writer(self._line)

    def writerow(self, row: Iterable[object]) -> None:
        self._writer.writerow([csv_cell(c) for c in row])
        line = self._line.getvalue()
        self._line.seek(0)
        self._line.truncate()
        self._out.write(line.removesuffix("\r\n") + "\n")

    def writerows(self, rows: Iterable[Iterable[object]]) -> None:
        for row in rows:
            self.writerow(row)


@dataclass(frozen=True, slots=True)
class Period:
    """Whole local days `first`..`last` (inclusive) in the time zone `tz`."""

    first: date
    last: date
    tz: str

    @classmethod
    def parse(cls, start: str | None, end: str | None, tz: str, now: float) -> Period:
        """From `--from`/`--to` (ISO dates); the current month for what is missing, or the
        month of the one given (`--to` alone: from its month's first day)."""
        today = datetime.fromtimestamp(now, ZoneInfo(tz)).date()
        given = parse_date(end, "to") if end else None
        first = parse_date(start, "from") if start else (given or today).replace(day=1)
        last = given or month_end(first if start else today)
        if last < first:
            raise InvalidRequest(f"--to {last} is before --from {first}.", param="to")
        return cls(first, last, tz)

    @classmethod
    def month(cls, text: str, tz: str) -> Period:
        """The month `YYYY-MM` (strptime alone also reads `2026-1` as January)."""
        message = f"{text!r} is not a month: use YYYY-MM."
        if not ISO_MONTH.fullmatch(text):
            raise InvalidRequest(message, param="statement")
        try:
            first = datetime.strptime(text, "%Y-%m").date()
        except ValueError as exc:
            raise InvalidRequest(message, param="statement") from exc
        return cls(in_range(first, "statement"), month_end(first), tz)

    def midnights(self) -> list[float]:
        """The unix time of each local midnight from `first` to the day after `last`."""
        return self._midnights(self.last + timedelta(days=1))

    def _midnights(self, until: date) -> list[float]:
        zone = ZoneInfo(self.tz)
        return [
            _midnight(self.first + timedelta(days=i), zone)
            for i in range((until - self.first).days + 1)
        ]

    @property
    def start(self) -> float:
        return _midnight(self.first, ZoneInfo(self.tz))

    @property
    def end(self) -> float:
        return _midnight(self.last + timedelta(days=1), ZoneInfo(self.tz))

    def bucket_seconds(self) -> int:
        """The widest divisor of a day on whose multiples every local midnight falls
        (a day in UTC, an hour in New York, half an hour in Kolkata).

        Past `RULES_FROM` a zone's clocks follow one yearly rule (tzdata lists no change
        that late), so a year of midnights there has every offset its later years have:
        the midnights read stop a year past it (or past `first`), whatever `last` is. A
        period to 9998 reads some 48,000 midnights, not 2.9 million (20 s of the event
        loop, during which the proxy answered nothing)."""
        until = min(self.last + timedelta(days=1), max(self.first, RULES_FROM) + RULE_YEAR)
        return math.gcd(DAY, *(int(m) % DAY for m in self._midnights(until)))

    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]


RULES_FROM, RULE_YEAR = date(2100, 1, 1), timedelta(days=366)
"""From when a zone's UTC offsets repeat year after year, and a span that holds a year."""


def _midnight(day: date, zone: ZoneInfo) -> float:
    return datetime.combine(day, datetime.min.time(), zone).timestamp()


def month_end(day: date) -> date:
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1) - timedelta(days=1)


ISO_MONTH = re.compile(r"[0-9]{4}-[0-9]{2}", re.ASCII)
ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
"""A day as the reports spell it. `date.fromisoformat` (Python 3.11) also reads `20261201`
and ISO weeks: `2026-W49` is its Monday alone, not the week it reads as."""


def parse_date(text: str, param: str) -> date:
    try:
        day = date.fromisoformat(text) if ISO_DAY.fullmatch(text) else None
    except ValueError:
        day = None
    if day is None:
        raise InvalidRequest(f"{text!r} is not a date: use YYYY-MM-DD.", param=param)
    return in_range(day, param)


FIRST_DAY, LAST_DAY = date(1970, 1, 2), date(9998, 12, 31)
"""The days a report may name: its midnights, in any time zone, and the day after its last,
stay unix times a datetime can hold (year 1 and 9999 overflow)."""


def in_range(day: date, param: str) -> date:
    if not FIRST_DAY <= day <= LAST_DAY:
        raise InvalidRequest(
            f"{day} is outside the dates a report covers ({FIRST_DAY} to {LAST_DAY}).",
            param=param,
        )
    return day


def parse_by(text: str | None) -> tuple[Dimension, ...]:
    """`"team,model"` → `("team", "model")`; None or "" → `()` (no grouping). An unknown
    name is an error naming the valid ones; so is an empty one (`team,,model`, `,`) and one
    given twice (`team,team`), which were once dropped: a typo then went unseen."""
    if not text:
        return ()
    found: list[Dimension] = []
    for name in text.split(","):
        name = name.strip()
        if not name:
            raise InvalidRequest(
                f"by={text!r} has an empty field: name each one once, separated by commas "
                f"(e.g. team,model), from {', '.join(DIMENSIONS)}.",
                param="by",
            )
        if name not in DIMENSIONS:
            raise InvalidRequest(
                f"cannot group by {name!r}: use any of {', '.join(DIMENSIONS)}.", param="by"
            )
        if name in found:
            raise InvalidRequest(
                f"by={text!r} names {name!r} twice: name each field once.", param="by"
            )
        found.append(name)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Sums:
    requests: int = 0
    images: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    cost_nanos: int = 0

    @classmethod
    def of(cls, a: Aggregate) -> Sums:
        return cls(*(getattr(a, f.name) for f in fields(cls)))

    def __add__(self, other: Sums) -> Sums:
        return Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "images": self.images,
            "text_input_tokens": self.text_input_tokens,
            "image_input_tokens": self.image_input_tokens,
            "image_output_tokens": self.image_output_tokens,
            "cost_usd": usd_text(self.cost_nanos),
        }


SUM_NAMES = tuple(Sums().as_json())
Key = tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Report:
    period: Period
    by: tuple[Dimension, ...]
    rows: tuple[tuple[Key, Sums], ...]
    total: Sums


def fold(aggregates: Iterable[Aggregate], by: Sequence[Dimension], period: Period) -> Report:
    """Turn the ledger's groups (with a trailing UTC bucket when `by` has day or month)
    into report rows keyed by `by`, sorted (pure)."""
    by = tuple(by)
    timed = "day" in by or "month" in by
    width = period.bucket_seconds()
    zone = ZoneInfo(period.tz)
    local: dict[int, date] = {}
    grouped: dict[Key, Sums] = {}
    for a in aggregates:
        keys = list(a.keys)
        bucket = keys.pop() if timed else None
        when = None
        if bucket is not None:
            when = local.get(bucket)
            if when is None:
                when = local[bucket] = datetime.fromtimestamp(bucket * width, zone).date()
        plain = iter(keys)
        key: Key = tuple(
            (when.isoformat() if d == "day" else when.isoformat()[:7])
            if d in ("day", "month") and when is not None
            else _text(next(plain))
            for d in by
        )
        grouped[key] = grouped.get(key, Sums()) + Sums.of(a)
    # None (no value) before "" (an empty one): sorted as one, they came in the order the
    # database answered, which SQLite and PostgreSQL do not share.
    rows = tuple(
        sorted(grouped.items(), key=lambda kv: tuple((v is not None, v or "") for v in kv[0]))
    )
    total = sum((s for _, s in rows), Sums())
    return Report(period, by, rows, total)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


async def summarize(ledger: Ledger, period: Period, by: Sequence[Dimension]) -> Report:
    """The report of `period` grouped by `by`, read from the ledger."""
    columns = [COLUMN[d] for d in by if d not in ("day", "month")]
    timed = "day" in by or "month" in by
    width = period.bucket_seconds() if timed else None
    if not parts.splits(columns):
        return fold(await ledger.summarize(period.start, period.end, columns, width), by, period)
    found = await ledger.summarize(period.start, period.end, [*columns, "mainline_model"], width)
    return fold(parts.split(found, columns), by, period)


# -- formats -------------------------------------------------------------------


def as_json(report: Report) -> dict[str, Any]:
    return {
        "from": report.period.first.isoformat(),
        "to": report.period.last.isoformat(),
        "rows": [
            {**dict(zip(report.by, key, strict=True)), **sums.as_json()}
            for key, sums in report.rows
        ],
        "total": report.total.as_json(),
    }


def _cells(report: Report) -> tuple[list[str], list[list[str]]]:
    header = [*report.by, *SUM_NAMES]
    body = [
        [*(k if k is not None else "" for k in key), *(str(v) for v in sums.as_json().values())]
        for key, sums in report.rows
    ]
    return header, body


def as_csv(report: Report, excel: bool = False) -> str:
    header, body = _cells(report)
    out = io.StringIO()
    writer = CsvWriter(out)
    writer.writerow(header)
    writer.writerows(body)
    return csv_start(excel) + out.getvalue()


def printable(value: object) -> str:
    """`value` as text a terminal shows as it is: control and format characters (an escape
    sequence, a line break that would forge a row, a right-to-left override) written as
    Python escapes, `\\x1b`, `\\n`, `\\u202e`. Text formats only: CSV and JSON keep values."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def aligned(lines: Sequence[Sequence[object]]) -> list[str]:
    """`lines` of cells as `printable` text in left-aligned columns two spaces apart, each
    line's trailing spaces dropped."""
    lines = [[printable(c) for c in line] for line in lines]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def as_table(report: Report) -> str:
    header, body = _cells(report)
    body = [[printable(c) for c in row] for row in body]
    total = ["TOTAL", *[""] * (len(report.by) - 1)] if report.by else []
    body = [*body, [*total, *(str(v) for v in report.total.as_json().values())]]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = len(report.by)

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i >= numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    title = f"Tollgate report {report.period.first} .. {report.period.last} ({report.period.tz})"
    lines = [title, "", line(header), rule, *(line(r) for r in body[:-1]), rule, line(body[-1])]
    return "\n".join(lines) + "\n"


def as_html(report: Report) -> str:
    header, body = _cells(report)
    numeric = len(report.by)

    def row(cells: list[str], tag: str = "td") -> str:
        return (
            "<tr>"
            + "".join(
                f"<{tag}{' class=n' if i >= numeric else ''}>{html.escape(c)}</{tag}>"
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )

    total = ["Total", *[""] * (numeric - 1)] if numeric else []
    title = f"Tollgate report {report.period.first} – {report.period.last} ({report.period.tz})"
    return (
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{BASE_CSS}</style><h1>{html.escape(title)}</h1><table>"
        f"<thead>{row(header, 'th')}</thead><tbody>{''.join(row(r) for r in body)}</tbody>"
        f"<tfoot>{row([*total, *map(str, report.total.as_json().values())], 'th')}"
        "</tfoot></table></html>\n"
    )


BASE_CSS = (
    "body{font:13px/1.4 system-ui,sans-serif;margin:24px;color:#111}"
    "table{border-collapse:collapse;margin:8px 0 16px}"
    "th,td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left}"
    "th{background:#f3f4f6}.n{text-align:right;font-variant-numeric:tabular-nums}"
    "@media print{body{margin:0;font-size:10pt}th{background:none}"
    "*{-webkit-print-color-adjust:exact;print-color-adjust:exact}}"
)


def render(report: Report, fmt: Format, excel: bool = False) -> str:
    if fmt == "json":
        return json.dumps(as_json(report), indent=2) + "\n"
    if fmt == "csv":
        return as_csv(report, excel)
    if fmt == "html":
        return as_html(report)
    return as_table(report)


# -- audit export --------------------------------------------------------------


async def audit(
    ledger: Ledger, period: Period, fmt: AuditFormat, excel: bool = False
) -> AsyncGenerator[str, None]:
    """Every ledger row of `period` as CSV (header first) or JSON lines, chunk by chunk.

    Rows stream from the ledger in batches; memory stays constant however many there are.
    Money columns (`*_nanos`) are integers of nano-dollars; `cost_usd` and `estimated_usd`
    are added as decimal strings, times as ISO 8601 UTC next to the unix seconds. A flagged
    row's `cost_nanos` is its bound until an operator resolved it (`resolved_at`,
    `resolution`)."""
    header: list[str] | None = None
    out = io.StringIO()
    writer = CsvWriter(out)
    # Closed with this generator (a client that stops reading), not whenever the loop
    # finalizes it: the export holds a database connection open.
    async with contextlib.aclosing(ledger.export(period.start, period.end)) as rows:
        async for row in rows:
            record = _audit_record(row)
            if fmt == "jsonl":
                yield json.dumps(record, separators=(",", ":")) + "\n"
                continue
            if header is None:
                header = list(record)
                writer.writerow(header)
                yield csv_start(excel) + _drain(out)
            writer.writerow(["" if v is None else v for v in record.values()])
            yield _drain(out)
    if fmt == "csv" and header is None:
        # No rows: the header alone, for a script that reads the columns by name.
        writer.writerow(list(_audit_record(dict.fromkeys(await ledger.export_columns()))))
        yield csv_start(excel) + _drain(out)


def _drain(out: io.StringIO) -> str:
    text = out.getvalue()
    out.seek(0)
    out.truncate()
    return text


INTERNAL_COLUMNS = ("reserved_clock",)
"""Columns the audit export leaves out: `reserved_clock` is the ledger's own clock at
reserve (seconds since boot on SQLite, since the epoch on PostgreSQL), kept to age a
reservation, a time finance cannot read."""


def _audit_record(row: dict[str, Any]) -> dict[str, Any]:
    record = dict(row)
    for name in INTERNAL_COLUMNS:
        record.pop(name, None)
    for name in ("started_at", "finished_at", "resolved_at"):
        value = record.get(name)
        record[name.replace("_at", "_utc")] = (
            None
            if value is None
            else datetime.fromtimestamp(value, ZoneInfo("UTC")).isoformat(timespec="milliseconds")
        )
    record["cost_usd"] = usd_text(int(record.get("cost_nanos") or 0))
    record["estimated_usd"] = usd_text(int(record.get("estimated_nanos") or 0))
    return record
