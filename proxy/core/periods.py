"""Budget periods (pure): the window a period covers at an instant, the counters a
request adds to, and the budgets that apply to it.

Windows are computed in the configured time zone (`zone`), so a day or a month starts at
local midnight and a day around a DST change has its true length. Every instant of a UTC
minute has the same windows, so each answer is computed once a minute and kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from math import inf
from zoneinfo import ZoneInfo

from proxy.core.models import Counter, Period, Scope, Totals, usd_text
from proxy.core.settings import Budget, Config, Team

PERIOD_ORDER: tuple[Period, ...] = ("day", "week", "month", "total")

UTC = ZoneInfo("UTC")


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class Window:
    period: Period
    start: float
    end: float | None
    """None for `total`."""


def window(period: Period, now: float, tz: ZoneInfo) -> Window:
    """The period containing `now` (unix seconds), with boundaries in `tz`."""
    if period == "total":
        return Window(period, 0.0, None)
    # Zone offsets are whole minutes, so period boundaries fall on UTC minutes: every
    # instant of a minute has the same window, computed once.
    minute = int(now // 60)
    found = _window_of_minute(period, minute, tz)
    if found.start <= now < (found.end or now + 1):
        return found
    return _window_of(period, now, tz)


@lru_cache(maxsize=1024)
def _window_of_minute(period: Period, minute: int, tz: ZoneInfo) -> Window:
    return _window_of(period, minute * 60.0, tz)


def _window_of(period: Period, now: float, tz: ZoneInfo) -> Window:
    local = datetime.fromtimestamp(now, tz)
    # The day's first midnight (fold 0): where clocks turn back to midnight (Havana, 01:00 to
    # 00:00), an instant of the repeated hour keeps fold 1, which would name the second
    # midnight and start a window of its own within the same day.
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # Re-attach the zone so that days around a DST change have their true length.
    start = start.replace(tzinfo=tz)
    end = end.replace(tzinfo=tz)
    return Window(period, start.timestamp(), end.timestamp())


def counters(team: str, user: str | None, now: float, tz: ZoneInfo) -> tuple[Counter, ...]:
    """The counters a request of `team` (and `user`) adds to, one per period and scope."""
    # Built once a minute per team and user (every request of a team builds the same
    # ones), and used for any instant inside all of their windows, which is every
    # instant of the minute but where a zone's boundary falls within one.
    found, since, until = _counters_of_minute(team, user, int(now // 60), tz)
    if since <= now < until:
        return found
    return _counters_at(team, user, now, tz)[0]


@lru_cache(maxsize=4096)
def _counters_of_minute(
    team: str, user: str | None, minute: int, tz: ZoneInfo
) -> tuple[tuple[Counter, ...], float, float]:
    return _counters_at(team, user, minute * 60.0, tz)


def _counters_at(
    team: str, user: str | None, now: float, tz: ZoneInfo
) -> tuple[tuple[Counter, ...], float, float]:
    """The counters at `now`, and the latest start and earliest end of their windows."""
    windows = [window(p, now, tz) for p in PERIOD_ORDER]
    found = [Counter("team", team, "", w.period, w.start) for w in windows]
    if user:
        found += [Counter("user", team, user, w.period, w.start) for w in windows]
    ends = [w.end for w in windows if w.end is not None]
    return tuple(found), max(w.start for w in windows), min(ends, default=inf)


@dataclass(frozen=True, slots=True)
class Applied:
    """A configured budget as it applies to one request: its counter and window."""

    budget: Budget
    counter: Counter
    window: Window

    def describe(self) -> str:
        who = {
            "organization": "the organization's",
            "team": f"team {self.counter.team}'s",
            "user": f"user {self.counter.user!r}'s",
        }[self.counter.scope]
        return f"{who} {self.budget.period} budget"

    def limit_text(self, totals: Totals) -> str:
        """`limit $60, spent $59.5, reserved $0.4`: what a 429 names. Plain numbers, as
        the configuration writes them and `tollgate budgets` prints them."""
        if self.budget.metric == "usd":
            reserved = totals.reserved_nanos
            return (
                f"limit ${usd_text(self.budget.limit)}, spent ${usd_text(totals.spent_nanos)}"
                + (f", reserved ${usd_text(reserved)}" if reserved else "")
            )
        kind = self.budget.metric.replace("_", " ")
        used = totals.used(self.budget.metric)
        return f"limit {self.budget.limit} {kind}, spent or reserved {used}"


def applicable(config: Config, team: Team, user: str | None, now: float) -> tuple[Applied, ...]:
    """Every budget a request of `team` by `user` must fit: organization, team, user."""
    # Kept for a minute, as `counters` are: the same budgets give the same answer.
    tz = zone(config.timezone)
    found, since, until = _applicable_of_minute(
        config.organization_budgets, team.name, team.budgets, team.per_user, user,
        int(now // 60), tz,
    )  # fmt: skip
    if since <= now < until:
        return found
    return _applicable_at(
        config.organization_budgets, team.name, team.budgets, team.per_user, user, now, tz
    )[0]


@lru_cache(maxsize=4096)
def _applicable_of_minute(
    organization: tuple[Budget, ...],
    team: str,
    budgets: tuple[Budget, ...],
    per_user: tuple[Budget, ...],
    user: str | None,
    minute: int,
    tz: ZoneInfo,
) -> tuple[tuple[Applied, ...], float, float]:
    return _applicable_at(organization, team, budgets, per_user, user, minute * 60.0, tz)


def _applicable_at(
    organization: tuple[Budget, ...],
    team: str,
    budgets: tuple[Budget, ...],
    per_user: tuple[Budget, ...],
    user: str | None,
    now: float,
    tz: ZoneInfo,
) -> tuple[tuple[Applied, ...], float, float]:
    """The budgets that apply at `now`, and the latest start and earliest end of their
    windows (the instants the same answer holds for)."""
    found: list[Applied] = []
    for budget in organization:
        w = window(budget.period, now, tz)
        found.append(Applied(budget, read_counter("organization", "", "", w, tz), w))
    for budget in budgets:
        w = window(budget.period, now, tz)
        found.append(Applied(budget, read_counter("team", team, "", w, tz), w))
    if user:
        for budget in per_user:
            w = window(budget.period, now, tz)
            found.append(Applied(budget, read_counter("user", team, user, w, tz), w))
    since = max((a.window.start for a in found), default=-inf)
    until = min((a.window.end for a in found if a.window.end is not None), default=inf)
    return tuple(found), since, until


def read_counter(scope: Scope, team: str, user: str, w: Window, tz: ZoneInfo) -> Counter:
    """The counter of window `w` as a decision reads it: with the counters written under
    another time zone whose windows overlap `w` (see `Counter.since`): each one that holds
    spend of `w` starts before `w` ends, and after the window before `w` began (but where a
    DST change made it longer than that one). Those windows may hold spend from before `w`
    too, which then counts: a budget refuses early rather than let spend pass its limit."""
    if w.end is None:
        return Counter(scope, team, user, w.period, w.start)
    before = window(w.period, w.start - 1, tz)
    return Counter(scope, team, user, w.period, w.start, before.start, w.end)


def spanning(
    config: Config, team: Team, user: str | None, start: float, span: float
) -> tuple[tuple[Applied, ...], tuple[Counter, ...]]:
    """Every budget, and every counter, of each window that a spend booked at any instant
    from `start` to `start + span` falls in: what a reservation must hold room in when its
    cost is booked when it ends, not when it starts (a batch is billed on the day it
    completes, up to a day after it was created)."""
    tz = zone(config.timezone)
    step = 1800.0  # far shorter than any window: each one the span touches is sampled
    instants = [start + i * step for i in range(int(span // step) + 1)] + [start + span]
    budgets: dict[tuple[Counter, Budget], Applied] = {}
    found: dict[Counter, None] = {}
    for instant in instants:
        for applied in applicable(config, team, user, instant):
            budgets.setdefault((applied.counter, applied.budget), applied)
        found.update(dict.fromkeys(counters(team.name, user, instant, tz)))
    return tuple(budgets.values()), tuple(found)
