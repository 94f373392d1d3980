"""Where every budget stands, read from the ledger at the moment of asking.

Every worker and replica tells the same truth (the admin API, `tollgate budgets` and
the Prometheus gauges all use it); `proxy.core.status` holds the values.
"""

from __future__ import annotations

from proxy.core import rates
from proxy.core.periods import applicable
from proxy.core.settings import Config, Team
from proxy.core.status import (
    BudgetStatus,
    RateStatus,
    configured,
    rate_statuses,
    statuses,
    window_statuses,
)
from proxy.ledger import Ledger


async def budget_status(
    config: Config, ledger: Ledger, now: float, team: Team | None = None
) -> list[BudgetStatus]:
    """Every organization and team budget, read from the ledger now (with `team`, the
    organization's and that team's only)."""
    applied = configured(config, now, team)
    totals = await ledger.totals(list(dict.fromkeys(a.counter for a in applied)))
    return statuses(applied, totals)


async def user_status(
    config: Config, ledger: Ledger, team_name: str, user: str, now: float
) -> list[BudgetStatus]:
    """One user's budgets (their per-user budgets and those they share)."""
    team = next(t for t in config.teams if t.name == team_name)
    applied = list(applicable(config, team, user, now))
    totals = await ledger.totals(list(dict.fromkeys(a.counter for a in applied)))
    return statuses(applied, totals)


async def rate_status(config: Config, ledger: Ledger, now: float) -> list[RateStatus]:
    """Every team's rate limits and the organization's in their current windows, in one
    read of the ledger however many teams there are."""
    checks = rates.every_limit(config, now)
    if not checks:
        return []
    used = await ledger.rate_windows([c.slot for c in checks])
    return window_statuses(checks, used)


async def team_rate_status(
    config: Config, ledger: Ledger, team: Team, now: float
) -> list[RateStatus]:
    """`team`'s rate limits and the organization's as they apply to it (its room on a
    shared organization limit included), read from the ledger now."""
    plan = rates.plan(config, team, now)
    if plan is None:
        return []
    return rate_statuses(plan, await ledger.rate_counts(plan))
