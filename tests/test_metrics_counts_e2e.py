"""How /metrics reads after real traffic through every door, through the official client:
the catalogue of the product specification (names, types, label sets) with a sample for
each door, and one downgraded request counted as one downgrade of each knob it changed,
however many steps down the ladder."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.auth import key_hash
from tests.conftest import DESIGN_KEY, Simulator, Tollgate, start_tollgate, wait_for, write_config

KEY = "tg_test_tokens_key_0003"
SPEC = {
    "tollgate_requests": ("counter", {"team", "model", "endpoint", "outcome"}),
    "tollgate_tokens": ("counter", {"team", "model", "kind"}),
    "tollgate_cost_usd": ("counter", {"team", "model", "quality"}),
    "tollgate_images": ("counter", {"team", "model", "quality", "size"}),
    "tollgate_downgrades": ("counter", {"team", "knob", "reason"}),
    "tollgate_budget_limit_usd": ("gauge", {"scope", "team", "period"}),
    "tollgate_budget_spent_usd": ("gauge", {"scope", "team", "period"}),
    "tollgate_budget_reserved_usd": ("gauge", {"scope", "team", "period"}),
    "tollgate_budget_utilization_ratio": ("gauge", {"scope", "team", "period"}),
    "tollgate_upstream_request_duration_seconds": ("histogram", {"model", "endpoint"}),
    "tollgate_inflight_requests": ("gauge", set()),
}
"""Each metric of the specification's table: its type and its labels."""


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("counts")
    # 500 image output tokens a day: a gpt-image-1 1024x1024 image fits only at low (272
    # tokens; medium takes 1,056, high 4,160).
    write_config(
        root,
        f"{simulator.url}/v1",
        settings="""
        organization:
          budgets:
            - {period: month, limit_usd: 1000}
        """,
        teams={
            "tokens": f"""
                name: tokens
                keys:
                  - {{id: app, sha256: {key_hash(KEY)}}}
                budgets:
                  - {{period: day, image_output_tokens: 500}}
                on_exhausted: downgrade
            """,
            "design": f"""
                name: design
                keys:
                  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
                budgets:
                  - {{period: month, limit_usd: 100}}
                allow:
                  max_quality: medium
            """,
        },
    )
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def test_a_quality_brought_down_two_steps_by_a_budget_is_one_downgrade(proxy: Tollgate) -> None:
    raw = proxy.client(KEY).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a lighthouse", quality="high", size="1024x1024"
    )
    assert raw.headers["x-tollgate-downgraded"] == "quality=high->low"
    labels = {"team": "tokens", "knob": "quality", "reason": "budget"}
    assert proxy.metric("tollgate_downgrades_total", **labels) == 1
    outcome = {"team": "tokens", "model": "gpt-image-1", "endpoint": "generations"}
    assert proxy.metric("tollgate_requests_total", **outcome, outcome="downgraded") == 1


def test_every_door_shows_in_the_specifications_catalogue(proxy: Tollgate) -> None:
    sdk = proxy.client()
    image = {"model": "gpt-image-1", "prompt": "a harbour", "size": "1024x1024"}
    sdk.images.generate(quality="high", **image)  # type: ignore[call-overload]  # clamped
    for _ in sdk.images.generate(stream=True, quality="low", **image):  # type: ignore[call-overload]
        pass
    tool = {"type": "image_generation", "model": "gpt-image-1", "quality": "low"}
    sdk.responses.create(model="gpt-5.5", input="a harbour", tools=[tool])  # type: ignore[list-item]
    for _ in sdk.responses.create(
        model="gpt-5.5",
        input="a harbour",
        tools=[tool],  # type: ignore[list-item]
        stream=True,
    ):
        pass
    line = {"custom_id": "a", "method": "POST", "url": "/v1/images/generations"}
    body = {"model": "gpt-image-1", "prompt": "a harbour", "quality": "low"}
    jsonl = json.dumps({**line, "body": body}).encode()
    file = sdk.files.create(file=("in.jsonl", io.BytesIO(jsonl)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
    )

    def ended() -> str | None:
        found = sdk.batches.retrieve(batch.id)
        return found.output_file_id if found.status == "completed" else None

    assert json.loads(sdk.files.content(wait_for("the batch", ended)).text)["custom_id"] == "a"
    requests = {"team": "design", "model": "gpt-image-1"}
    batched = {**requests, "endpoint": "batches", "outcome": "ok"}
    # Its line is counted as the batch is settled, once it has ended.
    wait_for(
        "the batch's line counted",
        lambda: proxy.metric("tollgate_requests_total", **batched) or None,
    )
    for endpoint, outcome, count in (
        ("generations", "downgraded", 1),
        ("generations", "ok", 1),
        ("responses", "ok", 2),
        ("batches", "ok", 1),
    ):
        labels = {**requests, "endpoint": endpoint, "outcome": outcome}
        assert proxy.metric("tollgate_requests_total", **labels) == count, labels
    text = httpx.get(f"{proxy.url}/metrics", timeout=30).text
    found = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in SPEC.items():
        family = found[name]
        assert family.type == kind, name
        assert family.samples, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert "user=" not in text
    assert (
        proxy.metric("tollgate_downgrades_total", team="design", knob="quality", reason="policy")
        == 1
    )
    assert proxy.metric("tollgate_inflight_requests") == 0
    assert proxy.metric(
        "tollgate_budget_limit_usd", scope="organization", team="", period="month"
    ) == pytest.approx(1000)
