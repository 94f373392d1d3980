"""Reconciliation: Tollgate's ledger against OpenAI's Costs API, per UTC day and model.

    pages = await fetch_costs(base_url, admin_key, first, last)   # or load_costs_file(text)
    result = compare(parse_costs(pages, book), await ledger_costs(ledger, first, last, book),
                     first, last, tolerance=Decimal("0.01"))

OpenAI buckets costs by UTC day, so this compares UTC days whatever the configured
timezone. A positive difference (OpenAI billed more) is spend that did not go
through Tollgate: another key, a batch job, a tool calling OpenAI directly; unless
no more than what the ledger still holds in flight for it (`holding_days`: a batch or a
background response OpenAI may have billed, not settled yet), which the line shows. A
negative one is spend Tollgate recorded that OpenAI did not bill (or a day missing
from the export). Line items name a model and a kind, e.g. `"gpt-image-2, image
output"`, `"batch api | gpt-image-2.5-sunburst image"` or `"gpt-5.5, cached input"`;
items whose model is in neither section of the price book (chat, audio, …) are left out
and counted.

A Responses API request is billed under two models, and so reconciled: its mainline
model's part (`mainline_cost_nanos`) under that model, matched with the mainline model's
line items, the rest under its image tool's model (see `parts`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Generic, Literal, Protocol, TypeVar

from proxy.core.errors import InvalidRequest
from proxy.core.models import NANOS_PER_USD
from proxy.core.pricing import PriceBook
from proxy.core.settings import Config
from proxy.finance import parts
from proxy.finance.costs_api import DAY, LATEST, fetch_costs, midnight, utc_day
from proxy.finance.reports import ISO_DAY, aligned, printable
from proxy.ledger import reading_ledger
from proxy.ledger.base import Flagged, Holding, Ledger

DEFAULT_TOLERANCE = Decimal("0.01")
"""USD per day and model: OpenAI reports float amounts, Tollgate rounds each request up
to the nano-dollar; a cent absorbs both, a single missed image does not."""
KIND_WORDS = frozenset(
    {"image", "images", "text", "input", "output", "tokens", "cached", "input_tokens",
     "output_tokens", "generation", "edit", "variation"}
)  # fmt: skip
Status = Literal["ok", "off"]


def line_item_model(line_item: str) -> str:
    """The model a Costs API line item bills: `"batch api | gpt-image-2 image"` → `gpt-image-2`."""
    name = line_item.rsplit("|", 1)[-1].strip()
    name = name.split(",", 1)[0].strip()
    words = name.split()
    while len(words) > 1 and words[-1].lower() in KIND_WORDS:
        words.pop()
    return " ".join(words)


def canonical(model: str, book: PriceBook) -> str | None:
    """The price book's name for `model`, an image model or a mainline model (snapshots →
    their model); None if it is not priced."""
    found = book.find(model) or book.find_mainline(model)
    return found.name if found is not None else None


@dataclass
class OpenAICosts:
    amounts: dict[tuple[date, str], Decimal] = field(default_factory=dict)
    days: set[date] = field(default_factory=set)
    """Days the export has a bucket for (a day with no bucket is unknown, not zero)."""
    ignored: dict[tuple[date, str], Decimal] = field(default_factory=dict)
    """Line items of other products, left out, with their amounts by UTC day."""


def left_out(
    ignored: Mapping[tuple[date, str], Decimal], first: date, last: date
) -> dict[str, Decimal]:
    """The amounts of the line items left out on the days `first`..`last`, by line item
    (none that sum to zero)."""
    found: dict[str, Decimal] = defaultdict(Decimal)
    for (day, item), value in ignored.items():
        if first <= day <= last:
            found[item] += value
    return {item: value for item, value in found.items() if value}


def billed_model(item: str, book: PriceBook, spent: Collection[str] = ()) -> str | None:
    """The model a line item is compared under: the price book's name for it, or its own
    when the ledger has spend under that name (`spent`: a model the book no longer prices,
    whose requests are still on the days reconciled); None: left out."""
    name = line_item_model(item)
    return canonical(name, book) or (name if name in spent else None)


def parse_costs(
    pages: Iterable[Mapping[str, Any]], book: PriceBook, spent: Collection[str] = ()
) -> OpenAICosts:
    """Sum a Costs API answer (one page, or a list of pages) by UTC day and priced model
    (or model of `spent`, see `billed_model`). InvalidRequest when it is not grouped by
    line item: its amounts name no model."""
    found = OpenAICosts()
    amounts: dict[tuple[date, str], Decimal] = defaultdict(Decimal)
    results = grouped = 0
    for page in pages:
        for bucket in page.get("data", []):
            day = utc_day(bucket["start_time"])
            found.days.add(day)
            for result in bucket.get("results", []):
                value = Decimal(str(result.get("amount", {}).get("value", 0)))
                item = str(result.get("line_item") or "")
                results, grouped = results + 1, grouped + bool(item)
                model = billed_model(item, book, spent)
                if model is None:
                    found.ignored[day, item] = found.ignored.get((day, item), Decimal(0)) + value
                else:
                    amounts[day, model] += value
    if results and not grouped:
        raise InvalidRequest(
            "The costs are not grouped by line item, so they name no model: export them "
            "with group_by[]=line_item, or fetch them live with --admin-key-env.",
            param="costs",
        )
    found.amounts = dict(amounts)
    return found


async def ledger_costs(
    ledger: Ledger, first: date, last: date, book: PriceBook
) -> dict[tuple[date, str], int]:
    """Tollgate's settled spend in nano-dollars by UTC day and (canonical) model, a
    Responses request's under its two models."""
    found: dict[tuple[date, str], int] = defaultdict(int)
    groups = await ledger.summarize(
        midnight(first), midnight(last + timedelta(days=1)), ["model", "mainline_model"], DAY
    )
    for g in parts.split(groups, ["model"]):
        if not g.cost_nanos:
            continue
        model = str(g.keys[0])
        found[utc_day(int(g.keys[1]) * DAY), canonical(model, book) or model] += g.cost_nanos
    return dict(found)


