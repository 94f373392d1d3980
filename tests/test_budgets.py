"""Budgets and decisions: periods, counters, allow, throttle, downgrades, 429s."""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.config.prices import load_price_book
from proxy.core.budgets import (
    STANDARD_SIZES,
    Decision,
    Variant,
    apply_allow,
    blocking,
    clamp_quality,
    decide,
    quality_steps,
    same_aspect_sizes,
    share_fits,
    size_steps,
    summary,
    switch_model,
    throttle,
    variants,
)
from proxy.core.errors import BudgetExceeded, PolicyViolation
from proxy.core.image_tokens import parse_size
from proxy.core.models import (
    Change,
    Counter,
    Estimate,
    ImageRequest,
    InputImage,
    Period,
    Totals,
    Usage,
    usd_text,
)
from proxy.core.periods import Applied, applicable, counters, window
from proxy.core.pricing import ModelPrices, PriceBook, estimate
from proxy.core.settings import (
    KNOBS,
    Allow,
    Budget,
    Config,
    Downgrade,
    Knob,
    Metric,
    OnExhausted,
    Team,
    ThrottleTier,
    UpstreamSettings,
)

NANOS = 10**9
UTC_ZONE = ZoneInfo("UTC")
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC).timestamp()  # a Wednesday
BOOK = load_price_book()
MODEL_NAMES = BOOK.names()


# --- builders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return load_price_book()


def model_of(book: PriceBook, name: str) -> ModelPrices:
    found = book.find(name)
    assert found is not None, name
    return found


def usd_budget(period: Period, dollars: str | int, **fields: Any) -> Budget:
    return Budget(period, "usd", int(Decimal(str(dollars)) * NANOS), **fields)


def make_team(
    name: str = "design",
    *,
    budgets: tuple[Budget, ...] = (),
    per_user: tuple[Budget, ...] = (),
    allow: Allow | None = None,
    throttle: tuple[ThrottleTier, ...] = (),
    on_exhausted: OnExhausted = "downgrade",
    order: tuple[Knob, ...] = KNOBS,
    fallback: str | None = None,
) -> Team:
    return Team(
        name=name,
        cost_center=None,
        keys=(),
        budgets=budgets,
        per_user=per_user,
        allow=allow or Allow(),
        throttle=throttle,
        on_exhausted=on_exhausted,
        downgrade=Downgrade(order=order, fallback_model=fallback),
    )


def make_config(
    book: PriceBook,
    teams: tuple[Team, ...] = (),
    org: tuple[Budget, ...] = (),
    timezone: str = "UTC",
) -> Config:
    return Config(
        root=Path("."),
        upstream=UpstreamSettings(),
        ledger_url="sqlite:///:memory:",
        timezone=timezone,
        admin_token=None,
        prices=book,
        organization_budgets=org,
        teams=teams,
    )


def req(model: str = "gpt-image-2", **fields: Any) -> ImageRequest:
    return ImageRequest(endpoint=fields.pop("endpoint", "generations"), model=model, **fields)


def variant_of(book: PriceBook, request: ImageRequest) -> Variant:
    model = model_of(book, request.model)
    return Variant(request, model, estimate(model, request))


def cost(book: PriceBook, model: str, **fields: Any) -> int:
    """The estimate of one request, in nano-dollars."""
    return estimate(model_of(book, model), req(model, **fields)).cost_nanos


@dataclass(frozen=True)
class Case:
    """A team, a config and the budgets that apply to one request."""

    team: Team
    config: Config
    user: str | None = None

    @property
    def applied(self) -> tuple[Applied, ...]:
        return applicable(self.config, self.team, self.user, NOW)

    def counter(self, scope: str, period: Period) -> Counter:
        return next(
            a.counter
            for a in self.applied
            if a.counter.scope == scope and a.budget.period == period
        )

    def decide(
        self, request: ImageRequest, totals: Mapping[Counter, Totals] | None = None
    ) -> Decision:
        book = self.config.prices
        variant = apply_allow(self.team, request, model_of(book, request.model))
        return decide(self.team, variant, self.applied, totals or {}, book)


def case(
    book: PriceBook, team: Team, org: tuple[Budget, ...] = (), user: str | None = None
) -> Case:
    return Case(team, make_config(book, (team,), org), user)


def sent(decision: Decision) -> tuple[str, str, str]:
    r = decision.variant.request
    return r.model, r.quality, r.size


def explicit_size(model: ModelPrices) -> str:
    return model.sizes[0] if model.sizes else "1024x1024"


def ts(zone: str, *args: int) -> float:
    year, month, day, *rest = args
    hour, minute, second = (*rest, 0, 0, 0)[:3]
    return datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone)).timestamp()


# --- periods -------------------------------------------------------------------------------


def test_day_window_in_utc_runs_from_midnight_to_midnight() -> None:
    w = window("day", NOW, UTC_ZONE)
    assert w.start == ts("UTC", 2026, 6, 10)
    assert w.end == ts("UTC", 2026, 6, 11)


@pytest.mark.parametrize(
    ("moment", "monday"),
    [
        ((2026, 6, 10, 12), (2026, 6, 8)),  # Wednesday
        ((2026, 6, 8, 0), (2026, 6, 8)),  # Monday midnight starts the week
        ((2026, 6, 14, 23, 59, 59), (2026, 6, 8)),  # Sunday still belongs to it
        ((2026, 1, 1, 10), (2025, 12, 29)),  # ISO week spanning new year
    ],
)
def test_week_window_starts_on_iso_monday(
    moment: tuple[int, ...], monday: tuple[int, int, int]
) -> None:
    w = window("week", ts("UTC", *moment), UTC_ZONE)
    assert w.start == ts("UTC", *monday)
    assert w.end == w.start + 7 * 86400
    assert datetime.fromtimestamp(w.start, UTC).weekday() == 0


@pytest.mark.parametrize(
    ("moment", "first", "next_first"),
    [
        ((2026, 6, 10), (2026, 6, 1), (2026, 7, 1)),
        ((2026, 12, 31, 23, 59), (2026, 12, 1), (2027, 1, 1)),  # December → January
        ((2028, 2, 29, 12), (2028, 2, 1), (2028, 3, 1)),  # leap February: 29 days
        ((2026, 2, 28, 12), (2026, 2, 1), (2026, 3, 1)),  # common February: 28 days
        ((2026, 1, 31, 12), (2026, 1, 1), (2026, 2, 1)),
    ],
)
def test_month_window_runs_from_the_first_to_the_next_first(
    moment: tuple[int, ...], first: tuple[int, ...], next_first: tuple[int, ...]
) -> None:
    w = window("month", ts("UTC", *moment), UTC_ZONE)
    assert (w.start, w.end) == (ts("UTC", *first), ts("UTC", *next_first))


def test_leap_february_window_lasts_29_days() -> None:
    w = window("month", ts("UTC", 2028, 2, 10), UTC_ZONE)
    assert w.end is not None
    assert w.end - w.start == 29 * 86400


def test_total_window_starts_at_epoch_and_never_ends() -> None:
    w = window("total", NOW, ZoneInfo("Europe/Paris"))
    assert (w.start, w.end) == (0.0, None)


@pytest.mark.parametrize(
    ("period", "boundary"),
    [
        ("day", (2026, 6, 11)),
        ("week", (2026, 6, 15)),
        ("month", (2026, 7, 1)),
        ("month", (2027, 1, 1)),
    ],
)
@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/New_York"])
def test_timestamp_exactly_at_a_boundary_belongs_to_the_new_period(
    period: Period, boundary: tuple[int, int, int], zone: str
) -> None:
    tz = ZoneInfo(zone)
    edge = ts(zone, *boundary)
    assert window(period, edge, tz).start == edge
    assert window(period, edge - 0.001, tz).end == edge


def test_day_window_follows_local_midnight_in_paris() -> None:
    # 00:30 in Paris (summer, UTC+2) is still the previous day in UTC.
    now = ts("Europe/Paris", 2026, 6, 10, 0, 30)
    w = window("day", now, ZoneInfo("Europe/Paris"))
    assert w.start == datetime(2026, 6, 9, 22, tzinfo=UTC).timestamp()
    assert w.end == datetime(2026, 6, 10, 22, tzinfo=UTC).timestamp()
    assert window("day", now, UTC_ZONE).start == datetime(2026, 6, 9, tzinfo=UTC).timestamp()


