"""The monthly chargeback statement: per cost center and team, what was spent and on what.

    statement = await build(ledger, config, Period.month("2026-11", config.timezone))
    page = as_html(statement)      # one self-contained page, charts as inline SVG

Each team gets: spend by model and quality, by endpoint (the door: Images API endpoints,
`responses`), images, tokens by kind, its monthly USD budget against the actual,
downgrades and rejections, its top users and its daily spend. A Responses API request's
mainline model's part is a model line of its own (`part` `mainline`, no quality; see
`parts`). HTML, CSV and JSON carry the same numbers (the same `Sums`).
"""

from __future__ import annotations

import html
import io
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from proxy.core.models import usd_text
from proxy.core.settings import Config
from proxy.finance import parts
from proxy.finance.reports import BASE_CSS, CsvWriter, Period, Sums, csv_start, fold, printable
from proxy.ledger.base import Aggregate, GroupColumn, Ledger

Part = Literal["image", "mainline"]
"""A model line's part of its requests: the image model's, or a Responses request's
mainline model's."""
TOP_USERS = 5
PALETTE = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0891b2", "#db2777", "#65a30d")


@dataclass(frozen=True, slots=True)
class TeamStatement:
    cost_center: str
    team: str
    sums: Sums
    by_model: tuple[tuple[str, str, Sums, Part], ...]
    """(model, quality, sums, part), most expensive first."""
    by_endpoint: tuple[tuple[str, Sums], ...]
    """(endpoint, sums), most expensive first."""
    outcomes: dict[str, int]
    budget_nanos: int | None
    """The team's tightest monthly USD budget, if it has one."""
    top_users: tuple[tuple[str, Sums], ...]
    daily_nanos: tuple[int, ...]
    """Spend of each day of the month."""
    month_nanos: int = 0
    """The team's spend of the month under every cost center (its budget's actual)."""

    @property
    def utilization(self) -> Decimal | None:
        if not self.budget_nanos:
            return None
        return (Decimal(self.month_nanos) / self.budget_nanos).quantize(Decimal("0.0001"))


@dataclass(frozen=True, slots=True)
class Statement:
    period: Period
    teams: tuple[TeamStatement, ...]
    total: Sums

    def cost_centers(self) -> dict[str, list[TeamStatement]]:
        found: dict[str, list[TeamStatement]] = defaultdict(list)
        for t in self.teams:
            found[t.cost_center].append(t)
        return dict(found)


async def build(ledger: Ledger, config: Config, period: Period) -> Statement:
    """Read the month's numbers from the ledger (five grouped queries).

    Spend is charged to the cost center each request was recorded with, as `report --by
    cost_center` does: a team that left the configuration keeps its cost center, and one
    that moved during the month is listed under each of its cost centers (its budget read
    against its whole month). A configured team with no request is listed under its
    configured cost center."""
    start, end, width = period.start, period.end, period.bucket_seconds()
    columns: list[GroupColumn] = ["cost_center", "team", "model", "quality"]
    by_model = parts.split(
        await ledger.summarize(start, end, [*columns, "mainline_model"]), columns
    )
    doors = await ledger.summarize(start, end, ["cost_center", "team", "endpoint"])
    outcomes = await ledger.summarize(start, end, ["cost_center", "team", "outcome"])
    users = await ledger.summarize(start, end, ["cost_center", "team", "user"])
    daily = fold(
        await ledger.summarize(start, end, ["cost_center", "team"], width),
        ("cost_center", "team", "day"),
        period,
    )
    budgets = {
        t.name: min(limits)
        for t in config.teams
        if (limits := [b.limit for b in t.budgets if b.period == "month" and b.metric == "usd"])
    }
    found = {_owner(a) for a in [*by_model, *outcomes] if a.keys[1]}
    recorded = {name for _, name in found}
    names = found | {(t.cost_center or "", t.name) for t in config.teams if t.name not in recorded}
    month: dict[str, int] = {}
    for a in outcomes:
        month[str(a.keys[1])] = month.get(str(a.keys[1]), 0) + a.cost_nanos
    days = [d.isoformat() for d in period.days()]
    teams = []
    for owner in sorted(names):
        center, name = owner
        models = sorted(
            _model_lines(a for a in by_model if _owner(a) == owner and a.keys[2] is not None),
            key=lambda m: (-m[2].cost_nanos, m[0], m[1], m[3]),
        )
        endpoints = sorted(
            ((str(a.keys[2] or ""), Sums.of(a)) for a in doors if _owner(a) == owner),
            key=lambda d: (-d[1].cost_nanos, d[0]),
        )
        team_users = sorted(
            _users(a for a in users if _owner(a) == owner).items(),
            key=lambda u: (-u[1].cost_nanos, u[0]),
        )
        per_day = {k[2]: s.cost_nanos for k, s in daily.rows if (k[0] or "", k[1]) == owner}
        teams.append(
            TeamStatement(
                cost_center=center,
                team=name,
                sums=sum((Sums.of(a) for a in outcomes if _owner(a) == owner), Sums()),
                by_model=tuple(models),
                by_endpoint=tuple(endpoints),
                outcomes={str(a.keys[2]): a.requests for a in outcomes if _owner(a) == owner},
                budget_nanos=budgets.get(name),
                top_users=tuple(team_users[:TOP_USERS]),
                daily_nanos=tuple(per_day.get(d, 0) for d in days),
                month_nanos=month.get(name, 0),
            )
        )
    teams.sort(key=lambda t: (t.cost_center, t.team))
    return Statement(period, tuple(teams), sum((t.sums for t in teams), Sums()))