def holding_days(
    holdings: Iterable[Holding],
    first: date,
    last: date,
    key: Callable[[Holding], Iterable[tuple[Any, int]]],
) -> dict[tuple[date, Any], int]:
    """What the reservations in flight hold, in nano-dollars, by UTC day and `key` (which
    splits a reservation's bound, e.g. by model): on each day of `first`..`last` from the
    day it started, since OpenAI may have billed it on any of them (a batch on the day it
    ends, a background response on the day it finishes), while the ledger holds it and has
    settled none of it."""
    found: dict[tuple[date, Any], int] = defaultdict(int)
    for h in holdings:
        day = max(utc_day(h.started_at), first)
        parts_of = [(k, nanos) for k, nanos in key(h) if nanos]
        while day <= last:
            for k, nanos in parts_of:
                found[day, k] += nanos
            day += timedelta(days=1)
    return dict(found)


def held_by_model(book: PriceBook) -> Callable[[Holding], list[tuple[str, int]]]:
    """A reservation's bound by (canonical) model: a Responses request's mainline part
    under its mainline model, the rest under its image model, as `ledger_costs` splits
    what is settled."""

    def split(h: Holding) -> list[tuple[str, int]]:
        mainline = h.mainline_nanos if h.mainline_model else 0
        found = []
        if mainline:
            found.append(
                (canonical(str(h.mainline_model), book) or str(h.mainline_model), mainline)
            )
        model = str(h.model or h.mainline_model)
        found.append((canonical(model, book) or model, h.reserved_nanos - mainline))
        return found

    return split


HELD_NOTE = (
    "Tollgate holds ${held} in flight, not settled (a batch or background response): "
    "OpenAI may have billed it; rerun once it settles"
)