def test_month_window_in_auckland_switches_month_before_utc_does() -> None:
    now = datetime(2026, 1, 31, 20, tzinfo=UTC).timestamp()  # 1 Feb, 09:00 in Auckland
    w = window("month", now, ZoneInfo("Pacific/Auckland"))
    assert w.start == ts("Pacific/Auckland", 2026, 2, 1)
    assert w.end == ts("Pacific/Auckland", 2026, 3, 1)


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("America/New_York", (2026, 3, 8), 23),
        ("America/New_York", (2026, 11, 1), 25),
        ("Europe/Paris", (2026, 3, 29), 23),
        ("Europe/Paris", (2026, 10, 25), 25),
        ("Europe/Paris", (2026, 6, 10), 24),
    ],
)
def test_day_window_across_a_dst_change_has_its_true_length(
    zone: str, day: tuple[int, int, int], hours: int
) -> None:
    noon = ts(zone, *day, 12)
    w = window("day", noon, ZoneInfo(zone))
    assert w.start == ts(zone, *day)
    assert w.end is not None
    assert w.end - w.start == hours * 3600


def test_timestamp_in_the_repeated_hour_belongs_to_its_local_day() -> None:
    # 01:30 EST, the second 01:30 of 1 November 2026 in New York.
    second = datetime(2026, 11, 1, 6, 30, tzinfo=UTC).timestamp()
    w = window("day", second, ZoneInfo("America/New_York"))
    assert w.start == datetime(2026, 11, 1, 4, tzinfo=UTC).timestamp()
    assert w.end == datetime(2026, 11, 2, 5, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("name", "midnight", "periods"),
    [
        # Havana turns 01:00 CDT back to 00:00 CST on 1 November 2026, the Azores 00:00 to
        # 23:00 on 25 October: both 00:30s of that day are the day's (and the month's).
        ("America/Havana", datetime(2026, 11, 1, 4, tzinfo=UTC), ("day", "month")),
        ("Atlantic/Azores", datetime(2026, 10, 25, 0, tzinfo=UTC), ("day", "week")),
    ],
)
def test_a_repeated_hour_after_midnight_belongs_to_the_window_of_the_first_midnight(
    name: str, midnight: datetime, periods: tuple[Period, ...]
) -> None:
    tz = ZoneInfo(name)
    first = midnight.timestamp() + 1800
    for period in periods:
        windows = {window(period, first + hours * 3600, tz) for hours in (-0.25, 0, 1, 2, 12)}
        assert len(windows) == 1, period
        (w,) = windows
        if period != "week":
            assert w.start == midnight.timestamp()
        assert window(period, w.start - 1, tz).end == w.start


def test_week_and_month_windows_across_dst_lose_an_hour() -> None:
    tz = ZoneInfo("America/New_York")
    week = window("week", ts("America/New_York", 2026, 3, 10), tz)
    month = window("month", ts("America/New_York", 2026, 3, 10), tz)
    assert week.start == ts("America/New_York", 2026, 3, 9)  # Monday after the change
    assert week.end is not None and month.end is not None
    assert week.end - week.start == 7 * 86400
    assert month.start == ts("America/New_York", 2026, 3, 1)
    assert month.end - month.start == 31 * 86400 - 3600


# --- counters and applicable budgets -------------------------------------------------------


def test_counters_without_a_user_are_the_team_counters_of_each_period() -> None:
    found = counters("design", None, NOW, UTC_ZONE)
    assert [(c.scope, c.team, c.user, c.period) for c in found] == [
        ("team", "design", "", p) for p in ("day", "week", "month", "total")
    ]
    assert [c.start for c in found] == [
        window(p, NOW, UTC_ZONE).start for p in ("day", "week", "month", "total")
    ]


def test_counters_with_a_user_add_that_users_counters() -> None:
    found = counters("design", "alice", NOW, UTC_ZONE)
    assert len(found) == 8
    users = [c for c in found if c.scope == "user"]
    assert [(c.team, c.user, c.period) for c in users] == [
        ("design", "alice", p) for p in ("day", "week", "month", "total")
    ]


def test_counters_of_an_empty_user_are_the_team_counters_only() -> None:
    assert counters("design", "", NOW, UTC_ZONE) == counters("design", None, NOW, UTC_ZONE)


def test_applicable_lists_organization_team_and_user_budgets_with_their_counters(
    book: PriceBook,
) -> None:
    team = make_team(
        budgets=(usd_budget("month", 800), usd_budget("day", 60)),
        per_user=(usd_budget("day", 5),),
    )
    config = make_config(book, (team,), org=(usd_budget("month", 20000),), timezone="Europe/Paris")
    found = applicable(config, team, "alice", NOW)
    tz = ZoneInfo("Europe/Paris")
    assert [(a.counter.scope, a.counter.team, a.counter.user, a.budget.period) for a in found] == [
        ("organization", "", "", "month"),
        ("team", "design", "", "month"),
        ("team", "design", "", "day"),
        ("user", "design", "alice", "day"),
    ]
    for a in found:
        assert a.window == window(a.budget.period, NOW, tz)
        assert a.counter.start == a.window.start
        assert a.counter.period == a.budget.period
    # The team and user counters are the ones `counters` says the request adds to.
    added = set(counters("design", "alice", NOW, tz))
    assert {a.counter for a in found if a.counter.scope != "organization"} <= added


def test_applicable_without_a_user_skips_per_user_budgets(book: PriceBook) -> None:
    team = make_team(budgets=(usd_budget("month", 800),), per_user=(usd_budget("day", 5),))
    found = applicable(make_config(book, (team,)), team, None, NOW)
    assert [a.counter.scope for a in found] == ["team"]


# --- allow ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "request_fields", "param", "rule"),
    [
        (
            Allow(endpoints=frozenset({"generations"})),
            {"endpoint": "edits"},
            None,
            "allow.endpoints",
        ),
        (Allow(models=frozenset({"gpt-image-1-mini"})), {}, "model", "allow.models"),
        (Allow(max_n=2), {"n": 3}, "n", "allow.max_n"),
        (Allow(sizes=frozenset({"1024x1024"})), {"size": "1536x1024"}, "size", "allow.sizes"),
        (
            Allow(params={"moderation": frozenset({"auto"})}),
            {"params": (("moderation", "low"),)},
            "moderation",
            "allow.params.moderation",
        ),
    ],
)
def test_allow_violation_is_a_403_policy_violation_naming_the_rule(
    book: PriceBook, allow: Allow, request_fields: dict[str, Any], param: str | None, rule: str
) -> None:
    team = make_team(allow=allow)
    request = req("gpt-image-2", **request_fields)
    with pytest.raises(PolicyViolation) as caught:
        apply_allow(team, request, model_of(book, "gpt-image-2"))
    error = caught.value
    assert error.status == 403
    assert error.code == "policy_violation"
    assert error.param == param
    assert rule in error.message
    assert "design" in error.message


@pytest.mark.parametrize(
    ("allow", "request_fields"),
    [
        (Allow(endpoints=frozenset({"generations", "edits"})), {"endpoint": "edits"}),
        (Allow(models=frozenset({"gpt-image-2"})), {}),
        (Allow(max_n=4), {"n": 4}),
        (Allow(sizes=frozenset({"1024x1024"})), {"size": "1024x1024"}),
        (Allow(params={"moderation": frozenset({"auto"})}), {"params": (("moderation", "auto"),)}),
        (Allow(params={"moderation": frozenset({"auto"})}), {}),
    ],
)
def test_allowed_request_passes_allow_unchanged(
    book: PriceBook, allow: Allow, request_fields: dict[str, Any]
) -> None:
    request = req("gpt-image-2", quality="high", **request_fields)
    variant = apply_allow(make_team(allow=allow), request, model_of(book, "gpt-image-2"))
    assert variant.request == request
    assert variant.changes == ()
    assert variant.estimate == estimate(model_of(book, "gpt-image-2"), request)


def test_allow_models_accepts_a_dated_alias_of_an_allowed_model(book: PriceBook) -> None:
    team = make_team(allow=Allow(models=frozenset({"gpt-image-2"})))
    request = req("gpt-image-2-2026-04-21")
    assert apply_allow(team, request, model_of(book, "gpt-image-2")).request == request


