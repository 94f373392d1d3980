"""Rate limits, pure (`proxy.core.rates`): what a request counts, team and organization
limits, windows, shares kept for their teams whatever the others do, and the room told in
headers. The ledger's part (counts read and added in the reservation's transaction, on
both backends) is in test_ledger_rates; the SDKs' part in test_rates_e2e."""

from __future__ import annotations

import math
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.prices import load_price_book
from proxy.core import rates
from proxy.core.errors import RateLimited
from proxy.core.models import Entry, ImageRequest, Usage
from proxy.core.rates import Add, Counts, Plan, Promise, Slot
from proxy.core.settings import Allow, Config, RateLimit, RateShare, Team, UpstreamSettings

BOOK = load_price_book()
NOW = 1_780_000_050.0  # 30 s into a minute
MINUTE_START = NOW // 60 * 60


def team(name: str, *limits: RateLimit | RateShare) -> Team:
    return Team(
        name=name,
        cost_center=None,
        keys=(),
        budgets=(),
        per_user=(),
        allow=Allow(),
        throttle=(),
        rate_limits=tuple(x for x in limits if isinstance(x, RateLimit)),
        rate_shares=tuple(x for x in limits if isinstance(x, RateShare)),
    )


def config(teams: tuple[Team, ...], *org: RateLimit, timezone: str = "UTC") -> Config:
    return Config(
        root=Path("."),
        upstream=UpstreamSettings(),
        ledger_url="sqlite:///:memory:",
        timezone=timezone,
        admin_token=None,
        prices=BOOK,
        organization_rate_limits=org,
        teams=teams,
    )


def request(n: int = 1, model: str = "gpt-image-2", tokens: int = 0) -> tuple[Entry, Usage]:
    sent = ImageRequest("generations", model, n=n)
    entry = Entry("tg_req_1", NOW, "generations", "t").sent(sent, 0, "")
    return entry, Usage(images=n, image_output=tokens)


class Store:
    """The ledger's counts, in memory: what `Ledger.reserve` reads and adds."""

    def __init__(self) -> None:
        self.used: dict[Slot, int] = {}
        self.rows: dict[Slot, Add] = {}

    def counts(self, plan: Plan) -> Counts:
        kept = {
            p: sum(min(self.used.get(Slot(key, p.start), 0), n) for key, n in p.others)
            for p in plan.promises
        }
        return Counts({s: self.used[s] for s in plan.slots if s in self.used}, kept)

    def admit(
        self, cfg: Config, name: str, n: int = 1, now: float = NOW, tokens: int = 0
    ) -> rates.Paced:
        found = next(t for t in cfg.teams if t.name == name)
        plan = rates.plan(cfg, found, now)
        assert plan is not None
        entry, usage = request(n, tokens=tokens)
        paced = plan.admit(entry, usage, self.counts(plan), now)
        for add in paced.adds:
            self.used[add.slot] = self.used.get(add.slot, 0) + add.amount
            self.rows[add.slot] = add
        return paced

    def refused(self, cfg: Config, name: str, n: int = 1, now: float = NOW) -> RateLimited:
        with pytest.raises(RateLimited) as caught:
            self.admit(cfg, name, n, now)
        return caught.value


def test_no_limits_no_plan() -> None:
    cfg = config((team("a"),))
    assert rates.plan(cfg, cfg.teams[0], NOW) is None


def test_a_request_counts_its_images_one_request_and_the_tokens_of_its_bound() -> None:
    _, usage = request(n=4, tokens=1000)
    assert rates.ask(replace(usage, text_input=20)) == {
        "images": 4,
        "requests": 1,
        "tokens": 1020,
    }


def test_a_team_limit_counts_n_images_as_n() -> None:
    cfg = config((team("a", RateLimit("minute", "images", 10)),))
    store = Store()
    store.admit(cfg, "a", n=4)
    store.admit(cfg, "a", n=4)
    refusal = store.refused(cfg, "a", n=4)
    assert refusal.status == 429 and refusal.type == "requests"
    assert refusal.code == "rate_limit_exceeded"
    assert "the team's limit of 10 images per minute" in refusal.message
    assert "used 8" in refusal.message
    store.admit(cfg, "a", n=2)  # exactly to the limit


def test_retry_after_is_the_seconds_until_the_window_turns() -> None:
    cfg = config((team("a", RateLimit("minute", "requests", 1)),))
    store = Store()
    store.admit(cfg, "a")
    refusal = store.refused(cfg, "a")
    assert refusal.retry_after == 30
    headers = refusal.headers()
    assert headers["retry-after"] == "30"
    assert headers["x-tollgate-ratelimit-remaining-requests"] == "0"
    assert headers["x-tollgate-ratelimit-reset-requests"] == "30s"
    assert "x-should-retry" not in headers  # the SDKs wait 30 s and retry
    store.admit(cfg, "a", now=MINUTE_START + 60)  # the next minute has room