def note_for(diff: Decimal, held: Decimal, tolerance: Decimal, covered: bool) -> str:
    """What a line's difference means (`covered`: the export has the day)."""
    if not covered:
        return "no OpenAI data for this day (missing from the export?)"
    if abs(diff) <= tolerance:
        return ""
    if diff < 0:
        return "Tollgate recorded more than OpenAI billed"
    if diff <= held + tolerance:
        return HELD_NOTE.format(held=money(held))
    if held:
        return "OpenAI billed more than Tollgate settled and holds: requests that bypassed Tollgate"
    return "OpenAI billed more: requests that bypassed Tollgate"


class Compared:
    """What a line of a reconciliation reads off its two sides (a dataclass's fields)."""

    __slots__ = ()
    openai_usd: Decimal
    tollgate_usd: Decimal
    status: Status | None
    held_usd: Decimal
    tolerance: Decimal

    @property
    def difference(self) -> Decimal:
        """OpenAI minus Tollgate: positive when spend bypassed Tollgate, or is in flight."""
        return self.openai_usd - self.tollgate_usd

    @property
    def awaits_settlement(self) -> bool:
        """Off only by what the ledger still holds in flight."""
        return self.status == "off" and 0 < self.difference <= self.held_usd + self.tolerance


@dataclass(frozen=True, slots=True)
class Line(Compared):
    day: date
    model: str
    openai_usd: Decimal
    tollgate_usd: Decimal
    status: Status
    note: str = ""
    held_usd: Decimal = Decimal(0)
    """What the ledger holds in flight for this model, started by this day, unsettled."""
    tolerance: Decimal = DEFAULT_TOLERANCE


class DayLine(Protocol):
    """A line of a reconciliation: one day of something, and whether it is off."""

    @property
    def day(self) -> date: ...

    @property
    def status(self) -> Status | None: ...

    @property
    def awaits_settlement(self) -> bool:
        """Off only by what the ledger holds in flight: Tollgate has not settled it yet."""


L = TypeVar("L", bound=DayLine)


@dataclass(frozen=True)  # not slots: a generic alias sets `__orig_class__` on its values
class Reconciliation(Generic[L]):
    """Days of OpenAI's bill and Tollgate's ledger side by side: by model (`Line`), or by
    project (`projects.ProjectLine`)."""

    first: date
    last: date
    tolerance: Decimal
    lines: tuple[L, ...]
    ignored: Mapping[str, Decimal]
    flagged: tuple[Flagged, ...] = ()
    """The flagged rows of these days: their charge is a bound until resolved."""

    @property
    def unresolved(self) -> list[Flagged]:
        return [f for f in self.flagged if f.resolved_at is None]

    @property
    def off_days(self) -> list[date]:
        return sorted({line.day for line in self.lines if line.status == "off"})

    @property
    def held_days(self) -> list[date]:
        """The days off only by what the ledger holds in flight (still off: exit 1)."""
        off = [line for line in self.lines if line.status == "off"]
        return sorted(
            {line.day for line in off} - {line.day for line in off if not line.awaits_settlement}
        )


def compare(
    openai: OpenAICosts,
    tollgate: Mapping[tuple[date, str], int],
    first: date,
    last: date,
    tolerance: Decimal = DEFAULT_TOLERANCE,
    held: Mapping[tuple[date, str], int] | None = None,
) -> Reconciliation[Line]:
    """One line per UTC day and model that either side billed, with what the ledger holds
    in flight for it (`held`, from `holding_days`) (pure)."""
    held = held or {}
    lines = []
    keys = sorted(
        {k for k in [*openai.amounts, *tollgate] if first <= k[0] <= last},
        key=lambda k: (k[0], k[1]),
    )
    for day, model in keys:
        ours = Decimal(tollgate.get((day, model), 0)) / NANOS_PER_USD
        theirs = openai.amounts.get((day, model), Decimal(0))
        diff = theirs - ours
        off = abs(diff) > tolerance
        holds = Decimal(held.get((day, model), 0)) / NANOS_PER_USD
        note = note_for(diff, holds, tolerance, day in openai.days)
        status: Status = "off" if off else "ok"
        lines.append(Line(day, model, theirs, ours, status, note, holds, tolerance))
    return Reconciliation(
        first, last, tolerance, tuple(lines), left_out(openai.ignored, first, last)
    )


