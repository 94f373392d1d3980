"""Observing a finished request: its metrics and its one log line (proxy/web/observe.py)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.prices import load_price_book
from proxy.core.models import Entry, Settlement, Usage, usd_text
from proxy.core.settings import Allow, Team
from proxy.doors.responses import read_body
from proxy.metrics import Metrics
from proxy.web.observe import observe, request_line
from proxy.web.runtime import Runtime

NANOS = 10**9


def runtime_with(metrics: Metrics) -> Runtime:
    """What `observe` reads of a runtime: its metrics and its price book."""
    config = SimpleNamespace(prices=load_price_book())
    return cast(Runtime, SimpleNamespace(metrics=metrics, config=config))


def observed(
    entry: Entry, settlement: Settlement, caplog: pytest.LogCaptureFixture
) -> tuple[Metrics, CollectorRegistry, dict[str, Any]]:
    """`entry` observed as `settlement`: the metrics, their registry and the log line."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.started()
    with caplog.at_level(logging.INFO, logger="tollgate.requests"):
        observe(runtime_with(metrics), entry, settlement, ())
    [record] = [r for r in caplog.records if r.name == "tollgate.requests"]
    line: dict[str, Any] = json.loads(record.getMessage())
    return metrics, registry, line


RESPONSES = Entry(
    "tg_req_r1", 0.0, "responses", team="design", key_id="web-app",
    model_requested="gpt-image-2", model="gpt-image-2", quality_requested="high",
    quality="high", size_requested="1024x1024", size="1024x1024", n_requested=1, n=1,
    estimated_nanos=400_000_000, mainline_model="gpt-4.1",
)  # fmt: skip
# gpt-4.1 at $2 / $0.50 / $8 per 1M: 1000 uncached + 1024 cached input, 80 output tokens;
# gpt-image-2 at $5 text input, $30 image output: 12 and 7024 tokens.
MAINLINE_NANOS = 1000 * 2_000 + 1024 * 500 + 80 * 8_000  # 3_152_000
IMAGE_NANOS = 12 * 5_000 + 7024 * 30_000  # 210_780_000
SETTLED = Settlement(
    1.5, "ok", 200,
    Usage(text_input=12, image_output=7024, images=1, mainline_input=1000,
          mainline_cached_input=1024, mainline_output=80),
    cost_nanos=MAINLINE_NANOS + IMAGE_NANOS, mainline_cost_nanos=MAINLINE_NANOS,
    upstream_request_id="resp_1", latency_ms=1500.0,
)  # fmt: skip


def test_observing_a_responses_request_counts_both_models_spend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics, registry, _ = observed(RESPONSES, SETTLED, caplog)
    cost = {
        (s.labels["model"], s.labels["quality"]): s.value
        for f in text_string_to_metric_families(metrics.exposition().decode())
        for s in f.samples
        if s.name == "tollgate_cost_usd_total"
    }
    assert cost == {("gpt-image-2", "high"): 0.21078, ("gpt-4.1", ""): 0.003152}
    assert cost[("gpt-image-2", "high")] == IMAGE_NANOS / NANOS
    assert cost[("gpt-4.1", "")] == MAINLINE_NANOS / NANOS
    labels = {"team": "design", "model": "gpt-image-2", "endpoint": "responses", "outcome": "ok"}
    assert registry.get_sample_value("tollgate_requests_total", labels) == 1
    mainline = {"team": "design", "model": "gpt-4.1"}
    assert (
        registry.get_sample_value("tollgate_tokens_total", {**mainline, "kind": "text_input"})
        == 1000
    )
    assert (
        registry.get_sample_value(
            "tollgate_tokens_total", {**mainline, "kind": "cached_text_input"}
        )
        == 1024
    )
    assert (
        registry.get_sample_value("tollgate_tokens_total", {**mainline, "kind": "text_output"})
        == 80
    )
    parts = {
        s.labels["part"]: (s.labels["model"], s.value)
        for f in text_string_to_metric_families(metrics.exposition().decode())
        for s in f.samples
        if s.name == "tollgate_responses_cost_usd_total"
    }
    assert parts == {"image_tool": ("gpt-image-2", 0.21078), "mainline": ("gpt-4.1", 0.003152)}
    assert registry.get_sample_value("tollgate_inflight_requests") == 0


def test_the_log_line_of_a_responses_request_names_its_mainline_model_and_cost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, line = observed(RESPONSES, SETTLED, caplog)
    assert line["endpoint"] == "responses"
    assert (line["model"], line["mainline_model"]) == ("gpt-image-2", "gpt-4.1")
    assert (line["cost_usd"], line["mainline_cost_usd"]) == ("0.213932", "0.003152")
    assert line["estimated_usd"] == "0.4"