@pytest.mark.parametrize(
    ("model", "quality", "clamped"),
    [
        ("gpt-image-2.5-sunburst", "max", "high"),
        ("gpt-image-2.5-sunburst", "xhigh", "high"),
        ("gpt-image-2.5-flare", "auto", "high"),
        ("gpt-image-2", "auto", None),  # `high` is its top: `auto` is already within the cap
        ("gpt-image-2", "high", None),
        ("gpt-image-2", "low", None),
        ("gpt-image-1", "medium", None),
        ("dall-e-3", "hd", None),  # its ladder has no `high`: untouched
        ("dall-e-3", "auto", None),
    ],
)
def test_max_quality_clamps_on_the_models_own_ladder(
    book: PriceBook, model: str, quality: str, clamped: str | None
) -> None:
    team = make_team(allow=Allow(max_quality="high"))
    request = req(model, quality=quality, size=explicit_size(model_of(book, model)))
    variant = apply_allow(team, request, model_of(book, model))
    if clamped is None:
        assert variant.request == request
        assert variant.changes == ()
    else:
        assert variant.request.quality == clamped
        assert variant.changes == (Change("quality", quality, clamped, "policy"),)
        assert variant.estimate == estimate(model_of(book, model), variant.request)


def test_clamp_to_a_quality_missing_from_the_ladder_leaves_the_variant_alone(
    book: PriceBook,
) -> None:
    start = variant_of(book, req("gpt-image-2", quality="high", size="1024x1024"))
    assert clamp_quality(start, "xhigh", "throttle") is start


# --- allow: fields left out, `size: auto` -------------------------------------------------

EDIT = {"endpoint": "edits", "images": (InputImage(1024, 1024),)}


@pytest.mark.parametrize(
    ("model", "rule", "fields", "default"),
    [
        ("gpt-image-2", {"background": "opaque"}, {}, "auto"),
        ("gpt-image-2", {"output_format": "webp"}, {}, "png"),
        ("gpt-image-2", {"moderation": "low"}, {}, "auto"),
        ("gpt-image-2", {"stream": "true"}, {}, "false"),
        (
            "gpt-image-2",
            {"output_compression": "80"},
            {"params": (("output_format", "jpeg"),)},
            "100",
        ),
        ("gpt-image-2", {"partial_images": "2"}, {"stream": True}, "0"),
        ("gpt-image-2", {"response_format": "url"}, {}, "b64_json"),
        ("gpt-image-1.5", {"input_fidelity": "high"}, EDIT, "low"),
        # gpt-image-2 takes no input_fidelity: it reads every input at high fidelity.
        ("gpt-image-2", {"input_fidelity": "low"}, EDIT, "high"),
        ("dall-e-3", {"style": "natural"}, {}, "vivid"),
    ],
)
def test_a_field_left_out_is_checked_as_openais_default_for_it(
    book: PriceBook, model: str, rule: dict[str, str], fields: dict[str, Any], default: str
) -> None:
    """A rule used to hold only for a value the client sent: left out, the field ran at
    OpenAI's default, whatever the rule allowed."""
    ((name, allowed),) = rule.items()
    team = make_team(allow=Allow(params={name: frozenset({allowed})}))
    with pytest.raises(PolicyViolation) as caught:
        apply_allow(team, req(model, **fields), model_of(book, model))
    error = caught.value
    assert (error.status, error.code, error.param) == (403, "policy_violation", name)
    assert "omitted" in error.message
    assert f"default for it is {default}," in error.message
    assert f"allow.params.{name}" in error.message and allowed in error.message
    sent = req(model, **{**fields, "params": (*fields.get("params", ()), (name, allowed))})
    assert apply_allow(team, sent, model_of(book, model)).request == sent


@pytest.mark.parametrize("name", ["user", "safety_identifier", "action"])
def test_a_field_without_a_default_left_out_is_refused(book: PriceBook, name: str) -> None:
    team = make_team(allow=Allow(params={name: frozenset({"alice"})}))
    with pytest.raises(PolicyViolation) as caught:
        apply_allow(team, req("gpt-image-2"), model_of(book, "gpt-image-2"))
    assert caught.value.param == name
    assert "no default" in caught.value.message and f"Send {name}" in caught.value.message


@pytest.mark.parametrize(
    ("model", "rule", "fields"),
    [
        ("gpt-image-2", {"moderation": "auto"}, {}),  # the default is allowed
        ("gpt-image-2", {"input_fidelity": "low"}, {}),  # a generation reads no input image
        ("gpt-image-2", {"output_compression": "80"}, {}),  # png is not compressed
        ("gpt-image-2", {"partial_images": "2"}, {}),  # no stream, no partial image
        ("gpt-image-2", {"style": "natural"}, {}),  # a GPT image model takes no style
    ],
)
def test_a_field_left_out_that_cannot_act_on_the_request_passes(
    book: PriceBook, model: str, rule: dict[str, str], fields: dict[str, Any]
) -> None:
    ((name, allowed),) = rule.items()
    team = make_team(allow=Allow(params={name: frozenset({allowed})}))
    request = req(model, **fields)
    assert apply_allow(team, request, model_of(book, model)).request == request


@pytest.mark.parametrize("asked", [True, False])
def test_size_auto_passes_allow_sizes_only_where_listed(book: PriceBook, asked: bool) -> None:
    """With `auto` the model chooses a size that may not be on the list: it used to pass."""
    request = req("gpt-image-2", params=(("size", "auto"),) if asked else ())
    model = model_of(book, "gpt-image-2")
    listed = make_team(allow=Allow(sizes=frozenset({"1024x1024"})))
    with pytest.raises(PolicyViolation) as caught:
        apply_allow(listed, request, model)
    assert caught.value.param == "size"
    assert ("omitted" in caught.value.message) != asked
    with_auto = make_team(allow=Allow(sizes=frozenset({"auto", "1024x1024"})))
    assert apply_allow(with_auto, request, model).request == request


def test_batch_lines_checked_again_without_their_fields_skip_allow_params(
    book: PriceBook,
) -> None:
    """A batch line is checked again when its batch is created from the fields kept of it
    (model, n, quality, size, user): its `allow.params` were checked at upload."""
    team = make_team(allow=Allow(params={"background": frozenset({"opaque"})}))
    request = req("gpt-image-2", size="1024x1024")
    model = model_of(book, "gpt-image-2")
    with pytest.raises(PolicyViolation):
        apply_allow(team, request, model)
    assert apply_allow(team, request, model, params=False).request == request


# --- downgrades within `allow` ---------------------------------------------------------------


def test_size_steps_offer_only_allowed_sizes(book: PriceBook) -> None:
    start = variant_of(book, req("gpt-image-2", quality="high", size="2048x1152"))
    assert "1536x864" in [v.request.size for v in size_steps(start)]
    allowed = frozenset({"2048x1152", "1280x720"})
    assert [v.request.size for v in size_steps(start, allowed)] == ["1280x720"]


def test_a_size_downgrade_chooses_only_a_size_the_team_may_request(book: PriceBook) -> None:
    """It used to choose the most faithful cheaper size of the aspect ratio, listed or not."""
    room = cost(book, "gpt-image-2", quality="high", size="1536x864")
    assert room < cost(book, "gpt-image-2", quality="high", size="1792x1008")
    request = req("gpt-image-2", quality="high", size="2048x1152")
    free = make_team(budgets=(Budget("day", "usd", room),), order=("size",))
    assert sent(case(book, free).decide(request))[2] == "1536x864"
    held = make_team(
        budgets=(Budget("day", "usd", room),),
        order=("size",),
        allow=Allow(sizes=frozenset({"2048x1152", "1280x720"})),
    )
    assert sent(case(book, held).decide(request))[2] == "1280x720"
    only_asked = replace(held, allow=Allow(sizes=frozenset({"2048x1152"})))
    with pytest.raises(BudgetExceeded):
        case(book, only_asked).decide(request)


def test_auto_size_becomes_only_an_allowed_explicit_size(book: PriceBook) -> None:
    room = cost(book, "gpt-image-2", quality="low", size="1024x1024")
    request = req("gpt-image-2", quality="low", size="auto")
    allow = Allow(sizes=frozenset({"auto", "1024x1536"}))
    team = make_team(budgets=(Budget("day", "usd", room),), order=("size",), allow=allow)
    assert cost(book, "gpt-image-2", quality="low", size="1024x1536") <= room
    assert sent(case(book, team).decide(request))[2] == "1024x1536"


def test_a_fallback_maps_the_size_only_to_an_allowed_one(book: PriceBook) -> None:
    """gpt-image-1-mini takes no 3072x2048: it maps it to 1536x1024, where the team may."""
    start = variant_of(book, req("gpt-image-2", quality="high", size="3072x2048"))
    mini = model_of(book, "gpt-image-1-mini")
    switched = switch_model(start, mini, Allow(sizes=frozenset({"3072x2048", "1536x1024"})))
    assert switched is not None and switched.request.size == "1536x1024"
    assert switch_model(start, mini, Allow(sizes=frozenset({"3072x2048"}))) is None


