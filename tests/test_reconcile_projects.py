"""Reconciliation per OpenAI project (pure): the Costs API grouped by project against the
ledger's spend of the teams billed to each project."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.config.prices import load_price_book
from proxy.core.errors import InvalidRequest
from proxy.core.models import NANOS_PER_USD, Counter, Totals
from proxy.core.settings import Allow, Config, Team, UpstreamSettings
from proxy.finance.projects import ProjectCosts, as_json, as_table, compare, parse_costs, run
from proxy.finance.reconcile import DEFAULT_TOLERANCE
from proxy.ledger import open_ledger
from proxy.ledger.base import Chooser, Reservation
from tests.test_ledger_responses import ALICE_DAY, ANSWERED, BOUND, DESIGN_DAY, responses_entry

BOOK = load_price_book()
DAY = date(2026, 11, 3)
PROJECTS = {"design": "proj_design", "research": "proj_research", "ops": "proj_company"}


def project_of(team: str) -> str | None:
    return PROJECTS.get(team)


def under(
    spent: Mapping[tuple[date, str], int], of: Callable[[str], str | None] = project_of
) -> dict[tuple[date, str, str | None], int]:
    """Spend by day and team as the ledger reads it: each team's under the project `of`."""
    return {(day, team, of(team)): nanos for (day, team), nanos in spent.items()}


def page(*results: dict[str, Any], day: date = DAY) -> dict[str, Any]:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    bucket = {"object": "bucket", "start_time": start, "end_time": start + 86_400,
              "results": list(results)}  # fmt: skip
    return {"object": "page", "data": [bucket], "has_more": False, "next_page": None}


def cost(value: float, project: str | None, item: str | None = None) -> dict[str, Any]:
    return {"object": "organization.costs.result", "amount": {"value": value, "currency": "usd"},
            "project_id": project, "line_item": item}  # fmt: skip


def test_costs_are_summed_by_day_and_project_leaving_out_unpriced_models() -> None:
    found = parse_costs(
        [page(cost(0.5, "proj_design", "gpt-image-2, image output"),
              cost(0.25, "proj_design", "gpt-5.5, input"),
              cost(3.0, "proj_design", "gpt-3.5-turbo, input"),
              cost(1.0, "proj_research", "batch api | gpt-image-2 image"))],
        BOOK,
    )  # fmt: skip
    assert found.amounts == {(DAY, "proj_design"): Decimal("0.75"),
                             (DAY, "proj_research"): Decimal("1.0")}  # fmt: skip
    assert found.ignored == {(DAY, "gpt-3.5-turbo, input"): Decimal("3.0")}
    assert found.days == {DAY}


def test_costs_grouped_by_project_alone_are_taken_whole() -> None:
    found = parse_costs([page(cost(2.0, "proj_design"), cost(1.0, "proj_research"))], BOOK)
    assert found.amounts == {(DAY, "proj_design"): Decimal("2.0"),
                             (DAY, "proj_research"): Decimal("1.0")}  # fmt: skip


def test_costs_not_grouped_by_project_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="group_by"):
        parse_costs([page(cost(2.0, None, "gpt-image-2, image output"))], BOOK)


def test_each_project_is_compared_with_the_spend_of_its_teams() -> None:
    openai = ProjectCosts({(DAY, "proj_design"): Decimal("1.5"),
                           (DAY, "proj_company"): Decimal("0.2")}, {DAY})  # fmt: skip
    ours = {(DAY, "design"): 1_000_000_000, (DAY, "research"): 300_000_000,
            (DAY, "ops"): 200_000_000}  # fmt: skip
    result = compare(openai, under(ours), project_of, PROJECTS, DAY, DAY)
    by_project = {line.project: line for line in result.lines}
    assert [line.project for line in result.lines] == ["proj_company", "proj_design",
                                                       "proj_research"]  # fmt: skip
    assert by_project["proj_company"].status == "ok"
    assert by_project["proj_company"].teams == ("ops",)
    design = by_project["proj_design"]
    assert (design.status, design.difference) == ("off", Decimal("0.5"))
    assert "bypassed" in design.note
    research = by_project["proj_research"]
    assert (research.openai_usd, research.tollgate_usd) == (Decimal(0), Decimal("0.3"))
    assert research.status == "off" and "Tollgate recorded more" in research.note
    assert result.off_days == [DAY]


def test_teams_sharing_a_project_are_one_line() -> None:
    shared = {"design": "proj_art", "research": "proj_art"}
    openai = ProjectCosts({(DAY, "proj_art"): Decimal("1.3")}, {DAY})
    ours = {(DAY, "design"): 1_000_000_000, (DAY, "research"): 300_000_000}
    result = compare(openai, under(ours, shared.get), shared.get, shared, DAY, DAY)
    [line] = result.lines
    assert (line.project, line.teams, line.status) == ("proj_art", ("design", "research"), "ok")
    assert result.off_days == []


def test_teams_without_a_project_are_shown_unmapped_and_never_off() -> None:
    openai = ProjectCosts({(DAY, "proj_design"): Decimal("1")}, {DAY})
    ours = {(DAY, "design"): 1_000_000_000, (DAY, "legacy"): 700_000_000}
    result = compare(openai, under(ours), project_of, ["design", "legacy"], DAY, DAY)
    unmapped = result.lines[-1]
    assert (unmapped.project, unmapped.teams, unmapped.status) == (None, ("legacy",), None)
    assert "default project" in unmapped.note
    assert result.off_days == []
    assert as_json(result)["lines"][-1]["status"] == "unmapped"
    assert "(key's default)" in as_table(result)


