"""Where rate limits stand: a team's own view (`rate_statuses`), every limit's window for the
gauges (`every_limit`, `window_statuses`) and the ledger's one read of them all
(`rate_windows`, both backends)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

from proxy.config.prices import load_price_book
from proxy.core import rates
from proxy.core.models import Counter, Entry, Totals, Usage
from proxy.core.rates import Counts, Slot
from proxy.core.settings import (
    Allow,
    Config,
    RateLimit,
    RateShare,
    Team,
    UpstreamSettings,
)
from proxy.core.status import rate_statuses, window_statuses
from proxy.finance.status import rate_status, team_rate_status
from proxy.ledger import Reservation
from proxy.ledger.base import Backend, Chooser

NOW = 1_800_000_030.0  # 30 s into a minute
MINUTE_START = 1_800_000_000.0
DAY_START = 1_799_971_200.0  # 00:00 UTC that day
ORG_IMAGES = RateLimit("minute", "images", 100, "gpt-image-2")


def team(name: str, *limits: RateLimit, shares: tuple[RateShare, ...] = ()) -> Team:
    return Team(name, None, (), (), (), Allow(), (), rate_limits=limits, rate_shares=shares)


def config(*teams: Team, org: tuple[RateLimit, ...] = (ORG_IMAGES,)) -> Config:
    return Config(
        root=Path("."),
        upstream=UpstreamSettings(),
        ledger_url="sqlite:///:memory:",
        timezone="UTC",
        admin_token=None,
        prices=load_price_book(),
        organization_rate_limits=org,
        teams=teams,
    )


DESIGN = team(
    "design",
    RateLimit("minute", "requests", 10),
    RateLimit("day", "tokens", 5000),
    shares=(RateShare("minute", Decimal("0.25")),),
)
RESEARCH = team("research", RateLimit("minute", "images", 3))
QUIET = team("quiet")


def test_every_limit_lists_each_teams_limits_then_the_organizations_in_their_windows() -> None:
    checks = rates.every_limit(config(DESIGN, RESEARCH, QUIET), NOW)
    assert [(c.scope, c.team, c.limit.metric, c.slot.start, c.end) for c in checks] == [
        ("team", "design", "requests", MINUTE_START, MINUTE_START + 60),
        ("team", "design", "tokens", DAY_START, DAY_START + 86400),
        ("team", "research", "images", MINUTE_START, MINUTE_START + 60),
        ("organization", "", "images", MINUTE_START, MINUTE_START + 60),
    ]
    assert rates.every_limit(config(QUIET, org=()), NOW) == ()


def test_window_statuses_count_what_each_window_used_and_nothing_for_the_unused() -> None:
    checks = rates.every_limit(config(RESEARCH), NOW)
    used = {checks[0].slot: 2, checks[1].slot: 130}
    shown = [(s.team, s.used, s.remaining) for s in window_statuses(checks, used)]
    assert shown == [("research", 2, 1), ("", 130, 0)]
    assert [(s.used, s.remaining) for s in window_statuses(checks, {})] == [(0, 3), (0, 100)]


def test_a_teams_statuses_show_its_share_and_the_room_it_keeps_on_the_organization_limit() -> None:
    settings = config(DESIGN, RESEARCH)
    plan = rates.plan(settings, DESIGN, NOW)
    assert plan is not None
    org = plan.checks[-1]
    assert org.own is not None
    # Every team used 95 of 100; design used 5 of its 25: 20 still kept for it.
    counts = Counts({org.slot: 95, org.own: 5, plan.checks[0].slot: 4}, {})
    found = {(s.scope, s.limit.metric): s for s in rate_statuses(plan, counts)}
    requests, tokens = found[("team", "requests")], found[("team", "tokens")]
    images = found[("organization", "images")]
    assert (requests.used, requests.remaining, requests.share) == (4, 6, None)
    assert (tokens.used, tokens.remaining, tokens.resets_at) == (0, 5000, DAY_START + 86400)
    assert (images.used, images.remaining, images.share, images.share_used) == (95, 20, 25, 5)
    assert images.as_json() == {
        "scope": "organization", "per": "minute", "metric": "images", "model": "gpt-image-2",
        "limit": 100, "used": 95, "remaining": 20, "resets_at": MINUTE_START + 60,
        "share": 25, "share_used": 5,
    }  # fmt: skip
    assert requests.as_json()["share"] is None and requests.as_json()["share_used"] is None


def admitted(request_id: str, images: int) -> Chooser:
    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        entry = Entry(request_id, NOW, "generations", team="research", model="gpt-image-2", n=1)
        return Reservation(entry, Usage(image_output=100, images=images), ())

    return choose


async def test_rate_windows_reads_every_slot_asked_in_one_call(ledger: Backend) -> None:
    settings = config(RESEARCH)
    plan = rates.plan(settings, RESEARCH, NOW)
    assert plan is not None
    await ledger.reserve([], admitted("r1", 2), plan)
    await ledger.reserve([], admitted("r2", 1), plan)
    before = rates.plan(settings, RESEARCH, NOW - 60)
    assert before is not None
    await ledger.reserve([], admitted("r0", 1), before)  # the minute before: another window
    checks = rates.every_limit(settings, NOW)
    team_slot, org_slot = checks[0].slot, checks[1].slot
    never = Slot("t|nobody|minute|images|*", MINUTE_START)
    many = [Slot(f"t|team{i}|minute|images|*", MINUTE_START) for i in range(3000)]
    found = await ledger.rate_windows([team_slot, org_slot, never, *many])
    assert found == {team_slot: 3, org_slot: 3}
    earlier = Slot(team_slot.key, MINUTE_START - 60)
    assert await ledger.rate_windows([earlier]) == {earlier: 1}
    assert await ledger.rate_windows([]) == {}


async def test_a_team_without_limits_in_an_organization_without_any_has_no_statuses(
    ledger: Backend,
) -> None:
    assert await team_rate_status(config(QUIET, org=()), ledger, QUIET, NOW) == []
    assert await rate_status(config(QUIET, org=()), ledger, NOW) == []
    shown = await team_rate_status(config(QUIET), ledger, QUIET, NOW)
    assert [(s.scope, s.used, s.remaining, s.share) for s in shown] == [
        ("organization", 0, 100, None)
    ]
