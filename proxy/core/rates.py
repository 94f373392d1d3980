"""Rate limits: images, requests and tokens per minute or day (README, "Rate limits").

OpenAI limits an organization's images per minute per model; behind one Tollgate, one
team's burst would take all of it. A team's own limits cap it; the organization's limits
cap everyone together; a team's `share` of an organization limit is kept for it: a team
under its share is admitted whatever the others used, and the others may only use room
that no team is still promised. With every team's promise kept, the organization's count
never passes its limit either.

This module is pure: `plan` says which counts a request must read, the ledger reads them
in the transaction that reserves the request, and `Plan.admit` decides, from those counts
and the request as it will be sent, what to add (or raises `RateLimited`). Counts are
added when a request is admitted and never given back: a limit counts what is asked of
OpenAI, as OpenAI's own limits do (its tokens per minute count the request's estimate).

    slot keys   o|minute|images|gpt-image-2      the organization's count of one limit
                t|design|minute|images|*         a team's count of one of its limits
                s|design|o|minute|images|…       a team's count against an organization
                                                 limit that teams have shares of
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from zoneinfo import ZoneInfo

from proxy.core.errors import RateLimited
from proxy.core.models import Entry, Usage
from proxy.core.periods import window, zone
from proxy.core.settings import Config, RateLimit, RateMetric, Team

MINUTE = 60.0

RateScope = Literal["team", "organization"]


@dataclass(frozen=True, slots=True)
class Slot:
    """One count in the ledger: what a scope used of one limit in one window.

    A day's count read for a decision also names, in `since` and `until`, the starts of
    the counts of the same limit kept under another time zone whose days overlap it: they
    count too after the configuration's `timezone` changed (as budgets' counters do, see
    `proxy.ledger.overlaps`). Neither takes part in a slot's identity."""

    key: str
    start: float
    since: float | None = field(default=None, compare=False, repr=False)
    until: float | None = field(default=None, compare=False, repr=False)

    def bounds(self) -> tuple[float, float]:
        """The starts, both excluded, of the counts that count toward this one."""
        if self.since is None or self.until is None:
            return self.start - 0.5, self.start + 0.5
        return self.since, self.until


@dataclass(frozen=True, slots=True)
class Promise:
    """What the teams other than `team` holding shares of one organization limit used of
    their promises in a window: the sum of each one's count, capped at its promise as the
    configuration in force says it. A count made under a share since made smaller, or
    taken away by a reload within the window, keeps no more than what is promised now:
    room kept for a promise nobody holds any more would be given twice."""

    group: str
    """The organization limit's slot key."""
    start: float
    team: str
    others: tuple[tuple[str, int], ...] = ()
    """Each other team holding a share: the slot key of its count, and its promise."""
    window: tuple[float, float] = field(default=(0.0, 0.0), compare=False)
    """The starts, both excluded, of the counts read (`Slot.bounds`)."""


@dataclass(frozen=True, slots=True)
class Add:
    """A count to add to when a request is admitted."""

    slot: Slot
    amount: int
    team: str = ""
    group: str = ""
    """For a team's count against a shared organization limit: that limit's key."""
    promise: int = 0
    """For such a count: the team's promise (stored with it, summed by `Promise`)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One limit as it applies to one request."""

    limit: RateLimit
    scope: RateScope
    slot: Slot
    end: float
    """When its window ends (and the limit has room again)."""
    team: str = ""
    own: Slot | None = None
    """On an organization limit that teams have shares of: the team's count against it,
    kept for a team without a share too (a reload may give it one within the window: what
    it borrowed is then what it used of its promise)."""
    promise: int = 0
    """The team's share of it (0 without one)."""
    promised: int = 0
    """What the other teams' shares of it promise in all."""
    others: tuple[tuple[str, int], ...] = ()
    """Those teams' counts' slot keys and promises (`Promise.others`)."""

    @property
    def shared(self) -> Promise | None:
        if self.promised == 0:
            return None
        return Promise(self.slot.key, self.slot.start, self.team, self.others, self.slot.bounds())

    @property
    def ceiling(self) -> int:
        """The most one window of this limit may ever give the team: the whole limit, but
        for what the other teams' shares promise (unless its own share is more)."""
        if self.scope == "team":
            return self.limit.limit
        return max(self.limit.limit - self.promised, self.promise)

    def describe(self) -> str:
        who = "the organization's" if self.scope == "organization" else "the team's"
        limit = self.limit
        model = f" of {limit.model}" if limit.model else ""
        return f"{who} limit of {limit.limit:,} {limit.metric}{model} per {limit.per}"