def test_json_and_table_name_the_project_its_teams_and_both_amounts() -> None:
    openai = ProjectCosts({(DAY, "proj_design"): Decimal("1.25")}, {DAY})
    spent = under({(DAY, "design"): 1_250_000_000})
    result = compare(openai, spent, project_of, ["design"], DAY, DAY)
    assert as_json(result)["lines"] == [
        {"day": "2026-11-03", "project": "proj_design", "teams": ["design"],
         "openai_usd": "1.25", "tollgate_usd": "1.25", "held_usd": "0", "difference_usd": "0",
         "status": "ok", "note": ""}
    ]  # fmt: skip
    table = as_table(result)
    assert "proj_design" in table and "design" in table
    assert "Every project matches within the tolerance" in table


def test_only_the_line_items_left_out_on_the_reconciled_days_are_listed() -> None:
    other = date(2026, 11, 4)
    found = parse_costs(
        [page(cost(3.0, "proj_design", "gpt-3.5-turbo, input")),
         page(cost(2.0, "proj_design", "gpt-3.5-turbo, input"), day=other)],
        BOOK,
    )  # fmt: skip
    result = compare(found, {}, project_of, ["design"], other, other)
    assert dict(result.ignored) == {"gpt-3.5-turbo, input": Decimal("2.0")}


def test_a_day_missing_from_the_export_is_said_so() -> None:
    other = date(2026, 11, 4)
    openai = ProjectCosts({(DAY, "proj_design"): Decimal("1")}, {DAY})
    ours = {(DAY, "design"): 1_000_000_000, (other, "design"): 1_000_000_000}
    result = compare(openai, under(ours), project_of, ["design"], DAY, other)
    assert result.off_days == [other]
    assert "no OpenAI data" in result.lines[-1].note


def sent_under(project: str | None, request_id: str, at: float) -> Chooser:
    """A design request reserved as sent under `project` (None: without one)."""

    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        entry = responses_entry(request_id, at)
        return Reservation(entry, BOUND, (DESIGN_DAY, ALICE_DAY), project=project)

    return choose


async def test_each_request_is_reconciled_under_the_project_it_was_sent_under(url: str) -> None:
    """design moved from proj_old to proj_new on the second day: OpenAI billed the first
    day's request to proj_old, and its day stays even under the team's new project."""
    first_day, second_day = date(2026, 11, 3), date(2026, 11, 4)
    first = datetime(2026, 11, 3, 9, tzinfo=UTC).timestamp()
    ledger = await open_ledger(url)
    try:
        await ledger.reserve([], sent_under("proj_old", "before", first))
        await ledger.reserve([], sent_under("proj_new", "after", first + 86_400))
        await ledger.reserve([], sent_under(None, "none", first + 86_400 + 60))
        for request_id in ("before", "after", "none"):
            await ledger.settle(request_id, replace(ANSWERED, response_id=None))
    finally:
        await ledger.close()
    team = Team("design", "CC-1042", (), (), (), Allow(), (), openai_project="proj_new")
    config = Config(
        root=Path("."), upstream=UpstreamSettings(), ledger_url=url, timezone="UTC",
        admin_token=None, prices=BOOK, teams=(team,),
    )  # fmt: skip
    dollars = float(Decimal(ANSWERED.cost_nanos) / NANOS_PER_USD)
    export = [page(cost(dollars, "proj_old"), day=first_day),
              page(cost(dollars, "proj_new"), day=second_day)]  # fmt: skip
    now = datetime(2026, 11, 5, tzinfo=UTC).timestamp()
    found = await run(config, url, export, None, None, None, DEFAULT_TOLERANCE, now)
    lines = {(line.day, line.project): line for line in found.lines}
    assert set(lines) == {(first_day, "proj_old"), (second_day, "proj_new"), (second_day, None)}
    assert lines[first_day, "proj_old"].status == "ok"
    assert lines[first_day, "proj_old"].teams == ("design",)
    assert lines[second_day, "proj_new"].status == "ok"
    # Sent without a project: the key's default project, whatever the team's is now.
    assert lines[second_day, None].status is None
    assert lines[second_day, None].tollgate_usd == Decimal(ANSWERED.cost_nanos) / NANOS_PER_USD
    assert found.off_days == []


async def test_a_model_the_price_book_no_longer_prices_is_still_reconciled(url: str) -> None:
    """gpt-image-2 dropped from a custom price book: a project's line items of it are
    compared with its teams' spend, not left out while that spend reads as billed by no
    one."""
    at = datetime(2026, 11, 3, 9, tzinfo=UTC).timestamp()
    ledger = await open_ledger(url)
    try:
        await ledger.reserve([], sent_under("proj_design", "request", at))
        await ledger.settle("request", replace(ANSWERED, response_id=None))
    finally:
        await ledger.close()
    book = replace(BOOK, models={k: m for k, m in BOOK.models.items() if m.name != "gpt-image-2"})
    team = Team("design", "CC-1042", (), (), (), Allow(), (), openai_project="proj_design")
    config = Config(
        root=Path("."), upstream=UpstreamSettings(), ledger_url=url, timezone="UTC",
        admin_token=None, prices=book, teams=(team,),
    )  # fmt: skip
    dollars = float(Decimal(ANSWERED.cost_nanos) / NANOS_PER_USD)
    export = [page(cost(dollars, "proj_design", "gpt-image-2, image output"),
                   cost(0.5, "proj_design", "gpt-3.5-turbo, input"))]  # fmt: skip
    now = datetime(2026, 11, 5, tzinfo=UTC).timestamp()
    found = await run(config, url, export, None, None, None, DEFAULT_TOLERANCE, now)
    [line] = found.lines
    assert (line.project, line.status, line.openai_usd) == (
        "proj_design",
        "ok",
        Decimal(str(dollars)),
    )
    assert found.ignored == {"gpt-3.5-turbo, input": Decimal("0.5")}
