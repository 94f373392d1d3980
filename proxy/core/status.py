"""Where a budget stands: limit, spent, reserved, remaining, utilization, period end; and
where a rate limit stands in its current window (pure).

The values `proxy.finance.status` reads from the ledger, shown by the admin API,
`tollgate budgets`, `GET /v1/tollgate/budget`, the alerts and the Prometheus gauges.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from proxy.core.models import Counter, Period, Scope, Totals, usd_text
from proxy.core.periods import Applied, Window, read_counter, window, zone
from proxy.core.rates import Check, Counts, Plan, RateScope, Slot
from proxy.core.settings import Budget, Config, Metric, RateLimit, Team


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    scope: str
    """`organization`, `team` or `user`."""
    team: str
    user: str
    period: Period
    metric: Metric
    limit: int
    """Nano-dollars for `usd`, else tokens."""
    spent: int
    """Settled spend; for token budgets, tokens used including those of requests in flight."""
    reserved: int
    """Held by requests in flight (USD budgets only)."""
    window: Window
    alert_at: tuple[Decimal, ...] = ()

    @property
    def used(self) -> int:
        return self.spent + self.reserved

    @property
    def remaining(self) -> int:
        return max(self.limit - self.used, 0)

    @property
    def utilization(self) -> Decimal:
        """Settled spend over the limit (reservations are not spent yet)."""
        return Decimal(self.spent) / self.limit if self.limit else Decimal(0)

    def as_json(self) -> dict[str, object]:
        money = self.metric == "usd"

        def show(value: int) -> str | int:
            return usd_text(value) if money else value

        return {
            "scope": self.scope,
            "team": self.team or None,
            "user": self.user or None,
            "period": self.period,
            "metric": self.metric,
            "limit": show(self.limit),
            "spent": show(self.spent),
            "reserved": show(self.reserved),
            "remaining": show(self.remaining),
            "utilization": format(self.utilization.quantize(Decimal("0.0001")), "f"),
            "period_start": self.window.start,
            "period_end": self.window.end,
            "alert_at": [format(a, "f") for a in self.alert_at],
        }


_NOTHING = Totals()
"""A counter the totals do not name holds nothing (a frozen value: one serves them all)."""


def statuses(applied: list[Applied], totals: dict[Counter, Totals]) -> list[BudgetStatus]:
    """The status of each applied budget given its counter's totals (pure)."""
    found = []
    for a in applied:
        t = totals.get(a.counter, _NOTHING)
        money = a.budget.metric == "usd"
        found.append(
            BudgetStatus(
                scope=a.counter.scope,
                team=a.counter.team,
                user=a.counter.user,
                period=a.budget.period,
                metric=a.budget.metric,
                limit=a.budget.limit,
                spent=t.spent_nanos if money else t.used(a.budget.metric),
                reserved=t.reserved_nanos if money else 0,
                window=a.window,
                alert_at=a.budget.alert_at,
            )
        )
    return found


def configured(config: Config, now: float, team: Team | None = None) -> list[Applied]:
    """Every organization and team budget as it applies now (per-user ones excepted); with
    `team`, the organization's and that team's only."""
    tz = zone(config.timezone)
    # Every budget of a period has the same window and counter bounds at `now`: each is
    # computed once per period, not once per budget (1,000 teams: 3,000 budgets, 4 periods).
    windows: dict[Period, tuple[Window, Counter]] = {}

    def applied(budget: Budget, scope: Scope, team: str) -> Applied:
        found = windows.get(budget.period)
        if found is None:
            w = window(budget.period, now, tz)
            found = windows[budget.period] = (w, read_counter(scope, "", "", w, tz))
        w, c = found
        return Applied(budget, Counter(scope, team, "", c.period, c.start, c.since, c.until), w)

    found = [applied(budget, "organization", "") for budget in config.organization_budgets]
    for each in config.teams if team is None else (team,):
        for budget in each.budgets:
            found.append(applied(budget, "team", each.name))
    return found


@dataclass(frozen=True, slots=True)
class RateStatus:
    """Where one rate limit stands in its current window."""

    scope: RateScope
    team: str
    """The team whose limit it is, or who asks about an organization limit ("" for none)."""
    limit: RateLimit
    used: int
    """What the window counted: the team's, or every team's on an organization limit."""
    remaining: int
    """What may still be added in the window (by `team`, when there is one: on an
    organization limit, its share's room and the room no other team is promised)."""
    resets_at: float
    """When the window ends (unix seconds)."""
    share: int | None = None
    """The part of an organization limit kept for `team` (its `share`), if it has one."""
    share_used: int = 0
    """What `team` counted against that share in the window."""

    def as_json(self) -> dict[str, object]:
        return {
            "scope": self.scope,
            "per": self.limit.per,
            "metric": self.limit.metric,
            "model": self.limit.model,
            "limit": self.limit.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resets_at": self.resets_at,
            "share": self.share,
            "share_used": self.share_used if self.share is not None else None,
        }


def rate_statuses(plan: Plan, counts: Counts) -> list[RateStatus]:
    """Each limit of a team's `plan`, given the counts the ledger read for it."""
    return [
        RateStatus(
            check.scope,
            plan.team,
            check.limit,
            counts.of(check.slot),
            room.remaining,
            check.end,
            check.promise or None,
            counts.of(check.own),
        )
        for check, room in zip(plan.checks, plan.rooms(counts), strict=True)
    ]


def window_statuses(checks: tuple[Check, ...], used: dict[Slot, int]) -> list[RateStatus]:
    """Each of `checks` (`proxy.core.rates.every_limit`) given what its window counted."""
    found = []
    for check in checks:
        count = used.get(check.slot, 0)
        remaining = max(check.limit.limit - count, 0)
        found.append(RateStatus(check.scope, check.team, check.limit, count, remaining, check.end))
    return found