def test_a_fallback_whose_default_the_team_does_not_allow_is_skipped(book: PriceBook) -> None:
    """An edit that leaves input_fidelity out runs at `low` on gpt-image-1.5, at `high` on
    gpt-image-2 (which reads every input so): not a fallback under `input_fidelity: [low]`."""
    allow = Allow(params={"input_fidelity": frozenset({"low"})})
    start = variant_of(book, req("gpt-image-1.5", quality="high", size="1024x1024", **EDIT))
    gpt2 = model_of(book, "gpt-image-2")
    assert switch_model(start, gpt2) is not None
    assert switch_model(start, gpt2, allow) is None
    team = make_team(budgets=(usd_budget("day", "0.000001"),), fallback="gpt-image-2", allow=allow)
    assert all(v.request.model == "gpt-image-1.5" for v in variants(start, team, book))


def test_a_fallback_model_the_team_may_not_use_is_never_chosen(book: PriceBook) -> None:
    """A team allowed only gpt-image-2 is never downgraded to its fallback gpt-image-1-mini
    (configuration refuses such a team; a decision made on one all the same skips it)."""
    request = req("gpt-image-2", quality="low", size="1024x1024")
    mini_low = cost(book, "gpt-image-1-mini", quality="low", size="1024x1024")
    assert mini_low < cost(book, "gpt-image-2", quality="low", size="1024x1024")
    allowed = make_team(
        budgets=(Budget("day", "usd", mini_low),),
        fallback="gpt-image-1-mini",
        allow=Allow(models=frozenset({"gpt-image-2", "gpt-image-1-mini"})),
    )
    assert sent(case(book, allowed).decide(request))[0] == "gpt-image-1-mini"
    only_2 = replace(allowed, allow=Allow(models=frozenset({"gpt-image-2"})))
    assert all(
        v.request.model == "gpt-image-2" for v in variants(variant_of(book, request), only_2, book)
    )
    with pytest.raises(BudgetExceeded):
        case(book, only_2).decide(request)


# --- throttle ------------------------------------------------------------------------------

TIERS = (
    ThrottleTier(Decimal("0.80"), "medium"),
    ThrottleTier(Decimal("0.95"), "low"),
)


@pytest.mark.parametrize(
    ("spent", "reserved", "quality"),
    [
        (0, 0, "high"),
        (80, 0, "high"),  # exactly at the threshold is not above it
        (80, 1, "medium"),  # reservations count
        (95, 0, "medium"),
        (90, 6, "low"),  # the highest tier exceeded wins
        (100, 0, "low"),
    ],
)
def test_throttle_caps_quality_by_fill_of_the_team_budget(
    book: PriceBook, spent: int, reserved: int, quality: str
) -> None:
    c = case(book, make_team(budgets=(usd_budget("month", 100),), throttle=TIERS))
    totals = {c.counter("team", "month"): Totals(spent * NANOS, reserved * NANOS)}
    start = variant_of(book, req("gpt-image-2", quality="high", size="1024x1024"))
    throttled = throttle(c.team, start, c.applied, totals)
    assert throttled.request.quality == quality
    if quality != "high":
        assert throttled.changes == (Change("quality", "high", quality, "throttle"),)


def test_throttle_follows_the_teams_tightest_usd_budget(book: PriceBook) -> None:
    team = make_team(budgets=(usd_budget("month", 1000), usd_budget("day", 10)), throttle=TIERS)
    c = case(book, team)
    totals = {
        c.counter("team", "month"): Totals(spent_nanos=100 * NANOS),  # 10 %
        c.counter("team", "day"): Totals(spent_nanos=9 * NANOS),  # 90 %
    }
    start = variant_of(book, req("gpt-image-2", quality="high", size="1024x1024"))
    assert throttle(team, start, c.applied, totals).request.quality == "medium"


def test_throttle_without_a_usd_budget_never_throttles(book: PriceBook) -> None:
    team = make_team(budgets=(Budget("month", "image_output_tokens", 1000),), throttle=TIERS)
    c = case(book, team)
    totals = {c.counter("team", "month"): Totals(image_output_tokens=999)}
    start = variant_of(book, req("gpt-image-2", quality="high", size="1024x1024"))
    assert throttle(team, start, c.applied, totals) is start


def test_throttle_ignores_organization_and_user_budgets(book: PriceBook) -> None:
    team = make_team(per_user=(usd_budget("day", 1),), throttle=TIERS)
    c = case(book, team, org=(usd_budget("month", 100),), user="alice")
    totals = {
        c.counter("organization", "month"): Totals(spent_nanos=99 * NANOS),
        c.counter("user", "day"): Totals(spent_nanos=NANOS - 1),
    }
    start = variant_of(book, req("gpt-image-2", quality="high", size="1024x1024"))
    assert throttle(team, start, c.applied, totals) is start


def test_decide_applies_throttle_before_budgets(book: PriceBook) -> None:
    c = case(book, make_team(budgets=(usd_budget("month", 100),), throttle=TIERS))
    totals = {c.counter("team", "month"): Totals(spent_nanos=85 * NANOS)}
    decision = c.decide(req("gpt-image-2", quality="high", size="1024x1024"), totals)
    assert sent(decision) == ("gpt-image-2", "medium", "1024x1024")
    assert decision.variant.changes == (Change("quality", "high", "medium", "throttle"),)


@pytest.mark.parametrize("model", ["gpt-image-2.6-sunburst", "gpt-image-2.6-flare"])
def test_throttle_cap_never_raises_the_estimate(book: PriceBook, model: str) -> None:
    c = case(book, make_team(budgets=(usd_budget("month", 100),), throttle=TIERS))
    totals = {c.counter("team", "month"): Totals(spent_nanos=85 * NANOS)}
    start = variant_of(book, req(model, quality="high", size="1024x1024"))
    throttled = throttle(c.team, start, c.applied, totals)
    assert throttled.request.quality == "medium"
    assert throttled.estimate.cost_nanos <= start.estimate.cost_nanos


# --- decide: quality, for every model ------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("quality", ["auto", "top"])
def test_without_budgets_every_model_passes_unchanged(
    book: PriceBook, name: str, quality: str
) -> None:
    model = model_of(book, name)
    q = model.qualities[-1] if quality == "top" else quality
    request = req(name, quality=q, size=explicit_size(model), prompt_bytes=40)
    decision = case(book, make_team(fallback="gpt-image-1-mini")).decide(request)
    assert decision.variant.request == request
    assert decision.variant.changes == ()
    assert decision.remaining_nanos is None


def expected_quality(book: PriceBook, name: str, start: str, size: str, room: int) -> str | None:
    """Walk the ladder down from `start`, one rung at a time: the first that fits."""
    ladder = model_of(book, name).qualities
    top = len(ladder) - 1 if start == "auto" else ladder.index(start)
    for q in reversed(ladder[: top + 1]):
        if cost(book, name, quality=q, size=size, prompt_bytes=40) <= room:
            return q
    return None


LADDER_CASES = [
    (name, rung) for name in MODEL_NAMES for rung in range(len(model_of(BOOK, name).qualities))
]


