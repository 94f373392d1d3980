"""The bound holds whatever Tollgate's own metering makes of the usage OpenAI may return:
every token model of the book, standard, batch and regional rates, every quality and size,
the usage told with its details or without them (a stream's completed events have no
`output_tokens_details`, and Tollgate reads their output tokens as image output)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.prices import load_price_book
from proxy.core.metering import SseMeter, usage_from_openai
from proxy.core.models import ImageRequest, InputImage, Usage
from proxy.core.pricing import AUTO, ModelPrices, estimate
from proxy.core.settlement import Bound, answered

BOOK = load_price_book()
REGIONAL = BOOK.at_data_residency()
CUSTOM_SIZES = ("1024x1024", "1536x864", "2048x2048", "3840x2160", "1024x3072", "2880x2880")


def token_models() -> list[ModelPrices]:
    """Every token-priced entry, at each rate it may be reserved and settled at."""
    found = []
    for book in (BOOK, REGIONAL):
        for name in book.names():
            model = book.models[name]
            if model.per_image_billing:
                continue
            found.append(model)
            if model.accepts_batch:
                found.append(model.for_batch())
    return found


MODELS = token_models()


@st.composite
def requests(draw: st.DrawFn) -> tuple[ModelPrices, ImageRequest]:
    """A request the model takes, as Tollgate prices it."""
    model = draw(st.sampled_from(MODELS))
    sizes = model.sizes or tuple(s for s in CUSTOM_SIZES if model.accepts_size(s))
    stream = draw(st.booleans())
    edit = draw(st.booleans())
    image = st.one_of(
        st.just(InputImage()),
        st.builds(InputImage, st.integers(1, 4096), st.integers(1, 4096)),
    )
    request = ImageRequest(
        endpoint="edits" if edit else "generations",
        model=model.name,
        prompt_bytes=draw(st.integers(0, 32_000)),
        n=draw(st.integers(1, model.max_n)),
        quality=draw(st.sampled_from((*model.qualities, AUTO))),
        size=draw(st.sampled_from((*sizes, AUTO))),
        stream=stream,
        partial_images=draw(st.integers(0, 3)) if stream else 0,
        input_fidelity=draw(st.sampled_from((None, *model.input_fidelities))),
        images=tuple(draw(st.lists(image, min_size=1, max_size=3))) if edit else (),
        mask=draw(st.none() | image) if edit else None,
    )
    model.validate(request)
    return model, request


def reported(draw: st.DrawFn, reserved: Usage) -> dict[str, int]:
    """Counts of each kind up to what the bound reserved for it (OpenAI's most)."""
    kinds = ("text_input", "image_input", "image_output", "text_output")
    return {kind: draw(st.integers(0, getattr(reserved, kind))) for kind in kinds}


def usage_json(counts: dict[str, int], input_details: bool, output_details: bool) -> Any:
    """`counts` as OpenAI's `usage` object, with or without each side's details."""
    output = counts["image_output"] + counts["text_output"]
    usage: dict[str, Any] = {
        "input_tokens": counts["text_input"] + counts["image_input"],
        "output_tokens": output,
        "total_tokens": counts["text_input"] + counts["image_input"] + output,
    }
    if input_details:
        usage["input_tokens_details"] = {
            "text_tokens": counts["text_input"],
            "image_tokens": counts["image_input"],
        }
    if output_details:
        usage["output_tokens_details"] = {
            "image_tokens": counts["image_output"],
            "text_tokens": counts["text_output"],
        }
    return usage


def streamed(counts: dict[str, int], n: int, input_details: bool) -> Usage | None:
    """`counts` told by `n` completed events, as a stream tells them (no output details):
    the first event carries the remainders."""
    events = []
    for index in range(n):
        share = {k: v // n + (v % n if index == 0 else 0) for k, v in counts.items()}
        data = {"type": "image_generation.completed", "b64_json": "AAAA"}
        data["usage"] = usage_json(share, input_details, output_details=False)
        events.append(f"event: image_generation.completed\ndata: {json.dumps(data)}\n\n")
    meter = SseMeter()
    meter.feed("".join(events).encode())
    meter.finish()
    assert meter.completed == n and not meter.unmetered
    return meter.usage


@settings(max_examples=400, deadline=None, database=None)
@given(asked=requests(), data=st.data())
def test_no_usage_the_bound_allows_is_charged_above_it(
    asked: tuple[ModelPrices, ImageRequest], data: st.DataObject
) -> None:
    model, request = asked
    bound = estimate(model, request)
    counts = reported(data.draw, bound.usage)
    input_details = data.draw(st.booleans(), "input details")
    if request.stream:
        usage = streamed(counts, request.n, input_details)
    else:
        output_details = data.draw(st.booleans(), "output details")
        usage = usage_from_openai(usage_json(counts, input_details, output_details))
    reserved = Bound(model, request.n, request.quality, request.size, bound.cost_nanos, bound.usage)
    verdict = answered(reserved, usage, request.n)
    assert verdict.cost_nanos <= bound.cost_nanos, (counts, bound)
    assert (verdict.error_code, verdict.charge.flagged) == (None, False)


def test_gpt_image_15_text_output_told_without_details_is_within_its_bound() -> None:
    """1,000 text tokens (what the bound reserves) without `output_tokens_details` are
    image output to Tollgate, at $32/M rather than $10/M: the bound covers that."""
    model = BOOK.models["gpt-image-1.5"]
    request = ImageRequest(
        endpoint="generations", model=model.name, quality="low", size="1024x1024"
    )
    bound = estimate(model, request)
    usage = usage_from_openai({"input_tokens": 0, "output_tokens": 272 + 1000})
    reserved = Bound(model, 1, "low", "1024x1024", bound.cost_nanos, bound.usage)
    verdict = answered(reserved, usage, 1)
    assert verdict.cost_nanos == (272 + 1000) * 32_000 == bound.cost_nanos
    assert verdict.error_code is None