@dataclass(frozen=True, slots=True)
class Room:
    """What is left of the tightest limit of one metric after a request."""

    metric: RateMetric
    limit: int
    remaining: int
    resets_at: float


@dataclass(frozen=True, slots=True)
class Paced:
    """A request admitted: the counts to add to, and the room each metric has left."""

    adds: tuple[Add, ...]
    rooms: tuple[Room, ...]


@dataclass(frozen=True, slots=True)
class Counts:
    """What the ledger read for a plan: each slot's count, each promise's use."""

    used: Mapping[Slot, int]
    kept: Mapping[Promise, int]

    def of(self, slot: Slot | None) -> int:
        return self.used.get(slot, 0) if slot is not None else 0


def ask(usage: Usage) -> dict[RateMetric, int]:
    """What a request with bound `usage` counts against each metric: its images (`n`
    counts as `n`; the Responses image tool: its most calls), one request, and the tokens
    of its bound."""
    return {"images": usage.images, "requests": 1, "tokens": usage.total_tokens}


def image_model(model: str | None, n: int | None) -> str | None:
    """The image model a request of `n` images counts against: none when it makes none. A
    Responses request without the image tool (or with `tool_choice: none`) names the
    default image model, which it never calls; it used to count against that model's
    limits, and be refused by them."""
    return None if n == 0 else model


@dataclass(frozen=True, slots=True)
class Plan:
    """The limits one request of one team must fit, and what must be read to decide."""

    team: str
    checks: tuple[Check, ...]
    at: float = 0.0
    """The time its windows were chosen for: when the request is decided, not when its
    headers came (`plan`)."""

    @property
    def slots(self) -> tuple[Slot, ...]:
        found = [c.slot for c in self.checks]
        found += [c.own for c in self.checks if c.own is not None]
        return tuple(dict.fromkeys(found))

    @property
    def promises(self) -> tuple[Promise, ...]:
        return tuple(dict.fromkeys(p for c in self.checks if (p := c.shared) is not None))

    def admit(self, entry: Entry, usage: Usage, counts: Counts, now: float) -> Paced:
        """The counts to add for a request sent as `entry` with bound `usage`; raises
        `RateLimited` naming the first limit it does not fit."""
        asked = ask(usage)
        adds: dict[Slot, Add] = {}
        rooms: list[Room] = []
        model = image_model(entry.model, entry.n)
        for check in self.checks:
            if not check.limit.matches(model, entry.mainline_model):
                continue
            amount = asked[check.limit.metric]
            left = self._room(check, counts) - amount
            if left < 0:
                rooms_now = self.rooms(counts, model, entry.mainline_model)
                raise refusal(check, counts.of(check.slot), amount, now, rooms_now)
            rooms.append(Room(check.limit.metric, check.limit.limit, left, check.end))
            if amount:
                adds.setdefault(check.slot, Add(check.slot, amount))
                if check.own is not None:
                    adds[check.own] = Add(
                        check.own, amount, self.team, check.slot.key, check.promise
                    )
        return Paced(tuple(adds.values()), tightest(tuple(rooms)))

    def rooms(
        self, counts: Counts, model: str | None = None, mainline: str | None = None
    ) -> tuple[Room, ...]:
        """The room of each limit now (of those a request of `model` and `mainline` counts
        against, when either is named)."""
        return tuple(
            Room(c.limit.metric, c.limit.limit, max(self._room(c, counts), 0), c.end)
            for c in self.checks
            if (model is None and mainline is None) or c.limit.matches(model, mainline)
        )

    def _room(self, check: Check, counts: Counts) -> int:
        """How much the team may still add to `check`'s count now."""
        used = counts.of(check.slot)
        if check.scope == "team":
            return check.limit.limit - used
        shared = check.shared
        others = check.promised - (counts.kept.get(shared, 0) if shared is not None else 0)
        room = check.limit.limit - used - max(others, 0)
        if check.own is not None:
            room = max(room, check.promise - counts.of(check.own))
        return room


