"""The simulated Costs API's answer for Responses requests: the mainline model's line items
at its own rates, and the image tool's at the image model's, read with the official SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from starlette.datastructures import QueryParams

from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.simulator.billing import BilledUsage, Entry, MainlineUsage
from proxy.simulator.costs import CostsQueryError, costs_page, line_costs
from proxy.simulator.response_tokens import cached_tokens
from proxy.simulator.tokens import formula_tokens, text_tokens
from tests.conftest import serving

API_KEY = "sk-sim-test-key-0003"
TOOL: Any = {
    "type": "image_generation",
    "model": "gpt-image-2",
    "quality": "low",
    "size": "1024x1024",
}
LOW_1024 = formula_tokens(16, 1024, 1024)
Costs = dict[tuple[str | None, str | None], tuple[float, float | None]]


def usd(*parts: tuple[str, int]) -> float:
    """(rate in USD per 1M, tokens) parts summed exactly, then sent as a JSON float."""
    return float(sum(Decimal(rate) * tokens / 1_000_000 for rate, tokens in parts))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(create_simulator_app(SimulatorSettings(api_key=API_KEY))) as url:
        yield url


@pytest.fixture
def clients(server: str) -> Iterator[dict[str, openai.OpenAI]]:
    """An SDK client per project (`proj_art`, `proj_ops`) of a reset simulator."""
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/reset").raise_for_status()
        http.post("/_sim/config", json={"latency_ms": 0, "payload_bytes": 0, "fault": None})
    made = {
        project: openai.OpenAI(
            base_url=f"{server}/v1",
            api_key=API_KEY,
            admin_api_key=API_KEY,
            project=project,
            max_retries=0,
        )
        for project in ("proj_art", "proj_ops")
    }
    yield made
    for client in made.values():
        client.close()


def costs(client: openai.OpenAI, group_by: list[Any]) -> Costs:
    """Today's bucket: (line_item, project_id) → (amount, quantity)."""
    page = client.admin.organization.usage.costs(
        start_time=int(time.time()) - 3600, group_by=group_by, limit=1
    )
    [bucket] = page.data
    found: Costs = {}
    for result in bucket.results:
        assert result.object == "organization.costs.result" and result.amount is not None
        assert result.amount.currency == "usd" and result.amount.value is not None
        found[result.line_item, result.project_id] = (result.amount.value, result.quantity)
    return found


def test_a_response_is_billed_as_its_mainline_and_its_image_models_line_items(
    clients: dict[str, openai.OpenAI],
) -> None:
    client = clients["proj_art"]
    prompt = "Draw a lighthouse at dusk"
    response = client.responses.create(model="gpt-5.5", input=prompt, tools=[TOOL])
    usage = response.usage
    assert usage is not None and usage.input_tokens_details.cached_tokens == 0
    read, written = usage.input_tokens, usage.output_tokens
    art = "proj_art"
    assert costs(client, ["line_item", "project_id"]) == {
        ("gpt-5.5, input", art): (usd(("5.00", read)), read),
        ("gpt-5.5, output", art): (usd(("30.00", written)), written),
        ("gpt-image-2, text input", art): (usd(("5.00", text_tokens(prompt))), text_tokens(prompt)),
        ("gpt-image-2, image output", art): (usd(("30.00", LOW_1024)), LOW_1024),
    }  # fmt: skip


def test_a_continued_response_bills_its_carried_tokens_as_cached_input_in_its_project(
    clients: dict[str, openai.OpenAI],
) -> None:
    # A response is continued in the project it was made in (from another, OpenAI answers
    # previous_response_not_found); another project's spend stays apart.
    art, ops = clients["proj_art"], clients["proj_ops"]
    prompt = "Draw a lighthouse at dusk. " * 160  # ~1,100 tokens: the next turn hits the cache
    first = art.responses.create(model="gpt-4.1", input=prompt, tools=[TOOL])
    with pytest.raises(openai.NotFoundError):
        ops.responses.create(model="gpt-4.1", input="Now at dawn", previous_response_id=first.id)
    second = art.responses.create(
        model="gpt-4.1", input="Now at dawn", previous_response_id=first.id
    )
    one, two = first.usage, second.usage
    assert one is not None and two is not None
    cached = two.input_tokens_details.cached_tokens
    assert cached == cached_tokens(one.input_tokens + one.output_tokens) > 0
    image_text = text_tokens(prompt.strip())
    fresh = two.input_tokens - cached
    assert costs(art, ["line_item", "project_id"]) == {
        ("gpt-4.1, input", "proj_art"): (
            usd(("2.00", one.input_tokens), ("2.00", fresh)), one.input_tokens + fresh),
        ("gpt-4.1, cached input", "proj_art"): (usd(("0.50", cached)), cached),
        ("gpt-4.1, output", "proj_art"): (
            usd(("8.00", one.output_tokens), ("8.00", two.output_tokens)),
            one.output_tokens + two.output_tokens),
        ("gpt-image-2, text input", "proj_art"): (usd(("5.00", image_text)), image_text),
        ("gpt-image-2, image output", "proj_art"): (usd(("30.00", LOW_1024)), LOW_1024),
    }  # fmt: skip
    by_line = costs(art, ["line_item"])
    assert by_line["gpt-4.1, input", None] == (
        usd(("2.00", one.input_tokens), ("2.00", fresh)),
        one.input_tokens + fresh,
    )
    by_project = costs(art, ["project_id"])
    assert by_project == {
        (None, "proj_art"): (
            usd(("2.00", one.input_tokens), ("8.00", one.output_tokens), ("5.00", image_text),
                ("30.00", LOW_1024), ("2.00", fresh), ("0.50", cached),
                ("8.00", two.output_tokens)),
            None,
        ),
    }  # fmt: skip


