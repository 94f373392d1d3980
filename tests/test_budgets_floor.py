"""A request that fits in no form of its downgrade ladder is refused from the ladder's
floor, without walking it: the same 429, the same decision otherwise, as the full walk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core import budgets
from proxy.core.budgets import (
    STANDARD_SIZES,
    Decision,
    _decide_by_walking,
    apply_allow,
    decide,
    same_aspect_sizes,
    variants,
)
from proxy.core.errors import BudgetExceeded, PolicyViolation
from proxy.core.models import Counter, Estimate, ImageRequest, InputImage, Totals, Usage
from proxy.core.periods import Applied
from proxy.core.pricing import AUTO, ModelPrices, PriceBook
from proxy.core.settings import KNOBS, Allow, Budget, Knob, Metric, Team, ThrottleTier
from tests.test_budgets import BOOK, NANOS, case, make_team, model_of, req, variant_of

METRICS: tuple[Metric, ...] = (
    "usd",
    "text_input_tokens",
    "image_input_tokens",
    "image_output_tokens",
    "total_tokens",
)


def odd_models(book: PriceBook) -> dict[str, ModelPrices]:
    """Entries a deployment might write that break what the floor relies on: a table whose
    medium quality bounds below low and high; a model whose output tokens are free;
    fallbacks whose ladder and sizes make a higher quality or a larger size of the request
    their cheaper form (they have no `low`, so `low` becomes their top; they take
    1024x1024 (and 816x816) as they are, and map every other square to the one they list
    first, 1536x1536 or the cheaper 768x768); twins of gpt-image-1 and of gpt-image-2 whose
    output tokens cost twice as much and are half as many (the same cost, other usage)."""
    table = model_of(book, "gpt-image-1")
    assert table.output_table is not None
    upside_down = {
        "low": table.output_table["high"],
        "medium": table.output_table["low"],
        "high": table.output_table["medium"],
    }
    formula = model_of(book, "gpt-image-2")
    free = {**formula.rates, "image_output": Decimal(0)}
    small = {"1536x1536": 300, "1024x1024": 100, "1536x1024": 150, "1024x1536": 150}
    smaller = {"768x768": 30, "816x816": 50, **small}
    twin_rates = {**table.rates, "image_output": 2 * table.rates["image_output"]}
    halved = {q: {s: t // 2 for s, t in by.items()} for q, by in table.output_table.items()}

    def mapping(name: str, tokens: dict[str, int]) -> ModelPrices:
        return replace(
            table,
            name=name,
            aliases=(),
            qualities=("medium", "high"),
            sizes=tuple(tokens),
            output_table={"medium": tokens, "high": {s: 4 * t for s, t in tokens.items()}},
        )

    half = replace(
        formula,
        name="odd-half",
        aliases=(),
        rates={**formula.rates, "image_output": 2 * formula.rates["image_output"]},
        qualities=("medium",),
        sizes=("1536x1536", "1024x1024"),
        custom_sizes=None,
        auto_size=None,
        output_formula=None,
        output_table={"medium": {"1536x1536": 5000, "1024x1024": 768}},
    )
    return {
        "odd-half": half,
        "odd-ladder": mapping("odd-ladder", small),
        "odd-small": mapping("odd-small", smaller),
        "odd-table": replace(table, name="odd-table", output_table=upside_down, aliases=()),
        "odd-free": replace(
            formula, name="odd-free", rates=free, aliases=(), output_scale={"low": Decimal(9)}
        ),
        "odd-twin": replace(
            table, name="odd-twin", aliases=(), rates=twin_rates, output_table=halved
        ),
    }


WIDE_BOOK = PriceBook({**BOOK.models, **odd_models(BOOK)}, BOOK.mainline)
NAMES = WIDE_BOOK.names()


def outcome(run: Callable[[], Decision]) -> Decision | tuple[str, str | None]:
    try:
        return run()
    except BudgetExceeded as refused:
        return refused.message, refused.remaining_usd


def sizes_of(model: ModelPrices) -> st.SearchStrategy[str]:
    listed = st.sampled_from((AUTO, *model.sizes)) if model.sizes else st.just(AUTO)
    if model.custom_sizes is None:
        return listed
    rules = model.custom_sizes
    edges = st.integers(1, rules.max_edge // rules.multiple_of).map(lambda k: k * rules.multiple_of)
    custom = st.tuples(edges, edges).filter(lambda d: rules.accepts(*d))
    squares = st.sampled_from(("2048x2048", "1024x1024", "3840x2160", "1024x1536", "2000x1008"))
    return st.one_of(
        listed,
        squares.filter(model.accepts_size),
        custom.map(lambda d: f"{d[0]}x{d[1]}"),
    )


@st.composite
def requests(draw: st.DrawFn) -> ImageRequest:
    model = WIDE_BOOK.models[draw(st.sampled_from(NAMES))]
    edit = model.name != "dall-e-3" and draw(st.booleans())
    fields: dict[str, Any] = {
        "quality": draw(st.sampled_from((AUTO, *model.qualities))),
        "size": draw(sizes_of(model)),
        "n": draw(st.integers(1, min(model.max_n, 4))),
        "prompt_bytes": draw(st.integers(0, 4000)),
    }
    if not model.per_image_billing:
        if draw(st.booleans()):
            fields["stream"] = True
            fields["partial_images"] = draw(st.integers(0, 3))
        if model.accepts_input_fidelity:
            fields["input_fidelity"] = draw(st.sampled_from((None, "low", "high")))
        if draw(st.integers(0, 4)) == 0:
            fields["mainline"] = "gpt-5.5"
    if edit:
        dims = st.one_of(st.none(), st.integers(64, 4096))
        images = draw(st.lists(st.tuples(dims, dims), min_size=1, max_size=3))
        fields["images"] = tuple(InputImage(w, h) for w, h in images)
    endpoint = "edits" if edit else "generations"
    return req(model.name, endpoint=endpoint, **fields)


def need(estimate: Estimate, metric: Metric) -> int:
    usage = estimate.usage
    return {
        "usd": estimate.cost_nanos,
        "text_input_tokens": usage.text_input + usage.cached_text_input,
        "image_input_tokens": usage.image_input + usage.cached_image_input,
        "image_output_tokens": usage.image_output,
        "total_tokens": usage.total_tokens,
    }[metric]


FRACTIONS = (0, 0.001, 0.01, 0.03, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 0.9, 1.0, 1.5)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    request=requests(),
    order=st.permutations(KNOBS).flatmap(
        lambda knobs: st.integers(1, 3).map(lambda k: tuple(knobs[:k]))
    ),
    fallback=st.one_of(st.none(), st.sampled_from(NAMES)),
    on_exhausted=st.sampled_from(("downgrade", "downgrade", "reject")),
    limits=st.lists(
        st.tuples(
            st.sampled_from(("day", "total")),
            st.sampled_from(METRICS),
            st.sampled_from(FRACTIONS),
            st.sampled_from(FRACTIONS),
        ),
        min_size=1,
        max_size=4,
    ),
    org=st.booleans(),
    throttled=st.booleans(),
    base=st.one_of(st.none(), st.integers(1, 50_000)),
    data=st.data(),
)
def test_decide_agrees_with_the_full_walk(
    request: ImageRequest,
    order: tuple[Knob, ...],
    fallback: str | None,
    on_exhausted: Any,
    limits: list[tuple[Any, Metric, float, float]],
    org: bool,
    throttled: bool,
    base: int | None,
    data: st.DataObject,
) -> None:
    """For any team, request and budgets: the same decision, or the same 429, as trying
    every form of the ladder in turn. Each budget's limit and use are fractions of what
    the request as asked needs, so that some forms fit and others do not. The team's
    `allow` may list sizes (the request's and some of its ladder's) and hold
    `input_fidelity` to `low` (which a fallback that reads every input at high fidelity
    does not meet)."""
    model = WIDE_BOOK.models[request.model]
    mainline = (
        Estimate(Usage(mainline_input=base, mainline_output=base), base * 40_000)
        if base is not None and request.mainline is not None
        else budgets.NO_BASE
    )
    asked = budgets.priced(model, request, mainline)
    entries = []
    for period, metric, limit, used in limits:
        full = need(asked, metric)
        entries.append((Budget(period, metric, int(full * limit) + 1), int(full * used)))
    team_budgets = tuple(dict.fromkeys(b for b, _ in entries))
    tiers = (ThrottleTier(Decimal("0.5"), model.qualities[0]),) if throttled else ()
    team = make_team(
        budgets=team_budgets,
        order=order,
        fallback=fallback,
        on_exhausted=on_exhausted,
        throttle=tiers,
        allow=data.draw(allows(request, fallback)),
    )
    org_budgets = (Budget("month", "usd", asked.cost_nanos // 3 + 1),) if org else ()
    c = case(WIDE_BOOK, team, org_budgets)
    applied = c.applied
    used_by_budget = {b: u for b, u in entries}
    totals: dict[Counter, Totals] = {}
    for a in applied:
        u = used_by_budget.get(a.budget, 0)
        held = totals.get(a.counter, Totals())
        if a.budget.metric == "usd":
            totals[a.counter] = replace(held, spent_nanos=u)
        else:
            totals[a.counter] = replace(held, **{a.budget.metric: u})
    try:
        variant = apply_allow(team, request, model, mainline)
    except PolicyViolation:
        return
    pruned = outcome(lambda: decide(team, variant, applied, totals, WIDE_BOOK))
    walked = outcome(lambda: _decide_by_walking(team, variant, applied, totals, WIDE_BOOK))
    assert pruned == walked


def allows(request: ImageRequest, fallback: str | None) -> st.SearchStrategy[Allow]:
    """No rule, or `allow.sizes` holding the request's size and some of the sizes its
    ladder may choose, and maybe `allow.params.input_fidelity: [low]`."""
    model = WIDE_BOOK.models[request.model]
    pool = {AUTO, *STANDARD_SIZES, *model.sizes}
    if request.size != AUTO:
        pool.update(same_aspect_sizes(model, request.size))
    if fallback is not None:
        pool.update(WIDE_BOOK.models[fallback].sizes)
    sizes = st.lists(st.sampled_from(sorted(pool)), max_size=6).map(
        lambda found: frozenset({request.size, *found})
    )
    fidelity = st.sampled_from(({}, {"input_fidelity": frozenset({"low"})}))
    return st.one_of(
        st.just(Allow()),
        st.builds(Allow, sizes=sizes, params=fidelity),
    )


# --- the refused 2048x2048 ------------------------------------------------------------------


def count_priced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = budgets.priced

    def counted(*args: Any, **kwargs: Any) -> Estimate:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(budgets, "priced", counted)
    return calls


def refused_2048(book: PriceBook, order: tuple[Knob, ...] = KNOBS) -> tuple[Team, Any, Any]:
    team = make_team(
        budgets=(Budget("day", "usd", 100 * NANOS),), order=order, fallback="gpt-image-1-mini"
    )
    c = case(book, team)
    request = req("gpt-image-2", quality="auto", size="2048x2048")
    totals = {c.counter("team", "day"): Totals(spent_nanos=100 * NANOS - 10**6)}
    return team, c, (variant_of(book, request), totals)


def test_a_refused_2048_square_prices_a_few_forms_not_its_whole_ladder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    book = BOOK
    team, c, (variant, totals) = refused_2048(book)
    ladder = sum(1 for _ in variants(variant, team, book))
    assert ladder > 300
    calls = count_priced(monkeypatch)
    with pytest.raises(BudgetExceeded) as refused:
        decide(team, variant, c.applied, totals, book)
    assert calls[0] <= 10
    with pytest.raises(BudgetExceeded) as walked:
        _decide_by_walking(team, variant, c.applied, totals, book)
    assert refused.value.message == walked.value.message
    assert "costs up to $0." in refused.value.message


@pytest.mark.parametrize(
    "order",
    [("size", "model", "quality"), ("model", "quality", "size"), ("quality", "model", "size")],
)
def test_a_refused_2048_square_prices_fewer_forms_when_the_fallback_is_inside(
    monkeypatch: pytest.MonkeyPatch, order: tuple[Knob, ...]
) -> None:
    book = BOOK
    team, c, (variant, totals) = refused_2048(book, order)
    ladder = sum(1 for _ in variants(variant, team, book))
    calls = count_priced(monkeypatch)
    with pytest.raises(BudgetExceeded) as refused:
        decide(team, variant, c.applied, totals, book)
    assert calls[0] * 10 <= ladder
    with pytest.raises(BudgetExceeded) as walked:
        _decide_by_walking(team, variant, c.applied, totals, book)
    assert refused.value.message == walked.value.message


def test_a_request_that_fits_as_asked_prices_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    book = BOOK
    team, c, (variant, _) = refused_2048(book)
    calls = count_priced(monkeypatch)
    assert decide(team, variant, c.applied, {}, book).variant == variant
    assert calls[0] == 0


def test_a_book_that_breaks_the_ladder_still_refuses_as_the_walk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Medium quality bounded below low and high: the floor keeps every quality, and
    names the same cheapest form as the walk."""
    team = make_team(budgets=(Budget("day", "usd", NANOS),), order=("quality",))
    c = case(WIDE_BOOK, team)
    variant = variant_of(WIDE_BOOK, req("odd-table", quality="high", size="1024x1024"))
    totals = {c.counter("team", "day"): Totals(spent_nanos=NANOS - 1)}
    applied: tuple[Applied, ...] = c.applied
    walked = outcome(lambda: _decide_by_walking(team, variant, applied, totals, WIDE_BOOK))
    assert outcome(lambda: decide(team, variant, applied, totals, WIDE_BOOK)) == walked


