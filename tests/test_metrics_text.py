"""The process's metrics written directly (`proxy.metrics_text`) are byte for byte what
prometheus-client's `generate_latest` writes, scrape after scrape."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import metrics as client_metrics

from proxy.core.models import Entry, Settlement, Usage
from proxy.metrics import BudgetCollector, Metrics, RateCollector

NANOS = 10**9


def reference(metrics: Metrics) -> bytes:
    """What the exposition was before it wrote counters itself: generate_latest over the
    process's registry, then the (empty) rate and budget gauges."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(metrics.registry)
    scrape.register(RateCollector(()))
    scrape.register(BudgetCollector(()))
    return generate_latest(scrape)


def finish(metrics: Metrics, team: str, model: str, cost_nanos: int, outcome: str = "ok") -> None:
    entry = Entry(
        id="tg_req_1",
        started_at=0.0,
        endpoint="generations",
        team=team,
        model=model,
        quality="low",
        size="1024x1024",
        estimated_nanos=cost_nanos + 7,
    )
    usage = Usage(text_input=12, image_output=cost_nanos % 5000, images=1)
    settlement = Settlement(1.0, outcome, 200, usage, cost_nanos=cost_nanos)  # type: ignore[arg-type]
    metrics.started()
    metrics.finished(entry, settlement, ())


def test_an_empty_process_is_written_as_generate_latest_writes_it() -> None:
    metrics = Metrics(CollectorRegistry())
    assert metrics.exposition() == reference(metrics)


def test_every_kind_of_metric_and_awkward_label_values_scrape_after_scrape() -> None:
    metrics = Metrics(CollectorRegistry())
    finish(metrics, "design", "gpt-image-2", 52_740_000)
    finish(metrics, 'de"sign\\x\ny', "gpt-image-2", 1)
    finish(metrics, "équipe ☃", "gpt-image-1.5", 3 * NANOS + 1, outcome="upstream_error")
    metrics.upstream("gpt-image-2", "generations", 0.3)
    metrics.unauthenticated("generations", "invalid_key")
    metrics.rate_limited("design", "minute", "images")
    metrics.refused("connections")
    first = metrics.exposition()
    assert first == reference(metrics)
    # Values move, new label sets arrive between scrapes: the remembered lines follow.
    finish(metrics, "design", "gpt-image-2", 10**15)
    finish(metrics, "late", "gpt-image-2", 0)
    metrics.rate_limited("design", "minute", "images")
    second = metrics.exposition()
    assert second == reference(metrics)
    assert second != first
    assert metrics.exposition() == second


def test_without_created_series_none_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_metrics, "_use_created", False)
    metrics = Metrics(CollectorRegistry())
    finish(metrics, "design", "gpt-image-2", 5)
    text = metrics.exposition()
    assert text == reference(metrics)
    assert b"_created" not in text


TEAMS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(
                TEAMS,
                st.sampled_from(["gpt-image-2", "gpt-image-1.5", "gpt-image-1-mini"]),
                st.integers(0, 10**16),
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_requests_between_any_scrapes(scrapes: list[list[tuple[str, str, int]]]) -> None:
    metrics = Metrics(CollectorRegistry())
    for requests in scrapes:
        for team, model, cost in requests:
            finish(metrics, team, model, cost)
        assert metrics.exposition() == reference(metrics)