def record_entry(model: str, mainline: MainlineUsage, *, billed: bool = True) -> Entry:
    """A billed Responses record entry whose response made no image."""
    return Entry(
        id="resp_1", time=0.0, endpoint="responses", model="gpt-image-2", quality="low",
        size="1024x1024", n=0, stream=False, status=200, billed=billed,
        usage=BilledUsage() if billed else None, images=0, authorization=None,
        mainline_model=model, mainline=mainline if billed else None,
    )  # fmt: skip


PUBLISHED = {
    "gpt-4o": ("2.50", "1.25", "10.00"),
    "gpt-4o-mini": ("0.15", "0.075", "0.60"),
    "gpt-4.1": ("2.00", "0.50", "8.00"),
    "gpt-4.1-mini": ("0.40", "0.10", "1.60"),
    "gpt-4.1-nano": ("0.10", "0.025", "0.40"),
    "o3": ("2.00", "0.50", "8.00"),
    "gpt-5": ("1.25", "0.125", "10.00"),
    "gpt-5-mini": ("0.25", "0.025", "2.00"),
    "gpt-5-nano": ("0.05", "0.005", "0.40"),
    "gpt-5.5": ("5.00", "0.50", "30.00"),
}


@pytest.mark.parametrize("model", PUBLISHED)
def test_each_mainline_model_is_billed_at_its_published_rates(model: str) -> None:
    # 200k input tokens (half of them cached) and 100k output: a tenth of each rate.
    usage = MainlineUsage(input=200_000, cached_input=100_000, output=100_000)
    lines = {c.line_item: (c.amount, c.quantity) for c in line_costs(record_entry(model, usage))}
    uncached, cached, output = (Decimal(rate) / 10 for rate in PUBLISHED[model])
    assert lines == {
        f"{model}, input": (uncached, 100_000),
        f"{model}, cached input": (cached, 100_000),
        f"{model}, output": (output, 100_000),
    }


@pytest.mark.parametrize(
    ("read", "rates", "suffix"),
    [(272_000, ("5.00", "0.50", "30.00"), ""),
     (272_001, ("10.00", "1.00", "45.00"), ", long context")],
)  # fmt: skip
def test_a_gpt_5_5_request_above_272k_input_tokens_is_billed_at_the_long_context_rates(
    read: int, rates: tuple[str, str, str], suffix: str
) -> None:
    usage = MainlineUsage(input=read, cached_input=2_048, output=900, reasoning=64)
    lines = {
        c.line_item: (c.amount, c.quantity) for c in line_costs(record_entry("gpt-5.5", usage))
    }
    uncached, cached, output = (Decimal(rate) / 1_000_000 for rate in rates)
    assert lines == {
        f"gpt-5.5, input{suffix}": (uncached * (read - 2_048), read - 2_048),
        f"gpt-5.5, cached input{suffix}": (cached * 2_048, 2_048),
        f"gpt-5.5, output{suffix}": (output * 900, 900),
    }


def test_a_model_that_bills_its_cache_writes_bills_them_apart_at_their_rate() -> None:
    """gpt-5.6-sol bills the input it writes to the prompt cache at 1.25x its input rate
    ($6.25 for $5.00), out of its input item."""
    usage = MainlineUsage(input=10_000, cached_input=2_000, output=500, cache_write=8_000)
    lines = {
        c.line_item: (c.amount, c.quantity) for c in line_costs(record_entry("gpt-5.6-sol", usage))
    }
    assert lines == {
        "gpt-5.6-sol, cache write": (Decimal("6.25") * 8_000 / 1_000_000, 8_000),
        "gpt-5.6-sol, cached input": (Decimal("0.50") * 2_000 / 1_000_000, 2_000),
        "gpt-5.6-sol, output": (Decimal("30.00") * 500 / 1_000_000, 500),
    }