@pytest.mark.parametrize(
    ("model", "quality", "size", "order", "fallback"),
    [
        # A higher quality of the request is the fallback's cheaper form (`low` is not on
        # its ladder: it becomes its top).
        ("gpt-image-2", "high", "1024x1024", ("model", "quality"), "odd-ladder"),
        ("gpt-image-2", "high", "1024x1024", ("model", "quality", "size"), "odd-ladder"),
        # A larger size of the request is: 1024x1024 kept, the smaller squares mapped to
        # 1536x1536.
        ("gpt-image-2", "high", "2048x2048", ("model", "size"), "odd-ladder"),
        ("gpt-image-2", "medium", "2048x2048", ("quality", "model", "size"), "odd-ladder"),
        # The squares the fallback does not take are mapped to its cheapest, 768x768
        # (from 1536x1536, which it takes, only a smaller square gets there).
        ("gpt-image-2", "high", "1536x1536", ("model", "size"), "odd-small"),
        ("gpt-image-2", "high", "2048x2048", ("model", "size"), "odd-small"),
        ("gpt-image-2", "high", "2048x2048", ("model", "quality", "size"), "odd-small"),
    ],
)
@pytest.mark.parametrize("metric", ["usd", "image_output_tokens"])
def test_a_fallback_inside_the_ladder_is_floored_at_its_own_cheapest_form(
    model: str,
    quality: str,
    size: str,
    order: tuple[Knob, ...],
    fallback: str,
    metric: Metric,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the fallback is given up inside quality or size, the request's cheapest
    quality and size are not the fallback's: the floor keeps what the fallback maps apart,
    and refuses with the walk's cheapest form, priced well below the walk's count."""
    team = make_team(budgets=(Budget("day", metric, 10**12),), order=order, fallback=fallback)
    c = case(WIDE_BOOK, team)
    variant = variant_of(WIDE_BOOK, req(model, quality=quality, size=size))
    totals = {c.counter("team", "day"): replace(Totals(), **{METRIC_FIELD[metric]: 10**12})}
    applied: tuple[Applied, ...] = c.applied
    walked = outcome(lambda: _decide_by_walking(team, variant, applied, totals, WIDE_BOOK))
    assert isinstance(walked, tuple)
    forms = list(variants(variant, team, WIDE_BOOK))
    cheapest = min(forms, key=lambda v: v.estimate.cost_nanos)
    assert cheapest.model.name == fallback, "the case must floor at the fallback"
    calls = count_priced(monkeypatch)
    assert outcome(lambda: decide(team, variant, applied, totals, WIDE_BOOK)) == walked
    assert calls[0] <= max(len(forms) // 3, len(forms) - 1)


METRIC_FIELD = {"usd": "spent_nanos", "image_output_tokens": "image_output_tokens"}


@pytest.mark.parametrize("order", [("model", "quality"), ("quality", "model"), ("model", "size")])
def test_two_models_at_the_same_cost_with_other_usage_are_named_as_the_walk_names_them(
    order: tuple[Knob, ...],
) -> None:
    """gpt-image-1's low square and its twin's cost the same, but the twin's has half
    the output tokens: a token budget blocks one and not the other, so which one is the
    cheapest form decides the budget the 429 names: the first in the walk."""
    usd = Budget("day", "usd", NANOS)
    tokens = Budget("day", "image_output_tokens", 200)
    team = make_team(budgets=(tokens, usd), order=order, fallback="odd-twin")
    c = case(WIDE_BOOK, team)
    variant = variant_of(WIDE_BOOK, req("gpt-image-1", quality="high", size="1024x1024"))
    counters = {a.budget: a.counter for a in c.applied}
    totals = {counters[usd]: Totals(spent_nanos=NANOS)}
    applied: tuple[Applied, ...] = c.applied
    forms = list(variants(variant, team, WIDE_BOOK))
    least = min(v.estimate.cost_nanos for v in forms)
    tied = [v for v in forms if v.estimate.cost_nanos == least]
    assert {v.model.name for v in tied} == {"gpt-image-1", "odd-twin"}
    walked = outcome(lambda: _decide_by_walking(team, variant, applied, totals, WIDE_BOOK))
    assert outcome(lambda: decide(team, variant, applied, totals, WIDE_BOOK)) == walked


def test_a_tie_the_floor_meets_in_another_order_than_the_walk_is_left_to_the_walk() -> None:
    """gpt-image-2's medium 816x816 and odd-half's 1024x1024 cost the same, with other
    usage. The walk meets the fallback's first (its 1024x1024 comes from the request at
    1024x1024, dearer than 816x816 on gpt-image-2); the floor meets gpt-image-2's first.
    Which budget the 429 names is the walk's."""
    usd = Budget("day", "usd", NANOS)
    tokens = Budget("day", "image_output_tokens", 1000)
    team = make_team(budgets=(tokens, usd), order=("model", "size"), fallback="odd-half")
    c = case(WIDE_BOOK, team)
    variant = variant_of(WIDE_BOOK, req("gpt-image-2", quality="medium", size="2048x2048"))
    counters = {a.budget: a.counter for a in c.applied}
    totals = {counters[usd]: Totals(spent_nanos=NANOS)}
    applied: tuple[Applied, ...] = c.applied
    forms = list(variants(variant, team, WIDE_BOOK))
    least = min(v.estimate.cost_nanos for v in forms)
    first = next(v for v in forms if v.estimate.cost_nanos == least)
    assert first.model.name == "odd-half"
    assert any(v.model.name == "gpt-image-2" and v.estimate.cost_nanos == least for v in forms)
    walked = outcome(lambda: _decide_by_walking(team, variant, applied, totals, WIDE_BOOK))
    assert isinstance(walked, tuple) and "limit $1," in walked[0]
    assert outcome(lambda: decide(team, variant, applied, totals, WIDE_BOOK)) == walked