def test_a_daily_limit_says_not_to_retry() -> None:
    cfg = config((team("a", RateLimit("day", "requests", 1)),))
    store = Store()
    store.admit(cfg, "a")
    refusal = store.refused(cfg, "a")
    assert refusal.retry_after > 60
    assert refusal.headers()["x-should-retry"] == "false"


def test_a_request_larger_than_a_whole_window_says_not_to_retry() -> None:
    # 5 images a minute: n=8 never fits, however long the SDK waits (and it would wait the
    # minute out twice before giving up).
    cfg = config((team("a", RateLimit("minute", "images", 5)),))
    refusal = Store().refused(cfg, "a", n=8)
    assert refusal.headers()["x-should-retry"] == "false"
    assert "more than the limit allows in a whole minute" in refusal.message


def test_days_turn_in_the_configured_time_zone() -> None:
    cfg = config((team("a", RateLimit("day", "requests", 1)),), timezone="Asia/Tokyo")
    plan = rates.plan(cfg, cfg.teams[0], NOW)
    assert plan is not None
    start = plan.checks[0].slot.start
    assert (start + 9 * 3600) % 86400 == 0  # midnight in Tokyo
    assert plan.checks[0].end - start == 86400


def test_a_day_whose_clocks_turn_back_to_midnight_keeps_one_count() -> None:
    # Havana, 1 November 2026: 00:30 CDT (04:30 UTC), then 00:30 again in CST an hour later.
    cfg = config((team("a", RateLimit("day", "requests", 1)),), timezone="America/Havana")
    first = 1_793_507_400.0
    slots = set()
    for later in (0.0, 3600.0, 7200.0):
        plan = rates.plan(cfg, cfg.teams[0], first + later)
        assert plan is not None
        slots.add((plan.checks[0].slot.key, plan.checks[0].slot.start))
    assert len(slots) == 1


def test_a_limit_of_one_model_counts_only_that_models_requests() -> None:
    cfg = config((team("a", RateLimit("minute", "images", 1, model="gpt-image-1.5")),))
    store = Store()
    for _ in range(3):
        store.admit(cfg, "a")  # gpt-image-2: not counted
    plan = rates.plan(cfg, cfg.teams[0], NOW)
    assert plan is not None
    entry, usage = request(model="gpt-image-1.5")
    store_counts = store.counts(plan)
    plan.admit(entry, usage, store_counts, NOW)
    with pytest.raises(RateLimited):
        plan.admit(entry, usage, Counts({plan.checks[0].slot: 1}, {}), NOW)


def test_a_request_larger_than_a_window_can_ever_give_its_team_says_not_to_retry() -> None:
    # 20 images a minute, of which a and b are promised 15: c, without a share, is never
    # given more than 5 in a minute, so n=8 never fits it (the SDK would wait two minutes
    # out for nothing); a, promised 5, may borrow the 5 nobody is promised: 8 does not fit
    # now, with b's 10 taken meanwhile, but may in a quieter minute.
    cfg = shared_config()
    store = Store()
    refusal = store.refused(cfg, "c", n=8)
    assert refusal.headers()["x-should-retry"] == "false"
    assert "more than the limit allows its team in a whole minute" in refusal.message
    for _ in range(4):
        store.admit(cfg, "c")
    refusal = store.refused(cfg, "a", n=11)  # past its 5 and the 5 nobody is promised
    assert refusal.headers()["x-should-retry"] == "false"
    store.admit(cfg, "b", n=10)
    refusal = store.refused(cfg, "a", n=8)
    assert "x-should-retry" not in refusal.headers()
    assert "Try again in 30s." in refusal.message


def test_the_organization_limit_counts_every_team() -> None:
    cfg = config((team("a"), team("b")), RateLimit("minute", "images", 5))
    store = Store()
    store.admit(cfg, "a", n=3)
    store.admit(cfg, "b", n=2)
    refusal = store.refused(cfg, "a")
    assert "the organization's limit of 5 images per minute" in refusal.message


def shared_config() -> Config:
    return config(
        (
            team("a", RateShare("minute", Decimal("0.25"))),
            team("b", RateShare("minute", Decimal("0.5"))),
            team("c"),  # no share: borrows what nobody is promised
        ),
        RateLimit("minute", "images", 20),
    )