def refusal(
    check: Check, used: int, amount: int, now: float, rooms: tuple[Room, ...]
) -> RateLimited:
    wait = max(1, math.ceil(check.end - now))
    metric = check.limit.metric
    ceiling = check.ceiling
    # A request no window can hold is never admitted: the SDKs must not wait for one.
    never = amount > ceiling
    whole = (
        f"the limit allows in a whole {check.limit.per}"
        if ceiling == check.limit.limit
        else f"the limit allows its team in a whole {check.limit.per} ({ceiling:,} "
        f"{metric}: the rest is promised to other teams' shares)"
    )
    message = (
        f"Rate limit reached: {check.describe()} (used {used:,}, this request "
        f"{amount:,} {metric}). "
        + (
            f"This request asks for more than {whole}: "
            "ask for less (fewer images, a smaller bound) or split it."
            if never
            else f"Try again in {wait}s."
        )
    )
    return RateLimited(
        message,
        retry_after=wait,
        metric=metric,
        headers=headers(tightest(rooms), now),
        per=check.limit.per,
        never=never,
    )


def tightest(rooms: tuple[Room, ...]) -> tuple[Room, ...]:
    """The room of each metric's tightest limit."""
    found: dict[RateMetric, Room] = {}
    for room in rooms:
        best = found.get(room.metric)
        if best is None or room.remaining < best.remaining:
            found[room.metric] = room
    return tuple(found.values())


def headers(rooms: tuple[Room, ...], now: float) -> dict[str, str]:
    """`x-tollgate-ratelimit-{limit,remaining,reset}-{metric}` of each metric's tightest
    limit (its reset in whole seconds, rounded up)."""
    found: dict[str, str] = {}
    for room in rooms:
        found[f"x-tollgate-ratelimit-limit-{room.metric}"] = str(room.limit)
        found[f"x-tollgate-ratelimit-remaining-{room.metric}"] = str(max(room.remaining, 0))
        found[f"x-tollgate-ratelimit-reset-{room.metric}"] = f"{math.ceil(room.resets_at - now)}s"
    return found


def plan(config: Config, team: Team, now: float) -> Plan | None:
    """The rate limits a request of `team` at `now` must fit; None when there are none.

    A request is planned when it is decided (its body in), the moment before it is sent
    upstream, and counts in the windows of that moment: its headers may have come minutes
    earlier (`limits.body_timeout_s`), and requests whose headers came in several minutes,
    each counted in its own, would all reach OpenAI in the one their bodies ended in."""
    if not team.rate_limits and not config.organization_rate_limits:
        return None
    tz = zone(config.timezone)
    checks = [_check(limit, "team", f"t|{team.name}", now, tz) for limit in team.rate_limits]
    promises = config.promises()
    for index, limit in enumerate(config.organization_rate_limits):
        check = _check(limit, "organization", "o", now, tz)
        shares = promises[index]
        if shares:
            promise = shares.get(team.name, 0)
            own = replace(check.slot, key=share_key(team.name, check.slot.key))
            promised = sum(shares.values()) - promise
            others = tuple(
                (share_key(name, check.slot.key), kept)
                for name, kept in shares.items()
                if name != team.name and kept
            )
            check = Check(
                limit, "organization", check.slot, check.end, team.name, own, promise, promised,
                others,
            )  # fmt: skip
        checks.append(check)
    return Plan(team.name, tuple(checks), now)


def share_key(team: str, group: str) -> str:
    """The slot key of `team`'s count against the organization limit of slot key `group`."""
    return f"s|{team}|{group}"


def every_limit(config: Config, now: float) -> tuple[Check, ...]:
    """Every team's own limits, then the organization's, as they apply at `now` (what the
    rate gauges show; without shares: the gauges count the organization as a whole)."""
    tz = zone(config.timezone)
    found = [
        replace(_check(limit, "team", f"t|{team.name}", now, tz), team=team.name)
        for team in config.teams
        for limit in team.rate_limits
    ]
    found += [
        _check(limit, "organization", "o", now, tz) for limit in config.organization_rate_limits
    ]
    return tuple(found)


def _check(limit: RateLimit, scope: RateScope, prefix: str, now: float, tz: ZoneInfo) -> Check:
    key = f"{prefix}|{limit.per}|{limit.metric}|{limit.model or '*'}"
    if limit.per == "minute":
        start = now // MINUTE * MINUTE
        return Check(limit, scope, Slot(key, start), start + MINUTE)
    day = window("day", now, tz)
    end = day.end or day.start
    before = window("day", day.start - 1, tz)
    return Check(limit, scope, Slot(key, day.start, before.start, end), end)