@pytest.mark.parametrize(("name", "rung"), LADDER_CASES)
def test_budget_for_one_rung_yields_the_highest_quality_that_fits(
    book: PriceBook, name: str, rung: int
) -> None:
    model = model_of(book, name)
    size = explicit_size(model)
    top = model.qualities[-1]
    room = cost(book, name, quality=model.qualities[rung], size=size, prompt_bytes=40)
    expected = expected_quality(book, name, top, size, room)
    c = case(book, make_team(budgets=(usd_budget("total", 1000),)))
    totals = {c.counter("team", "total"): Totals(spent_nanos=1000 * NANOS - room)}
    decision = c.decide(req(name, quality=top, size=size, prompt_bytes=40), totals)
    assert sent(decision) == (name, expected, size)
    # One step at a time down the model's own ladder, each recorded.
    steps = model.qualities[model.qualities.index(expected or top) :][::-1]
    assert decision.variant.changes == tuple(
        Change("quality", a, b, "budget") for a, b in itertools.pairwise(steps)
    )
    assert decision.remaining_nanos == room - decision.variant.estimate.cost_nanos


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_budget_fitting_only_the_cheapest_quality_picks_the_best_that_fits(
    book: PriceBook, name: str
) -> None:
    model = model_of(book, name)
    size = explicit_size(model)
    room = min(cost(book, name, quality=q, size=size, prompt_bytes=40) for q in model.qualities)
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req(name, quality=model.qualities[-1], size=size, prompt_bytes=40))
    assert decision.variant.request.quality == expected_quality(
        book, name, model.qualities[-1], size, room
    )
    assert decision.variant.estimate.cost_nanos <= room


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_auto_quality_becomes_the_highest_explicit_quality_that_fits(
    book: PriceBook, name: str
) -> None:
    model = model_of(book, name)
    size = explicit_size(model)
    ladder = model.qualities
    room = min(cost(book, name, quality=q, size=size, prompt_bytes=40) for q in ladder)
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req(name, quality="auto", size=size, prompt_bytes=40))
    if cost(book, name, quality="auto", size=size, prompt_bytes=40) <= room:
        assert decision.variant.request.quality == "auto"  # it fits as asked
    else:
        expected = expected_quality(book, name, "auto", size, room)
        assert decision.variant.request.quality == expected
        assert decision.variant.changes[0] == Change("quality", "auto", ladder[-1], "budget")


def test_quality_steps_walk_down_the_ladder_one_rung_at_a_time(book: PriceBook) -> None:
    start = variant_of(book, req("gpt-image-2.5-sunburst", quality="max", size="1024x1024"))
    assert [v.request.quality for v in quality_steps(start)] == ["xhigh", "high", "medium", "low"]
    auto = variant_of(book, req("gpt-image-2.5-sunburst", quality="auto", size="1024x1024"))
    assert next(v.request.quality for v in quality_steps(auto)) == "max"
    lowest = variant_of(book, req("gpt-image-2", quality="low", size="1024x1024"))
    assert list(quality_steps(lowest)) == []


# --- decide: sizes -------------------------------------------------------------------------


def brute_same_aspect(model: ModelPrices, size: str) -> set[str]:
    """Every smaller accepted size of exactly this aspect, by brute force."""
    dims = parse_size(size)
    assert dims is not None
    width, height = dims
    found = set()
    for w in range(16, width, 16):
        if (w * height) % width == 0:
            s = f"{w}x{w * height // width}"
            if model.accepts_size(s):
                found.add(s)
    return found


def test_gpt_image_2_16_9_can_step_down_to_smaller_16_9_sizes(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2")
    found = same_aspect_sizes(model, "2048x1152")
    assert {"1792x1008", "1536x864", "1280x720"} <= set(found)
    assert set(found) == brute_same_aspect(model, "2048x1152")
    assert all(model.accepts_size(s) for s in found)


def test_same_aspect_sizes_are_every_smaller_accepted_size_of_the_aspect(book: PriceBook) -> None:
    """Stepping by the least multiple whose edges are multiples of 16 skips only sizes the
    model refuses: the same sizes as a walk over every width, for a spread of requests."""
    model = model_of(book, "gpt-image-2")
    pick = random.Random(17)
    sizes = {"3840x2160", "2160x3840", "3840x1280", "2048x2048", "1008x1008", "2880x1920"}
    while len(sizes) < 120:
        w, h = pick.randrange(16, 3841, 16), pick.randrange(16, 3841, 16)
        if model.accepts_size(f"{w}x{h}"):
            sizes.add(f"{w}x{h}")
    for size in sorted(sizes):
        found = same_aspect_sizes(model, size)
        assert set(found) == brute_same_aspect(model, size), size
        assert len(found) == len(set(found))


@pytest.mark.parametrize("size", ["2048x1152", "1152x2048", "1536x1024", "1024x1536", "2048x2048"])
def test_same_aspect_sizes_keep_ratio_and_orientation(book: PriceBook, size: str) -> None:
    model = model_of(book, "gpt-image-2")
    dims = parse_size(size)
    assert dims is not None
    for s in same_aspect_sizes(model, size):
        w, h = parse_size(s) or (0, 0)
        assert w * dims[1] == h * dims[0]
        assert (w > h) == (dims[0] > dims[1]) and (w < h) == (dims[0] < dims[1])


def test_square_request_never_becomes_the_cheaper_1536x1024(book: PriceBook) -> None:
    landscape = cost(book, "gpt-image-2", quality="low", size="1536x1024")
    square = cost(book, "gpt-image-2", quality="low", size="1024x1024")
    assert landscape < square  # sizes are not monotonic in cost
    start = variant_of(book, req("gpt-image-2", quality="high", size="1024x1024"))
    team = make_team(budgets=(usd_budget("day", 1),))
    for v in variants(start, team, book):
        w, h = parse_size(v.request.size) or (0, 0)
        assert w == h
    c = case(book, make_team(budgets=(Budget("day", "usd", landscape),)))
    smallest_square = min(
        cost(book, "gpt-image-2", quality="low", size=s)
        for s in brute_same_aspect(model_of(book, "gpt-image-2"), "1024x1024")
    )
    if smallest_square > landscape:
        with pytest.raises(BudgetExceeded):
            c.decide(start.request)
    else:
        assert c.decide(start.request).variant.request.size != "1536x1024"


def test_square_size_steps_down_to_a_smaller_square(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2")
    squares = brute_same_aspect(model, "1024x1024")
    room = max(cost(book, "gpt-image-2", quality="low", size=s) for s in squares) - 1
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req("gpt-image-2", quality="low", size="1024x1024"))
    w, h = parse_size(decision.variant.request.size) or (0, 0)
    assert w == h < 1024
    assert decision.variant.estimate.cost_nanos <= room


def test_size_steps_only_offer_cheaper_sizes_most_expensive_first(book: PriceBook) -> None:
    start = variant_of(book, req("gpt-image-2", quality="low", size="2048x1152"))
    steps = size_steps(start)
    costs = [v.estimate.cost_nanos for v in steps]
    assert costs == sorted(costs, reverse=True)
    assert all(c < start.estimate.cost_nanos for c in costs)
    assert all(v.changes[-1].reason == "budget" for v in steps)


def test_size_downgrade_picks_the_most_faithful_cheaper_size_that_fits(book: PriceBook) -> None:
    room = cost(book, "gpt-image-2", quality="low", size="1536x864")
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req("gpt-image-2", quality="high", size="2048x1152"))
    model = model_of(book, "gpt-image-2")
    fitting = [
        s
        for s in brute_same_aspect(model, "2048x1152")
        if cost(book, "gpt-image-2", quality="low", size=s) <= room
    ]
    best = max(fitting, key=lambda s: cost(book, "gpt-image-2", quality="low", size=s))
    assert sent(decision) == ("gpt-image-2", "low", best)
    assert summary(decision.variant.changes) == f"quality=high->low; size=2048x1152->{best}"


def test_size_steps_come_after_quality_steps(book: PriceBook) -> None:
    """Quality is given up first: every quality of the requested size comes before any
    smaller size, and each smaller size tries the qualities afresh from the top."""
    room = cost(book, "gpt-image-2", quality="low", size="2048x1152")
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req("gpt-image-2", quality="high", size="2048x1152"))
    assert sent(decision) == ("gpt-image-2", "low", "2048x1152")
    start = variant_of(book, req("gpt-image-2", quality="high", size="2048x1152"))
    forms = [(v.request.size, v.request.quality) for v in variants(start, make_team(), book)]
    sizes = list(dict.fromkeys(size for size, _ in forms))
    assert sizes[0] == "2048x1152" and len(sizes) > 1
    assert forms == [(size, q) for size in sizes for q in ("high", "medium", "low")]


@pytest.mark.parametrize("order", [("size", "quality"), ("size", "quality", "model")])
def test_a_knob_given_up_first_comes_back_once_a_later_one_is_given_up(
    book: PriceBook, order: tuple[Knob, ...]
) -> None:
    """Under `order: [size, quality]` no size of high fits, medium fits at the requested
    size: that is what is sent. The size steps used to stay at the smallest size once the
    quality moved, and the image went out at medium and 1280x720 (40 % of its pixels)."""
    room = cost(book, "gpt-image-2", quality="medium", size="2048x1152")
    assert room < cost(book, "gpt-image-2", quality="high", size="1280x720")
    team = make_team(budgets=(Budget("day", "usd", room),), order=order)
    decision = case(book, team).decide(req("gpt-image-2", quality="high", size="2048x1152"))
    assert sent(decision) == ("gpt-image-2", "medium", "2048x1152")
    assert summary(decision.variant.changes) == "quality=high->medium"


