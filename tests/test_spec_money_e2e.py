"""Prices, bounds and budget decisions against an oracle written from the specification
and OpenAI's published numbers alone (nothing of Tollgate's pricing is imported), through
a running Tollgate in front of the simulated upstream and the official `openai` client.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    nanos,
    start_tollgate,
    write_config,
)

TIGHT_KEY = "tg_spec_money_tight_0001"
# Per-user day limits of the teams `ladder0`, `ladder1`, ... (keys `LADDER_KEY` + index).
LADDER_KEY = "tg_spec_money_ladder_"
USER_LIMITS = (Decimal("0.0103"), Decimal("0.05"), Decimal("0.3"))
FALLBACK = "gpt-image-1-mini"

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
# gpt-image-1-mini's published per-image prices (OPENAI-IMAGES §5.5), which its usage
# does not match: the most an image of it is charged, so what its bound holds.
MINI_PER_IMAGE = {
    "low": {"1024x1024": Decimal("0.005"), "1024x1536": Decimal("0.006")},
    "medium": {"1024x1024": Decimal("0.011"), "1024x1536": Decimal("0.015")},
    "high": {"1024x1024": Decimal("0.036"), "1024x1536": Decimal("0.052")},
}
MINI_TEXT_INPUT = Decimal(2)
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
    """An image's output tokens; `auto` quality is the model's worst case, its top."""
    name = base(model)
    if quality == "auto":
        quality = qualities_of(model)[-1]
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
    images, text output where the model bills it (at the image output rate, which it is
    charged at when a usage leaves out its output details); × n."""
    if model == "gpt-image-1-mini":
        price = MINI_PER_IMAGE["high" if quality == "auto" else quality][
            "1024x1024" if size == "1024x1024" else "1024x1536"
        ]
        text = len(prompt.encode()) * MINI_TEXT_INPUT / 1_000_000
        partial = PARTIAL_TOKENS * partials * Decimal(8) / 1_000_000
        return usd_nanos(n * (price + text + partial))
    text_in, _, image_out, text_out = RATES[base(model)]
    one = (
        len(prompt.encode()) * text_in
        + (output_tokens(model, quality, size) + PARTIAL_TOKENS * partials) * image_out
    )
    if text_out is not None:
        one += TEXT_OUTPUT_PER_IMAGE * max(text_out, image_out)
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
    for index, limit in enumerate(USER_LIMITS):
        teams[f"ladder{index}"] = f"""
            name: ladder{index}
            keys:
              - {{id: k, sha256: {key_hash(LADDER_KEY + str(index))}}}
            per_user:
              - {{period: day, limit_usd: {limit}}}
            on_exhausted: downgrade
            downgrade:
              order: [quality, size, model]
              fallback_model: {FALLBACK}
        """
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
    prompt=st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
    ),
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


def qualities_of(model: str) -> tuple[str, ...]:
    if not base(model).startswith("gpt-image-2"):
        return ("low", "medium", "high")
    return tuple(FACTORS["gpt-image-2.5" if "2.5" in model else "gpt-image-2"])


def accepts(model: str, width: int, height: int) -> bool:
    if not base(model).startswith("gpt-image-2"):
        return f"{width}x{height}" in STANDARD
    long, short = max(width, height), min(width, height)
    return (
        width % 16 == 0
        and height % 16 == 0
        and long <= 3840
        and long <= 3 * short
        and 655_360 <= width * height <= 8_294_400
    )


