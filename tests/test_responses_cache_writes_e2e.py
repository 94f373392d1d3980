"""A mainline model that bills the input it writes to the prompt cache (gpt-5.6 and later,
at 1.25 times its input rate, reported as `usage.input_tokens_details.cache_write_tokens`),
listed in a deployment's own price book with its `cache_write_input` rate, is charged its
writes at that rate, sent directly, streamed, in the background and continued, within the
bound reserved for it. The simulator's gpt-5.6-sol bills its writes so.

The oracle prices the simulator's billing record at the rates written below, apart from
Tollgate's price book and meter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.core.models import Usage
from tests.bound_oracle import DEPLOYMENT_MAINLINE
from tests.conftest import Simulator, Tollgate, run_tollgate, write_config
from tests.responses_e2e import BOOK, TEAMS, billed, settled_row, tool

__all__ = ["proxy"]

PRICES = DEPLOYMENT_MAINLINE
INPUT, CACHED, OUTPUT, WRITE = Decimal("5.00"), Decimal("0.50"), Decimal("30.00"), Decimal("6.25")


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("cache-writes")
    (root / "prices.yaml").write_text(PRICES)
    write_config(root, f"{simulator.url}/v1", "prices: prices.yaml\n", TEAMS)
    yield from run_tollgate(root)


def oracle(record: dict[str, Any]) -> int:
    """Nano-dollars: the mainline tokens of the simulator's record at the rates above (the
    written ones at the write rate), the image tool's at the image model's."""
    main, images = record["mainline"], record["usage"]
    uncached = main["input"] - main["cached_input"] - main["cache_write"]
    micro_usd = (
        uncached * INPUT
        + main["cache_write"] * WRITE
        + main["cached_input"] * CACHED
        + main["output"] * OUTPUT
    )
    model = BOOK.find(record["model"])
    assert model is not None
    tool_usage = Usage(
        text_input=images["text_input"],
        image_input=images["image_input"],
        image_output=images["image_output"],
        text_output=images["text_output"],
    )
    return math.ceil(micro_usd * 1000) + model.cost(tool_usage)


ASKED: dict[str, Any] = {
    "model": "gpt-5.6-sol",
    "tools": [tool()],
    "max_tool_calls": 2,
    "max_output_tokens": 600,
    "reasoning": {"context": "current_turn"},
}


def check(proxy: Tollgate, simulator: Simulator, response_id: str) -> None:
    record = billed(simulator, response_id)
    assert record["mainline"]["cache_write"] > 0
    row = settled_row(proxy, response_id)
    assert row["cost_nanos"] == oracle(record)
    assert row["estimated_nanos"] >= row["cost_nanos"]
    assert (row["flagged"], row["outcome"], row["mainline_model"]) == (0, "ok", "gpt-5.6-sol")


@pytest.mark.parametrize("way", ["direct", "background", "stream"])
def test_a_model_that_bills_its_cache_writes_is_charged_them_at_its_write_rate(
    proxy: Tollgate, simulator: Simulator, way: str
) -> None:
    prompt = f"A lighthouse at dusk, {way} [[images:2]]"
    with proxy.client() as sdk:
        if way == "stream":
            with sdk.responses.create(input=prompt, stream=True, **ASKED) as events:
                ended = [e.response.id for e in events if e.type == "response.completed"]
            response_id = ended[0]
        else:
            created = sdk.responses.create(input=prompt, background=way == "background", **ASKED)
            assert created.usage is None or created.usage.input_tokens_details.cache_write_tokens
            response_id = created.id
    check(proxy, simulator, response_id)


def test_a_continued_response_is_charged_the_context_it_writes_again(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The context carried by `previous_response_id` is read (and written) again."""
    with proxy.client() as sdk:
        first = sdk.responses.create(input="A red bicycle " + "in the rain " * 200, **ASKED)
        second = sdk.responses.create(
            input="Now make it blue", previous_response_id=first.id, **ASKED
        )
    check(proxy, simulator, first.id)
    check(proxy, simulator, second.id)