def test_a_responses_request_that_was_not_billed_has_no_line_items() -> None:
    usage = MainlineUsage(input=10, output=10)
    assert line_costs(record_entry("gpt-5.5", usage, billed=False)) == []


@pytest.mark.parametrize(
    ("model", "tool", "uplift"),
    [("gpt-5.5", "gpt-image-2", Decimal("1.1")), ("gpt-4.1", "gpt-image-1.5", Decimal(1)),
     ("gpt-4.1", "gpt-image-2.5-flare", None), ("gpt-5.4", "gpt-image-1", None)],
)  # fmt: skip
def test_a_regional_endpoint_bills_models_released_since_march_2026_at_110_percent(
    model: str, tool: str, uplift: Decimal | None
) -> None:
    """Each model's line items apart: the mainline and the image model's released dates
    decide their own uplift (None: the image model's is 1.1, the mainline's 1)."""
    usage = MainlineUsage(input=2_000, cached_input=500, output=300)
    entry = replace(record_entry(model, usage), model=tool, usage=BilledUsage(20, 0, 196, 0))
    plain = {c.line_item: c.amount for c in line_costs(entry)}
    regional = {c.line_item: c.amount for c in line_costs(replace(entry, data_residency=True))}
    assert plain.keys() == regional.keys()
    released = {
        m: m in ("gpt-5.5", "gpt-5.4", "gpt-image-2", "gpt-image-2.5-flare") for m in (model, tool)
    }
    for item, amount in plain.items():
        owner = item.split(",")[0]
        assert regional[item] == amount * (Decimal("1.1") if released[owner] else 1), item
    if uplift is not None:
        assert sum(regional.values()) == sum(plain.values()) * uplift


def test_the_data_residency_knob_bills_later_requests_as_a_regional_endpoint(
    clients: dict[str, openai.OpenAI], server: str
) -> None:
    client = clients["proj_art"]
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/config", json={"data_residency": True}).raise_for_status()
        try:
            client.images.generate(
                model="gpt-image-2", prompt="a fox", quality="low", size="1024x1024"
            )
        finally:
            http.post("/_sim/config", json={"data_residency": False}).raise_for_status()
        client.images.generate(model="gpt-image-2", prompt="a fox", quality="low", size="1024x1024")
        regional, plain = http.get("/_sim/billing").json()["requests"]
    assert (regional["data_residency"], plain["data_residency"]) == (True, False)
    found = costs(client, ["line_item"])
    assert found["gpt-image-2, image output", None] == (
        # one image at 30 USD per 1M output tokens, one at 33
        usd(("63.00", LOW_1024)),
        2 * LOW_1024,
    )


def test_the_costs_are_filtered_by_project_and_line_item(
    clients: dict[str, openai.OpenAI],
) -> None:
    """`project_ids` and `line_items` (the SDK's `project_ids[]`, `line_items[]`) answer
    those projects' and line items' costs only, as OpenAI does; they answered every one."""
    art, ops = clients["proj_art"], clients["proj_ops"]
    art.images.generate(model="gpt-image-2", prompt="a", quality="low", size="1024x1024")
    ops.images.generate(model="gpt-image-1", prompt="b", quality="low", size="1024x1024")
    both = ["line_item", "project_id"]
    everything = costs(art, both)
    assert {project for _, project in everything} == {"proj_art", "proj_ops"}
    page = art.admin.organization.usage.costs(
        start_time=int(time.time()) - 3600, group_by=both, limit=1, project_ids=["proj_ops"]
    )
    [bucket] = page.data
    assert {(r.line_item, r.project_id) for r in bucket.results} == {
        (item, project) for item, project in everything if project == "proj_ops"
    }
    page = art.admin.organization.usage.costs(
        start_time=int(time.time()) - 3600,
        group_by=both,
        limit=1,
        line_items=["gpt-image-2, image output"],
    )
    [bucket] = page.data
    assert [(r.line_item, r.project_id) for r in bucket.results] == [
        ("gpt-image-2, image output", "proj_art")
    ]


def test_a_negative_page_cursor_is_refused() -> None:
    """`page_-1` read the buckets from the end of the range, and the next cursor again
    from the start: the pages of one answer repeated days."""
    query = QueryParams({"start_time": "0", "end_time": str(3 * 86_400), "page": "page_-1"})
    with pytest.raises(CostsQueryError, match="page"):
        costs_page([], query, now=0)