def as_json(r: Reconciliation[Line]) -> dict[str, Any]:
    return {
        "from": r.first.isoformat(),
        "to": r.last.isoformat(),
        "tolerance_usd": format(r.tolerance, "f"),
        "lines": [
            {
                "day": line.day.isoformat(),
                "model": line.model,
                "openai_usd": money(line.openai_usd),
                "tollgate_usd": money(line.tollgate_usd),
                "held_usd": money(line.held_usd),
                "difference_usd": money(line.difference),
                "status": line.status,
                "note": line.note,
            }
            for line in r.lines
        ],
        "off_days": [d.isoformat() for d in r.off_days],
        "held_days": [d.isoformat() for d in r.held_days],
        "ignored_line_items": {k: money(v) for k, v in sorted(r.ignored.items())},
        "unresolved_flagged": unresolved_json(r.unresolved),
    }


def as_table(r: Reconciliation[Line]) -> str:
    head = ("day (UTC)", "model", "openai_usd", "tollgate_usd", "held_usd", "difference",
            "status", "note")  # fmt: skip
    rows = [
        (line.day.isoformat(), line.model, money(line.openai_usd), money(line.tollgate_usd),
         money(line.held_usd), f"{line.difference:+.6f}", "OFF" if line.status == "off" else "ok",
         line.note)
        for line in r.lines
    ]  # fmt: skip
    return table(
        r,
        f"Reconciliation {r.first} .. {r.last} (UTC days), tolerance ${r.tolerance} per day "
        "and model; difference = OpenAI - Tollgate",
        [head, *rows],
        "A positive difference is spend that bypassed Tollgate (another key or a direct "
        "call), unless no more than what Tollgate holds in flight (held_usd); a negative "
        "one is spend OpenAI did not bill or a day missing from the export.",
        "Every day matches within the tolerance.",
    )


def table(
    r: Reconciliation[Any], title: str, rows: list[tuple[str, ...]], off: str, even: str
) -> str:
    """A reconciliation as text: `title`, its `rows` (a head, then a row per line) aligned,
    what was left out, the days off (explained by `off`) or `even`, the flagged rows."""
    out = [title, "", *aligned(rows)]
    if len(rows) == 1:
        out.append("(no spend on either side)")
    if r.ignored:
        out.append("")
        # `; ` between them: a line item's own name holds a comma ("chat-model, input").
        left = (f"{printable(item)} ${money(r.ignored[item])}" for item in sorted(r.ignored))
        out.append("Left out (not priced models): " + "; ".join(left))
    out.append("")
    if r.off_days:
        days = ", ".join(d.isoformat() for d in r.off_days)
        out.append(f"{len(r.off_days)} day(s) off: {days}. {off}")
    if r.held_days:
        days = ", ".join(d.isoformat() for d in r.held_days)
        out.append(
            f"Of these, {days}: off only by what Tollgate holds in flight, not settled yet "
            "(a batch or a background response OpenAI may have billed); rerun once they settle."
        )
    if not r.off_days:
        out.append(even)
    if r.unresolved:
        out.append("")
        out.append(unresolved_note(r.unresolved))
    return "\n".join(out) + "\n"


