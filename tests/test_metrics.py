"""The metric catalogue: each test has its own registry and reads values back."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.prices import load_price_book
from proxy.core.models import Change, Entry, Settlement, Usage
from proxy.core.periods import Window
from proxy.core.settings import RateLimit
from proxy.core.status import BudgetStatus, RateStatus
from proxy.metrics import BudgetCollector, Children, Metrics
from proxy.web.observe import listed_size

NANOS = 10**9


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def forwarded(**fields: object) -> Entry:
    values: dict[str, object] = {
        "id": "tg_req_1",
        "started_at": 0.0,
        "endpoint": "generations",
        "team": "design",
        "model": "gpt-image-2",
        "quality": "medium",
        "size": "1024x1024",
        "estimated_nanos": 60_000_000,
        **fields,
    }
    return Entry(**values)  # type: ignore[arg-type]


def test_a_settled_request_counts_its_outcome_cost_images_tokens_and_estimate(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    usage = Usage(text_input=12, image_input=300, image_output=1056, images=2)
    metrics.started()
    metrics.finished(forwarded(), Settlement(1.0, "ok", 200, usage, cost_nanos=52_740_000), ())
    labels = {"team": "design", "model": "gpt-image-2"}
    assert (
        registry.get_sample_value(
            "tollgate_requests_total", {**labels, "endpoint": "generations", "outcome": "ok"}
        )
        == 1
    )
    assert registry.get_sample_value(
        "tollgate_cost_usd_total", {**labels, "quality": "medium"}
    ) == pytest.approx(0.05274)
    assert registry.get_sample_value("tollgate_reserved_usd_total", labels) == pytest.approx(0.06)
    assert (
        registry.get_sample_value(
            "tollgate_images_total", {**labels, "quality": "medium", "size": "1024x1024"}
        )
        == 2
    )
    for kind, count in (("text_input", 12), ("image_input", 300), ("image_output", 1056)):
        assert registry.get_sample_value("tollgate_tokens_total", {**labels, "kind": kind}) == count
    cached = {**labels, "kind": "cached_text_input"}
    assert registry.get_sample_value("tollgate_tokens_total", cached) is None
    assert registry.get_sample_value("tollgate_inflight_requests") == 0


def responses_entry(**fields: object) -> Entry:
    """A Responses request: gpt-5.5 calling the image tool with gpt-image-2, low quality."""
    return forwarded(endpoint="responses", mainline_model="gpt-5.5", quality="low", **fields)


# gpt-5.5 wrote 1820 input (500 of them cached) and 210 output tokens; the image tool read 40
# text tokens and wrote one image of 196 tokens.
RESPONSES_USAGE = Usage(
    text_input=40, image_output=196, images=1,
    mainline_input=1320, mainline_cached_input=500, mainline_output=210,
)  # fmt: skip
RESPONSES_MAINLINE_NANOS = 1320 * 5_000 + 500 * 500 + 210 * 30_000  # 13_150_000
RESPONSES_COST_NANOS = RESPONSES_MAINLINE_NANOS + 40 * 5_000 + 196 * 30_000  # 19_230_000


def responses_settlement(**fields: object) -> Settlement:
    values: dict[str, object] = {
        "usage": RESPONSES_USAGE,
        "cost_nanos": RESPONSES_COST_NANOS,
        "mainline_cost_nanos": RESPONSES_MAINLINE_NANOS,
        **fields,
    }
    return Settlement(1.0, "ok", 200, **values)  # type: ignore[arg-type]


def test_a_responses_request_counts_under_the_image_model_with_endpoint_responses(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.started()
    metrics.finished(responses_entry(), responses_settlement(), ())
    requests = {"team": "design", "model": "gpt-image-2", "endpoint": "responses", "outcome": "ok"}
    assert registry.get_sample_value("tollgate_requests_total", requests) == 1
    images = {"team": "design", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}
    assert registry.get_sample_value("tollgate_images_total", images) == 1
    assert (
        registry.get_sample_value("tollgate_images_total", {**images, "model": "gpt-5.5"}) is None
    )
    mainline = {"team": "design", "model": "gpt-5.5", "endpoint": "responses", "outcome": "ok"}
    assert registry.get_sample_value("tollgate_requests_total", mainline) is None


def test_a_responses_requests_cost_is_split_between_the_image_and_the_mainline_model(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.started()
    metrics.finished(responses_entry(), responses_settlement(), ())
    image = registry.get_sample_value(
        "tollgate_cost_usd_total", {"team": "design", "model": "gpt-image-2", "quality": "low"}
    )
    mainline = registry.get_sample_value(
        "tollgate_cost_usd_total", {"team": "design", "model": "gpt-5.5", "quality": ""}
    )
    # Each part is the nano-dollar integer turned into dollars once, at the edge.
    assert image == (RESPONSES_COST_NANOS - RESPONSES_MAINLINE_NANOS) / NANOS == 0.00608
    assert mainline == RESPONSES_MAINLINE_NANOS / NANOS == 0.01315
    assert image + mainline == pytest.approx(RESPONSES_COST_NANOS / NANOS, rel=1e-15)


def test_a_responses_requests_cost_is_also_counted_by_part_on_its_own_counter(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.started()
    metrics.finished(responses_entry(), responses_settlement(), ())
    metrics.started()
    metrics.finished(forwarded(), Settlement(1.0, "ok", 200, Usage(images=1), 5_000_000), ())

    def part(model: str, name: str) -> float | None:
        labels = {"team": "design", "model": model, "part": name}
        return registry.get_sample_value("tollgate_responses_cost_usd_total", labels)

    assert part("gpt-image-2", "image_tool") == 0.00608
    assert part("gpt-5.5", "mainline") == 0.01315
    assert part("gpt-image-2", "mainline") is None
    assert part("gpt-5.5", "image_tool") is None
    # The Images API request is in tollgate_cost_usd_total only.
    images = {"team": "design", "model": "gpt-image-2", "quality": "medium"}
    assert registry.get_sample_value("tollgate_cost_usd_total", images) == 0.005


def test_a_responses_requests_tokens_are_counted_under_the_model_that_billed_them(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.started()
    metrics.finished(responses_entry(), responses_settlement(), ())

    def tokens(model: str, kind: str) -> float | None:
        labels = {"team": "design", "model": model, "kind": kind}
        return registry.get_sample_value("tollgate_tokens_total", labels)

    assert tokens("gpt-5.5", "text_input") == 1320  # uncached only
    assert tokens("gpt-5.5", "cached_text_input") == 500
    assert tokens("gpt-5.5", "text_output") == 210
    assert tokens("gpt-image-2", "text_input") == 40
    assert tokens("gpt-image-2", "image_output") == 196
    for kind in ("image_input", "cached_image_input", "image_output"):
        assert tokens("gpt-5.5", kind) is None
    assert tokens("gpt-image-2", "text_output") is None


def test_the_exposition_of_a_responses_request_adds_up_to_its_cost(metrics: Metrics) -> None:
    for _ in range(3):
        metrics.started()
        metrics.finished(responses_entry(), responses_settlement(), ())
    text = metrics.exposition().decode()
    cost: dict[tuple[str, str], float] = {}
    tokens: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tollgate_cost_usd_total":
                cost[sample.labels["model"], sample.labels["quality"]] = sample.value
            if sample.name == "tollgate_tokens_total":
                tokens[sample.labels["model"], sample.labels["kind"]] = sample.value
    assert cost == {
        ("gpt-image-2", "low"): pytest.approx(3 * 0.00608, rel=1e-15),
        ("gpt-5.5", ""): pytest.approx(3 * 0.01315, rel=1e-15),
    }
    assert sum(cost.values()) == pytest.approx(3 * RESPONSES_COST_NANOS / NANOS, rel=1e-15)
    assert tokens == {
        ("gpt-5.5", "text_input"): 3 * 1320,
        ("gpt-5.5", "cached_text_input"): 3 * 500,
        ("gpt-5.5", "text_output"): 3 * 210,
        ("gpt-image-2", "text_input"): 3 * 40,
        ("gpt-image-2", "image_output"): 3 * 196,
    }
    assert 'endpoint="responses"' in text


def test_a_responses_request_that_made_no_image_bills_only_its_mainline_model(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    usage = Usage(mainline_input=100, mainline_output=20)
    nanos = 100 * 5_000 + 20 * 30_000
    settlement = Settlement(1.0, "ok", 200, usage, nanos, mainline_cost_nanos=nanos)
    metrics.started()
    metrics.finished(responses_entry(), settlement, ())
    text = metrics.exposition().decode()
    assert 'tollgate_cost_usd_total{model="gpt-image-2"' not in text
    assert "tollgate_images_total{" not in text
    labels = {"team": "design", "model": "gpt-5.5", "quality": ""}
    assert registry.get_sample_value("tollgate_cost_usd_total", labels) == nanos / NANOS


def test_a_refused_responses_request_is_counted_with_no_cost_or_tokens(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    entry = Entry("tg_req_3", 0.0, "responses", team="research", model_requested="gpt-image-2",
                  mainline_model="gpt-5.5")  # fmt: skip
    metrics.started()
    metrics.finished(entry, Settlement(1.0, "rejected_policy", 403), ())
    assert registry.get_sample_value(
        "tollgate_requests_total",
        {"team": "research", "model": "gpt-image-2", "endpoint": "responses",
         "outcome": "rejected_policy"},
    ) == 1  # fmt: skip
    text = metrics.exposition().decode()
    assert "tollgate_cost_usd_total{" not in text
    assert "tollgate_tokens_total{" not in text


def test_a_responses_request_without_an_image_model_is_counted_under_its_mainline_model(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    entry = Entry("tg_req_4", 0.0, "responses", team="design", mainline_model="gpt-4.1")
    metrics.started()
    metrics.finished(entry, Settlement(1.0, "client_error", 400), ())
    labels = {"team": "design", "model": "gpt-4.1", "endpoint": "responses"}
    assert (
        registry.get_sample_value("tollgate_requests_total", {**labels, "outcome": "client_error"})
        == 1
    )


def test_a_mainline_cost_with_no_mainline_model_to_name_stays_on_the_requests_model(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    settlement = responses_settlement()
    metrics.started()
    metrics.finished(forwarded(endpoint="responses", quality="low"), settlement, ())
    labels = {"team": "design", "model": "gpt-image-2", "quality": "low"}
    assert registry.get_sample_value("tollgate_cost_usd_total", labels) == pytest.approx(
        RESPONSES_COST_NANOS / NANOS, rel=1e-15
    )
    assert 'quality=""' not in metrics.exposition().decode()


def test_requests_with_the_same_labels_add_up_on_one_child(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    settlement = Settlement(1.0, "ok", 200, Usage(image_output=100, images=1), cost_nanos=1)
    for _ in range(3):
        metrics.started()
        metrics.finished(forwarded(), settlement, ())
    labels = {"team": "design", "model": "gpt-image-2"}
    tokens = {**labels, "kind": "image_output"}
    assert registry.get_sample_value("tollgate_tokens_total", tokens) == 300
    requests = {**labels, "endpoint": "generations", "outcome": "ok"}
    assert registry.get_sample_value("tollgate_requests_total", requests) == 3
    other = {**labels, "endpoint": "edits", "outcome": "ok"}
    metrics.finished(forwarded(endpoint="edits"), settlement, ())
    assert registry.get_sample_value("tollgate_requests_total", other) == 1


def test_dollars_add_up_exactly_however_many_requests_and_kinds(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """$0.032 + $0.02 added as floats is 0.052000000000000005: the counters of dollars are
    summed in nanos, and show the nearest float to the exact sum, as the ledger's is."""
    for cost, estimate in ((32_000_000, 30_000_000), (20_000_000, 40_000_000), (1, 1)):
        metrics.started()
        entry = responses_entry(estimated_nanos=estimate)
        settlement = responses_settlement(cost_nanos=cost + 7, mainline_cost_nanos=7)
        metrics.finished(entry, settlement, ())
    image = {"team": "design", "model": "gpt-image-2"}
    mainline = {"team": "design", "model": "gpt-5.5"}
    assert registry.get_sample_value("tollgate_cost_usd_total", {**image, "quality": "low"}) == (
        52_000_001 / NANOS
    )
    assert registry.get_sample_value("tollgate_cost_usd_total", {**mainline, "quality": ""}) == (
        21 / NANOS
    )
    part = {**image, "part": "image_tool"}
    assert (
        registry.get_sample_value("tollgate_responses_cost_usd_total", part) == 52_000_001 / NANOS
    )
    assert registry.get_sample_value("tollgate_reserved_usd_total", image) == 70_000_001 / NANOS
    assert (
        'tollgate_cost_usd_total{model="gpt-image-2",quality="low",team="design"} 0.052000001\n'
        in (metrics.exposition().decode())
    )