def test_the_log_line_of_an_images_request_has_no_mainline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry = Entry("tg_req_i1", 0.0, "generations", team="design", model="gpt-image-2")
    settlement = Settlement(1.0, "ok", 200, Usage(image_output=196, images=1), 5_880_000)
    _, registry, line = observed(entry, settlement, caplog)
    assert (line["mainline_model"], line["mainline_cost_usd"]) == (None, None)
    assert line["cost_usd"] == "0.00588"
    labels = {"team": "design", "model": "gpt-image-2", "quality": ""}
    assert registry.get_sample_value("tollgate_cost_usd_total", labels) == 0.00588


def test_a_response_that_makes_no_image_is_logged_and_counted_under_no_image_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A Responses request without the image tool, as the door reads it: its log line
    names no image model, quality or size (they were the default model's, gpt-image-2,
    `auto`, `auto`), and its metrics count it under the mainline model it ran."""
    team = Team("design", None, (), (), (), Allow(), ())
    body = {"model": "gpt-4.1", "input": "A haiku", "max_output_tokens": 300}
    request = read_body(body, 100, "gpt-image-2", team).request
    entry = (
        Entry("tg_req_r2", 0.0, "responses")
        .identified("design", None, "web-app")
        .asked(request)
        .sent(request, 10_000_000, "")
    )
    usage = Usage(mainline_input=1000, mainline_cached_input=1024, mainline_output=80)
    settled = Settlement(1.0, "ok", 200, usage, MAINLINE_NANOS, mainline_cost_nanos=MAINLINE_NANOS)
    _, registry, line = observed(entry, settled, caplog)
    image = ("model_requested", "model", "quality_requested", "quality", "size_requested", "size")
    assert [line[k] for k in image] == [None] * 6
    assert (line["mainline_model"], line["mainline_cost_usd"]) == ("gpt-4.1", "0.003152")
    requests = {"team": "design", "endpoint": "responses", "outcome": "ok"}
    assert (
        registry.get_sample_value("tollgate_requests_total", {**requests, "model": "gpt-4.1"}) == 1
    )
    none = {**requests, "model": "gpt-image-2"}
    assert registry.get_sample_value("tollgate_requests_total", none) is None
    reserved = {"team": "design", "model": "gpt-4.1"}
    assert registry.get_sample_value("tollgate_reserved_usd_total", reserved) == 0.01


def dumped(entry: Entry, settlement: Settlement) -> str:
    """The line as `json.dumps` of a dict writes it: what `request_line`'s template must equal."""
    return json.dumps({
        "request_id": entry.id, "upstream_request_id": settlement.upstream_request_id,
        "team": entry.team, "key_id": entry.key_id, "endpoint": entry.endpoint,
        "model_requested": entry.model_requested, "model": entry.model,
        "mainline_model": entry.mainline_model, "quality_requested": entry.quality_requested,
        "quality": entry.quality, "size_requested": entry.size_requested, "size": entry.size,
        "n_requested": entry.n_requested, "n": entry.n, "stream": entry.stream,
        "downgrades": entry.downgrades or None,
        "outcome": settlement.outcome, "status": settlement.status,
        "error_code": settlement.error_code, "cost_usd": usd_text(settlement.cost_nanos),
        "mainline_cost_usd": (
            usd_text(settlement.mainline_cost_nanos) if entry.mainline_model else None
        ),
        "estimated_usd": usd_text(entry.estimated_nanos), "flagged": settlement.flagged,
        "latency_ms": round(settlement.latency_ms, 1),
    })  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "settlement"),
    [
        (RESPONSES, SETTLED),
        (Entry("tg_req_i1", 0.0, "generations"), Settlement(1.0, "client_error", 401)),
        (
            Entry(
                "tg_req_u1",
                0.0,
                "edits",
                team='équipe "b"\\\n',
                key_id="k\u2603",
                model="gpt-image-1",
                n=3,
                stream=True,
                downgrades="quality high->low",
            ),
            Settlement(
                2.0,
                "downgraded",
                200,
                cost_nanos=7,
                flagged=True,
                error_code="x\ty",
                latency_ms=12.345678,
                upstream_request_id="req_\x00",
            ),
        ),
        (RESPONSES, Settlement(1.0, "ok", 200, latency_ms=float("nan"))),
        (RESPONSES, Settlement(1.0, "ok", 200, latency_ms=float("inf"))),
    ],
)
def test_the_log_line_is_exactly_what_json_dumps_writes(
    entry: Entry, settlement: Settlement
) -> None:
    assert request_line(entry, settlement) == dumped(entry, settlement)
