"""Generated requests end to end: the official openai client → Tollgate → the simulated
upstream, on loopback. What Tollgate says it reserved (`x-tollgate-reserved-usd`, the
ledger's estimate) is never below what the simulator's billing record (`/_sim/billing`)
bills for the request, at the simulator's rates and at Tollgate's price book.

Fewer examples than the in-process tests (`test_bound_fuzz_*.py`): each is a real
request through two processes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.config import load_config
from proxy.core.models import Usage
from proxy.core.pricing import PriceBook
from proxy.simulator.billing import BilledUsage, Entry, MainlineUsage
from proxy.simulator.costs import line_costs
from tests.bound_oracle import examples
from tests.conftest import DESIGN_KEY, Simulator, Tollgate, start_tollgate, write_config
from tests.test_bound_fuzz_images import picture, quality_for, size_for
from tests.test_bound_fuzz_responses import IMAGE_MODELS, user_texts

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
GENERATION_MODELS = (
    "gpt-image-2", "gpt-image-2.5-sunburst", "gpt-image-2.6-flare", "gpt-image-1.5",
    "gpt-image-1", "gpt-image-1-mini", "dall-e-3", "dall-e-2",
)  # fmt: skip
MAINLINES = (
    "gpt-5.5",
    "gpt-5.4",
    "gpt-5.4-nano",
    "gpt-5-mini",
    "gpt-4o-mini",
    "gpt-4.1-nano",
    "o3",
)


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("bound-e2e")
    write_config(root, f"{simulator.url}/v1")
    started = start_tollgate(root)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def book(proxy: Tollgate) -> PriceBook:
    return load_config(proxy.root).prices


@pytest.fixture(scope="module")
def sdk(proxy: Tollgate) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=DESIGN_KEY, max_retries=0)


def _nanos(header: str) -> int:
    return int(Decimal(header) * 10**9)


def billed_nanos(record: dict[str, Any], book: PriceBook) -> tuple[int, int]:
    """A billing record's cost: at the simulator's rates, and at Tollgate's price book."""
    usage = BilledUsage(**record["usage"]) if record["usage"] else None
    mainline = MainlineUsage(**record["mainline"]) if record["mainline"] else None
    fields = {**record, "usage": usage, "mainline": mainline}
    entry = Entry(**{k: v for k, v in fields.items() if k in Entry.__dataclass_fields__})
    sim = math.ceil(sum((line.amount for line in line_costs(entry)), Decimal(0)) * 10**9)
    ours = 0
    model = book.find(record["model"]) if record["model"] else None
    if model is not None and usage is None:
        ours = model.image_price_nanos(record["quality"], record["size"]) * record["images"]
    elif model is not None and usage is not None:
        text_output = usage.text_output if "text_output" in model.rates else 0
        ours = model.cost(
            Usage(
                text_input=usage.text_input,
                image_input=usage.image_input,
                image_output=usage.image_output,
                text_output=text_output,
            )
        )
    line = book.find_mainline(record["mainline_model"] or "")
    if line is not None and mainline is not None:
        ours += line.cost(
            Usage(
                mainline_input=mainline.input - mainline.cached_input,
                mainline_cached_input=mainline.cached_input,
                mainline_output=mainline.output,
            )
        )
    return sim, ours


def assert_covered(
    raw: Any, proxy: Tollgate, simulator: Simulator, book: PriceBook, asked: Any
) -> None:
    """The ledger's reserved estimate (a stream's `x-tollgate-reserved-usd` too) covers
    the simulator's bill of the request."""
    reserved = proxy.row(raw.headers["x-tollgate-request-id"])["estimated_nanos"]
    header = raw.headers.get("x-tollgate-reserved-usd")
    assert header is None or _nanos(header) == reserved
    record = simulator.record(raw.headers["x-request-id"])
    assert record["billed"], record
    sim, ours = billed_nanos(record, book)
    assert max(sim, ours) <= reserved, (
        f"reserved {reserved} < billed (sim {sim}, book {ours}) for {asked}: {record}"
    )


@st.composite
def generations(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from(GENERATION_MODELS))
    asked: dict[str, Any] = {"model": model, "prompt": draw(user_texts()).strip() or "a fox"}
    asked["quality"] = draw(quality_for(model, strict=True))
    asked["size"] = draw(size_for(model, strict=True))
    asked["n"] = 1 if model == "dall-e-3" else draw(st.integers(1, 3))
    if not model.startswith("dall-e") and draw(st.booleans()):
        asked["stream"] = True
        asked["partial_images"] = draw(st.integers(0, 3))
    return asked


def _generate(sdk: openai.OpenAI, asked: dict[str, Any]) -> Any:
    try:
        raw = sdk.images.with_raw_response.generate(**asked)
    except openai.BadRequestError:
        return None
    if asked.get("stream"):
        for _ in raw.parse():
            pass
    return raw