def _owner(a: Aggregate) -> tuple[str, str]:
    """The (cost center, team) a group grouped by both first is charged to."""
    return str(a.keys[0] or ""), str(a.keys[1] or "")


def _users(found: Iterable[Aggregate]) -> dict[str, Sums]:
    """One team's spend by user: requests without a user (none sent, or "") as one
    `(none)`, not two lines of that name in the top users."""
    by_user: dict[str, Sums] = {}
    for a in found:
        name = str(a.keys[2] or "(none)")
        by_user[name] = by_user.get(name, Sums()) + Sums.of(a)
    return by_user


def _model_lines(found: Iterable[Aggregate]) -> list[tuple[str, str, Sums, Part]]:
    """(model, quality, sums, part) of one team's groups (split, so that a model line may
    come in several groups: an image model called by two mainline models)."""
    lines: dict[tuple[str, str, Part], Sums] = {}
    for a in found:
        key = (str(a.keys[2]), str(a.keys[3] or ""), _part(a))
        lines[key] = lines.get(key, Sums()) + Sums.of(a)
    return [(m, q, sums, part) for (m, q, part), sums in lines.items()]


def _part(a: Aggregate) -> Part:
    return "mainline" if parts.is_mainline(a) else "image"


# -- JSON and CSV: the same numbers -------------------------------------------


REJECTIONS = ("rejected_budget", "rejected_policy", "rejected_rate")


def rejections(outcomes: dict[str, int]) -> int:
    """The requests refused by a budget, a policy or a rate limit."""
    return sum(outcomes.get(outcome, 0) for outcome in REJECTIONS)


def as_json(s: Statement) -> dict[str, Any]:
    return {
        "month": s.period.first.isoformat()[:7],
        "from": s.period.first.isoformat(),
        "to": s.period.last.isoformat(),
        "timezone": s.period.tz,
        "cost_centers": [
            {
                "cost_center": center or None,
                "total": sum((t.sums for t in teams), Sums()).as_json(),
                "teams": [_team_json(t, s.period) for t in teams],
            }
            for center, teams in s.cost_centers().items()
        ],
        "total": s.total.as_json(),
    }


def _team_json(t: TeamStatement, period: Period) -> dict[str, Any]:
    return {
        "team": t.team,
        "total": t.sums.as_json(),
        "budget_usd": usd_text(t.budget_nanos) if t.budget_nanos is not None else None,
        "utilization": format(t.utilization, "f") if t.utilization is not None else None,
        "by_model": [
            {"model": m, "quality": q or None, "part": part, **sums.as_json()}
            for m, q, sums, part in t.by_model
        ],
        "by_endpoint": [{"endpoint": d, **sums.as_json()} for d, sums in t.by_endpoint],
        "outcomes": t.outcomes,
        "downgrades": t.outcomes.get("downgraded", 0),
        "rejections": rejections(t.outcomes),
        "top_users": [{"user": u, **sums.as_json()} for u, sums in t.top_users],
        "daily": [
            {"day": d.isoformat(), "cost_usd": usd_text(n)}
            for d, n in zip(period.days(), t.daily_nanos, strict=True)
        ],
    }


CSV_HEADER = ("cost_center", "team", "section", "item", "metric", "value")


def as_csv(s: Statement, excel: bool = False) -> str:
    """One number per line (`section, item, metric, value`): pivots in any spreadsheet."""
    out = io.StringIO()
    writer = CsvWriter(out)
    writer.writerow(CSV_HEADER)
    for t in s.teams:
        data = _team_json(t, s.period)
        head = (t.cost_center, t.team)
        for metric, value in data["total"].items():
            writer.writerow((*head, "total", "", metric, value))
        for metric in ("budget_usd", "utilization", "downgrades", "rejections"):
            writer.writerow((*head, "budget" if "u" in metric[:2] else "decisions", "",
                             metric, "" if data[metric] is None else data[metric]))  # fmt: skip
        for m in data["by_model"]:
            item = f"{m['model']} {m['quality'] or ''}".strip()
            section = "mainline_model" if m["part"] == "mainline" else "model_quality"
            for metric in Sums().as_json():
                writer.writerow((*head, section, item, metric, m[metric]))
        for d in data["by_endpoint"]:
            for metric in Sums().as_json():
                writer.writerow((*head, "endpoint", d["endpoint"], metric, d[metric]))
        for outcome, count in sorted(t.outcomes.items()):
            writer.writerow((*head, "outcome", outcome, "requests", count))
        for u in data["top_users"]:
            writer.writerow((*head, "top_user", u["user"], "cost_usd", u["cost_usd"]))
        for d in data["daily"]:
            writer.writerow((*head, "daily", d["day"], "cost_usd", d["cost_usd"]))
    return csv_start(excel) + out.getvalue()


