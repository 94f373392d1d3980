"""Budget status (pure part): limit, spent, reserved, remaining and utilization per budget."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from proxy.config.prices import load_price_book
from proxy.core.models import Counter, Totals
from proxy.core.periods import Applied, applicable, read_counter, window
from proxy.core.settings import Allow, Budget, Config, Team, UpstreamSettings
from proxy.core.status import configured, statuses

NANOS = 10**9
NOW = datetime(2026, 6, 10, 12, tzinfo=UTC).timestamp()


def make_team(name: str, budgets: tuple[Budget, ...], per_user: tuple[Budget, ...] = ()) -> Team:
    return Team(name, None, (), budgets, per_user, Allow(), ())


@pytest.fixture
def config() -> Config:
    design = make_team(
        "design",
        (
            Budget("month", "usd", 800 * NANOS, alert_at=(Decimal("0.5"), Decimal("0.8"))),
            Budget("month", "image_output_tokens", 20_000_000),
        ),
        per_user=(Budget("day", "usd", 5 * NANOS),),
    )
    research = make_team("research", (Budget("day", "usd", 60 * NANOS),))
    return Config(
        root=Path("."),
        upstream=UpstreamSettings(),
        ledger_url="sqlite:///:memory:",
        timezone="UTC",
        admin_token=None,
        prices=load_price_book(),
        organization_budgets=(Budget("month", "usd", 20_000 * NANOS),),
        teams=(design, research),
    )


def test_configured_lists_organization_and_team_budgets_but_not_per_user(config: Config) -> None:
    found = configured(config, NOW)
    assert [(a.counter.scope, a.counter.team, a.budget.period, a.budget.metric) for a in found] == [
        ("organization", "", "month", "usd"),
        ("team", "design", "month", "usd"),
        ("team", "design", "month", "image_output_tokens"),
        ("team", "research", "day", "usd"),
    ]
    for a in found:
        assert a.window == window(a.budget.period, NOW, ZoneInfo(config.timezone))


@pytest.mark.parametrize("zone_name", ["UTC", "America/New_York", "Australia/Lord_Howe"])
@pytest.mark.parametrize(
    "at", [NOW, datetime(2026, 11, 1, 5, 59, 59, tzinfo=UTC).timestamp(), 1_793_491_200.0]
)
def test_configured_counters_are_each_budgets_own(
    config: Config, zone_name: str, at: float
) -> None:
    """Windows are computed once per period for all the budgets of it: each budget's
    counter and window are still what `read_counter` gives that budget alone, `since`
    and `until` included (they are no part of a counter's equality)."""
    budgets = tuple(Budget(p, "usd", NANOS) for p in ("day", "week", "month", "total"))
    teams = (*config.teams, make_team("all", budgets))
    zoned = replace(config, timezone=zone_name, organization_budgets=budgets, teams=teams)
    tz = ZoneInfo(zone_name)
    found = configured(zoned, at)
    expected = [("organization", "", b) for b in budgets] + [
        ("team", t.name, b) for t in teams for b in t.budgets
    ]
    assert len(found) == len(expected)
    for a, (scope, team, budget) in zip(found, expected, strict=True):
        w = window(budget.period, at, tz)
        own = read_counter(scope, team, "", w, tz)
        assert (a.budget, a.window) == (budget, w)
        assert (a.counter, a.counter.since, a.counter.until) == (own, own.since, own.until)


def test_usd_status_splits_spent_and_reserved(config: Config) -> None:
    applied = configured(config, NOW)
    design_month = applied[1]
    totals = {design_month.counter: Totals(spent_nanos=200 * NANOS, reserved_nanos=40 * NANOS)}
    status = statuses([design_month], totals)[0]
    assert (status.scope, status.team, status.user) == ("team", "design", "")
    assert (status.limit, status.spent, status.reserved) == (800 * NANOS, 200 * NANOS, 40 * NANOS)
    assert status.used == 240 * NANOS
    assert status.remaining == 560 * NANOS
    assert status.utilization == Decimal("0.25")  # settled spend only
    assert status.alert_at == (Decimal("0.5"), Decimal("0.8"))


def test_token_status_counts_tokens_in_flight_as_spent(config: Config) -> None:
    tokens = configured(config, NOW)[2]
    totals = {tokens.counter: Totals(image_output_tokens=5_000_000, reserved_nanos=NANOS)}
    status = statuses([tokens], totals)[0]
    assert (status.spent, status.reserved) == (5_000_000, 0)
    assert status.remaining == 15_000_000
    assert status.utilization == Decimal("0.25")


def test_status_without_totals_is_empty(config: Config) -> None:
    status = statuses(configured(config, NOW)[:1], {})[0]
    assert (status.spent, status.reserved, status.remaining) == (0, 0, 20_000 * NANOS)
    assert status.utilization == 0


def test_remaining_never_goes_negative(config: Config) -> None:
    research = configured(config, NOW)[3]
    totals = {research.counter: Totals(spent_nanos=59 * NANOS, reserved_nanos=5 * NANOS)}
    assert statuses([research], totals)[0].remaining == 0


def test_zero_limit_has_zero_utilization() -> None:
    budget = Budget("total", "usd", 0)
    w = window("total", NOW, ZoneInfo("UTC"))
    applied = Applied(budget, Counter("team", "t", "", "total", w.start), w)
    status = statuses([applied], {applied.counter: Totals(spent_nanos=5)})[0]
    assert status.utilization == 0
    assert status.remaining == 0


def test_json_shows_dollars_as_decimal_strings_and_tokens_as_integers(config: Config) -> None:
    applied = configured(config, NOW)
    totals = {
        applied[0].counter: Totals(spent_nanos=1_234_567_890, reserved_nanos=10_000_000),
        applied[2].counter: Totals(image_output_tokens=7024),
    }
    org, _, tokens, _ = (s.as_json() for s in statuses(applied, totals))
    assert org["scope"] == "organization"
    assert org["team"] is None and org["user"] is None
    assert org["limit"] == "20000"
    assert org["spent"] == "1.23456789"
    assert org["reserved"] == "0.01"
    assert org["remaining"] == "19998.75543211"
    assert org["utilization"] == "0.0001"
    assert org["period_start"] == applied[0].window.start
    assert org["period_end"] == applied[0].window.end
    assert tokens["limit"] == 20_000_000
    assert tokens["spent"] == 7024
    assert tokens["remaining"] == 20_000_000 - 7024
    assert tokens["team"] == "design"


def test_user_status_reports_the_per_user_budget_for_that_user(config: Config) -> None:
    design = config.teams[0]
    applied = list(applicable(config, design, "alice", NOW))
    user_budget = applied[-1]
    totals = {user_budget.counter: Totals(spent_nanos=NANOS)}
    status = statuses(applied, totals)[-1]
    assert (status.scope, status.team, status.user, status.period) == (
        "user",
        "design",
        "alice",
        "day",
    )
    assert status.as_json()["alert_at"] == []
    assert status.remaining == 4 * NANOS