def test_custom_order_tries_sizes_before_quality(book: PriceBook) -> None:
    room = cost(book, "gpt-image-2", quality="high", size="1536x864")
    budget = (Budget("day", "usd", room),)
    request = req("gpt-image-2", quality="high", size="2048x1152")
    size_first = case(book, make_team(budgets=budget, order=("size", "quality")))
    decision = size_first.decide(request)
    assert decision.variant.request.quality == "high"
    assert decision.variant.changes[0].knob == "size"
    assert decision.variant.estimate.cost_nanos <= room
    expected_size = max(
        (
            s
            for s in brute_same_aspect(model_of(book, "gpt-image-2"), "2048x1152")
            if cost(book, "gpt-image-2", quality="high", size=s) <= room
        ),
        key=lambda s: cost(book, "gpt-image-2", quality="high", size=s),
    )
    assert sent(decision) == ("gpt-image-2", "high", expected_size)
    assert decision.variant.changes == (Change("size", "2048x1152", expected_size, "budget"),)
    # The default order gives up quality first and keeps the size.
    quality_first = case(book, make_team(budgets=budget)).decide(request)
    assert quality_first.variant.request.size == "2048x1152"
    assert quality_first.variant.request.quality == next(
        q
        for q in ("high", "medium", "low")
        if cost(book, "gpt-image-2", quality=q, size="2048x1152") <= room
    )


def test_order_without_size_never_changes_the_size(book: PriceBook) -> None:
    room = cost(book, "gpt-image-2", quality="low", size="1536x864")
    c = case(book, make_team(budgets=(Budget("day", "usd", room),), order=("quality",)))
    with pytest.raises(BudgetExceeded):
        c.decide(req("gpt-image-2", quality="high", size="2048x1152"))


@pytest.mark.parametrize("name", ["gpt-image-2", "gpt-image-1", "gpt-image-1.5", "dall-e-3"])
def test_auto_size_becomes_an_explicit_accepted_size(book: PriceBook, name: str) -> None:
    model = model_of(book, name)
    low = model.qualities[0]
    explicit = [s for s in (model.sizes or STANDARD_SIZES) if model.accepts_size(s)]
    room = min(cost(book, name, quality=low, size=s) for s in explicit)
    assert room < cost(book, name, quality=low, size="auto")
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req(name, quality="auto", size="auto"))
    assert decision.variant.request.size in explicit
    assert decision.variant.request.quality == low
    assert decision.variant.estimate.cost_nanos <= room


def test_dall_e_2_square_steps_down_to_smaller_squares(book: PriceBook) -> None:
    room = cost(book, "dall-e-2", quality="standard", size="512x512")
    c = case(book, make_team(budgets=(Budget("day", "usd", room),)))
    decision = c.decide(req("dall-e-2", quality="standard", size="1024x1024"))
    assert sent(decision) == ("dall-e-2", "standard", "512x512")


# --- decide: model fallback ----------------------------------------------------------------


def test_fallback_model_comes_after_quality_and_size_with_its_own_ladder(
    book: PriceBook,
) -> None:
    cheapest_own = cost(book, "gpt-image-1.5", quality="low", size="1024x1024")
    mini = {
        q: cost(book, "gpt-image-1-mini", quality=q, size="1024x1024")
        for q in ("low", "medium", "high")
    }
    room = mini["medium"]
    assert room < cheapest_own
    c = case(
        book,
        make_team(budgets=(Budget("day", "usd", room),), fallback="gpt-image-1-mini"),
    )
    decision = c.decide(req("gpt-image-1.5", quality="high", size="1024x1024"))
    assert sent(decision) == ("gpt-image-1-mini", "medium", "1024x1024")
    # The fallback starts from the request as it came, then walks its own ladder.
    assert decision.variant.changes == (
        Change("model", "gpt-image-1.5", "gpt-image-1-mini", "budget"),
        Change("quality", "high", "medium", "budget"),
    )
    assert summary(decision.variant.changes) == (
        "model=gpt-image-1.5->gpt-image-1-mini; quality=high->medium"
    )
    assert decision.variant.estimate == estimate(
        model_of(book, "gpt-image-1-mini"), decision.variant.request
    )


def test_fallback_maps_a_quality_missing_from_its_ladder(book: PriceBook) -> None:
    start = variant_of(book, req("gpt-image-2.5-sunburst", quality="xhigh", size="1024x1536"))
    switched = switch_model(start, model_of(book, "gpt-image-1-mini"))
    assert switched is not None
    assert switched.request.model == "gpt-image-1-mini"
    assert switched.request.quality in model_of(book, "gpt-image-1-mini").qualities
    assert switched.request.size == "1024x1536"
    assert switched.estimate == estimate(switched.model, switched.request)


@pytest.mark.parametrize(
    ("name", "quality", "size"),
    [("dall-e-3", "hd", "1024x1024"), ("gpt-image-2.5-sunburst", "max", "1024x1024")],
)
@pytest.mark.parametrize("order", [KNOBS, ("model",), ("size", "model", "quality")])
def test_every_variant_with_a_fallback_is_priceable(
    book: PriceBook, name: str, quality: str, size: str, order: tuple[Knob, ...]
) -> None:
    start = variant_of(book, req(name, quality=quality, size=size))
    team = make_team(order=order, fallback="gpt-image-1-mini")
    for v in variants(start, team, book):
        assert v.model.accepts_quality(v.request.quality)
        assert v.model.accepts_size(v.request.size)
        assert v.estimate == estimate(v.model, v.request)


def test_fallback_that_cannot_keep_the_aspect_ratio_is_skipped(book: PriceBook) -> None:
    start = variant_of(book, req("gpt-image-2", quality="high", size="2048x1152"))
    team = make_team(budgets=(usd_budget("day", "0.000001"),), fallback="gpt-image-1-mini")
    assert all(v.request.model == "gpt-image-2" for v in variants(start, team, book))
    assert switch_model(start, model_of(book, "gpt-image-1-mini")) is None
    with pytest.raises(BudgetExceeded):
        case(book, team).decide(start.request)


def test_fallback_keeps_the_orientation_of_a_portrait_request(book: PriceBook) -> None:
    room = cost(book, "gpt-image-1-mini", quality="low", size="1024x1536")
    team = make_team(budgets=(Budget("day", "usd", room),), fallback="gpt-image-1-mini")
    decision = case(book, team).decide(req("gpt-image-2", quality="high", size="1024x1536"))
    # Either gpt-image-2 found a cheaper portrait, or the mini took over in portrait.
    w, h = parse_size(decision.variant.request.size) or (0, 0)
    assert w * 3 == h * 2


@pytest.mark.parametrize(
    ("endpoint", "name"), [("variations", "dall-e-2"), ("edits", "gpt-image-2")]
)
def test_fallback_is_never_a_model_the_endpoint_does_not_take(
    book: PriceBook, endpoint: str, name: str
) -> None:
    """Variations take dall-e-2 only, edits never dall-e-3."""
    start = variant_of(book, req(name, endpoint=endpoint, quality="auto", size="1024x1024"))
    fallback = "dall-e-3" if endpoint == "edits" else "gpt-image-1-mini"
    assert switch_model(start, model_of(book, fallback)) is None


def test_fallback_equal_to_the_requested_model_adds_nothing(book: PriceBook) -> None:
    start = variant_of(book, req("gpt-image-1-mini", quality="high", size="1024x1024"))
    team = make_team(fallback="gpt-image-1-mini")
    assert [v.request.quality for v in variants(start, team, book)] == ["high", "medium", "low"]


# --- on_exhausted: reject, and the 429 --------------------------------------------------------


def test_reject_never_downgrades_and_answers_429(book: PriceBook) -> None:
    team = make_team(budgets=(usd_budget("month", 1),), on_exhausted="reject")
    c = case(book, team)
    totals = {
        c.counter("team", "month"): Totals(spent_nanos=800_000_000, reserved_nanos=100_000_000)
    }
    request = req("gpt-image-2", quality="high", size="1024x1024")
    with pytest.raises(BudgetExceeded) as caught:
        c.decide(request, totals)
    error = caught.value
    assert error.status == 429
    assert error.type == "insufficient_quota"
    assert error.code == "budget_exceeded"
    assert error.headers()["x-should-retry"] == "false"
    assert "team design's month budget" in error.message
    assert "limit $1" in error.message
    assert "spent $0.8, reserved $0.1" in error.message
    # The same request fits once downgrading is allowed.
    downgrading = case(book, make_team(budgets=team.budgets))
    assert downgrading.decide(request, totals).variant.changes


