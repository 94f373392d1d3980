"""Reconciliation per OpenAI project: each project's spend in OpenAI's Costs API against
the ledger's spend of the teams billed to it (`tollgate reconcile --by project`).

    pages = await fetch_costs(base_url, admin_key, first, last, group_by=GROUP_BY)
    result = compare(parse_costs(pages, book),
                     await ledger_costs(ledger, first, last, config.project_of),
                     config.project_of, teams, first, last)

A team's requests go upstream under its `openai_project`, else `upstream.project`
(`Config.project_of`), so OpenAI books them to that project; a team with neither is
billed to the upstream key's default project, which Tollgate cannot name: its spend is
shown as unmapped, never counted as off. Each request is counted under the project its
row says it was sent under, so a team whose project changed is reconciled under its
former project for the days before (a batch's lines under their batch's); only rows that
recorded none (written before schema version 10) are taken to be under the team's project
now. Like `proxy.finance.reconcile`, it compares UTC days (OpenAI's buckets). Asked live,
the costs are grouped by project and line item, so that the spend of models Tollgate does
not price (chat, audio) is left out and listed; a saved export grouped by project alone is
taken whole.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from proxy.core.errors import InvalidRequest
from proxy.core.models import NANOS_PER_USD
from proxy.core.pricing import PriceBook
from proxy.core.settings import Config
from proxy.finance import reconcile
from proxy.finance.costs_api import DAY, fetch_costs, midnight, utc_day
from proxy.finance.reconcile import (
    DEFAULT_TOLERANCE,
    Compared,
    Reconciliation,
    Status,
    billed_model,
    holding_days,
    left_out,
    money,
    note_for,
    table,
    unresolved_json,
    window,
)
from proxy.ledger import reading_ledger
from proxy.ledger.base import Holding, Ledger
from proxy.ledger.codecs import project_read

GROUP_BY = ("project_id", "line_item")
UNMAPPED_NOTE = (
    "no openai_project and no upstream.project: billed to the upstream key's default "
    "project; set one to reconcile these teams"
)
ProjectOf = Callable[[str], str | None]
"""A team's OpenAI project (`Config.project_of`); None: the key's default project."""


@dataclass
class ProjectCosts:
    amounts: dict[tuple[date, str | None], Decimal] = field(default_factory=dict)
    """By UTC day and project (None: spend OpenAI booked to no project)."""
    days: set[date] = field(default_factory=set)
    """Days the export has a bucket for (a day with no bucket is unknown, not zero)."""
    ignored: dict[tuple[date, str], Decimal] = field(default_factory=dict)
    """Line items of other products, left out, with their amounts by UTC day."""


def parse_costs(
    pages: Iterable[Mapping[str, Any]],
    book: PriceBook,
    spent: Collection[str] = (),
    fetched: bool = False,
) -> ProjectCosts:
    """Sum a Costs API answer grouped by `project_id` (and maybe `line_item`) by UTC day
    and project, leaving out the line items of models neither priced nor in `spent` (see
    `reconcile.billed_model`). InvalidRequest when it is not grouped by project: a saved
    export that names no project anywhere. One `fetched` live was asked grouped by
    project, so where it names none, OpenAI booked the spend to none (unmapped)."""
    found = ProjectCosts()
    amounts: dict[tuple[date, str | None], Decimal] = defaultdict(Decimal)
    results = grouped = 0
    for page in pages:
        for bucket in page.get("data", []):
            day = utc_day(bucket["start_time"])
            found.days.add(day)
            for result in bucket.get("results", []):
                value = Decimal(str(result.get("amount", {}).get("value", 0)))
                project = result.get("project_id") or None
                results, grouped = results + 1, grouped + (project is not None)
                item = result.get("line_item")
                if item is not None and billed_model(str(item), book, spent) is None:
                    key = (day, str(item))
                    found.ignored[key] = found.ignored.get(key, Decimal(0)) + value
                else:
                    amounts[day, None if project is None else str(project)] += value
    if results and not grouped and not fetched:
        raise InvalidRequest(
            "The costs are not grouped by project: export them with group_by[]=project_id "
            "(and group_by[]=line_item), or fetch them live with --admin-key-env.",
            param="costs",
        )
    found.amounts = dict(amounts)
    return found


Spent = Mapping[tuple[date, str, str | None], int]
"""Settled nano-dollars by UTC day, team and the OpenAI project they were billed to (None:
the upstream key's default project)."""


async def ledger_costs(
    ledger: Ledger, first: date, last: date, project_of: ProjectOf
) -> dict[tuple[date, str, str | None], int]:
    """Tollgate's settled spend in nano-dollars by UTC day, team and the project each row
    was sent under (`project_of` the team for a row that recorded none)."""
    groups = await ledger.summarize(
        midnight(first), midnight(last + timedelta(days=1)), ["team", "project"], DAY
    )
    found: dict[tuple[date, str, str | None], int] = defaultdict(int)
    for g in groups:
        if g.cost_nanos:
            team = str(g.keys[0])
            stored, known = project_read(None if g.keys[1] is None else str(g.keys[1]))
            project = stored if known else project_of(team)
            found[utc_day(int(g.keys[2]) * DAY), team, project] += g.cost_nanos
    return dict(found)


def held_by_project(project_of: ProjectOf) -> Callable[[Holding], list[tuple[str | None, int]]]:
    """A reservation's bound under the project it is sent under (`project_of` its team for
    one that recorded none), as `ledger_costs` counts what is settled."""

    def under(h: Holding) -> list[tuple[str | None, int]]:
        stored, known = project_read(h.project)
        return [(stored if known else project_of(h.team), h.reserved_nanos)]

    return under


@dataclass(frozen=True, slots=True)
class ProjectLine(Compared):
    day: date
    project: str | None
    """None: the upstream key's default project (the teams set no project)."""
    teams: tuple[str, ...]
    openai_usd: Decimal
    tollgate_usd: Decimal
    status: Status | None
    """None when the project is unknown, so the line cannot be compared."""
    note: str = ""
    held_usd: Decimal = Decimal(0)
    """What the ledger holds in flight for the project, started by this day, unsettled."""
    tolerance: Decimal = DEFAULT_TOLERANCE


ProjectReconciliation = Reconciliation[ProjectLine]
"""Days of each project's spend: OpenAI's and its teams' in the ledger."""


def compare(
    openai: ProjectCosts,
    tollgate: Spent,
    project_of: ProjectOf,
    teams: Iterable[str],
    first: date,
    last: date,
    tolerance: Decimal = DEFAULT_TOLERANCE,
    held: Mapping[tuple[date, str | None], int] | None = None,
) -> ProjectReconciliation:
    """One line per UTC day and project that either side billed, naming the teams billed
    to it: the configured `teams` (by `project_of`, their project now) and every team with
    spend in the ledger under it, and what the ledger holds in flight for it (`held`, from
    `holding_days`) (pure)."""
    held = held or {}
    members: dict[str | None, set[str]] = defaultdict(set)
    for team in teams:
        members[project_of(team)].add(team)
    ours: dict[tuple[date, str | None], int] = defaultdict(int)
    for (day, team, project), nanos in tollgate.items():
        members[project].add(team)
        ours[day, project] += nanos
    theirs: Mapping[tuple[date, str | None], Decimal] = dict(openai.amounts)
    keys = sorted(
        {k for k in [*theirs, *ours] if first <= k[0] <= last},
        key=lambda k: (k[0], k[1] is None, k[1] or ""),
    )
    lines = []
    for day, project in keys:
        spent = Decimal(ours.get((day, project), 0)) / NANOS_PER_USD
        billed = theirs.get((day, project), Decimal(0))
        diff = billed - spent
        holds = Decimal(held.get((day, project), 0)) / NANOS_PER_USD
        status: Status | None = "off" if abs(diff) > tolerance else "ok"
        if project is None:
            status, note = None, UNMAPPED_NOTE
        else:
            note = note_for(diff, holds, tolerance, day in openai.days)
        team_names = tuple(sorted(members.get(project, ())))
        lines.append(
            ProjectLine(day, project, team_names, billed, spent, status, note, holds, tolerance)
        )
    ignored = left_out(openai.ignored, first, last)
    return ProjectReconciliation(first, last, tolerance, tuple(lines), ignored)


def as_json(r: ProjectReconciliation) -> dict[str, Any]:
    return {
        "from": r.first.isoformat(),
        "to": r.last.isoformat(),
        "by": "project",
        "tolerance_usd": format(r.tolerance, "f"),
        "lines": [
            {
                "day": line.day.isoformat(),
                "project": line.project,
                "teams": list(line.teams),
                "openai_usd": money(line.openai_usd),
                "tollgate_usd": money(line.tollgate_usd),
                "held_usd": money(line.held_usd),
                "difference_usd": money(line.difference),
                "status": line.status or "unmapped",
                "note": line.note,
            }
            for line in r.lines
        ],
        "off_days": [d.isoformat() for d in r.off_days],
        "held_days": [d.isoformat() for d in r.held_days],
        "ignored_line_items": {k: money(v) for k, v in sorted(r.ignored.items())},
        "unresolved_flagged": unresolved_json(r.unresolved),
    }


def as_table(r: ProjectReconciliation) -> str:
    head = ("day (UTC)", "project", "teams", "openai_usd", "tollgate_usd", "held_usd",
            "difference", "status", "note")  # fmt: skip
    rows = [
        (line.day.isoformat(), line.project or "(key's default)", ",".join(line.teams) or "-",
         money(line.openai_usd), money(line.tollgate_usd), money(line.held_usd),
         f"{line.difference:+.6f}",
         {"off": "OFF", "ok": "ok", None: "unmapped"}[line.status], line.note)
        for line in r.lines
    ]  # fmt: skip
    return table(
        r,
        f"Reconciliation by OpenAI project {r.first} .. {r.last} (UTC days), tolerance "
        f"${r.tolerance} per day and project; difference = OpenAI - Tollgate",
        [head, *rows],
        "A positive difference is spend of the project that bypassed Tollgate (another "
        "key or a direct call), unless no more than what Tollgate holds in flight "
        "(held_usd); a negative one is spend OpenAI did not bill to that "
        "project, or a day missing from the export.",
        "Every project matches within the tolerance, every day.",
    )


async def run(
    config: Config,
    ledger_url: str,
    pages: list[dict[str, Any]],
    admin_key: str | None,
    first: date | None,
    last: date | None,
    tolerance: Decimal,
    now: float,
) -> ProjectReconciliation:
    """Reconcile the UTC days `first`..`last` per project: by default the days a saved
    export covers, or (live) the current UTC month up to today. `pages` is fetched, grouped
    by project and line item, when `admin_key` is given."""
    today = utc_day(now)
    if admin_key is not None:
        # `--to` alone: its month up to it (a cron's `--to` yesterday, on the 1st too).
        first = first or (last or today).replace(day=1)
        last = last or today
        pages = await fetch_costs(
            config.upstream.base_url, admin_key, first, last, group_by=GROUP_BY
        )
    fetched = admin_key is not None
    openai = parse_costs(pages, config.prices, fetched=fetched)
    first, last = window(openai.days, first, last, today, saved=not fetched)
    async with reading_ledger(ledger_url) as ledger:
        ours = await ledger_costs(ledger, first, last, config.project_of)
        models = await reconcile.ledger_costs(ledger, first, last, config.prices)
        flagged = await ledger.flagged(midnight(first), midnight(last + timedelta(days=1)))
        holdings = await ledger.holding(midnight(last + timedelta(days=1)))
    teams = [team.name for team in config.teams]
    held = holding_days(holdings, first, last, held_by_project(config.project_of))
    # A model the price book no longer names, with spend on these days: compared, not left out.
    held_by = reconcile.held_by_model(config.prices)
    spent = {m for _, m in models} | {m for h in holdings for m, _ in held_by(h)}
    openai = parse_costs(pages, config.prices, spent, fetched)
    result = compare(openai, ours, config.project_of, teams, first, last, tolerance, held)
    return replace(result, flagged=tuple(flagged))