def smaller_same_aspect(model: str, size: str) -> list[str]:
    """Accepted sizes of exactly the aspect ratio of `size`, smaller, largest first."""
    width, height = (int(edge) for edge in size.split("x"))
    found = [
        (w, w * height // width)
        for w in range(width - 1, 0, -1)
        if w * height % width == 0 and accepts(model, w, w * height // width)
    ]
    return [f"{w}x{h}" for w, h in found]


def ladder(model: str, quality: str, size: str, n: int, prompt: str) -> Iterator[tuple[str, ...]]:
    """Every form of the request, most faithful first, under `order: [quality, size, model]`
    (SPEC §6): quality one step at a time, then each cheaper smaller size of the same aspect
    ratio (from the top quality again), then the fallback model, its ladder and sizes."""

    def on(model: str, quality: str, size: str) -> Iterator[tuple[str, ...]]:
        asked = bound_of(model, quality, size, n, prompt)
        sizes = [size] + [
            s for s in smaller_same_aspect(model, size)
            if bound_of(model, quality, s, n, prompt) < asked
        ]  # fmt: skip
        ladder_ = qualities_of(model)
        # `auto` first becomes the highest explicit quality, then one step at a time.
        steps = ladder_ if quality == "auto" else ladder_[: ladder_.index(quality) + 1]
        for s in sizes:
            yield model, quality, s
            for q in reversed(steps):
                if q != quality:
                    yield model, q, s

    yield from on(model, quality, size)
    width, height = (int(edge) for edge in size.split("x"))
    same = [s for s in STANDARD if int(s.split("x")[0]) * height == int(s.split("x")[1]) * width]
    if same:
        kept = quality == "auto" or quality in qualities_of(FALLBACK)
        fallback_quality = quality if kept else qualities_of(FALLBACK)[-1]
        yield from on(FALLBACK, fallback_quality, same[0])


@settings(max_examples=25, deadline=None, database=None)
@given(
    asked=model_quality_size().filter(lambda a: not a[0].startswith(("gpt-image-1", "chat"))),
    auto=st.booleans(),
    n=st.integers(1, 10),
    team=st.sampled_from(range(len(USER_LIMITS))),
)
def test_the_downgrade_ladder_sends_the_most_faithful_form_that_fits(
    gate: Tollgate, asked: tuple[str, str, str], auto: bool, n: int, team: int
) -> None:
    """A user with no spend yet: the first form of the ladder whose bound fits the user's
    budget is sent, the header names what changed (model, quality, size), or a 429."""
    if auto:
        asked = (asked[0], "auto", asked[2])
    model, quality, size = asked
    user = uuid.uuid4()
    prompt = "a lighthouse"
    limit = usd_nanos(USER_LIMITS[team])
    fits = [f for f in ladder(model, quality, size, n, prompt) if bound_of(*f, n, prompt) <= limit]
    client = gate.client(LADDER_KEY + str(team))
    call = client.images.with_raw_response.generate
    if not fits:
        with pytest.raises(openai.RateLimitError):
            call(model=model, prompt=prompt, quality=quality, size=size, n=n, user=str(user))
        return
    answer = call(model=model, prompt=prompt, quality=quality, size=size, n=n, user=str(user))
    sent = fits[0]
    changed = [
        f"{knob}={before}->{after}"
        for knob, before, after in zip(("model", "quality", "size"), asked, sent, strict=True)
        if before != after
    ]
    assert answer.headers.get("x-tollgate-downgraded") == ("; ".join(changed) or None)
    row = gate.row(answer.headers["x-tollgate-request-id"])
    assert (row["model"], row["quality"], row["size"]) == sent
    assert row["estimated_nanos"] == bound_of(*sent, n, prompt)


def tile_tokens(width: int, height: int, high_fidelity: bool) -> int:
    """gpt-image-1's published input rule (OPENAI-IMAGES §5.4): fit in 2048x2048, shortest
    side down to 512, 65 + 129 per 512-px tile, + 4160 (square) or 6240 at high fidelity."""
    w, h = Decimal(width), Decimal(height)
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 512:
        w, h = w * 512 / min(w, h), h * 512 / min(w, h)
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    extra = (4160 if width == height else 6240) if high_fidelity else 0
    return 65 + 129 * tiles + extra


def png(width: int, height: int, mode: str = "L") -> tuple[str, bytes, str]:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG", optimize=True)
    return "i.png", out.getvalue(), "image/png"


@settings(max_examples=12, deadline=None, database=None)
@given(
    dims=st.lists(st.tuples(st.integers(64, 4000), st.integers(64, 4000)), min_size=1, max_size=3),
    high=st.booleans(),
    masked=st.booleans(),
    n=st.integers(1, 2),
)
def test_an_edit_is_bounded_by_its_images_real_dimensions(
    gate: Tollgate, dims: list[tuple[int, int]], high: bool, masked: bool, n: int
) -> None:
    """gpt-image-1's bound: every uploaded image (the mask one more, as OpenAI does not say
    it is free) by the tile rule, the prompt, the output, × n; the cost is the usage's."""
    images = [png(w, h) for w, h in dims]
    extra: dict[str, Any] = {"input_fidelity": "high"} if high else {}
    if masked:
        extra["mask"] = png(*dims[0], mode="LA")
    client = gate.client()
    answer = client.images.with_raw_response.edit(
        model="gpt-image-1", prompt="p", image=images, quality="low", size="1024x1024", n=n,
        **extra,
    )  # fmt: skip
    usage = answer.parse().usage
    assert usage is not None
    assert nanos(answer.headers["x-tollgate-cost-usd"]) == cost_of(
        "gpt-image-1", usage.model_dump()
    )
    masks = [dims[0]] if masked else []
    image_tokens = sum(tile_tokens(w, h, high) for w, h in [*dims, *masks])
    text_in, image_in, image_out, _ = RATES["gpt-image-1"]
    bound = n * (1 * text_in + image_tokens * image_in + TABLE["low"]["1024x1024"] * image_out)
    row = gate.row(answer.headers["x-tollgate-request-id"])
    assert row["estimated_nanos"] == usd_nanos(bound / 1_000_000)


def test_an_organization_budget_binds_every_team(simulator: Simulator, tmp_path: Path) -> None:
    """One team's spend leaves the other less room in the organization's budget: its
    request downgraded to fit (the header names the room left), then refused naming it."""
    write_config(
        tmp_path,
        f"{simulator.url}/v1",
        settings="""
        organization:
          budgets:
            - {period: month, limit_usd: 0.1}
        """,
    )
    tollgate = start_tollgate(tmp_path)
    try:
        asked = {"model": "gpt-image-2", "prompt": "p", "quality": "medium", "size": "1024x1024"}
        medium = bound_of("gpt-image-2", "medium", "1024x1024", 1, "p")
        low = bound_of("gpt-image-2", "low", "1024x1024", 1, "p")
        first = tollgate.client(DESIGN_KEY).images.with_raw_response.generate(**asked)
        assert "x-tollgate-downgraded" not in first.headers
        left = usd_nanos(Decimal("0.1")) - medium
        assert nanos(first.headers["x-tollgate-budget-remaining-usd"]) == left
        research = tollgate.client(RESEARCH_KEY)
        second = research.images.with_raw_response.generate(**asked)
        assert second.headers["x-tollgate-downgraded"] == "quality=medium->low"
        assert nanos(second.headers["x-tollgate-budget-remaining-usd"]) == left - low
        with pytest.raises(openai.RateLimitError) as refused:
            research.images.generate(**{**asked, "n": 10})
        assert "organization's month budget" in refused.value.message
        assert nanos(refused.value.response.headers["x-tollgate-budget-remaining-usd"]) == (
            left - low
        )
    finally:
        tollgate.stop()