def test_a_429_says_the_room_left_in_the_tightest_usd_budget(book: PriceBook) -> None:
    budgets = (usd_budget("month", 1), usd_budget("day", "0.95"))
    c = case(book, make_team(budgets=budgets, on_exhausted="reject"))
    totals = {
        c.counter("team", "month"): Totals(spent_nanos=800_000_000, reserved_nanos=100_000_000),
        c.counter("team", "day"): Totals(spent_nanos=890_000_000),
    }
    with pytest.raises(BudgetExceeded) as caught:
        c.decide(req("gpt-image-2", quality="high", size="1024x1024"), totals)
    # As every answer says it: the day's $0.06 is tighter than the month's $0.10.
    assert caught.value.headers()["x-tollgate-budget-remaining-usd"] == "0.06"


def test_reject_sends_a_request_that_fits_unchanged(book: PriceBook) -> None:
    c = case(book, make_team(budgets=(usd_budget("month", 1),), on_exhausted="reject"))
    request = req("gpt-image-2", quality="high", size="1024x1024")
    assert c.decide(request).variant.request == request


def test_reject_message_quotes_the_cost_of_the_request_itself(book: PriceBook) -> None:
    team = make_team(budgets=(usd_budget("month", 1),), on_exhausted="reject")
    c = case(book, team)
    totals = {c.counter("team", "month"): Totals(spent_nanos=900_000_000)}
    request = req("gpt-image-2", quality="high", size="1024x1024")
    with pytest.raises(BudgetExceeded) as caught:
        c.decide(request, totals)
    own = cost(book, "gpt-image-2", quality="high", size="1024x1024")
    assert f"${usd_text(own)}" in caught.value.message


def test_exhausted_downgrade_message_names_budget_and_cheapest_cost(book: PriceBook) -> None:
    c = case(book, make_team(budgets=(usd_budget("day", 60),)))
    totals = {c.counter("team", "day"): Totals(spent_nanos=60 * NANOS - 1000)}
    request = req("gpt-image-2", quality="high", size="1024x1024", prompt_bytes=10)
    with pytest.raises(BudgetExceeded) as caught:
        c.decide(request, totals)
    start = variant_of(book, request)
    cheapest = min(v.estimate.cost_nanos for v in variants(start, c.team, book))
    message = caught.value.message
    assert "team design's day budget" in message
    assert "limit $60" in message and "spent $59.999999" in message
    assert f"${usd_text(cheapest)}" in message


# --- token, user and organization budgets --------------------------------------------------


def edit_request(quality: str = "high") -> ImageRequest:
    return req(
        "gpt-image-1",
        endpoint="edits",
        quality=quality,
        size="1024x1024",
        prompt_bytes=200,
        images=(InputImage(1024, 1024),),
    )


def need(request: ImageRequest, metric: Metric) -> int:
    usage = estimate(model_of(BOOK, request.model), request).usage
    return {
        "text_input_tokens": usage.text_input + usage.cached_text_input,
        "image_input_tokens": usage.image_input + usage.cached_image_input,
        "image_output_tokens": usage.image_output,
        "total_tokens": usage.total_tokens,
        "usd": 0,
    }[metric]


TOKEN_METRICS: tuple[Metric, ...] = (
    "text_input_tokens",
    "image_input_tokens",
    "image_output_tokens",
    "total_tokens",
)


@pytest.mark.parametrize("metric", TOKEN_METRICS)
def test_token_budget_with_exact_room_lets_the_request_through(
    book: PriceBook, metric: Metric
) -> None:
    request = edit_request()
    c = case(book, make_team(budgets=(Budget("month", metric, 10_000_000),)))
    totals = {c.counter("team", "month"): Totals(**{metric: 10_000_000 - need(request, metric)})}
    assert c.decide(request, totals).variant.request == request


@pytest.mark.parametrize("metric", TOKEN_METRICS)
def test_token_budget_one_short_downgrades_or_rejects(book: PriceBook, metric: Metric) -> None:
    request = edit_request()
    c = case(book, make_team(budgets=(Budget("month", metric, 10_000_000),)))
    room = need(request, metric) - 1
    totals = {c.counter("team", "month"): Totals(**{metric: 10_000_000 - room})}
    if metric in ("text_input_tokens", "image_input_tokens"):
        # No downgrade reduces the prompt or the input images.
        with pytest.raises(BudgetExceeded) as caught:
            c.decide(request, totals)
        assert metric.replace("_", " ") in caught.value.message
    else:
        decision = c.decide(request, totals)
        assert need(decision.variant.request, metric) <= room
        assert decision.variant.request.quality == "medium"


def test_per_user_budget_applies_only_to_that_user(book: PriceBook) -> None:
    team = make_team(per_user=(usd_budget("day", 1),))
    alice = case(book, team, user="alice")
    bob = case(book, team, user="bob")
    totals = {alice.counter("user", "day"): Totals(spent_nanos=NANOS)}
    request = req("gpt-image-2", quality="low", size="1024x1024")
    with pytest.raises(BudgetExceeded) as caught:
        alice.decide(request, totals)
    assert "user 'alice''s day budget" in caught.value.message
    assert bob.decide(request, totals).variant.request == request
    assert case(book, team).decide(request, totals).variant.request == request


def test_organization_budget_applies_to_every_team(book: PriceBook) -> None:
    org = (usd_budget("month", 10),)
    design, research = make_team("design"), make_team("research")
    config = make_config(book, (design, research), org=org)
    org_counter = applicable(config, design, None, NOW)[0].counter
    assert org_counter == applicable(config, research, None, NOW)[0].counter
    totals = {org_counter: Totals(spent_nanos=10 * NANOS)}
    request = req("gpt-image-2", quality="low", size="1024x1024")
    for team in (design, research):
        c = Case(team, config)
        with pytest.raises(BudgetExceeded) as caught:
            c.decide(request, totals)
        assert "the organization's month budget" in caught.value.message


def test_every_budget_must_fit_not_just_the_first(book: PriceBook) -> None:
    team = make_team(budgets=(usd_budget("month", 1000), usd_budget("day", 1)))
    c = case(book, team, org=(usd_budget("month", 100000),))
    totals = {c.counter("team", "day"): Totals(spent_nanos=NANOS)}
    with pytest.raises(BudgetExceeded) as caught:
        c.decide(req("gpt-image-2", quality="low", size="1024x1024"), totals)
    assert "day budget" in caught.value.message


# --- remaining and summary -----------------------------------------------------------------