def test_a_team_under_its_share_is_admitted_whatever_the_others_used() -> None:
    cfg = shared_config()
    store = Store()
    # b floods: its own 10, then the 5 that nobody is promised; a's 5 stay kept.
    for _ in range(15):
        store.admit(cfg, "b")
    store.refused(cfg, "b")
    store.refused(cfg, "c")
    for _ in range(5):
        store.admit(cfg, "a")  # a's share, whole
    store.refused(cfg, "a")


def test_unpromised_room_is_borrowed_while_promises_stay_kept() -> None:
    cfg = shared_config()
    store = Store()
    for _ in range(5):
        store.admit(cfg, "c")  # the 5 nobody is promised
    store.refused(cfg, "c")
    for _ in range(10):
        store.admit(cfg, "b")
    for _ in range(5):
        store.admit(cfg, "a")


def test_a_team_past_its_share_borrows_only_what_nobody_is_promised() -> None:
    cfg = shared_config()
    store = Store()
    for _ in range(7):  # a's 5, then 2 of the 5 nobody is promised
        store.admit(cfg, "a")
    for _ in range(3):  # c takes the other 3
        store.admit(cfg, "c")
    store.refused(cfg, "a")
    for _ in range(10):  # b's promise was kept whole
        store.admit(cfg, "b")
    store.refused(cfg, "b")


def test_headers_tell_the_tightest_limit_of_each_metric() -> None:
    cfg = config(
        (team("a", RateLimit("minute", "images", 10), RateLimit("day", "images", 100)),),
        RateLimit("minute", "requests", 50),
    )
    paced = Store().admit(cfg, "a", n=3)
    headers = rates.headers(paced.rooms, NOW)
    assert headers["x-tollgate-ratelimit-remaining-images"] == "7"
    assert headers["x-tollgate-ratelimit-limit-images"] == "10"
    assert headers["x-tollgate-ratelimit-remaining-requests"] == "49"
    assert "x-tollgate-ratelimit-remaining-tokens" not in headers


def test_the_room_of_a_team_with_a_share_is_at_least_what_is_left_of_it() -> None:
    cfg = shared_config()
    store = Store()
    for _ in range(15):
        store.admit(cfg, "b")
    plan = rates.plan(cfg, cfg.teams[0], NOW)
    assert plan is not None
    (room,) = plan.rooms(store.counts(plan))
    assert room.remaining == 5


def test_promises_are_computed_once_per_configuration() -> None:
    cfg = shared_config()
    first = rates.plan(cfg, cfg.teams[0], NOW)
    again = rates.plan(cfg, cfg.teams[0], NOW)
    assert first == again
    assert first is not None and first.checks[0].promise == 5
    assert first.checks[0].promised == 10
    group = first.checks[0].slot.key
    others = ((f"s|b|{group}", 10),)
    assert first.promises == (Promise(group, MINUTE_START, "a", others),)


# -- the guarantee, for any order of requests ------------------------------------------

SHARES = (Decimal("0.3"), Decimal("0.2"), Decimal("0.4"))


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=40),
    shares=st.lists(st.sampled_from(SHARES), min_size=1, max_size=3),
    borrowers=st.integers(min_value=0, max_value=2),
    asks=st.lists(st.tuples(st.integers(0, 4), st.integers(1, 4)), max_size=60),
)
def test_shares_hold_and_the_organization_never_passes_its_limit(
    limit: int,
    shares: list[Decimal],
    borrowers: int,
    asks: list[tuple[int, int]],
) -> None:
    total = Decimal(0)
    teams: list[Team] = []
    for index, share in enumerate(shares):
        if total + share <= 1:
            total += share
            teams.append(team(f"s{index}", RateShare("minute", share)))
    teams += [team(f"b{index}") for index in range(borrowers)]
    cfg = config(tuple(teams), RateLimit("minute", "images", limit))
    store = Store()
    used = {t.name: 0 for t in teams}
    promise = {
        t.name: sum(s.of(cfg.organization_rate_limits[0]) for s in t.rate_shares) for t in teams
    }
    for who, n in asks:
        name = teams[who % len(teams)].name
        try:
            store.admit(cfg, name, n=n)
            used[name] += n
        except RateLimited:
            # Refused only past its promise: a team under its share always gets it.
            assert used[name] + n > promise[name]
        assert sum(used.values()) <= limit
    # What every team is still promised is still there for it.
    for t in teams:
        room = promise[t.name] - used[t.name]
        if room > 0:
            store.admit(cfg, t.name, n=room)
            used[t.name] += room
    assert sum(used.values()) <= limit


def test_rounding_never_promises_more_than_the_limit() -> None:
    limit = RateLimit("minute", "images", 7)
    thirds = [RateShare("minute", Decimal("0.333")) for _ in range(3)]
    assert sum(s.of(limit) for s in thirds) <= 7
    assert math.floor(Decimal("0.333") * 7) == thirds[0].of(limit)