# -- HTML: one self-contained page, inline SVG charts --------------------------

STATEMENT_CSS = (
    BASE_CSS + "h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 4px;"
    "border-bottom:2px solid #111}h3{font-size:14px;margin:16px 0 4px}"
    ".team{break-inside:avoid;page-break-inside:avoid;margin-bottom:20px}"
    ".grid{display:flex;gap:24px;flex-wrap:wrap}.muted{color:#555}"
    ".over{color:#b91c1c;font-weight:600}svg{display:block}"
    "@page{size:A4;margin:14mm}"
    "@media print{h2{break-before:auto;break-after:avoid}.team{margin-bottom:8mm}}"
)


def as_html(s: Statement) -> str:
    month = s.period.first.strftime("%B %Y")
    title = f"Chargeback statement — {month}"
    parts = [
        f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title>",
        f"<style>{STATEMENT_CSS}</style><h1>{html.escape(title)}</h1>",
        f"<p class=muted>{s.period.first} to {s.period.last}, days in {html.escape(s.period.tz)}"
        f". Total <b>${usd_text(s.total.cost_nanos)}</b> over {s.total.requests} requests, "
        f"{s.total.images} images. Settled requests only.</p>",
        _bars(((t.team, t.sums.cost_nanos) for t in s.teams), "Spend by team (USD)"),
    ]
    for center, teams in s.cost_centers().items():
        subtotal = sum((t.sums for t in teams), Sums())
        parts.append(
            f"<h2>Cost center {html.escape(center or '(none)')} — "
            f"${usd_text(subtotal.cost_nanos)}</h2>"
        )
        parts.extend(_team_html(t, s.period) for t in teams)
    parts.append("</html>\n")
    return "".join(parts)


def _team_html(t: TeamStatement, period: Period) -> str:
    e = html.escape
    if t.budget_nanos is not None:
        used = t.utilization or Decimal(0)
        budget = (
            f"Monthly budget ${usd_text(t.budget_nanos)}, actual ${usd_text(t.month_nanos)} "
            f"(<span class='{'over' if used > 1 else ''}'>{used * 100:.1f} %</span>)"
        )
    else:
        budget = f"No monthly USD budget; actual ${usd_text(t.sums.cost_nanos)}"
    rejected = rejections(t.outcomes)
    models = "".join(
        f"<tr><td>{e(m)}</td><td>{e(q) if part == 'image' else '<i>mainline</i>'}</td>"
        f"<td class=n>{x.requests}</td>"
        f"<td class=n>{x.images}</td><td class=n>{x.text_input_tokens}</td>"
        f"<td class=n>{x.image_input_tokens}</td><td class=n>{x.image_output_tokens}</td>"
        f"<td class=n>{usd_text(x.cost_nanos)}</td></tr>"
        for m, q, x, part in t.by_model
    )
    doors = "".join(
        f"<tr><td>{e(d)}</td><td class=n>{x.requests}</td><td class=n>{x.images}</td>"
        f"<td class=n>{usd_text(x.cost_nanos)}</td></tr>"
        for d, x in t.by_endpoint
    )
    users = "".join(
        f"<tr><td>{e(u)}</td><td class=n>{x.requests}</td><td class=n>{x.images}</td>"
        f"<td class=n>{usd_text(x.cost_nanos)}</td></tr>"
        for u, x in t.top_users
    )
    outcomes = ", ".join(f"{e(o)} {n}" for o, n in sorted(t.outcomes.items())) or "none"
    return (
        f"<section class=team><h3>Team {e(t.team)}</h3><p>{budget}. "
        f"{t.sums.requests} requests, {t.sums.images} images; tokens: "
        f"{t.sums.text_input_tokens} text input, {t.sums.image_input_tokens} image input, "
        f"{t.sums.image_output_tokens} image output. Downgrades "
        f"{t.outcomes.get('downgraded', 0)}, rejections {rejected} "
        f"(budget {t.outcomes.get('rejected_budget', 0)}, policy "
        f"{t.outcomes.get('rejected_policy', 0)}, rate {t.outcomes.get('rejected_rate', 0)})."
        f" <span class=muted>Outcomes: {outcomes}."
        f"</span></p><div class=grid><div><table><thead><tr><th>model</th><th>quality</th>"
        f"<th class=n>requests</th><th class=n>images</th><th class=n>text in</th>"
        f"<th class=n>image in</th><th class=n>image out</th><th class=n>USD</th></tr></thead>"
        f"<tbody>{models}</tbody></table><table><thead><tr><th>endpoint</th>"
        f"<th class=n>requests</th><th class=n>images</th><th class=n>USD</th></tr></thead>"
        f"<tbody>{doors}</tbody></table><table><thead><tr><th>top users</th>"
        f"<th class=n>requests</th><th class=n>images</th><th class=n>USD</th></tr></thead>"
        f"<tbody>{users}</tbody></table></div>"
        f"{_daily(t.daily_nanos, period)}</div></section>"
    )


