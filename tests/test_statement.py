"""The monthly chargeback statement on both ledger backends: each team's spend under the
cost center its requests were recorded with, as `report --by cost_center` shows it, whatever
the configuration says now."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.core.models import NANOS_PER_USD, Usage
from proxy.core.settings import Allow, Budget, Config, Team, UpstreamSettings
from proxy.finance import reports, statement
from tests.test_reports_responses import BOOK, DAY_TWO, NOVEMBER, REQUESTS, filled, request

MOVED = request(
    6, DAY_TWO + 300, "design", "generations", "gpt-image-2", "low",
    Usage(text_input=20, image_output=1056, images=1),
)  # fmt: skip
"""design's last request of the month, after it moved to cost center CC-9000."""
REQUESTS_MOVED = (*REQUESTS, replace(MOVED, entry=replace(MOVED.entry, cost_center="CC-9000")))
BUDGET = 50 * NANOS_PER_USD


def config(*teams: tuple[str, str]) -> Config:
    built = tuple(
        Team(name, center, (), (Budget("month", "usd", BUDGET),), (), Allow(), ())
        for name, center in teams
    )
    return Config(
        root=Path("."), upstream=UpstreamSettings(), ledger_url="", timezone="UTC",
        admin_token=None, prices=BOOK, teams=built,
    )  # fmt: skip


def by_center(data: dict[str, Any]) -> dict[tuple[str | None, str], Decimal]:
    return {
        (center["cost_center"], team["team"]): Decimal(team["total"]["cost_usd"])
        for center in data["cost_centers"]
        for team in center["teams"]
    }


async def test_spend_stays_with_the_cost_center_it_was_recorded_under(url: str) -> None:
    """research left the configuration and design moved to CC-9000 on the month's last
    request: the statement charges each cost center what `report --by cost_center,team`
    does, and design's budget is read against its whole month."""
    ledger = await filled(url, REQUESTS_MOVED)
    try:
        built = await statement.build(ledger, config(("design", "CC-9000")), NOVEMBER)
        report = await reports.summarize(ledger, NOVEMBER, ("cost_center", "team"))
    finally:
        await ledger.close()
    data = statement.as_json(built)
    expected = {
        (key[0] or None, str(key[1])): Decimal(sums.cost_nanos) / NANOS_PER_USD
        for key, sums in report.rows
    }
    assert by_center(data) == expected
    assert set(expected) == {("CC-1042", "design"), ("CC-2077", "research"),
                             ("CC-9000", "design")}  # fmt: skip
    assert data["total"] == reports.as_json(report)["total"]
    design = sum(r.settlement.cost_nanos for r in REQUESTS_MOVED if r.entry.team == "design")
    shares = [
        team["utilization"]
        for center in data["cost_centers"]
        for team in center["teams"]
        if team["team"] == "design"
    ]
    assert shares == [format((Decimal(design) / BUDGET).quantize(Decimal("0.0001")), "f")] * 2
    lines = statement.as_csv(built).splitlines()
    assert any(line.startswith("CC-2077,research,total,,cost_usd,") for line in lines)


async def test_a_team_without_requests_is_listed_under_its_configured_cost_center(
    url: str,
) -> None:
    ledger = await filled(url)
    try:
        teams = config(("design", "CC-1042"), ("idle", "CC-5000"))
        built = await statement.build(ledger, teams, NOVEMBER)
    finally:
        await ledger.close()
    found = by_center(statement.as_json(built))
    assert found["CC-5000", "idle"] == Decimal(0)
    assert ("CC-2077", "research") in found


async def test_requests_without_a_user_are_one_top_user(url: str) -> None:
    """A request that sent no `user` and one that sent "" are both without one: a single
    `(none)` among the top users, not two lines of that name taking two of the five."""
    unnamed = [
        replace(r, entry=replace(r.entry, user=user))
        for r, user in zip(REQUESTS[:2], (None, ""), strict=True)
    ]
    ledger = await filled(url, (*unnamed, *REQUESTS[2:]))
    try:
        built = await statement.build(ledger, config(), NOVEMBER)
    finally:
        await ledger.close()
    first = REQUESTS[0].entry
    [team] = [t for t in built.teams if (t.cost_center, t.team) == (first.cost_center, first.team)]
    names = [user for user, _ in team.top_users]
    assert names.count("(none)") == 1
    nanos = sum(r.settlement.cost_nanos for r in REQUESTS[:2] if r.entry.team == first.team)
    assert dict(team.top_users)["(none)"].cost_nanos == nanos