def test_children_are_made_once_and_only_when_first_used(metrics: Metrics) -> None:
    children = Children(metrics.requests)
    assert "tollgate_requests_total{" not in metrics.exposition().decode()
    first = children("design", "gpt-image-2", "generations", "ok")
    assert "tollgate_requests_total{" in metrics.exposition().decode()
    assert children("design", "gpt-image-2", "generations", "ok") is first
    assert first is metrics.requests.labels("design", "gpt-image-2", "generations", "ok")


def test_downgrades_are_counted_per_knob_and_reason(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    changes = (
        Change("quality", "high", "medium", "policy"),
        Change("size", "1536x1024", "1024x1024", "budget"),
    )
    metrics.started()
    metrics.finished(forwarded(downgrades="…"), Settlement(1.0, "downgraded", 200), changes)
    for knob, reason in (("quality", "policy"), ("size", "budget")):
        value = registry.get_sample_value(
            "tollgate_downgrades_total", {"team": "design", "knob": knob, "reason": reason}
        )
        assert value == 1


def test_a_rejection_counts_a_request_but_no_cost_images_or_estimate(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    entry = Entry("tg_req_2", 0.0, "generations", team="research", model_requested="gpt-image-2")
    metrics.started()
    metrics.finished(entry, Settlement(1.0, "rejected_budget", 429), ())
    assert registry.get_sample_value(
        "tollgate_requests_total",
        {"team": "research", "model": "gpt-image-2", "endpoint": "generations",
         "outcome": "rejected_budget"},
    ) == 1  # fmt: skip
    text = metrics.exposition().decode()
    assert "tollgate_cost_usd_total{" not in text
    assert "tollgate_reserved_usd_total{" not in text


def test_upstream_latency_is_a_histogram_by_model_and_endpoint(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.upstream("gpt-image-2", "edits", 3.2)
    labels = {"model": "gpt-image-2", "endpoint": "edits"}
    assert (
        registry.get_sample_value("tollgate_upstream_request_duration_seconds_count", labels) == 1
    )
    assert (
        registry.get_sample_value(
            "tollgate_upstream_request_duration_seconds_bucket", {**labels, "le": "5.0"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "tollgate_upstream_request_duration_seconds_bucket", {**labels, "le": "2.5"}
        )
        == 0
    )


def status(
    scope: str, team: str, period: str, limit: int, spent: int, metric: str = "usd"
) -> BudgetStatus:
    return BudgetStatus(
        scope=scope,
        team=team,
        user="",
        period=period,  # type: ignore[arg-type]
        metric=metric,  # type: ignore[arg-type]
        limit=limit,
        spent=spent,
        reserved=NANOS // 100,
        window=Window(period, 1000.0, None if period == "total" else 2000.0),  # type: ignore[arg-type]
        alert_at=(Decimal("0.8"),),
    )


def scrape(
    metrics: Metrics, budgets: list[BudgetStatus]
) -> dict[str, dict[tuple[str, ...], float]]:
    """name -> (scope, team, period) -> value, parsed from the text format."""
    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(metrics.exposition(budgets).decode()):
        for sample in family.samples:
            if sample.name.startswith("tollgate_budget_"):
                key = tuple(sample.labels.get(k, "") for k in ("scope", "team", "period"))
                found.setdefault(sample.name, {})[key] = sample.value
    return found


def test_budget_gauges_come_from_the_snapshot_given_at_scrape_time(metrics: Metrics) -> None:
    budgets = [
        status("organization", "", "month", 1000 * NANOS, 250 * NANOS),
        status("team", "design", "month", 800 * NANOS, 600 * NANOS),
        status("team", "design", "total", 10 * NANOS, 2 * NANOS),
    ]
    found = scrape(metrics, budgets)
    design = ("team", "design", "month")
    assert found["tollgate_budget_limit_usd"][design] == 800
    assert found["tollgate_budget_spent_usd"][design] == 600
    assert found["tollgate_budget_reserved_usd"][design] == pytest.approx(0.01)
    assert found["tollgate_budget_utilization_ratio"][design] == 0.75
    assert found["tollgate_budget_utilization_ratio"][("organization", "", "month")] == 0.25
    assert found["tollgate_budget_period_end_timestamp_seconds"][design] == 2000
    assert ("team", "design", "total") not in found["tollgate_budget_period_end_timestamp_seconds"]
    # A later scrape tells what the ledger says then, nothing kept from before.
    assert scrape(metrics, []) == {}


def test_token_budgets_are_left_out_and_the_tightest_usd_budget_of_a_period_wins(
    metrics: Metrics,
) -> None:
    budgets = [
        status("team", "design", "month", 20_000_000, 19_000_000, metric="image_output_tokens"),
        status("team", "design", "day", 60 * NANOS, 6 * NANOS),
        status("team", "design", "day", 10 * NANOS, 5 * NANOS),
    ]
    found = scrape(metrics, budgets)
    assert found["tollgate_budget_utilization_ratio"] == {("team", "design", "day"): 0.5}
    assert found["tollgate_budget_limit_usd"] == {("team", "design", "day"): 10}


@pytest.mark.parametrize("count", [0, 1, 3])
def test_budget_gauges_are_written_as_prometheus_client_writes_them(count: int) -> None:
    budgets = [
        status("organization", "", "month", 1000 * NANOS, 250 * NANOS),
        status("team", 'de"sign\\x\ny', "day", 800 * NANOS, 600 * NANOS),
        status("team", "design", "total", 10 * NANOS, 2 * NANOS + 7),
    ][:count]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BudgetCollector(budgets))
    assert BudgetCollector(budgets).text() == generate_latest(registry)


def test_the_exposition_has_exactly_the_catalogue_of_the_spec(metrics: Metrics) -> None:
    metrics.started()
    metrics.finished(
        forwarded(), Settlement(1.0, "ok", 200, Usage(image_output=1, images=1), 1), ()
    )
    metrics.upstream("gpt-image-2", "generations", 1.0)
    metrics.unauthenticated("generations", "invalid_key")
    text = metrics.exposition([status("team", "design", "month", NANOS, 1)]).decode()
    families = text_string_to_metric_families(text)
    kinds = {f.name: f.type for f in families if not f.name.endswith("_created")}
    assert kinds == {
        "tollgate_requests": "counter",
        "tollgate_tokens": "counter",
        "tollgate_cost_usd": "counter",
        # The Responses API's spend by part (the cost counter has no endpoint label).
        "tollgate_responses_cost_usd": "counter",
        "tollgate_reserved_usd": "counter",
        "tollgate_images": "counter",
        "tollgate_downgrades": "counter",
        "tollgate_upstream_request_duration_seconds": "histogram",
        "tollgate_unauthenticated_requests": "counter",
        "tollgate_inflight_requests": "gauge",
        # And how close the process is to what it may hold (README, Limits).
        "tollgate_inflight_body_bytes": "gauge",
        "tollgate_overload_refusals": "counter",
        # Batches whose polls the upstream refuses: held, their spend unread (README, Batches).
        "tollgate_batches_refused": "gauge",
        # And background responses whose polls the upstream refuses (README, Crashes).
        "tollgate_background_responses_refused": "gauge",
        "tollgate_budget_limit_usd": "gauge",
        "tollgate_budget_spent_usd": "gauge",
        "tollgate_budget_reserved_usd": "gauge",
        "tollgate_budget_utilization_ratio": "gauge",
        "tollgate_budget_period_end_timestamp_seconds": "gauge",
        # Rate limits (README, Rate limits): refusals, OpenAI's own 429s, and the windows.
        "tollgate_rate_limited": "counter",
        "tollgate_upstream_rate_limited": "counter",
        "tollgate_rate_limit_used": "gauge",
        "tollgate_rate_limit_limit": "gauge",
    }
    assert "user=" not in text


def rate(scope: str, team: str, limit: RateLimit, used: int) -> RateStatus:
    return RateStatus(scope, team, limit, used, max(limit.limit - used, 0), 60.0)  # type: ignore[arg-type]


def test_rate_limit_gauges_come_from_the_snapshot_given_at_scrape_time(metrics: Metrics) -> None:
    snapshot = [
        rate("team", "design", RateLimit("minute", "images", 20), 7),
        rate("team", "design", RateLimit("day", "tokens", 5000, "gpt-image-2"), 1200),
        rate("organization", "", RateLimit("minute", "images", 250, "gpt-image-2"), 31),
    ]
    text = metrics.exposition([], snapshot).decode()
    found = {
        (s.name, *(s.labels[k] for k in ("scope", "team", "per", "metric", "model"))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("tollgate_rate_limit_")
    }
    assert found == {
        ("tollgate_rate_limit_used", "team", "design", "minute", "images", ""): 7,
        ("tollgate_rate_limit_limit", "team", "design", "minute", "images", ""): 20,
        ("tollgate_rate_limit_used", "team", "design", "day", "tokens", "gpt-image-2"): 1200,
        ("tollgate_rate_limit_limit", "team", "design", "day", "tokens", "gpt-image-2"): 5000,
        ("tollgate_rate_limit_used", "organization", "", "minute", "images", "gpt-image-2"): 31,
        ("tollgate_rate_limit_limit", "organization", "", "minute", "images", "gpt-image-2"): 250,
    }
    assert "tollgate_rate_limit_used{" not in metrics.exposition().decode()


def test_rate_limit_refusals_are_counted_by_team_window_and_metric(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.rate_limited("design", "minute", "images")
    metrics.rate_limited("design", "minute", "images")
    metrics.rate_limited("design", "day", "tokens")
    labels = {"team": "design", "per": "minute", "metric": "images"}
    assert registry.get_sample_value("tollgate_rate_limited_total", labels) == 2
    labels = {"team": "design", "per": "day", "metric": "tokens"}
    assert registry.get_sample_value("tollgate_rate_limited_total", labels) == 1


@pytest.mark.parametrize(
    ("outcome", "status", "counted"),
    [
        ("upstream_error", 429, 1),  # OpenAI's own rate limit (or quota)
        ("upstream_error", 500, None),
        ("rejected_rate", 429, None),  # Tollgate's refusal: counted in tollgate_rate_limited
        ("rejected_budget", 429, None),
    ],
)
def test_only_openais_429s_count_as_upstream_rate_limited(
    metrics: Metrics, registry: CollectorRegistry, outcome: str, status: int, counted: int | None
) -> None:
    metrics.started()
    metrics.finished(forwarded(), Settlement(1.0, outcome, status), ())  # type: ignore[arg-type]
    labels = {"team": "design", "model": "gpt-image-2"}
    assert registry.get_sample_value("tollgate_upstream_rate_limited_total", labels) == counted


WORKER = """
import sys
from proxy.ledger import Entry, Settlement
from proxy.metrics import Metrics
from proxy.core.models import Usage
metrics = Metrics(multiprocess_dir=sys.argv[1])
entry = Entry("tg_req_1", 0.0, "generations", team="design", model="gpt-image-2")
for _ in range(2):
    metrics.started()
    metrics.upstream("gpt-image-2", "generations", 1.0)
    metrics.finished(entry, Settlement(1.0, "ok", 200, Usage(image_output=7)), ())
if sys.argv[2] == "report":
    print(metrics.exposition().decode())
"""


def run_worker(script: str, directory: Path, *args: str) -> str:
    """What `script` prints, run as one worker process writing its metrics to `directory`
    (`sys.argv[1]`), with `args` after it."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(directory), *args],
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_multiprocess_workers_sum_their_children_in_the_exposition(tmp_path: Path) -> None:
    run_worker(WORKER, tmp_path, "work")
    report = run_worker(WORKER, tmp_path, "report")
    samples = {
        (sample.name, sample.labels.get("kind", "")): sample.value
        for family in text_string_to_metric_families(report)
        for sample in family.samples
    }
    assert samples[("tollgate_requests_total", "")] == 4
    assert samples[("tollgate_tokens_total", "image_output")] == 28
    assert samples[("tollgate_upstream_request_duration_seconds_count", "")] == 4
    assert ("tollgate_tokens_total", "text_input") not in samples


DOLLARS = """
import sys
from proxy.ledger import Entry, Settlement
from proxy.metrics import Metrics
metrics = Metrics(multiprocess_dir=sys.argv[1])
entry = Entry("tg_req_1", 0.0, "generations", team="design", model="gpt-image-2",
              quality="low", estimated_nanos=int(sys.argv[3]))
metrics.started()
metrics.finished(entry, Settlement(1.0, "ok", 200, cost_nanos=int(sys.argv[3])), ())
if sys.argv[2] == "report":
    print(metrics.exposition().decode())
"""


def test_multiprocess_workers_sum_their_dollars_exactly(tmp_path: Path) -> None:
    """Each worker's dollars are exact, and so is their sum at a scrape (as floats, two
    workers' $0.032 and $0.02 made 0.052000000000000005)."""
    run_worker(DOLLARS, tmp_path, "work", "32000000")
    report = run_worker(DOLLARS, tmp_path, "report", "20000000")
    assert 'tollgate_cost_usd_total{model="gpt-image-2",quality="low",team="design"} 0.052\n' in (
        report
    )
    assert 'tollgate_reserved_usd_total{model="gpt-image-2",team="design"} 0.052\n' in report


def test_a_worker_given_a_dead_workers_pid_keeps_its_dollars(tmp_path: Path) -> None:
    """Worker files are named by pid: a worker given the pid of one that died reads its
    file, and its dollars must carry on from that one's, not replace them."""
    run_worker(DOLLARS, tmp_path, "work", "32000000")
    [file] = [f for f in tmp_path.iterdir() if f.name.startswith("counter_")]
    # The next worker is given the same pid: its counters file is the dead one's.
    script = DOLLARS.replace("import sys\n", "import os, sys\nos.getpid = lambda: {pid}\n", 1)
    pid = int(file.stem.split("_")[1])
    report = run_worker(script.replace("{pid}", str(pid)), tmp_path, "report", "20000000")
    assert 'tollgate_cost_usd_total{model="gpt-image-2",quality="low",team="design"} 0.052\n' in (
        report
    )


KILLED = """
import os, sys
from proxy.ledger import Entry, Settlement
from proxy.metrics import Metrics
metrics = Metrics(multiprocess_dir=sys.argv[1])
metrics.started()
entry = Entry("tg_req_1", 0.0, "generations", team="design", model="gpt-image-2")
metrics.finished(entry, Settlement(1.0, "ok", 200), ())
for _ in range(3):
    metrics.started()
metrics.body_bytes.inc(3000)
os._exit(0)  # as kill -9 leaves it: close() never ran
"""


def test_a_worker_that_died_holding_requests_is_no_longer_counted_in_flight(
    tmp_path: Path,
) -> None:
    """uvicorn replaces a killed worker; its in-flight gauges end with it, or the
    dashboard's in-flight panel would show its requests forever."""
    run_worker(WORKER, tmp_path, "work")
    run_worker(KILLED, tmp_path)
    report = run_worker(WORKER, tmp_path, "report")
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(report)
        for sample in family.samples
    }
    assert samples["tollgate_inflight_requests"] == 0
    assert samples["tollgate_inflight_body_bytes"] == 0
    assert samples["tollgate_requests_total"] == 5  # its counters stay: that was done


def test_an_image_of_a_size_its_model_does_not_list_is_counted_under_custom(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """gpt-image-2 takes some 29,000 sizes: a label for each would make as many series."""
    prices = load_price_book()
    usage = Usage(image_output=1000, images=1)
    for size in ("1024x1024", "1040x1008", "1056x1008", "auto", "3840x2160"):
        metrics.started()
        metrics.finished(
            forwarded(size=size),
            Settlement(1.0, "ok", 200, usage, cost_nanos=1),
            (),
            listed=lambda m, s: listed_size(prices, m, s),
        )
    labels = {"team": "design", "model": "gpt-image-2", "quality": "medium"}
    assert registry.get_sample_value("tollgate_images_total", {**labels, "size": "custom"}) == 2
    for size in ("1024x1024", "auto", "3840x2160"):
        assert registry.get_sample_value("tollgate_images_total", {**labels, "size": size}) == 1
    odd = {**labels, "size": "1040x1008"}
    assert registry.get_sample_value("tollgate_images_total", odd) is None


def test_steps_of_one_knob_count_once_for_each_reason_that_took_them(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    changes = (
        Change("quality", "high", "medium", "throttle"),
        Change("quality", "medium", "low", "budget"),
        Change("size", "1536x1024", "1024x1024", "budget"),
        Change("size", "1024x1024", "768x512", "budget"),
    )
    metrics.started()
    metrics.finished(forwarded(downgrades="…"), Settlement(1.0, "downgraded", 200), changes)
    for knob, reason in (("quality", "throttle"), ("quality", "budget"), ("size", "budget")):
        value = registry.get_sample_value(
            "tollgate_downgrades_total", {"team": "design", "knob": knob, "reason": reason}
        )
        assert value == 1
