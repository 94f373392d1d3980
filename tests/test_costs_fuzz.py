"""Hostile Costs API exports, generated: a saved answer is either refused with a message
(exit 2) or reconciled and printed, by model and by project, never a traceback; and one
answer's buckets read the same however they are paged."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config.prices import load_price_book
from proxy.core.errors import InvalidRequest
from proxy.finance import costs_api, projects, reconcile

BOOK = load_price_book()
DAY = 86_400
FIRST = 1_793_664_000  # 2026-11-03, UTC
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["gpt-image-2, image output", "batch api | gpt-image-2 image",
                     "gpt-5.5, cached input", "chat, input", "1.5", "NaN", "-1e3", "usd", "EUR",
                     "proj_a"]),
)  # fmt: skip
ANY = st.recursive(
    SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)
AMOUNT = st.one_of(ANY, st.fixed_dictionaries({"value": ANY}, optional={"currency": ANY}))
RESULT = st.one_of(
    ANY,
    st.fixed_dictionaries(
        {}, optional={"amount": AMOUNT, "line_item": ANY, "project_id": ANY, "object": ANY}
    ),
)
START = st.one_of(ANY, st.integers(FIRST - 3 * DAY, FIRST + 3 * DAY), st.floats(0, 3e9))
BUCKET = st.one_of(
    ANY,
    st.fixed_dictionaries(
        {"start_time": START},
        optional={"end_time": st.one_of(ANY, START), "results": st.lists(RESULT, max_size=4)},
    ),
)
PAGE = st.one_of(
    ANY,
    st.fixed_dictionaries(
        {"data": st.one_of(ANY, st.lists(BUCKET, max_size=4))},
        optional={"has_more": ANY, "next_page": ANY, "object": ANY},
    ),
)


@FUZZ
@given(st.one_of(PAGE, st.lists(PAGE, max_size=3)))
def test_a_saved_export_is_reconciled_or_refused_never_a_traceback(export: Any) -> None:
    try:
        text = json.dumps(export)
    except (TypeError, ValueError):  # a key json cannot write
        return
    try:
        pages = costs_api.load_costs_file(text)
    except InvalidRequest:
        return
    try:
        by_model = reconcile.parse_costs(pages, BOOK)
    except InvalidRequest:
        pass
    else:
        first, last = reconcile.window(by_model.days, None, None, date(2026, 11, 3))
        found = reconcile.compare(by_model, {}, first, last)
        reconcile.as_table(found), json.dumps(reconcile.as_json(found))
    try:
        by_project = projects.parse_costs(pages, BOOK)
    except InvalidRequest:
        return
    first, last = reconcile.window(by_project.days, None, None, date(2026, 11, 3))
    lines = projects.compare(by_project, {}, lambda team: None, [], first, last)
    projects.as_table(lines), json.dumps(projects.as_json(lines))


AMOUNTS = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.decimals(-(10**6), 10**6, allow_nan=False, allow_infinity=False, places=12).map(str),
)
ITEMS = st.sampled_from(
    ["gpt-image-2, image output", "gpt-image-2, text input", "batch api | gpt-image-1.5 image",
     "gpt-5.5, input", "chat-model, input"]
)  # fmt: skip


@FUZZ
@given(
    st.lists(
        st.lists(st.tuples(ITEMS, AMOUNTS), max_size=5, unique_by=lambda r: r[0]),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 6),
)
def test_one_answer_reads_the_same_however_it_is_paged(
    days: list[list[tuple[str, float | str]]], per_page: int
) -> None:
    """Amounts as floats or decimal strings of many places, summed exactly by day and
    model, whatever the page size."""
    buckets = [
        {"object": "bucket", "start_time": FIRST + i * DAY, "end_time": FIRST + (i + 1) * DAY,
         "results": [{"amount": {"value": value, "currency": "usd"}, "line_item": item}
                     for item, value in results]}
        for i, results in enumerate(days)
    ]  # fmt: skip
    pages = [
        {"object": "page", "data": buckets[i : i + per_page]}
        for i in range(0, len(buckets), per_page)
    ]
    whole = costs_api.load_costs_file(json.dumps({"object": "page", "data": buckets}))
    paged = costs_api.load_costs_file("\n".join(json.dumps(p) for p in pages))
    if not any(days):
        return
    once, again = reconcile.parse_costs(whole, BOOK), reconcile.parse_costs(paged, BOOK)
    assert (once.amounts, once.days, once.ignored) == (again.amounts, again.days, again.ignored)
    total = sum((Decimal(str(value)) for results in days for _, value in results), Decimal(0))
    summed = sum(once.amounts.values(), Decimal(0)) + sum(once.ignored.values(), Decimal(0))
    # Decimal keeps 28 digits: sums in another order differ far below a nano-dollar.
    assert abs(summed - total) < Decimal("1e-12")
