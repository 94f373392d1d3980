"""A data-residency upstream end to end: the simulator billing as a regional endpoint
(`--data-residency`: models released on or after 2026-03-05 at 110 % of their rates), and
Tollgate with `upstream.data_residency`, through the official SDK. For an eligible and an
ineligible model, on the Images and Responses doors and in a batch, the reservation
covers what the simulator bills and the ledger charges exactly that; reconciled against
the regional Costs export, nothing differs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config.prices import load_price_book
from proxy.core.models import Usage
from proxy.simulator.billing import BilledUsage, Entry, MainlineUsage
from proxy.simulator.costs import line_costs
from tests.batches_e2e import (
    GENERATIONS,
    billed_lines,
    cli,
    create,
    ended,
    generations,
    line,
    settled_rows,
)
from tests.conftest import (
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)

GLOBAL = load_price_book()
"""The book at the global endpoint's rates: the regional bill is 110 % of it, or equal."""
UPLIFT = Decimal("1.1")
DAY = 86_400
RESPONSES = "/v1/responses"
LOW = {"quality": "low", "size": "1024x1024"}
IMAGE_MODELS = [("gpt-image-2", UPLIFT), ("gpt-image-2.5-flare", UPLIFT), ("gpt-image-1.5", 1),
                ("chatgpt-image-latest", UPLIFT)]  # fmt: skip
"""chatgpt-image-latest: undated (a pointer to ChatGPT's current model), so uplifted."""
PAIRS = [("gpt-5.5", "gpt-image-2", UPLIFT, UPLIFT), ("gpt-4.1", "gpt-image-1.5", 1, 1),
         ("gpt-4.1-mini", "gpt-image-2", 1, UPLIFT)]  # fmt: skip
"""(mainline model, image model, their uplifts): each part by its own model's release."""


@pytest.fixture(scope="module")
def regional(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Simulator, Tollgate]]:
    """A regional simulator of the module's own (its Costs export holds only this module's
    spend), and a Tollgate told it is one (127.0.0.1 is no regional host by its name)."""
    simulator = start_simulator("--data-residency")
    root = tmp_path_factory.mktemp("regional")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n")
    settings = root / "tollgate.yaml"
    text = settings.read_text().replace("timeout_s: 3\n", "timeout_s: 3\n  data_residency: true\n")
    settings.write_text(text)
    proxy = start_tollgate(root)
    simulator.configure(batch_delay_ms=300)
    try:
        yield simulator, proxy
    finally:
        proxy.stop()
        stop(simulator.process)


def _ceil(nanos: Decimal) -> int:
    return int(nanos.to_integral_value(ROUND_CEILING))


def simulator_nanos(record: dict[str, Any]) -> int:
    """What the simulator bills for a record entry, at its own rates (`costs.line_costs`,
    written apart from Tollgate's price book), rounded up to the nano-dollar."""
    usage = BilledUsage(**record["usage"]) if record["usage"] else None
    mainline = MainlineUsage(**record["mainline"]) if record["mainline"] else None
    fields = {**record, "usage": usage, "mainline": mainline}
    entry = Entry(**{k: v for k, v in fields.items() if k in Entry.__dataclass_fields__})
    assert entry.data_residency, record
    return math.ceil(sum((line.amount for line in line_costs(entry)), Decimal(0)) * 10**9)


def image_usage(record: dict[str, Any]) -> Usage:
    return Usage(**{k: record["usage"][k] for k in ("text_input", "image_input", "image_output")})


def mainline_usage(record: dict[str, Any]) -> Usage:
    main = record["mainline"]
    return Usage(
        mainline_input=main["input"] - main["cached_input"],
        mainline_cached_input=main["cached_input"],
        mainline_output=main["output"],
    )


def global_nanos(model: str, usage: Usage, batch: bool = False) -> Decimal:
    """`usage` at the global endpoint's rates, unrounded."""
    entry = GLOBAL.find(model)
    assert entry is not None
    rates = entry.batch_rates if batch else entry.rates
    assert rates is not None
    return sum((rates[k] * usage.tokens(k) * 1000 for k in rates), Decimal(0))


def mainline_global_nanos(model: str, usage: Usage, batch: bool = False) -> Decimal:
    entry = GLOBAL.find_mainline(model)
    assert entry is not None
    rates = entry.batch_rates if batch else entry.rates
    assert rates is not None
    return 1000 * (
        rates["text_input"] * usage.mainline_input
        + rates["cached_text_input"] * usage.mainline_cached_input
        + rates["text_output"] * usage.mainline_output
    )


@pytest.mark.parametrize(("model", "uplift"), IMAGE_MODELS)
def test_an_image_is_reserved_and_charged_as_the_regional_endpoint_bills_it(
    regional: tuple[Simulator, Tollgate], model: str, uplift: Decimal
) -> None:
    simulator, proxy = regional
    with proxy.client() as sdk:
        answer = sdk.images.with_raw_response.generate(model=model, prompt="a fjord", n=2, **LOW)
    assert answer.status_code == 200 and len(answer.parse().data or []) == 2
    row = proxy.row(answer.headers["x-tollgate-request-id"])
    record = simulator.record(row["upstream_request_id"])
    billed = simulator_nanos(record)
    assert row["state"] == "settled" and not row["flagged"]
    assert row["cost_nanos"] == billed <= row["estimated_nanos"]
    # 110 % of the global price for a model released on or after 2026-03-05, else the same
    assert billed == _ceil(global_nanos(model, image_usage(record)) * uplift)