def _bars(items: Iterable[tuple[str, int]], title: str) -> str:
    """A horizontal bar chart as inline SVG."""
    rows = [(label, nanos) for label, nanos in items]
    if not rows:
        return ""
    top = max((n for _, n in rows), default=0) or 1
    height, label_w, bar_w = 22, 140, 420
    bars = "".join(
        f"<text x='{label_w - 6}' y='{i * height + 15}' text-anchor='end'>{html.escape(lbl)}"
        f"</text><rect x='{label_w}' y='{i * height + 4}' width='{bar_w * n / top:.1f}' "
        f"height='14' fill='{PALETTE[i % len(PALETTE)]}'/>"
        f"<text x='{label_w + bar_w * n / top + 4:.1f}' y='{i * height + 15}'>"
        f"{usd_text(n)}</text>"
        for i, (lbl, n) in enumerate(rows)
    )
    total_h = len(rows) * height + 4
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f"<svg role='img' width='{label_w + bar_w + 90}' "
        f"height='{total_h}' font-size='11' font-family='sans-serif'>{bars}</svg></figure>"
    )


def _daily(nanos: tuple[int, ...], period: Period) -> str:
    """Daily spend of the month as an inline SVG column chart."""
    days = period.days()
    top = max(nanos, default=0) or 1
    w, h, pad = 12, 120, 30
    width = pad + len(days) * w + 8
    cols = "".join(
        f"<rect x='{pad + i * w + 1}' y='{h - h * n / top:.1f}' width='{w - 2}' "
        f"height='{h * n / top:.1f}' fill='#2563eb'><title>{d}: ${usd_text(n)}</title></rect>"
        for i, (d, n) in enumerate(zip(days, nanos, strict=True))
    )
    ticks = "".join(
        f"<text x='{pad + i * w + w / 2}' y='{h + 12}' text-anchor='middle'>{d.day}</text>"
        for i, d in enumerate(days)
        if d.day == 1 or d.day % 5 == 0
    )
    return (
        f"<figure><figcaption>Daily spend (USD, max ${usd_text(max(nanos, default=0))})"
        f"</figcaption><svg role='img' width='{width}' "
        f"height='{h + 16}' font-size='9' font-family='sans-serif'>"
        f"<line x1='{pad}' y1='{h}' x2='{width}' y2='{h}' stroke='#999'/>{cols}{ticks}</svg>"
        f"</figure>"
    )


def render(s: Statement, fmt: str, excel: bool = False) -> str:
    if fmt == "json":
        return json.dumps(as_json(s), indent=2) + "\n"
    if fmt == "csv":
        return as_csv(s, excel)
    if fmt == "html":
        return as_html(s)
    return _text(s)


def _text(s: Statement) -> str:
    p = printable
    lines = [f"Chargeback statement {s.period.first:%Y-%m} ({s.period.tz})", ""]
    for center, teams in s.cost_centers().items():
        lines.append(f"Cost center {p(center or '(none)')}")
        for t in teams:
            budget = f" of {usd_text(t.budget_nanos)}" if t.budget_nanos is not None else ""
            rejected = rejections(t.outcomes)
            lines.append(
                f"  {p(t.team)}: ${usd_text(t.sums.cost_nanos)}{budget}, {t.sums.requests} "
                f"requests, {t.sums.images} images, downgrades {t.outcomes.get('downgraded', 0)}"
                f", rejections {rejected}"
            )
            for m, q, x, part in t.by_model:
                what = q if part == "image" else "(mainline)"
                lines.append(f"    {p(m)} {p(what)}: {x.images} images, ${usd_text(x.cost_nanos)}")
            doors = ", ".join(f"{p(d)} ${usd_text(x.cost_nanos)}" for d, x in t.by_endpoint)
            lines.append(f"    by endpoint: {doors or 'none'}")
    lines.append(f"\nTotal ${usd_text(s.total.cost_nanos)}")
    return "\n".join(lines) + "\n"
