"""The process's metrics written directly (`proxy.metrics.text`) are byte for byte what
prometheus-client's `generate_latest` writes, scrape after scrape."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import metrics as client_metrics
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.models import Entry, Settlement, Usage
from proxy.metrics import BudgetCollector, Metrics, RateCollector
from tests.test_metrics import run_worker

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


WORKER = """
import sys
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from proxy.metrics import BudgetCollector, Metrics, RateCollector
from tests.test_metrics import run_worker
from proxy.core.models import Entry, Settlement, Usage
metrics = Metrics(multiprocess_dir=sys.argv[1])
for n, team in enumerate(sys.argv[3:]):
    entry = Entry("tg_req_1", 0.0, "generations", team=team, model="gpt-image-2",
                  quality="low", size="1024x1024", estimated_nanos=10**7 + n)
    metrics.started()
    metrics.upstream("gpt-image-2", "generations", 0.1 * n)
    usage = Usage(text_input=3 + n, image_output=7, images=1)
    metrics.finished(entry, Settlement(1.0, "ok", 200, usage, cost_nanos=5 * 10**6 + n), ())
metrics.rate_limited("design", "minute", "images")
metrics.started()  # one still in flight
if sys.argv[2] == "report":
    stock = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(stock, sys.argv[1])
    stock.register(RateCollector(()))
    stock.register(BudgetCollector(()))
    sys.stdout.write(metrics.exposition().decode() + "\\f" + generate_latest(stock).decode())
"""


def families(text: str) -> list[tuple[str, str, str, list[tuple[str, tuple[object, ...], float]]]]:
    """Each family (name, type, help, samples sorted): a family written in two places
    would be parsed as two, and the lists would differ."""
    found = [
        (
            family.name,
            family.type,
            family.documentation,
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples),
        )
        for family in text_string_to_metric_families(text)
    ]
    return sorted(found)


def test_every_workers_values_are_summed_as_the_clients_collector_sums_them(
    tmp_path: Path,
) -> None:
    run_worker(WORKER, tmp_path, "work", "design", 'de"sign\\x\ny', "équipe ☃")
    run_worker(WORKER, tmp_path, "work", "design", "late")
    ours, stock = run_worker(WORKER, tmp_path, "report", "design").split("\f")
    assert families(ours) == families(stock)
    samples = {
        (s.name, s.labels.get("team", "")): s.value
        for family in text_string_to_metric_families(ours)
        for s in family.samples
    }
    assert samples[("tollgate_requests_total", "design")] == 3
    assert samples[("tollgate_requests_total", 'de"sign\\x\ny')] == 1
    # The two workers that wrote before have ended: only the reporter's request is in flight.
    assert samples[("tollgate_inflight_requests", "")] == 1