def money(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.000001")).normalize(), "f")


def unresolved_note(unresolved: Sequence[Flagged]) -> str:
    """What to do about the flagged rows of the reconciled days, charged their bound."""
    charged = Decimal(sum(f.cost_nanos for f in unresolved)) / NANOS_PER_USD
    return (
        f"{len(unresolved)} flagged request(s) of these days are charged their bound "
        f"(${money(charged)} in all) until resolved: list them with `tollgate ledger "
        "flagged --unresolved`, then `tollgate ledger resolve ID --cost USD` (or --free) "
        "once OpenAI's costs show what they were billed."
    )


def unresolved_json(unresolved: Sequence[Flagged]) -> list[dict[str, Any]]:
    return [
        {
            "id": f.id,
            "team": f.team,
            "day": utc_day(f.started_at).isoformat(),
            "charged_usd": money(Decimal(f.cost_nanos) / NANOS_PER_USD),
            "error_code": f.error_code,
            "upstream_request_id": f.upstream_request_id,
        }
        for f in unresolved
    ]


def window(
    covered: Iterable[date],
    first: date | None,
    last: date | None,
    today: date,
    *,
    saved: bool = False,
) -> tuple[date, date]:
    """The UTC days to reconcile: `first`..`last`, by default the days an export covers.

    `saved`: the days come from a saved export, which must hold a bucket for each of them.
    The Costs API answers one bucket per day asked, even a day without spend: a day with
    none was not asked for (or not saved), and reads as neither a match nor a difference.
    InvalidRequest naming the missing days (an export of no bucket at all is refused
    before, by `load_costs_file`)."""
    days = sorted(covered) or [today]
    first = first or days[0]
    last = last or days[-1]
    if last < first:
        raise InvalidRequest(f"--to {last} is before --from {first}.", param="to")
    missing = gaps(days, first, last) if saved else []
    if missing:
        count = sum((b - a).days + 1 for a, b in missing)
        shown = ", ".join(a.isoformat() if a == b else f"{a}..{b}" for a, b in missing[:5])
        more = f" and {len(missing) - 5} more gap(s)" if len(missing) > 5 else ""
        raise InvalidRequest(
            f"the costs file has no bucket for {count} of the days reconciled "
            f"({first}..{last}): {shown}{more}. The Costs API answers one bucket per day "
            "asked, even an empty one: save its answer for these days too, or reconcile only "
            "the days it covers (--from/--to).",
            param="costs",
        )
    return first, last


def gaps(days: Sequence[date], first: date, last: date) -> list[tuple[date, date]]:
    """The runs of days `first`..`last` (both included) that sorted `days` leaves out."""
    found, expected = [], first
    for day in days:
        if day > last:
            break
        if day < expected:
            continue
        if day > expected:
            found.append((expected, day - timedelta(days=1)))
        expected = day + timedelta(days=1)
    if expected <= last:
        found.append((expected, last))
    return found


def parse_day(text: str) -> date:
    try:
        day = date.fromisoformat(text) if ISO_DAY.fullmatch(text) else None
    except ValueError:
        day = None
    if day is None:
        raise InvalidRequest(f"{text!r} is not a date: use YYYY-MM-DD.", param="from")
    if midnight(day) >= LATEST:
        raise InvalidRequest(f"{day} is after the last day reconciled (9998-12-31).", param="to")
    return day


async def run(
    config: Config,
    ledger_url: str,
    pages: list[dict[str, Any]],
    admin_key: str | None,
    first: date | None,
    last: date | None,
    tolerance: Decimal,
    now: float,
) -> Reconciliation[Line]:
    """Reconcile the UTC days `first`..`last`: by default the days a saved export covers,
    or (live) the current UTC month up to today. `pages` is fetched when `admin_key` is given."""
    today = utc_day(now)
    if admin_key is not None:
        # `--to` alone: its month up to it (a cron's `--to` yesterday, on the 1st too).
        first = first or (last or today).replace(day=1)
        last = last or today
        pages = await fetch_costs(config.upstream.base_url, admin_key, first, last)
    book = config.prices
    openai = parse_costs(pages, book)
    first, last = window(openai.days, first, last, today, saved=admin_key is None)
    async with reading_ledger(ledger_url) as ledger:
        ours = await ledger_costs(ledger, first, last, book)
        flagged = await ledger.flagged(midnight(first), midnight(last + timedelta(days=1)))
        holdings = await ledger.holding(midnight(last + timedelta(days=1)))
    held = holding_days(holdings, first, last, held_by_model(book))
    # A model the price book no longer names, with spend on these days: compared, not left out.
    openai = parse_costs(pages, book, {model for _, model in [*ours, *held]})
    result = compare(openai, ours, first, last, tolerance, held)
    return replace(result, flagged=tuple(flagged))