@given(asked=generations())
@examples(12)
def test_a_generation_through_the_sdk_is_billed_within_its_reservation(
    sdk: openai.OpenAI,
    proxy: Tollgate,
    simulator: Simulator,
    book: PriceBook,
    asked: dict[str, Any],
) -> None:
    raw = _generate(sdk, asked)
    event("refused" if raw is None else "billed")
    if raw is not None:
        assert_covered(raw, proxy, simulator, book, asked)


@given(
    model=st.sampled_from(("gpt-image-1", "gpt-image-1.5", "gpt-image-2", "gpt-image-1-mini")),
    sides=st.lists(st.sampled_from((64, 512, 1024, 2048, 700)), min_size=2, max_size=8),
    fidelity=st.sampled_from(("low", "high", None)),
    prompt=user_texts(),
)
@examples(6)
def test_a_multipart_edit_through_the_sdk_is_billed_within_its_reservation(
    sdk: openai.OpenAI,
    proxy: Tollgate,
    simulator: Simulator,
    book: PriceBook,
    model: str,
    sides: list[int],
    fidelity: str | None,
    prompt: str,
) -> None:
    pairs = list(zip(sides[::2], sides[1::2], strict=False)) or [(sides[0], sides[0])]
    images = [(f"i{i}.png", io.BytesIO(picture(w, h, "PNG")), "image/png") for i, (w, h) in
              enumerate(pairs)]  # fmt: skip
    asked: dict[str, Any] = {"model": model, "prompt": prompt.strip() or "a fox", "image": images}
    if fidelity:
        asked["input_fidelity"] = fidelity
    try:
        raw = sdk.images.with_raw_response.edit(**asked)
    except openai.BadRequestError as exc:
        event(f"refused: {exc.message[:60]}")
        return
    assert_covered(raw, proxy, simulator, book, {**asked, "image": pairs})


@given(
    mainline=st.sampled_from(MAINLINES),
    tool_model=st.sampled_from(IMAGE_MODELS),
    text=user_texts(),
    calls=st.integers(1, 4),
    max_output=st.none() | st.integers(16, 400),
    stream=st.booleans(),
    data=st.data(),
)
@examples(8)
def test_a_response_through_the_sdk_is_billed_within_its_reservation(
    sdk: openai.OpenAI,
    proxy: Tollgate,
    simulator: Simulator,
    book: PriceBook,
    mainline: str,
    tool_model: str,
    text: str,
    calls: int,
    max_output: int | None,
    stream: bool,
    data: st.DataObject,
) -> None:
    tool: dict[str, Any] = {"type": "image_generation", "model": tool_model}
    tool["quality"] = data.draw(quality_for(tool_model, strict=True))
    tool["size"] = data.draw(size_for(tool_model, strict=True))
    if stream:
        tool["partial_images"] = data.draw(st.integers(0, 3))
    asked: dict[str, Any] = {
        "model": mainline,
        "input": text.strip() or "a fox",
        "tools": [tool],
        "max_tool_calls": calls,
        "stream": stream,
    }
    if max_output is not None:
        asked["max_output_tokens"] = max_output
    try:
        raw = sdk.responses.with_raw_response.create(**asked)
    except openai.BadRequestError as exc:
        event(f"refused: {exc.message[:60]}")
        return
    if stream:
        for _ in raw.parse():
            pass
    assert_covered(raw, proxy, simulator, book, asked)


def test_the_price_book_read_is_the_proxys(proxy: Tollgate, book: PriceBook) -> None:
    assert Path(proxy.root).is_dir() and book.find("gpt-image-2") is not None


@given(
    mainline=st.sampled_from(MAINLINES),
    texts=st.lists(user_texts(), min_size=2, max_size=3),
    tool_model=st.sampled_from(IMAGE_MODELS),
    calls=st.integers(1, 4),
)
@examples(4)
def test_each_response_of_a_chain_through_the_sdk_is_billed_within_its_reservation(
    sdk: openai.OpenAI,
    proxy: Tollgate,
    simulator: Simulator,
    book: PriceBook,
    mainline: str,
    texts: list[str],
    tool_model: str,
    calls: int,
) -> None:
    """Continued by `previous_response_id`: the ledger carries the previous response's
    tokens and images into the bound; the simulator bills its tokens again as input."""
    previous: str | None = None
    for text in texts:
        asked: dict[str, Any] = {
            "model": mainline,
            "input": text.strip() or "a fox",
            "tools": [{"type": "image_generation", "model": tool_model, "quality": "low"}],
            "max_tool_calls": calls,
        }
        if previous is not None:
            asked["previous_response_id"] = previous
        try:
            raw = sdk.responses.with_raw_response.create(**asked)
        except openai.BadRequestError as exc:
            event(f"refused: {exc.message[:60]}")
            return
        assert_covered(raw, proxy, simulator, book, asked)
        previous = raw.parse().id