def test_remaining_is_the_room_of_the_tightest_usd_budget_after_the_reservation(
    book: PriceBook,
) -> None:
    team = make_team(
        budgets=(
            usd_budget("month", 10),
            usd_budget("day", 5),
            Budget("day", "total_tokens", 10**9),
        ),
        per_user=(usd_budget("day", 3),),
    )
    c = case(book, team, org=(usd_budget("month", 1000),), user="alice")
    totals = {
        c.counter("team", "month"): Totals(spent_nanos=2 * NANOS),
        c.counter("team", "day"): Totals(spent_nanos=NANOS, reserved_nanos=NANOS),
        c.counter("user", "day"): Totals(spent_nanos=NANOS // 2),
    }
    request = req("gpt-image-2", quality="high", size="1024x1024")
    decision = c.decide(request, totals)
    assert decision.remaining_nanos == 5 * NANOS // 2 - decision.variant.estimate.cost_nanos


def test_remaining_is_none_without_a_usd_budget(book: PriceBook) -> None:
    c = case(book, make_team(budgets=(Budget("day", "total_tokens", 10**9),)))
    assert c.decide(req("gpt-image-2", quality="low", size="1024x1024")).remaining_nanos is None


def test_summary_merges_changes_per_knob_first_value_to_last() -> None:
    changes = [
        Change("quality", "high", "medium", "policy"),
        Change("quality", "medium", "low", "budget"),
        Change("size", "2048x1152", "1792x1008", "budget"),
        Change("size", "1792x1008", "1536x864", "budget"),
    ]
    assert summary(changes) == "quality=high->low; size=2048x1152->1536x864"


def test_summary_drops_a_knob_that_came_back_and_is_empty_without_changes() -> None:
    assert summary([]) == ""
    back = [Change("quality", "high", "low", "budget"), Change("quality", "low", "high", "budget")]
    assert summary(back) == ""


# --- the guarantee, property-style ---------------------------------------------------------

CUSTOM_SIZES = (
    "auto",
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "2048x1152",
    "1152x2048",
    "2048x2048",
    "1280x720",
)


def random_request(rng: random.Random, book: PriceBook) -> ImageRequest:
    name = rng.choice(MODEL_NAMES)
    model = model_of(book, name)
    sizes = CUSTOM_SIZES if model.arbitrary_sizes else ("auto", *model.sizes)
    return req(
        name,
        quality=rng.choice(("auto", *model.qualities)),
        size=rng.choice(sizes),
        n=rng.randint(1, min(4, model.max_n)),
        prompt_bytes=rng.randint(0, 4000),
    )


def conceivable_costs(book: PriceBook, request: ImageRequest, fallback: str) -> list[int]:
    """Every form the request could take (any quality, same-aspect size, the fallback)."""
    found = []
    for name in (request.model, fallback):
        model = model_of(book, name)
        if request.size == "auto":
            sizes = {"auto", *(s for s in (*model.sizes, *STANDARD_SIZES) if model.accepts_size(s))}
        else:
            dims = parse_size(request.size)
            assert dims is not None
            sizes = brute_same_aspect(model, request.size) if model.arbitrary_sizes else set()
            sizes |= {
                s for s in model.sizes if (p := parse_size(s)) and p[0] * dims[1] == p[1] * dims[0]
            }
            if model.accepts_size(request.size):
                sizes.add(request.size)
        for q in model.qualities:
            for s in sizes:
                found.append(estimate(model, request.with_changes(quality=q, size=s)).cost_nanos)
    return found


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_chosen_estimates_never_exceed_the_limit_and_rejection_means_nothing_fits(
    book: PriceBook, seed: int
) -> None:
    rng = random.Random(seed)
    limit_usd = rng.choice(["2", "5", "13.37"])
    team = make_team(budgets=(usd_budget("total", limit_usd),), fallback="gpt-image-1-mini")
    c = case(book, team)
    counter = c.counter("team", "total")
    limit = int(Decimal(limit_usd) * NANOS)
    reserved = 0
    rejected = 0
    for _ in range(120):
        request = random_request(rng, book)
        try:
            decision = c.decide(request, {counter: Totals(reserved_nanos=reserved)})
        except BudgetExceeded:
            rejected += 1
            assert min(conceivable_costs(book, request, "gpt-image-1-mini")) > limit - reserved
            continue
        chosen = decision.variant.estimate.cost_nanos
        assert chosen <= limit - reserved
        assert decision.variant.estimate == estimate(
            decision.variant.model, decision.variant.request
        )
        reserved += chosen
        assert decision.remaining_nanos == limit - reserved
    assert reserved <= limit
    assert rejected > 0  # the budget was actually exhausted along the way


def test_alert_thresholds_are_soft_and_never_block(book: PriceBook) -> None:
    budget = usd_budget("month", 1, alert_at=(Decimal("0.5"), Decimal("0.8")))
    c = case(book, make_team(budgets=(budget,)))
    totals = {c.counter("team", "month"): Totals(spent_nanos=950_000_000)}
    request = req("gpt-image-2", quality="low", size="1024x1024")
    assert c.decide(request, totals).variant.request == request


def counters_built_now(team: str, user: str | None, now: float, tz: ZoneInfo) -> list[Counter]:
    """What `counters` must answer: each window worked out for `now` itself."""
    users = [("team", "")] + ([("user", user)] if user else [])
    return [
        Counter(scope, team, who, p, window(p, now, tz).start)  # type: ignore[arg-type]
        for scope, who in users
        for p in ("day", "week", "month", "total")
    ]


@pytest.mark.parametrize(
    ("zone_name", "around"),
    [
        ("UTC", datetime(2026, 3, 1, tzinfo=UTC).timestamp()),  # a month, week and day end
        ("Europe/Paris", datetime(2026, 3, 29, 1, tzinfo=UTC).timestamp()),  # DST begins
        ("Europe/Paris", datetime(2026, 10, 24, 22, tzinfo=UTC).timestamp()),  # a day of 25 h
        # Monrovia kept -0:44:30 until 1972: its midnight fell half-way through a minute.
        ("Africa/Monrovia", datetime(1960, 5, 1, 0, 44, 30, tzinfo=UTC).timestamp()),
    ],
)
def test_counters_kept_for_a_minute_are_those_of_each_instant(
    zone_name: str, around: float
) -> None:
    tz = ZoneInfo(zone_name)
    for offset in (-61.0, -60.0, -30.5, -1.0, -0.25, 0.0, 0.25, 1.0, 29.5, 30.0, 59.999, 61.0):
        now = around + offset
        for user in (None, "alice"):
            assert list(counters("design", user, now, tz)) == counters_built_now(
                "design", user, now, tz
            ), (zone_name, offset, user)


@pytest.mark.parametrize(
    ("zone_name", "around"),
    [
        ("UTC", datetime(2026, 3, 1, tzinfo=UTC).timestamp()),
        ("Europe/Paris", datetime(2026, 3, 29, 1, tzinfo=UTC).timestamp()),
        ("Africa/Monrovia", datetime(1960, 5, 1, 0, 44, 30, tzinfo=UTC).timestamp()),
    ],
)
def test_applicable_budgets_kept_for_a_minute_are_those_of_each_instant(
    book: PriceBook, zone_name: str, around: float
) -> None:
    team = make_team(
        budgets=(usd_budget("month", 800), usd_budget("day", 60)),
        per_user=(usd_budget("week", 5),),
    )
    config = make_config(book, (team,), org=(usd_budget("month", 20000),), timezone=zone_name)
    tz = ZoneInfo(zone_name)
    for offset in (-61.0, -60.0, -30.5, -1.0, -0.25, 0.0, 0.25, 1.0, 29.5, 30.0, 59.999, 61.0):
        now = around + offset
        for user in (None, "alice"):
            found = applicable(config, team, user, now)
            assert [(a.budget, a.counter, a.window) for a in found] == [
                (b, Counter(scope, who_team, who, b.period, window(b.period, now, tz).start),
                 window(b.period, now, tz))
                for scope, who_team, who, budgets in (
                    ("organization", "", "", config.organization_budgets),
                    ("team", "design", "", team.budgets),
                    ("user", "design", user or "", team.per_user if user else ()),
                )
                for b in budgets
            ], (zone_name, offset, user)  # fmt: skip


def test_share_fits_finds_what_a_strict_decide_finds_for_a_share(book: PriceBook) -> None:
    """A batch's users' shares are checked by `share_fits`: the same refusals (the same
    budget) and the same room left as `decide` under the strict policy a batch is reserved
    under, for random shares, budgets and totals."""
    rng = random.Random(20261206)
    metrics: tuple[Metric, ...] = ("usd", *TOKEN_METRICS)
    periods: tuple[Period, ...] = ("day", "week", "month", "total")
    model = model_of(book, "gpt-image-2")
    refused = fitted = 0
    for _ in range(3000):
        scale = rng.choice((10, 1000, 10**6, 10**9))

        def budget(period: Period, scale: int = scale) -> Budget:
            return Budget(period, rng.choice(metrics), rng.randint(0, 20 * scale))

        team = make_team(
            budgets=tuple(budget(p) for p in rng.sample(periods, rng.randint(0, 2))),
            per_user=tuple(budget(p) for p in rng.sample(periods, rng.randint(0, 3))),
            on_exhausted="reject",
        )
        org = tuple(budget(p) for p in rng.sample(periods, rng.randint(0, 1)))
        config = make_config(book, (team,), org)
        applied = applicable(config, team, "alice", NOW)
        totals = {
            a.counter: Totals(*(rng.randint(0, 12 * scale) for _ in range(6)))
            for a in applied
            if rng.random() < 0.8
        }
        usage = Usage(*(rng.randint(0, 4 * scale) for _ in range(6)))
        share = Estimate(usage, rng.randint(0, 4 * scale))
        variant = Variant(req(user="alice"), model, share)
        blocker, left = share_fits(share, applied, totals)
        try:
            decision = decide(team, variant, applied, totals, book)
        except BudgetExceeded as exc:
            refused += 1
            assert blocker is not None
            assert blocker.describe() in exc.message
            assert blocker == blocking(variant, applied, totals)
        else:
            fitted += 1
            assert blocker is None
            assert left == decision.remaining_nanos
    assert refused > 300 and fitted > 300
