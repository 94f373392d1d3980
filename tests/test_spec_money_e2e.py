"""Prices, bounds and budget decisions against an oracle written from the specification
and OpenAI's published numbers alone (nothing of Tollgate's pricing is imported), through
a running Tollgate in front of the simulated upstream and the official `openai` client.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    nanos,
    start_tollgate,
    write_config,
)

TIGHT_KEY = "tg_spec_money_tight_0001"

# -- the oracle: OpenAI's published rates and token rules ---------------------------------

# USD per 1M tokens: text input, image input, image output, text output (None: not billed).
RATES: dict[str, tuple[Decimal, Decimal, Decimal, Decimal | None]] = {
    "gpt-image-2": (Decimal(5), Decimal(8), Decimal(30), None),
    "gpt-image-2.5-sunburst": (Decimal(5), Decimal(8), Decimal(30), None),
    "gpt-image-2.5-flare": (Decimal(5), Decimal(8), Decimal(30), None),
    "gpt-image-1.5": (Decimal(5), Decimal(8), Decimal(32), Decimal(10)),
    "chatgpt-image-latest": (Decimal(5), Decimal(8), Decimal(32), Decimal(10)),
    "gpt-image-1": (Decimal(5), Decimal(10), Decimal(40), None),
}
SNAPSHOTS = {
    "gpt-image-2-2026-04-21": "gpt-image-2",
    "gpt-image-2.5-sunburst-2026-09-08": "gpt-image-2.5-sunburst",
    "gpt-image-2.5-flare-2026-09-08": "gpt-image-2.5-flare",
}
FACTORS = {
    "gpt-image-2": {"low": 16, "medium": 48, "high": 96},
    "gpt-image-2.5": {"low": 16, "medium": 24, "high": 48, "xhigh": 64, "max": 96},
}
TABLE = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
STANDARD = ("1024x1024", "1536x1024", "1024x1536")
CUSTOM = ("2048x1152", "3840x2160", "2160x3840", "2048x2048", "1536x864", "1008x2992")
TEXT_OUTPUT_PER_IMAGE = 1000  # what Tollgate documents it reserves for 1.5's text output
PARTIAL_TOKENS = 100


def base(model: str) -> str:
    return SNAPSHOTS.get(model, model)


def formula(factor: int, width: int, height: int) -> int:
    """The community formula for gpt-image-2 and 2.5 output tokens (OPENAI-IMAGES §5.3)."""
    long, short = max(width, height), min(width, height)
    steps = (2 * factor * short + long) // (2 * long)
    return -(-factor * steps * (2_000_000 + width * height) // 4_000_000)


def output_tokens(model: str, quality: str, size: str) -> int:
    name = base(model)
    width, height = (int(edge) for edge in size.split("x"))
    if name.startswith("gpt-image-2.5"):
        return formula(FACTORS["gpt-image-2.5"][quality], width, height)
    if name == "gpt-image-2":
        return formula(FACTORS["gpt-image-2"][quality], width, height)
    return TABLE[quality][size]


def usd_nanos(usd: Decimal) -> int:
    exact = usd * 10**9
    assert exact == exact.to_integral_value(), usd
    return int(exact)


def cost_of(model: str, usage: dict[str, Any]) -> int:
    """Nano-dollars of a returned `usage` (output tokens are image output without details)."""
    text_in, image_in, image_out, text_out = RATES[base(model)]
    inputs = usage.get("input_tokens_details") or {}
    outputs = usage.get("output_tokens_details")
    image_tokens = outputs["image_tokens"] if outputs else usage["output_tokens"]
    text_tokens = outputs.get("text_tokens", 0) if outputs else 0
    usd = (
        inputs.get("text_tokens", 0) * text_in
        + inputs.get("image_tokens", 0) * image_in
        + image_tokens * image_out
        + text_tokens * (text_out if text_out is not None else image_out)
    ) / 1_000_000
    return usd_nanos(usd)


def bound_of(model: str, quality: str, size: str, n: int, prompt: str, partials: int = 0) -> int:
    """The bound of a generation: text ≤ prompt bytes, the image's output tokens, partial
    images, text output where the model bills it; × n."""
    text_in, _, image_out, text_out = RATES[base(model)]
    one = (
        len(prompt.encode()) * text_in
        + (output_tokens(model, quality, size) + PARTIAL_TOKENS * partials) * image_out
    )
    if text_out is not None:
        one += TEXT_OUTPUT_PER_IMAGE * text_out
    return usd_nanos(n * one / 1_000_000)


# -- the running Tollgate -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("spec-money")
    teams = {
        "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
        "tight": f"""
            name: tight
            keys:
              - {{id: k, sha256: {key_hash(TIGHT_KEY)}}}
            budgets:
              - {{period: total, limit_usd: 0.02}}
            on_exhausted: downgrade
        """,
    }
    write_config(root, f"{simulator.url}/v1", teams=teams)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def model_quality_size() -> st.SearchStrategy[tuple[str, str, str]]:
    def sizes(model: str) -> tuple[str, ...]:
        return (*STANDARD, *CUSTOM) if base(model).startswith("gpt-image-2") else STANDARD

    def qualities(model: str) -> tuple[str, ...]:
        return tuple(FACTORS["gpt-image-2.5" if "2.5" in model else "gpt-image-2"])

    models = st.sampled_from([*RATES, *SNAPSHOTS])
    return models.flatmap(
        lambda m: st.tuples(st.just(m), st.sampled_from(qualities(m)), st.sampled_from(sizes(m)))
    )


@settings(max_examples=20, deadline=None, database=None)
@given(
    asked=model_quality_size(),
    n=st.integers(1, 3),
    prompt=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1),
)
def test_a_generation_costs_its_usage_and_reserved_its_bound(
    gate: Tollgate, asked: tuple[str, str, str], n: int, prompt: str
) -> None:
    model, quality, size = asked
    client = gate.client()
    answer = client.images.with_raw_response.generate(
        model=model, prompt=prompt, quality=quality, size=size, n=n
    )
    image = answer.parse()
    assert image.usage is not None
    cost = cost_of(model, image.usage.model_dump())
    assert nanos(answer.headers["x-tollgate-cost-usd"]) == cost
    row = gate.row(answer.headers["x-tollgate-request-id"])
    assert (row["cost_nanos"], row["outcome"], row["images"]) == (cost, "ok", n)
    assert row["estimated_nanos"] == bound_of(model, quality, size, n, prompt)


@pytest.mark.parametrize(
    ("model", "quality", "size", "n", "partials"),
    [
        ("gpt-image-2", "high", "1024x1024", 1, 2),
        ("gpt-image-2.5-sunburst", "max", "2048x1152", 2, 3),
        ("gpt-image-1.5", "medium", "1024x1536", 2, 1),
        ("gpt-image-1", "low", "1536x1024", 1, 0),
    ],
)
def test_a_stream_reserves_its_bound_and_settles_its_completed_events(
    gate: Tollgate, model: str, quality: str, size: str, n: int, partials: int
) -> None:
    prompt = "a lighthouse at dusk"
    client = gate.client()
    with client.images.with_streaming_response.generate(
        model=model, prompt=prompt, quality=quality, size=size, n=n,
        stream=True, partial_images=partials,
    ) as answer:  # fmt: skip
        reserved = nanos(answer.headers["x-tollgate-reserved-usd"])
        request_id = answer.headers["x-tollgate-request-id"]
        events = list(answer.parse())
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert completed
    cost = sum(cost_of(model, e.usage.model_dump()) for e in completed)
    assert reserved == bound_of(model, quality, size, n, prompt, partials)
    row = gate.row(request_id)
    assert (row["estimated_nanos"], row["cost_nanos"]) == (reserved, cost)


def test_a_quality_downgraded_several_steps_counts_one_downgrade(gate: Tollgate) -> None:
    """high -> medium -> low for the budget is one quality downgrade of the request, as the
    header and the ledger say, not one per step of the ladder tried."""
    labels = {"team": "tight", "knob": "quality", "reason": "budget"}
    before = gate.metric("tollgate_downgrades_total", **labels)
    client = gate.client(TIGHT_KEY)
    answer = client.images.with_raw_response.generate(
        model="gpt-image-2", prompt="p", quality="high", size="2048x2048"
    )
    assert answer.headers["x-tollgate-downgraded"] == "quality=high->low"
    row = gate.row(answer.headers["x-tollgate-request-id"])
    assert (row["outcome"], row["downgrades"]) == ("downgraded", "quality=high->low")
    assert gate.metric("tollgate_downgrades_total", **labels) == before + 1


def test_a_request_no_form_of_which_fits_is_refused_without_retry(gate: Tollgate) -> None:
    client = gate.client(TIGHT_KEY)
    with pytest.raises(openai.RateLimitError) as refused:
        client.images.generate(
            model="gpt-image-2", prompt="p", quality="low", size="2048x2048", n=10
        )
    error = refused.value
    assert (error.code, error.type) == ("budget_exceeded", "insufficient_quota")
    assert error.response.headers["x-should-retry"] == "false"
    # The smallest square gpt-image-2 accepts (655,360 pixels at least, edges of 16 px).
    cheapest = bound_of("gpt-image-2", "low", "816x816", 10, "p")
    assert f"${Decimal(cheapest) / 10**9}" in error.message and "$0.02" in error.message


def worst_size(factor: int) -> str:
    """The accepted size (OPENAI-IMAGES §2.4) of the most output tokens at `factor`."""
    accepted = (
        (w, h)
        for w in range(16, 3841, 16)
        for h in range(16, 3841, 16)
        if max(w, h) <= 3 * min(w, h) and 655_360 <= w * h <= 8_294_400
    )
    w, h = max(accepted, key=lambda d: formula(factor, *d))
    return f"{w}x{h}"


@pytest.mark.parametrize(
    ("model", "top"), [("gpt-image-2", "high"), ("gpt-image-2.5-flare", "max")]
)
def test_auto_size_and_quality_reserve_the_models_worst_case(
    gate: Tollgate, model: str, top: str
) -> None:
    """ "The model's worst case for `auto` quality or size": the top of its ladder at the
    accepted size of the most output tokens, not one size OpenAI's `auto` was seen to
    return."""
    factor = FACTORS["gpt-image-2.5" if "2.5" in model else "gpt-image-2"][top]
    client = gate.client()
    with client.images.with_streaming_response.generate(
        model=model, prompt="p", stream=True, partial_images=1
    ) as answer:
        reserved = nanos(answer.headers["x-tollgate-reserved-usd"])
        events = list(answer.parse())
    assert events[-1].type == "image_generation.completed"
    assert reserved == bound_of(model, top, worst_size(factor), 1, "p", partials=1)
