"""Where every budget stands, read from the ledger at the moment of asking.

Every worker and replica tells the same truth (the admin API, `tollgate budgets` and
the Prometheus gauges all use it); `proxy.core.status` holds the values.
"""

from __future__ import annotations

from proxy.core.budgets import applicable
from proxy.core.settings import Config
from proxy.core.status import BudgetStatus, configured, statuses
from proxy.ledger import Ledger


async def budget_status(config: Config, ledger: Ledger, now: float) -> list[BudgetStatus]:
    """Every organization and team budget, read from the ledger now."""
    applied = configured(config, now)
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