@pytest.mark.parametrize(("mainline", "image_model", "main_uplift", "image_uplift"), PAIRS)
def test_a_response_is_reserved_and_charged_as_the_regional_endpoint_bills_each_model(
    regional: tuple[Simulator, Tollgate],
    mainline: str,
    image_model: str,
    main_uplift: Decimal,
    image_uplift: Decimal,
) -> None:
    simulator, proxy = regional
    tool = {"type": "image_generation", "model": image_model, **LOW}
    with proxy.client() as sdk:
        answer = sdk.responses.with_raw_response.create(
            model=mainline,
            input="draw a fjord",
            tools=[tool],  # type: ignore[list-item]
        )
    assert answer.status_code == 200
    response = answer.parse()
    record = next(r for r in simulator.billing() if r["id"] == response.id)
    row = proxy.row(answer.headers["x-tollgate-request-id"])
    assert row["state"] == "settled" and not row["flagged"]
    main = _ceil(mainline_global_nanos(mainline, mainline_usage(record)) * main_uplift)
    image = _ceil(global_nanos(image_model, image_usage(record)) * image_uplift)
    # each model's part rounded up on its own: at most a nano-dollar above the one rounding
    # of the simulator's whole bill
    assert row["estimated_nanos"] >= row["cost_nanos"] == main + image
    assert 0 <= row["cost_nanos"] - simulator_nanos(record) <= 1


def run_batch(
    simulator: Simulator, proxy: Tollgate, lines: list[dict[str, Any]], endpoint: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, int]]:
    """A batch of `lines` run to its end: its settled rows, the simulator's billing record
    of each line and each line's bound, by `custom_id` (every line billed and settled)."""
    with proxy.client() as sdk:
        batch = ended(sdk, create(sdk, lines, endpoint).id)
    assert batch.status == "completed"
    rows = settled_rows(proxy, batch.id)
    records = billed_lines(simulator, batch.id)
    bounds = {
        r["custom_id"]: r["bound_nanos"]
        for r in proxy.query("SELECT custom_id, bound_nanos FROM batch_lines")
    }
    assert (
        sorted(r["custom_id"] for r in rows)
        == sorted(records)
        == sorted(x["custom_id"] for x in lines)
    )
    return rows, records, bounds


@pytest.mark.parametrize(("model", "uplift"), IMAGE_MODELS)
def test_a_batch_line_is_bounded_and_settled_as_the_regional_endpoint_bills_it(
    regional: tuple[Simulator, Tollgate], model: str, uplift: Decimal
) -> None:
    simulator, proxy = regional
    lines = generations(model, 3)
    rows, records, bounds = run_batch(simulator, proxy, lines, GENERATIONS)
    for row in rows:
        record = records[row["custom_id"]]
        billed = simulator_nanos(record)
        assert (row["state"], row["flagged"], row["model"]) == ("settled", 0, model)
        assert row["cost_nanos"] == billed <= bounds[row["custom_id"]]
        assert billed == _ceil(global_nanos(model, image_usage(record), batch=True) * uplift)


@pytest.mark.parametrize(("mainline", "image_model", "main_uplift", "image_uplift"), PAIRS)
def test_a_responses_batch_line_is_bounded_and_settled_as_the_regional_endpoint_bills_it(
    regional: tuple[Simulator, Tollgate],
    mainline: str,
    image_model: str,
    main_uplift: Decimal,
    image_uplift: Decimal,
) -> None:
    simulator, proxy = regional
    tool = {"type": "image_generation", "model": image_model, **LOW}
    body = {"model": mainline, "tools": [tool], "max_output_tokens": 2000, "max_tool_calls": 2}
    lines = [
        line(f"{mainline}-{image_model}-{i}", {**body, "input": f"a fjord, take {i}"}, RESPONSES)
        for i in range(2)
    ]
    rows, records, bounds = run_batch(simulator, proxy, lines, RESPONSES)
    for row in rows:
        record = records[row["custom_id"]]
        main = _ceil(mainline_global_nanos(mainline, mainline_usage(record), True) * main_uplift)
        image = _ceil(global_nanos(image_model, image_usage(record), True) * image_uplift)
        assert (row["state"], row["flagged"], row["mainline_model"]) == ("settled", 0, mainline)
        assert row["mainline_cost_nanos"] == main
        assert bounds[row["custom_id"]] >= row["cost_nanos"] == main + image
        assert 0 <= row["cost_nanos"] - simulator_nanos(record) <= 1


def test_reconcile_against_the_regional_costs_export_finds_no_difference(
    regional: tuple[Simulator, Tollgate], tmp_path: Path
) -> None:
    simulator, proxy = regional
    with proxy.client() as sdk:
        sdk.images.generate(model="gpt-image-2", prompt="a fjord at dawn", **LOW)
        sdk.images.generate(model="gpt-image-1.5", prompt="a fjord at dusk", **LOW)
        sdk.responses.create(
            model="gpt-5.5",
            input="draw a fjord",
            tools=[{"type": "image_generation", "model": "gpt-image-2", **LOW}],  # type: ignore[list-item]
        )
    today = int(time.time()) // DAY * DAY
    page = httpx.get(
        f"{simulator.url}/v1/organization/costs",
        params={"start_time": today - DAY, "end_time": today + DAY,
                "group_by[]": "line_item", "limit": 31},
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
    ).json()  # fmt: skip
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(page))
    done = cli(proxy, "reconcile", "--costs", str(costs), "--format", "json")
    assert done.returncode == 0, done.stdout
    lines = {x["model"]: x for x in json.loads(done.stdout)["lines"]}
    assert {"gpt-image-2", "gpt-image-1.5", "gpt-5.5"} <= set(lines)
    for found in lines.values():
        assert found["status"] == "ok", found
        assert Decimal(found["difference_usd"]) == 0, found
