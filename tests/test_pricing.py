"""The price book: published token counts and prices, size rules, estimates as upper bounds."""

from __future__ import annotations

import json
import random
import textwrap
import typing
from dataclasses import replace
from datetime import date
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai.types.image_model import ImageModel

from proxy.config.prices import load_price_book
from proxy.core.errors import BatchUnsupported, ConfigError, InvalidRequest
from proxy.core.image_tokens import CustomSizes
from proxy.core.models import (
    INPUT_KINDS,
    OUTPUT_KINDS,
    TOKEN_KINDS,
    ImageRequest,
    InputImage,
    Usage,
)
from proxy.core.parsing import parse_request
from proxy.core.price_entries import (
    ENTRY_ERRORS,
    EntryError,
    mainline_prices,
    model_prices,
    price_book,
)
from proxy.core.pricing import MainlinePrices, ModelPrices, PriceBook, estimate, to_nanos
from proxy.simulator.catalogue import BOOKLESS_MAINLINE, MAINLINE_MODELS, RELEASED
from proxy.simulator.forms import RawRequest
from proxy.simulator.tokens import tokens_for
from proxy.simulator.validation import validate as simulator_validate

SDK_MODELS = typing.get_args(ImageModel)
GPT_IMAGE_2_SIZES = (
    "1024x1024",
    "1536x1024",
    "1024x1536",
    "2048x1152",
    "2560x1440",
    "2048x2048",
    "3840x2160",
    "2160x3840",
)


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return load_price_book()


def model_of(book: PriceBook, name: str) -> ModelPrices:
    found = book.find(name)
    assert found is not None, name
    return found


def request(model: str = "gpt-image-2", **fields: Any) -> ImageRequest:
    return ImageRequest(endpoint=fields.pop("endpoint", "generations"), model=model, **fields)


# --- the book ------------------------------------------------------------------------------


def test_built_in_book_loads_with_every_canonical_model(book: PriceBook) -> None:
    assert set(book.names()) >= {
        "gpt-image-1",
        "gpt-image-1-mini",
        "gpt-image-1.5",
        "chatgpt-image-latest",
        "gpt-image-2",
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-flare",
        "gpt-image-2.6-sunburst",
        "gpt-image-2.6-flare",
        "dall-e-2",
        "dall-e-3",
    }


@pytest.mark.parametrize("name", SDK_MODELS)
def test_every_model_the_openai_sdk_lists_is_priced(book: PriceBook, name: str) -> None:
    assert book.find(name) is not None


@pytest.mark.parametrize(
    ("snapshot", "canonical"),
    [
        ("gpt-image-2-2026-04-21", "gpt-image-2"),
        ("gpt-image-2.5-sunburst-2026-09-08", "gpt-image-2.5-sunburst"),
        ("gpt-image-2.5-flare-2026-09-08", "gpt-image-2.5-flare"),
    ],
)
def test_dated_snapshots_resolve_to_the_canonical_entry(
    book: PriceBook, snapshot: str, canonical: str
) -> None:
    assert model_of(book, snapshot) is model_of(book, canonical)
    assert model_of(book, snapshot).name == canonical


def test_aliases_are_not_listed_as_canonical_names(book: PriceBook) -> None:
    assert "gpt-image-2-2026-04-21" not in book.names()


def test_unknown_model_is_not_found(book: PriceBook) -> None:
    assert book.find("gpt-image-9") is None


@pytest.mark.parametrize("name", sorted({*SDK_MODELS}))
def test_every_entry_has_a_source_and_an_effective_date(book: PriceBook, name: str) -> None:
    model = model_of(book, name)
    assert model.source.strip()
    assert isinstance(model.effective_from, date)


# --- output tokens: gpt-image-2 and 2.5 formula (the community fit to OpenAI's calculator) --

GPT_IMAGE_2_TABLE = {
    "1024x1024": (196, 1756, 7024),
    "1536x1024": (158, 1372, 5488),
    "1024x1536": (158, 1372, 5488),
    "2048x1152": (157, 1413, 5650),
    "2560x1440": (205, 1843, 7370),
    "2048x2048": (397, 3568, 14272),
    "3840x2160": (371, 3336, 13342),
    "2160x3840": (371, 3336, 13342),
}
GPT_IMAGE_25_TABLE = {
    "1024x1024": (196, 439, 1756, 3122, 7024),
    "1536x1024": (158, 343, 1372, 2459, 5488),
    "1024x1536": (158, 343, 1372, 2459, 5488),
    "1536x864": (120, 280, 1078, 1917, 4312),
    "2048x1152": (157, 367, 1413, 2511, 5650),
    "2560x1440": (205, 478, 1843, 3276, 7370),
    "2048x2048": (397, 892, 3568, 6343, 14272),
    "3840x2160": (371, 865, 3336, 5930, 13342),
    "2160x3840": (371, 865, 3336, 5930, 13342),
}


@pytest.mark.parametrize(
    ("quality", "size", "tokens"),
    [
        (quality, size, row[i])
        for size, row in GPT_IMAGE_2_TABLE.items()
        for i, quality in enumerate(("low", "medium", "high"))
    ],
)
def test_gpt_image_2_output_tokens_match_the_published_calculator(
    book: PriceBook, quality: str, size: str, tokens: int
) -> None:
    assert model_of(book, "gpt-image-2").output_tokens(quality, size) == tokens


@pytest.mark.parametrize("name", ["gpt-image-2.5-sunburst", "gpt-image-2.5-flare-2026-09-08"])
@pytest.mark.parametrize(
    ("quality", "size", "tokens"),
    [
        (quality, size, row[i])
        for size, row in GPT_IMAGE_25_TABLE.items()
        for i, quality in enumerate(("low", "medium", "high", "xhigh", "max"))
    ],
)
def test_gpt_image_25_output_tokens_match_the_published_calculator(
    book: PriceBook, name: str, quality: str, size: str, tokens: int
) -> None:
    assert model_of(book, name).output_tokens(quality, size) == tokens


# --- output tokens: models before gpt-image-2 (the image-generation guide's table) ---------

PRIOR_TO_2_TABLE = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}


@pytest.mark.parametrize("name", ["gpt-image-1", "gpt-image-1.5", "chatgpt-image-latest"])
@pytest.mark.parametrize(
    ("quality", "size", "tokens"),
    [(q, s, t) for q, by_size in PRIOR_TO_2_TABLE.items() for s, t in by_size.items()],
)
def test_models_before_gpt_image_2_use_the_published_table(
    book: PriceBook, name: str, quality: str, size: str, tokens: int
) -> None:
    assert model_of(book, name).output_tokens(quality, size) == tokens


MINI_PRICES = {
    "low": {"1024x1024": "0.005", "1024x1536": "0.006", "1536x1024": "0.006"},
    "medium": {"1024x1024": "0.011", "1024x1536": "0.015", "1536x1024": "0.015"},
    "high": {"1024x1024": "0.036", "1024x1536": "0.052", "1536x1024": "0.052"},
}


@pytest.mark.parametrize(
    ("quality", "size", "price"),
    [(q, s, p) for q, by_size in MINI_PRICES.items() for s, p in by_size.items()],
)
def test_gpt_image_1_mini_bounds_an_image_by_its_published_price_above_the_guides_table(
    book: PriceBook, quality: str, size: str, price: str
) -> None:
    """Mini's per-image prices do not match the guide's table at $8/M (low 1024x1024 would
    be $0.0022, listed at $0.005): an image is bounded by the dearer of the two."""
    model = model_of(book, "gpt-image-1-mini")
    cost = model.cost(Usage(image_output=model.output_tokens(quality, size)))
    assert cost >= to_nanos(Decimal(price))
    assert model.output_tokens(quality, size) >= PRIOR_TO_2_TABLE[quality][size]


# --- published prices ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tokens", "nanos"),
    [
        ("gpt-image-2", 7024, 210_720_000),  # high 1024², $30/M
        ("gpt-image-1.5", 4160, 133_120_000),  # high 1024², $32/M
        ("gpt-image-1", 6208, 248_320_000),  # high 1536x1024, $40/M
    ],
)
def test_image_output_cost_is_exact_in_nano_dollars(
    book: PriceBook, name: str, tokens: int, nanos: int
) -> None:
    assert model_of(book, name).cost(Usage(image_output=tokens)) == nanos


# (model, quality, size, published USD) from the image-generation guide. gpt-image-1 high 1024² is
# left out: the guide prints $0.167 while 4160 × $40/M = $0.1664, which rounds to $0.166.
PUBLISHED_GUIDE: dict[str, dict[str, tuple[str | None, ...]]] = {
    "gpt-image-2": {
        "low": ("0.006", "0.005", "0.005"),
        "medium": ("0.053", "0.041", "0.041"),
        "high": ("0.211", "0.165", "0.165"),
    },
    "gpt-image-1.5": {
        "low": ("0.009", "0.013", "0.013"),
        "medium": ("0.034", "0.05", "0.05"),
        "high": ("0.133", "0.20", "0.20"),
    },
    "gpt-image-1": {
        "low": ("0.011", "0.016", "0.016"),
        "medium": ("0.042", "0.063", "0.063"),
        "high": (None, "0.25", "0.25"),
    },
}
PUBLISHED_PER_IMAGE = [
    (model, quality, size, price)
    for model, rows in PUBLISHED_GUIDE.items()
    for quality, prices in rows.items()
    for size, price in zip(("1024x1024", "1024x1536", "1536x1024"), prices, strict=True)
    if price is not None
]


@pytest.mark.parametrize(("name", "quality", "size", "published"), PUBLISHED_PER_IMAGE)
def test_output_cost_rounded_to_the_published_precision_gives_the_guide_price(
    book: PriceBook, name: str, quality: str, size: str, published: str
) -> None:
    model = model_of(book, name)
    nanos = model.cost(Usage(image_output=model.output_tokens(quality, size)))
    price = Decimal(published)
    assert (Decimal(nanos) / 10**9).quantize(price, rounding=ROUND_HALF_UP) == price


def test_published_examples_round_to_the_guide_values(book: PriceBook) -> None:
    gpt2 = model_of(book, "gpt-image-2").cost(Usage(image_output=7024))
    gpt15 = model_of(book, "gpt-image-1.5").cost(Usage(image_output=4160))
    gpt1 = model_of(book, "gpt-image-1").cost(Usage(image_output=6208))
    assert Decimal(gpt2).scaleb(-9) == Decimal("0.21072")
    assert Decimal(gpt15).scaleb(-9) == Decimal("0.13312")
    assert Decimal(gpt1).scaleb(-9) == Decimal("0.24832")
    assert round(Decimal(gpt2).scaleb(-9), 3) == Decimal("0.211")
    assert round(Decimal(gpt15).scaleb(-9), 3) == Decimal("0.133")
    assert round(Decimal(gpt1).scaleb(-9), 2) == Decimal("0.25")


def test_cost_sums_every_token_kind_at_its_own_rate(book: PriceBook) -> None:
    usage = Usage(text_input=1000, image_input=2000, image_output=3000, text_output=400)
    # 1000 × $5 + 2000 × $8 + 3000 × $32 + 400 × $10, per million tokens.
    assert (
        model_of(book, "gpt-image-1.5").cost(usage)
        == 5_000 * 1000 + 16_000 * 1000 + (96_000 * 1000) + 4_000 * 1000
    )


def test_cost_of_no_usage_is_zero(book: PriceBook) -> None:
    assert model_of(book, "gpt-image-2").cost(Usage()) == 0


NO_TEXT_OUTPUT_RATE = (
    "gpt-image-1", "gpt-image-1-mini", "gpt-image-2", "gpt-image-2.5-sunburst",
    "gpt-image-2.6-flare",
)  # fmt: skip


@pytest.mark.parametrize("name", NO_TEXT_OUTPUT_RATE)
def test_text_output_without_a_rate_is_priced_at_the_image_output_rate_and_flagged(
    book: PriceBook, name: str
) -> None:
    model = model_of(book, name)
    assert "text_output" not in model.rates
    image_rate = model.rates["image_output"]
    assert model.cost(Usage(text_output=1_000_000)) == int(image_rate * 10**9)
    charge = model.charge(Usage(image_output=272, text_output=150))
    assert charge.flagged
    assert charge.usage == Usage(image_output=272, text_output=150)  # kept as reported
    assert charge.cost_nanos == model.cost(Usage(image_output=272 + 150))


def test_every_token_kind_of_every_token_model_costs_something(book: PriceBook) -> None:
    for name in book.names():
        model = model_of(book, name)
        if model.per_image_billing:
            continue
        for kind in TOKEN_KINDS:
            assert model.cost(Usage(**{kind: 1000})) > 0, (name, kind)  # type: ignore[arg-type]
        assert model.cost(Usage(unclassified_input=1000)) > 0, name
        assert model.cost(Usage(unclassified_output=1000)) > 0, name


def test_usage_at_the_models_own_rates_is_not_flagged(book: PriceBook) -> None:
    usage = Usage(text_input=20, image_input=30, image_output=4160, text_output=100, images=1)
    charge = model_of(book, "gpt-image-1.5").charge(usage)
    assert not charge.flagged
    assert charge.usage == usage
    assert charge.cost_nanos == model_of(book, "gpt-image-1.5").cost(usage)


def test_unclassified_tokens_are_priced_at_the_dearest_rate_of_their_side_and_flagged(
    book: PriceBook,
) -> None:
    model = model_of(book, "gpt-image-1.5")  # image output $32 > text output $10
    usage = Usage(text_input=20, image_output=4160, unclassified_input=7, unclassified_output=50)
    charge = model.charge(usage)
    assert charge.flagged
    # Folded into the kind that priced them: the row's kinds give the same cost.
    assert charge.usage == Usage(text_input=20, image_input=7, image_output=4210)
    assert charge.cost_nanos == model.cost(usage) == model.cost(charge.usage)
    assert charge.cost_nanos == 20 * 5_000 + 7 * 8_000 + 4210 * 32_000


def test_an_input_kind_without_its_own_rate_is_priced_at_the_dearest_input_rate(
    tmp_path: Path,
) -> None:
    model = model_of(load_price_book(write(tmp_path, OVERRIDE)), "gpt-image-2")
    assert "cached_text_input" not in model.rates  # the override names only three rates
    assert model.cost(Usage(cached_text_input=1000)) == 1000 * 4_000  # image input's $4.00
    assert model.charge(Usage(cached_text_input=1)).flagged


# --- non-monotonic sizes ---------------------------------------------------------------------


@pytest.mark.parametrize("quality", ["low", "medium", "high"])
def test_gpt_image_2_landscape_is_cheaper_than_square(book: PriceBook, quality: str) -> None:
    model = model_of(book, "gpt-image-2")
    assert model.output_tokens(quality, "1536x1024") < model.output_tokens(quality, "1024x1024")


@pytest.mark.parametrize("quality", ["low", "medium", "high"])
def test_gpt_image_2_2048_square_is_dearer_than_4k(book: PriceBook, quality: str) -> None:
    model = model_of(book, "gpt-image-2")
    assert model.output_tokens(quality, "2048x2048") > model.output_tokens(quality, "3840x2160")


# --- size rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", ["3840x2160", "2160x3840", "2880x2880", "1024x1024", "3840x1280", "1536x864", "auto"]
)
@pytest.mark.parametrize("name", ["gpt-image-2", "gpt-image-2.5-sunburst"])
def test_custom_size_models_accept_sizes_within_the_rules(
    book: PriceBook, name: str, size: str
) -> None:
    assert model_of(book, name).accepts_size(size)


@pytest.mark.parametrize(
    ("size", "rule"),
    [
        ("1000x1000", "edges must be multiples of 16"),
        ("4096x1024", "no edge over 3840"),
        ("3840x1264", "aspect ratio over 3:1"),
        ("1264x3840", "aspect ratio over 1:3"),
        ("512x512", "fewer than 655,360 pixels"),
        ("3840x2176", "more than 8,294,400 pixels"),
        ("1024X1024", "not WxH"),
        ("1024x", "not WxH"),
        ("-1024x1024", "not WxH"),
        ("0x0", "no pixels"),
        ("large", "not WxH"),
    ],
)
def test_custom_size_models_reject_sizes_outside_the_rules(
    book: PriceBook, size: str, rule: str
) -> None:
    assert not model_of(book, "gpt-image-2").accepts_size(size), rule


def test_a_refused_custom_size_is_told_every_rule_it_must_meet(book: PriceBook) -> None:
    # 2400x784 has edges multiple of 16: the refusal must name the rule it breaks too.
    with pytest.raises(InvalidRequest) as caught:
        model_of(book, "gpt-image-2").validate(request("gpt-image-2", size="2400x784"))
    message = caught.value.message
    for rule in ("multiples of 16", "no edge above 3840", "within 3:1", "655,360 to 8,294,400"):
        assert rule in message
    assert caught.value.param == "size"


@pytest.mark.parametrize("name", ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"])
def test_standard_size_models_reject_custom_sizes(book: PriceBook, name: str) -> None:
    model = model_of(book, name)
    assert not model.accepts_size("2048x2048")
    with pytest.raises(InvalidRequest) as caught:
        model.validate(request(name, size="2048x2048"))
    assert caught.value.param == "size"


# --- quality ladders and validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ladder"),
    [
        ("gpt-image-1", ("low", "medium", "high")),
        ("gpt-image-1.5", ("low", "medium", "high")),
        ("gpt-image-2", ("low", "medium", "high")),
        ("gpt-image-2.5-sunburst", ("low", "medium", "high", "xhigh", "max")),
        ("gpt-image-2.5-flare", ("low", "medium", "high", "xhigh", "max")),
        ("dall-e-3", ("standard", "hd")),
        ("dall-e-2", ("standard",)),
    ],
)
def test_quality_ladder_is_ordered_cheapest_first(
    book: PriceBook, name: str, ladder: tuple[str, ...]
) -> None:
    model = model_of(book, name)
    assert model.qualities == ladder
    assert model.accepts_quality("auto")
    assert model.explicit_quality("auto") == ladder[-1]


@pytest.mark.parametrize(
    ("name", "fields", "param"),
    [
        ("gpt-image-2", {"quality": "xhigh"}, "quality"),
        ("gpt-image-1", {"quality": "hd"}, "quality"),
        ("dall-e-3", {"quality": "high"}, "quality"),
        ("gpt-image-2.5-sunburst", {"quality": "standard"}, "quality"),
        ("gpt-image-2", {"size": "1000x1000"}, "size"),
        ("dall-e-3", {"size": "1536x1024"}, "size"),
        ("dall-e-2", {"size": "1024x1536"}, "size"),
        ("dall-e-3", {"n": 2}, "n"),
        ("gpt-image-2", {"n": 11}, "n"),
        ("gpt-image-2", {"n": 0}, "n"),
    ],
)
def test_validate_refuses_what_the_model_does_not_accept(
    book: PriceBook, name: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        model_of(book, name).validate(request(name, **fields))
    assert caught.value.param == param
    assert name in caught.value.message


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("gpt-image-2.5-sunburst", {"quality": "max", "size": "3840x2160", "n": 10}),
        ("gpt-image-2", {"quality": "auto", "size": "auto"}),
        ("dall-e-3", {"quality": "hd", "size": "1792x1024", "n": 1}),
        ("gpt-image-1", {"quality": "low", "size": "1024x1536"}),
    ],
)
def test_validate_accepts_what_the_model_accepts(
    book: PriceBook, name: str, fields: dict[str, Any]
) -> None:
    model_of(book, name).validate(request(name, **fields))


# --- gpt-image-1's input tile rule (the image-generation guide) --------------------------------


@pytest.mark.parametrize(
    ("width", "height", "fidelity", "tokens"),
    [
        (1024, 1024, "low", 65 + 129),  # → 512x512, one tile
        (1024, 1024, "high", 65 + 129 + 4160),
        (2048, 1024, "low", 65 + 2 * 129),  # → 1024x512, two tiles
        (2048, 1024, "high", 65 + 2 * 129 + 6240),
        (4096, 1024, "low", 65 + 4 * 129),  # fit 2048x512, four tiles
        (256, 256, "low", 65 + 129),  # never scaled up
        (1536, 1024, None, 65 + 2 * 129),  # → 768x512
    ],
)
def test_gpt_image_1_input_tokens_follow_the_tile_rule(
    book: PriceBook, width: int, height: int, fidelity: str | None, tokens: int
) -> None:
    assert model_of(book, "gpt-image-1").input_image_tokens(width, height, fidelity) == tokens


def test_gpt_image_1_input_ceiling_is_the_longest_thin_image_at_high_fidelity(
    book: PriceBook,
) -> None:
    model = model_of(book, "gpt-image-1")
    assert model.input_tiles is not None
    assert model.input_tiles.ceiling == 6821 == 65 + 4 * 129 + 6240
    assert model.input_image_tokens(None, None, "low") == 6821


@pytest.mark.parametrize("name", ["gpt-image-2", "gpt-image-1.5", "gpt-image-2.5-flare"])
def test_models_without_a_published_input_rule_use_their_ceiling(
    book: PriceBook, name: str
) -> None:
    model = model_of(book, name)
    assert model.input_ceiling is not None
    assert model.input_image_tokens(1024, 1024, None) == model.input_ceiling
    assert model.input_image_tokens(None, None, None) == model.input_ceiling


# --- estimate: an upper bound ------------------------------------------------------------------


def test_estimate_counts_one_text_token_per_prompt_byte(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2")
    est = estimate(model, request(prompt_bytes=123, quality="low", size="1024x1024"))
    assert est.usage.text_input == 123
    assert est.usage.image_output == 196
    assert est.cost_nanos == model.cost(est.usage)


def test_estimate_of_auto_quality_is_the_top_of_the_ladder(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2.5-sunburst")
    est = estimate(model, request("gpt-image-2.5-sunburst", quality="auto", size="1024x1024"))
    assert est.usage.image_output == 7024  # `max`


@pytest.mark.parametrize(
    ("name", "worst"), [("gpt-image-1", 6240), ("gpt-image-1.5", 6240), ("gpt-image-1-mini", 6500)]
)
def test_estimate_of_auto_size_on_a_table_model_is_its_worst_size(
    book: PriceBook, name: str, worst: int
) -> None:
    est = estimate(model_of(book, name), request(name, quality="high", size="auto"))
    assert est.usage.image_output == worst


def test_estimate_of_auto_size_on_a_custom_size_model_is_not_below_the_listed_sizes(
    book: PriceBook,
) -> None:
    model = model_of(book, "gpt-image-2")
    est = estimate(model, request(quality="high", size="auto"))
    assert est.usage.image_output >= max(
        model.output_tokens("high", s) for s in ("1024x1024", "1536x1024", "1024x1536")
    )


def test_estimate_adds_100_tokens_per_partial_image_per_image(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2")
    base = request(quality="low", size="1024x1024", n=2, stream=True)
    plain = estimate(model, base)
    partials = estimate(model, base.with_changes(partial_images=3))
    assert partials.usage.image_output - plain.usage.image_output == 3 * 100 * 2


def test_estimate_ignores_partial_images_without_stream(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2")
    est = estimate(model, request(quality="low", size="1024x1024", partial_images=3))
    assert est.usage.image_output == 196


def test_estimate_multiplies_output_by_n(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-2")
    one = estimate(model, request(quality="medium", size="1536x1024", prompt_bytes=10))
    four = estimate(model, request(quality="medium", size="1536x1024", prompt_bytes=10, n=4))
    assert four.usage.image_output == 4 * one.usage.image_output == 4 * 1372
    assert four.usage.images == 4
    assert one.usage.text_input == 10


def test_estimate_bounds_the_input_of_every_image(book: PriceBook) -> None:
    """OpenAI does not say that `n` images bill their prompt and input images once: each
    image is bounded as if billed its own, as each call of the Responses image tool is."""
    model = model_of(book, "gpt-image-1.5")
    edit = request("gpt-image-1.5", endpoint="edits", prompt_bytes=10, images=(InputImage(),), n=1)
    one, four = estimate(model, edit), estimate(model, edit.with_changes(n=4))
    assert one.usage.text_input == 10 and four.usage.text_input == 40
    assert one.usage.image_input == 6821 and four.usage.image_input == 4 * 6821
    assert four.usage.text_output == 4 * one.usage.text_output == 4 * model.text_output_ceiling


def test_estimate_counts_uploaded_images_and_the_mask(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-1")
    image = InputImage(1024, 1024)
    edit = request(
        "gpt-image-1",
        endpoint="edits",
        quality="low",
        size="1024x1024",
        images=(image, InputImage(2048, 1024)),
        input_fidelity="high",
    )
    assert estimate(model, edit).usage.image_input == (194 + 4160) + (323 + 6240)
    masked = estimate(model, edit.with_changes(mask=image)).usage.image_input
    assert masked == (194 + 4160) * 2 + (323 + 6240)
    marked = estimate(model, edit.with_changes(markup=image)).usage.image_input
    assert marked == masked  # a markup is an image OpenAI is given: bounded as one


def test_estimate_gives_url_images_the_ceiling(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-1")
    edit = request("gpt-image-1", endpoint="edits", images=(InputImage(), InputImage()))
    assert estimate(model, edit).usage.image_input == 2 * 6821


def test_estimate_reserves_text_output_where_the_model_bills_it(book: PriceBook) -> None:
    model = model_of(book, "gpt-image-1.5")
    assert model.text_output_ceiling > 0
    est = estimate(model, request("gpt-image-1.5", quality="low", size="1024x1024"))
    assert est.usage.text_output == model.text_output_ceiling


@pytest.mark.parametrize(
    ("name", "quality", "size", "n", "usd"),
    [
        ("dall-e-3", "hd", "1792x1024", 1, "0.12"),
        ("dall-e-3", "standard", "1024x1024", 1, "0.04"),
        ("dall-e-3", "auto", "auto", 1, "0.12"),
        ("dall-e-2", "auto", "512x512", 1, "0.018"),
        ("dall-e-2", "standard", "256x256", 3, "0.048"),
        ("dall-e-2", "auto", "auto", 2, "0.040"),
    ],
)
def test_dalle_estimates_are_per_image_prices(
    book: PriceBook, name: str, quality: str, size: str, n: int, usd: str
) -> None:
    est = estimate(model_of(book, name), request(name, quality=quality, size=size, n=n))
    assert est.cost_nanos == int(Decimal(usd) * 10**9)
    assert est.usage.images == n
    assert est.usage.total_tokens == 0


# --- estimate ≥ what the simulated upstream bills ------------------------------------------------

GPT_MODELS = [m for m in SDK_MODELS if not m.startswith("dall-e")]
CUSTOM_SIZES = ("auto", "1024x1024", "1536x864", "2048x2048", "3840x2160", "1024x3072", "2880x2880")
TABLE_SIZES = ("auto", "1024x1024", "1536x1024", "1024x1536")


def grid() -> list[Any]:
    book = load_price_book()
    cases = []
    for name in GPT_MODELS:
        model = model_of(book, name)
        sizes = CUSTOM_SIZES if model.arbitrary_sizes else TABLE_SIZES
        for quality in (*model.qualities, "auto"):
            for size in sizes:
                cases.append(pytest.param(name, quality, size, id=f"{name}-{quality}-{size}"))
    return cases


@pytest.mark.parametrize(("name", "quality", "size"), grid())
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": 3},
        {"stream": True, "partial_images": 3, "n": 2},
        {"prompt": "ünïcødé " * 50},
        {"prompt": "a lighthouse at dusk, " * 200, "n": 10},
    ],
    ids=["plain", "n3", "partials", "unicode", "long-n10"],
)
def test_estimate_is_never_below_what_the_simulator_bills(
    book: PriceBook, name: str, quality: str, size: str, extra: dict[str, Any]
) -> None:
    fields = {"prompt": "a lighthouse at dusk", "model": name, "quality": quality, "size": size}
    fields.update(extra)
    order = simulator_validate(RawRequest("generations", "json", fields))
    tokens = tokens_for(order)
    billed = Usage(
        text_input=tokens.text_input,
        image_input=tokens.image_input,
        image_output=tokens.output_total,
    )
    parsed = parse_request("generations", "application/json", json.dumps(fields).encode(), "x")
    model = model_of(book, name)
    model.validate(parsed.request)
    assert estimate(model, parsed.request).cost_nanos >= model.cost(billed)


@pytest.mark.parametrize("name", ["gpt-image-1", "gpt-image-1.5", "gpt-image-2.5-flare"])
@pytest.mark.parametrize("fidelity", [None, "low", "high"])
@pytest.mark.parametrize("n", [1, 10])
def test_estimate_of_a_json_edit_is_never_below_what_the_simulator_bills(
    book: PriceBook, name: str, fidelity: str | None, n: int
) -> None:
    fields: dict[str, Any] = {
        "prompt": "add a hat",
        "model": name,
        "images": [{"image_url": "https://example.com/a.png"}, {"file_id": "file-1"}],
        "quality": "auto",
        "n": n,
    }
    if fidelity is not None:
        fields["input_fidelity"] = fidelity
    order = simulator_validate(RawRequest("edits", "json", fields))
    tokens = tokens_for(order)
    billed = Usage(
        text_input=tokens.text_input,
        image_input=tokens.image_input,
        image_output=tokens.output_total,
    )
    parsed = parse_request("edits", "application/json", json.dumps(fields).encode(), "x")
    model = model_of(book, name)
    assert estimate(model, parsed.request).cost_nanos >= model.cost(billed)


# --- a deployment's own price book -------------------------------------------------------------

OVERRIDE = """
    version: 1
    models:
      gpt-image-3:
        source: https://example.com/pricing
        effective_from: 2027-01-01
        aliases: [gpt-image-3-2027-01-01]
        rates: {text_input: "4.00", image_input: "6.00", image_output: "20.00"}
        qualities: [low, high]
        sizes: [1024x1024, 2048x2048]
        output_tokens:
          table:
            low: {1024x1024: 100, 2048x2048: 400}
            high: {1024x1024: 1000, 2048x2048: 4000}
        image_input: {ceiling: 5000}
      gpt-image-2:
        source: negotiated contract 2027
        effective_from: "2027-01-01"
        aliases: [gpt-image-2-2026-04-21]
        rates: {text_input: "2.50", image_input: "4.00", image_output: "15.00"}
        qualities: [low, medium, high]
        sizes: custom
        auto_size: 1536x1536
        output_tokens:
          formula: {low: 16, medium: 48, high: 96}
        image_input: {ceiling: 8192}
"""


def write(tmp_path: Path, text: str, name: str = "prices.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[str]:
    """The problems `load_price_book(path)` raises."""
    with pytest.raises(ConfigError) as caught:
        load_price_book(path)
    return caught.value.problems


def test_override_file_adds_a_new_model(tmp_path: Path) -> None:
    book = load_price_book(write(tmp_path, OVERRIDE))
    model = model_of(book, "gpt-image-3")
    assert model_of(book, "gpt-image-3-2027-01-01") is model
    assert model.effective_from == date(2027, 1, 1)
    assert model.output_tokens("high", "2048x2048") == 4000
    est = estimate(model, request("gpt-image-3", quality="auto", size="auto"))
    assert est.usage.image_output == 4000
    assert model.cost(Usage(image_output=1_000_000)) == 20 * 10**9


def test_override_file_replaces_the_rates_of_a_built_in_model(tmp_path: Path) -> None:
    book = load_price_book(write(tmp_path, OVERRIDE))
    model = model_of(book, "gpt-image-2")
    assert model.source == "negotiated contract 2027"
    assert model.cost(Usage(image_output=7024)) == 105_360_000
    assert model_of(book, "gpt-image-2-2026-04-21") is model
    # Models the file does not name keep their built-in entry.
    assert model_of(book, "gpt-image-1.5").cost(Usage(image_output=4160)) == 133_120_000


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models: {gpt-image-3: [unclosed\n", "YAML syntax error"),
        ("- just\n- a list\n", "models"),
        (
            """
            models:
              gpt-image-3:
                effective_from: 2027-01-01
                rates: {image_output: "20.00"}
                qualities: [low]
                sizes: [1024x1024]
            """,
            "gpt-image-3",
        ),
        (
            """
            models:
              gpt-image-3:
                source: x
                effective_from: not-a-date
                rates: {image_output: "20.00"}
                qualities: [low]
            """,
            "gpt-image-3",
        ),
        (
            """
            models:
              gpt-image-3:
                source: x
                effective_from: 2027-01-01
                rates: {image_output: "twenty"}
                qualities: [low]
            """,
            "gpt-image-3",
        ),
        (
            """
            models:
              gpt-image-3:
                source: x
                effective_from: 2027-01-01
                qualities: [low]
            """,
            "gpt-image-3",
        ),
    ],
    ids=["yaml-syntax", "not-a-mapping", "no-source", "bad-date", "bad-rate", "no-rates"],
)
def test_broken_override_file_raises_config_error_naming_the_file(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = write(tmp_path, text, "team-prices.yaml")
    problems = problems_of(path)
    assert problems
    assert all(str(path) in problem for problem in problems)
    assert needle in "\n".join(problems)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('image_output: "20.00"}', 'image_ouput: "20.00"}',
         "8: models.gpt-image-3.rates.image_ouput: invalid price-book entry: unknown key "
         "'image_ouput' (known: text_input, cached_text_input, image_input, "
         "cached_image_input, image_output, text_output)"),
        ("qualities: [low, high]", "qualities: [low, high]\n    partial_images: 2",
         "10: models.gpt-image-3.partial_images: invalid price-book entry: unknown key "
         "'partial_images' (known: source, "),
        ("      table:\n        low: {1024x1024: 100", "      tabel:\n        low: {1024x1024: 100",
         "12: models.gpt-image-3.output_tokens.tabel: invalid price-book entry: unknown key "
         "'tabel' (known: table, formula, scale, floor)"),
        ("{ceiling: 5000}", "{ceilling: 5000}",
         "15: models.gpt-image-3.image_input.ceilling: invalid price-book entry: unknown key "
         "'ceilling' (known: tiles, ceiling)"),
        ("version: 1", "version: 1\nmainlin: {}",
         "3: mainlin: unknown key (known: version, models, mainline, custom_sizes)"),
    ],
    ids=["rate-kind", "entry", "output-tokens", "image-input", "book"],
)  # fmt: skip
def test_a_misspelt_key_of_a_price_book_is_refused_at_its_line(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    """A rate written `image_ouput` was dropped without a word, and gpt-image-3's images
    priced at its dearest other rate (image input, $6 where $20 was meant); any other
    misspelt key was ignored as well, as unknown keys of the configuration are not."""
    text = textwrap.dedent(OVERRIDE)
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{expected}"), problem


def test_a_book_is_built_from_plain_mappings_without_a_file() -> None:
    fields = {
        "source": "x",
        "effective_from": "2027-01-01",
        "aliases": ["gpt-image-3-2027-01-01"],
        "rates": {"image_output": "20.00"},
        "qualities": ["low"],
        "sizes": "custom",
        "auto_size": "1024x1024",
        "output_tokens": {"formula": {"low": 16}},
        "image_input": {"ceiling": 5000},
    }
    book = price_book([model_prices("gpt-image-3", fields, CustomSizes())])
    model = model_of(book, "gpt-image-3-2027-01-01")
    assert model.name == "gpt-image-3"
    assert model.custom_sizes == CustomSizes()
    assert model.cost(Usage(image_output=1_000_000)) == 20 * 10**9


def test_broken_override_entry_is_reported_at_its_own_line(tmp_path: Path) -> None:
    text = "# negotiated\nmodels:\n  gpt-image-2: {source: contract}\n  gpt-image-3: {source: x}\n"
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}:4: models.gpt-image-3: invalid price-book entry: "
        "ValueError('every entry needs `source` and `effective_from`')"
    ]


def test_missing_override_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    assert problems_of(path) == [f"{path}: cannot read: No such file or directory"]


def test_override_entry_that_is_not_a_mapping_raises_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  gpt-image-3: oops\n")
    assert problems_of(path) == [
        f"{path}:2: models.gpt-image-3: invalid price-book entry: "
        "AttributeError(\"'str' object has no attribute 'get'\")"
    ]


def test_override_entry_without_an_output_token_rule_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        models:
          gpt-image-3:
            source: x
            effective_from: 2027-01-01
            rates: {image_output: "20.00"}
            qualities: [low]
            sizes: [1024x1024]
        """,
    )
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3: models.gpt-image-3: ")
    assert "output_tokens" in problem


def test_costs_are_the_exact_decimal_price_rounded_up_to_a_nano_dollar() -> None:
    """Integer arithmetic over one denominator gives what Decimal arithmetic gives."""
    rng = random.Random(7)
    for model in load_price_book().models.values():
        for _ in range(200):
            draws = [rng.choice((0, 1, 7, rng.randrange(10**7))) for _ in range(8)]
            usage = Usage(*draws[:6], 0, *draws[6:])
            exact = sum(
                (model.rate(k) * usage.tokens(k) * 1000 for k in TOKEN_KINDS),
                Decimal(0),
            )
            exact += model.stand_in_rate(INPUT_KINDS) * usage.unclassified_input * 1000
            exact += model.stand_in_rate(OUTPUT_KINDS) * usage.unclassified_output * 1000
            assert model.cost(usage) == int(exact.to_integral_value(ROUND_CEILING)), model.name


# --- batch rates: the Batch API's prices, every other rule of the entry kept -----------------

BATCH_FIELDS: dict[str, Any] = {
    "source": "x",
    "effective_from": "2027-01-01",
    "aliases": ["gpt-image-3-2027-01-01"],
    "rates": {"text_input": "5.00", "image_input": "8.00", "image_output": "30.00"},
    "batch": {"text_input": "2.50", "image_input": "4.00", "image_output": "15.00"},
    "qualities": ["low", "high"],
    "sizes": "custom",
    "auto_size": "1536x1536",
    "output_tokens": {"formula": {"low": 16, "high": 96}},
    "image_input": {"ceiling": 8192},
}


def batch_model(**fields: Any) -> ModelPrices:
    return model_prices("gpt-image-3", {**BATCH_FIELDS, **fields}, CustomSizes())


def test_an_entry_with_batch_rates_is_priced_at_them_through_the_batch_api() -> None:
    model = batch_model()
    usage = Usage(text_input=1000, image_input=1000, image_output=7024)
    assert model.accepts_batch
    # USD per 1M tokens × 1000 = nano-dollars per token.
    assert model.for_batch().cost(usage) == 1000 * 2500 + 1000 * 4000 + 7024 * 15000
    assert model.cost(usage) == 1000 * 5000 + 1000 * 8000 + 7024 * 30000


def test_for_batch_keeps_everything_but_the_rates() -> None:
    model = batch_model()
    batch = model.for_batch()
    assert batch.rates == model.batch_rates
    assert replace(batch, rates=model.rates) == model
    assert (batch.name, batch.aliases) == ("gpt-image-3", ("gpt-image-3-2027-01-01",))
    assert batch.output_tokens("high", "1024x1024") == model.output_tokens("high", "1024x1024")
    assert batch.accepts_batch


def test_for_batch_is_built_once_per_entry() -> None:
    model = batch_model()
    assert model.for_batch() is model.for_batch()


def test_a_batch_estimate_bounds_the_same_tokens_at_the_batch_rates() -> None:
    model = batch_model()
    req = request("gpt-image-3", quality="auto", size="auto", n=2, prompt_bytes=40)
    standard, batch = estimate(model, req), estimate(model.for_batch(), req)
    assert batch.usage == standard.usage
    assert batch.cost_nanos * 2 == standard.cost_nanos


def test_a_batch_charge_prices_a_kind_without_a_batch_rate_at_the_batch_stand_in() -> None:
    batch = batch_model().for_batch()
    charge = batch.charge(Usage(text_output=100, unclassified_input=10))
    # text_output: the dearest batch output rate; unclassified input: the dearest batch input.
    assert charge.cost_nanos == 100 * 15000 + 10 * 4000
    assert charge.flagged
    assert charge.usage.image_input == 10


@pytest.mark.parametrize("batch", [None, False], ids=["absent", "false"])
def test_an_entry_without_batch_rates_is_refused_by_the_batch_api(batch: bool | None) -> None:
    fields = {k: v for k, v in BATCH_FIELDS.items() if k != "batch"}
    model = model_prices(
        "gpt-image-3", fields if batch is None else {**fields, "batch": batch}, CustomSizes()
    )
    assert not model.accepts_batch
    assert model.batch_rates is None
    with pytest.raises(BatchUnsupported) as caught:
        model.for_batch()
    assert isinstance(caught.value, InvalidRequest)
    assert caught.value.param == "model"
    assert "'gpt-image-3'" in caught.value.message


@pytest.mark.parametrize(
    ("fields", "message", "at"),
    [
        (
            {"batch": True},
            "`batch` must be the Batch API's rates by kind (USD per 1M tokens, as `rates`) or "
            "false where the Batch API does not take the model",
            ("batch",),
        ),
        ({"batch": {}}, "`batch` must be the Batch API's rates", ("batch",)),
        ({"batch": ["text_input"]}, "`batch` must be the Batch API's rates", ("batch",)),
        (
            {"batch": {"text_input": "2.50", "image_output": "15.00"}},
            "`batch` needs a rate for every kind of `rates` (missing: image_input)",
            ("batch",),
        ),
        (
            {"batch": {**BATCH_FIELDS["batch"], "audio_output": "1"}},
            "unknown key 'audio_output' (known: text_input, cached_text_input, image_input, "
            "cached_image_input, image_output, text_output)",
            ("batch", "audio_output"),
        ),
        (
            {"batch": {**BATCH_FIELDS["batch"], "image_output": "half"}},
            "must be a number of USD >= 0, got 'half'",
            ("batch", "image_output"),
        ),
        (
            {"batch": {**BATCH_FIELDS["batch"], "image_output": -1}},
            "must be a number of USD >= 0, got -1",
            ("batch", "image_output"),
        ),
        (
            {"batch": {**BATCH_FIELDS["batch"], "image_output": True}},
            "must be a number of USD >= 0, got True",
            ("batch", "image_output"),
        ),
        (
            {
                "rates": {},
                "output_tokens": {},
                "per_image": {"low": {"1024x1024": "0.04"}},
                "batch": {"image_output": "1"},
            },
            "a per-image model has no token rates to batch: write `batch: false`",
            ("batch",),
        ),
    ],
    ids=[
        "true",
        "empty",
        "a-list",
        "a-kind-of-rates-missing",
        "unknown-kind",
        "not-a-number",
        "negative",
        "boolean-rate",
        "per-image",
    ],
)
def test_batch_rates_the_builder_cannot_read_name_the_key_at_fault(
    fields: dict[str, Any], message: str, at: tuple[str, ...]
) -> None:
    with pytest.raises(EntryError) as caught:
        batch_model(**fields)
    assert str(caught.value).startswith(message)
    assert caught.value.at == at


def test_a_per_image_model_may_say_the_batch_api_does_not_take_it() -> None:
    model = batch_model(
        rates={},
        output_tokens={},
        per_image={"low": {"1024x1024": "0.04"}},
        batch=False,
        qualities=["low"],
        sizes=["1024x1024"],
        auto_size=None,
    )
    assert model.per_image_billing
    assert not model.accepts_batch


# --- batch rates of the built-in book and of a deployment's ------------------------------------

BATCH_MODELS = (
    "gpt-image-2",
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-flare",
    "gpt-image-1.5",
    "chatgpt-image-latest",
    "gpt-image-1",
    "gpt-image-1-mini",
)
NOT_BATCH_MODELS = ("gpt-image-2.6-sunburst", "gpt-image-2.6-flare", "dall-e-3", "dall-e-2")


def test_every_built_in_model_says_whether_the_batch_api_takes_it() -> None:
    assert {*BATCH_MODELS, *NOT_BATCH_MODELS} == set(load_price_book().names())
    written = yaml.safe_load(resources.files("proxy").joinpath("prices.yaml").read_text())
    for name, fields in written["models"].items():
        assert "batch" in fields, name
        assert "batch:" in fields["source"], name


@pytest.mark.parametrize("name", BATCH_MODELS)
def test_the_batch_api_takes_the_gpt_image_models_at_half_their_rates(
    book: PriceBook, name: str
) -> None:
    model = model_of(book, name)
    assert model.accepts_batch
    assert model.batch_rates == {kind: rate / 2 for kind, rate in model.rates.items()}


@pytest.mark.parametrize("name", NOT_BATCH_MODELS)
def test_the_batch_api_refuses_gpt_image_26_and_dalle(book: PriceBook, name: str) -> None:
    model = model_of(book, name)
    assert not model.accepts_batch
    with pytest.raises(BatchUnsupported):
        model.for_batch()


@pytest.mark.parametrize(
    ("name", "usage", "nanos"),
    [
        ("gpt-image-2", Usage(text_input=1000, image_input=1000, image_output=7024), 111_860_000),
        (
            "gpt-image-2-2026-04-21",
            Usage(cached_text_input=1000, cached_image_input=1000),
            1_625_000,
        ),
        ("gpt-image-2.5-sunburst", Usage(image_output=1_000_000), 15 * 10**9),
        ("gpt-image-1.5", Usage(text_input=100, image_output=4160, text_output=200), 67_810_000),
        (
            "chatgpt-image-latest",
            Usage(text_input=100, image_output=4160, text_output=200),
            67_810_000,
        ),
        ("gpt-image-1", Usage(image_input=1000, image_output=6240), 129_800_000),
        (
            "gpt-image-1-mini",
            Usage(cached_text_input=1000, cached_image_input=1000, image_output=272),
            1_313_000,
        ),
    ],
)
def test_batch_costs_are_exact_in_nano_dollars_and_half_the_standard_cost(
    book: PriceBook, name: str, usage: Usage, nanos: int
) -> None:
    model = model_of(book, name)
    charge = model.for_batch().charge(usage)
    assert charge.cost_nanos == nanos
    assert not charge.flagged
    assert model.cost(usage) == 2 * nanos


def test_every_batch_cost_is_half_the_standard_cost_to_the_nano_dollar(book: PriceBook) -> None:
    rng = random.Random(11)
    for name in BATCH_MODELS:
        model = model_of(book, name)
        for _ in range(200):
            draws = [rng.choice((0, 1, 7, rng.randrange(10**7))) for _ in range(8)]
            usage = Usage(*draws[:6], 0, *draws[6:])
            assert model.for_batch().cost(usage) * 2 == model.cost(usage), (name, usage)


@pytest.mark.parametrize("name", BATCH_MODELS)
def test_a_batch_estimate_is_half_the_standard_one(book: PriceBook, name: str) -> None:
    model = model_of(book, name)
    for fields in (
        {"quality": "auto", "size": "auto", "n": 3, "prompt_bytes": 400},
        {"stream": True, "partial_images": 2, "images": (InputImage(None, None),)},
    ):
        req = request(name, **fields)
        assert estimate(model.for_batch(), req).cost_nanos * 2 == estimate(model, req).cost_nanos


@pytest.mark.parametrize("name", BATCH_MODELS)
def test_a_built_in_batch_entry_differs_from_its_model_by_the_rates_only(
    book: PriceBook, name: str
) -> None:
    model = model_of(book, name)
    assert replace(model.for_batch(), rates=model.rates) == model


def test_a_dated_snapshot_gets_its_models_batch_entry(book: PriceBook) -> None:
    batch = model_of(book, "gpt-image-2-2026-04-21").for_batch()
    assert batch is model_of(book, "gpt-image-2").for_batch()
    assert batch.name == "gpt-image-2"


BATCH_OVERRIDE = """
    # negotiated
    models:
      gpt-image-2.6-sunburst:
        batch:
          {text_input: "2.50", cached_text_input: "0.625", image_input: "4.00",
           cached_image_input: "1.00", image_output: "15.00"}
      gpt-image-2:
        batch: false
      gpt-image-1:
        rates: {text_input: "4.00", image_input: "8.00", image_output: "32.00"}
      gpt-image-3:
        source: negotiated contract 2027
        effective_from: 2027-01-01
        rates: {text_input: "4.00", image_output: "20.00"}
        batch: {text_input: "1.00", image_output: "5.00"}
        qualities: [low]
        sizes: [1024x1024]
        output_tokens: {table: {low: {1024x1024: 100}}}
        image_input: {ceiling: 5000}
"""


def test_a_deployment_sets_and_overrides_batch_rates(tmp_path: Path) -> None:
    book = load_price_book(write(tmp_path, BATCH_OVERRIDE))
    sunburst = model_of(book, "gpt-image-2.6-sunburst")
    assert sunburst.for_batch().cost(Usage(image_output=1000)) == 15_000_000
    assert sunburst.cost(Usage(image_output=1000)) == 30_000_000
    # An entry the file does not name keeps its built-in `batch:`, as the alias of 2.6 does.
    assert not model_of(book, "gpt-image-2.6-flare").accepts_batch
    assert not model_of(book, "gpt-image-2").accepts_batch
    assert not model_of(book, "gpt-image-2-2026-04-21").accepts_batch
    assert model_of(book, "gpt-image-3").for_batch().cost(Usage(image_output=100)) == 500_000


def test_a_deployment_that_changes_only_the_rates_keeps_the_built_in_batch_rates(
    tmp_path: Path,
) -> None:
    book = load_price_book(write(tmp_path, BATCH_OVERRIDE))
    model = model_of(book, "gpt-image-1")
    assert model.cost(Usage(image_output=1000)) == 32_000_000
    assert model.for_batch().rates == model_of(load_price_book(), "gpt-image-1").batch_rates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """
            models:
              gpt-image-2:
                batch: true
            """,
            "4: models.gpt-image-2.batch: invalid price-book entry: `batch` must be the Batch "
            "API's rates by kind (USD per 1M tokens, as `rates`) or false where the Batch API "
            "does not take the model",
        ),
        (
            """
            models:
              gpt-image-2:
                batch: {image_output: "15.00"}
            """,
            "4: models.gpt-image-2.batch: invalid price-book entry: `batch` needs a rate for "
            "every kind of `rates` (missing: text_input, cached_text_input, image_input, "
            "cached_image_input)",
        ),
        (
            """
            models:
              gpt-image-2:
                batch:
                  text_input: "2.50"
                  cached_text_input: "0.625"
                  image_input: "4.00"
                  cached_image_input: "1.00"
                  image_output: half
            """,
            "9: models.gpt-image-2.batch.image_output: invalid price-book entry: "
            "must be a number of USD >= 0, got 'half'",
        ),
        (
            """
            models:
              gpt-image-2.6-sunburst:
                batch:
                  image_output: "15.00"
                  video_output: "1.00"
            """,
            "6: models.gpt-image-2.6-sunburst.batch.video_output: invalid price-book entry: "
            "unknown key 'video_output' (known: text_input, cached_text_input, image_input, "
            "cached_image_input, image_output, text_output)",
        ),
        (
            # The built-in `batch:` is kept, and no longer prices every kind of the rates.
            """
            models:
              gpt-image-2:
                rates: {text_input: "5.00", image_input: "8.00", image_output: "30.00",
                        text_output: "10.00"}
                text_output_ceiling: 1000
            """,
            "3: models.gpt-image-2.batch: invalid price-book entry: `batch` needs a rate for "
            "every kind of `rates` (missing: text_output)",
        ),
        (
            """
            models:
              dall-e-3:
                batch: {image_output: "0.02"}
            """,
            "4: models.dall-e-3.batch: invalid price-book entry: a per-image model has no "
            "token rates to batch: write `batch: false`",
        ),
    ],
    ids=[
        "true",
        "a-kind-missing",
        "not-a-number",
        "unknown-kind",
        "rates-gain-a-kind",
        "per-image",
    ],
)
def test_a_broken_batch_entry_is_reported_at_its_own_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, "# negotiated\n" + textwrap.dedent(text).lstrip("\n"))
    assert problems_of(path) == [f"{path}:{expected}"]


# --- mainline models: the Responses API's text model that calls the image tool -------------

BUILT_IN_MAINLINE = {
    *(MAINLINE_MODELS.keys() - BOOKLESS_MAINLINE),
    "gpt-5.4",
    "gpt-5.4-mini",
    "gpt-5.4-nano",
}


def mainline_of(book: PriceBook, name: str) -> MainlinePrices:
    found = book.find_mainline(name)
    assert found is not None, name
    return found


def mainline_usage(uncached: int = 0, cached: int = 0, output: int = 0) -> Usage:
    return Usage(mainline_input=uncached, mainline_cached_input=cached, mainline_output=output)


def test_built_in_book_lists_the_mainline_models_of_the_image_tool(book: PriceBook) -> None:
    assert {m.name for m in book.mainline.values()} == BUILT_IN_MAINLINE


@pytest.mark.parametrize("name", sorted(BUILT_IN_MAINLINE))
def test_every_mainline_entry_has_a_source_a_date_and_the_three_rates(
    book: PriceBook, name: str
) -> None:
    model = mainline_of(book, name)
    assert model.name == name
    assert model.source.startswith("https://developers.openai.com/api/docs/pricing")
    assert isinstance(model.effective_from, date)
    assert set(model.rates) == {"text_input", "cached_text_input", "text_output"}
    assert all(rate > 0 for rate in model.rates.values())
    assert model.rates["cached_text_input"] < model.rates["text_input"]


@pytest.mark.parametrize("name", sorted(BUILT_IN_MAINLINE))
def test_mainline_models_are_not_image_models(book: PriceBook, name: str) -> None:
    assert book.find(name) is None


def test_image_models_are_not_mainline_models(book: PriceBook) -> None:
    assert all(book.find_mainline(name) is None for name in book.names())


def test_mainline_names_are_not_listed_with_the_image_models(book: PriceBook) -> None:
    assert not set(book.names()) & BUILT_IN_MAINLINE


@pytest.mark.parametrize(
    ("name", "uncached", "cached", "output", "nanos"),
    [
        # 1820 × $5/M + 210 × $30/M
        ("gpt-5.5", 1820, 0, 210, 1820 * 5_000 + 210 * 30_000),
        ("gpt-5.5", 1000, 800, 50, 1000 * 5_000 + 800 * 500 + 50 * 30_000),
        ("gpt-5", 1000, 500, 300, 1000 * 1_250 + 500 * 125 + 300 * 10_000),
        ("gpt-5-mini", 2000, 0, 700, 2000 * 250 + 700 * 2_000),
        ("gpt-5-nano", 1, 1, 1, 50 + 5 + 400),
        ("gpt-5.4", 1000, 1000, 1000, 2_500_000 + 250_000 + 15_000_000),
        ("gpt-5.4-mini", 1000, 1000, 1000, 750_000 + 75_000 + 4_500_000),
        ("gpt-5.4-nano", 1000, 1000, 1000, 200_000 + 20_000 + 1_250_000),
        ("o3", 10, 10, 10, 20_000 + 5_000 + 80_000),
        ("gpt-4.1", 10, 10, 10, 20_000 + 5_000 + 80_000),
        ("gpt-4.1-mini", 10, 10, 10, 4_000 + 1_000 + 16_000),
        ("gpt-4.1-nano", 10, 10, 10, 1_000 + 250 + 4_000),
        ("gpt-4o", 10, 10, 10, 25_000 + 12_500 + 100_000),
        ("gpt-4o-mini", 1, 1, 1, 150 + 75 + 600),
        ("gpt-5.5", 0, 0, 0, 0),
    ],
)
def test_mainline_cost_is_exact_in_nano_dollars(
    book: PriceBook, name: str, uncached: int, cached: int, output: int, nanos: int
) -> None:
    assert mainline_of(book, name).cost(mainline_usage(uncached, cached, output)) == nanos


def test_mainline_cost_ignores_the_image_tools_tokens(book: PriceBook) -> None:
    usage = Usage(text_input=1000, image_output=4160, mainline_input=100, mainline_output=10)
    assert mainline_of(book, "gpt-5").cost(usage) == 100 * 1_250 + 10 * 10_000


@pytest.mark.parametrize(
    ("uncached", "cached", "output", "nanos"),
    [
        (272_000, 0, 100, 272_000 * 5_000 + 100 * 30_000),
        (272_001, 0, 100, 272_001 * 10_000 + 100 * 45_000),
        # Cached tokens are input: they count toward the threshold, and are priced at the
        # long-context cached rate once it is passed.
        (271_000, 1_000, 100, 271_000 * 5_000 + 1_000 * 500 + 100 * 30_000),
        (271_000, 1_001, 100, 271_000 * 10_000 + 1_001 * 1_000 + 100 * 45_000),
        (0, 272_001, 0, 272_001 * 1_000),
    ],
    ids=["at-the-threshold", "one-above", "cached-at", "cached-above", "all-cached-above"],
)
def test_gpt_55_bills_the_whole_request_at_long_context_rates_above_272k_input(
    book: PriceBook, uncached: int, cached: int, output: int, nanos: int
) -> None:
    assert mainline_of(book, "gpt-5.5").cost(mainline_usage(uncached, cached, output)) == nanos


@pytest.mark.parametrize(
    ("uncached", "cached", "output", "nanos"),
    [
        (272_000, 0, 100, 272_000 * 2_500 + 100 * 15_000),
        (272_001, 0, 100, 272_001 * 5_000 + 100 * 22_500),
        (271_000, 1_001, 100, 271_000 * 5_000 + 1_001 * 500 + 100 * 22_500),
    ],
    ids=["at-the-threshold", "one-above", "cached-above"],
)
def test_gpt_54_bills_the_whole_request_at_2x_input_and_1_5x_output_above_272k_input(
    book: PriceBook, uncached: int, cached: int, output: int, nanos: int
) -> None:
    """OpenAI's model page: GPT-5.4 (1.05M context) prices prompts above 272K input tokens
    at 2x input and 1.5x output for the whole request."""
    assert mainline_of(book, "gpt-5.4").cost(mainline_usage(uncached, cached, output)) == nanos


@pytest.mark.parametrize("name", sorted(BUILT_IN_MAINLINE - {"gpt-5.5", "gpt-5.4"}))
def test_models_without_long_context_rates_keep_their_rates_at_any_length(
    book: PriceBook, name: str
) -> None:
    model = mainline_of(book, name)
    assert model.long_context is None
    assert model.rates_for(10**7) == model.rates


@pytest.mark.parametrize(
    ("snapshot", "canonical"),
    [
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("o3-2025-04-16", "o3"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ],
)
def test_dated_mainline_snapshots_resolve_to_the_canonical_entry(
    book: PriceBook, snapshot: str, canonical: str
) -> None:
    assert mainline_of(book, snapshot) is mainline_of(book, canonical)
    assert mainline_of(book, snapshot).name == canonical


def test_an_unknown_mainline_model_is_not_found(book: PriceBook) -> None:
    assert book.find_mainline("gpt-9") is None


MAINLINE_FIELDS: dict[str, Any] = {
    "source": "negotiated contract 2027",
    "effective_from": "2027-01-01",
    "aliases": ["gpt-6-2027-01-01"],
    "rates": {"text_input": "3.00", "cached_text_input": "0.30", "text_output": "12.00"},
}


def test_a_mainline_model_is_built_from_a_plain_mapping() -> None:
    model = mainline_prices("gpt-6", MAINLINE_FIELDS)
    book = price_book([], [model])
    assert mainline_of(book, "gpt-6-2027-01-01") is model
    assert model.effective_from == date(2027, 1, 1)
    assert model.rates == {
        "text_input": Decimal("3.00"),
        "cached_text_input": Decimal("0.30"),
        "text_output": Decimal("12.00"),
    }
    assert model.cost(mainline_usage(10**6, 10**6, 10**6)) == (3 + Decimal("0.3") + 12) * 10**9


def test_mainline_cost_rounds_fractional_nanos_up() -> None:
    # $0.0001/M is a tenth of a nano-dollar per token.
    rates = {"text_input": "0.0001", "cached_text_input": "0.00001", "text_output": "0.0003"}
    model = mainline_prices("cheap", {**MAINLINE_FIELDS, "rates": rates})
    assert model.cost(mainline_usage(uncached=1)) == 1
    assert model.cost(mainline_usage(uncached=10)) == 1
    assert model.cost(mainline_usage(uncached=11)) == 2
    assert model.cost(mainline_usage(cached=1)) == 1
    assert model.cost(mainline_usage(output=4)) == 2  # 1.2 nanos
    # Rounded once, on the sum: 0.1 + 0.01 + 0.3 = 0.41 nanos.
    assert model.cost(mainline_usage(1, 1, 1)) == 1


def test_cached_input_without_its_own_rate_costs_the_input_rate() -> None:
    rates = {"text_input": "2.00", "text_output": "8.00"}
    model = mainline_prices("no-cache", {**MAINLINE_FIELDS, "rates": rates})
    assert model.cost(mainline_usage(cached=1000)) == model.cost(mainline_usage(uncached=1000))


def test_cache_writes_cost_their_own_rate_where_the_entry_gives_one() -> None:
    """From gpt-5.6 on, OpenAI bills the input it writes to the prompt cache at 1.25x the
    input rate: `cache_write_input`. Without it, a written token costs the input rate (no
    model before gpt-5.6 bills its writes)."""
    rates = {**MAINLINE_FIELDS["rates"], "cache_write_input": "3.75"}
    model = mainline_prices("gpt-5.6", {**MAINLINE_FIELDS, "rates": rates})
    written = Usage(mainline_input=1000, mainline_cache_write=400, mainline_output=10)
    assert model.cost(written) == 600 * 3_000 + 400 * 3_750 + 10 * 12_000
    # A written count above the uncached input is not believed past it.
    assert model.cost(replace(written, mainline_cache_write=5000)) == 1000 * 3_750 + 10 * 12_000
    plain = mainline_prices("gpt-6", MAINLINE_FIELDS)
    assert plain.cost(written) == plain.cost(replace(written, mainline_cache_write=0))


def test_long_context_and_batch_rates_carry_the_cache_write_premium() -> None:
    """Rates that give no write rate of their own keep the entry's ratio to their input."""
    rates = {**MAINLINE_FIELDS["rates"], "cache_write_input": "3.75"}
    long = {"above_input_tokens": 100, "rates": {"text_input": "6.00", "text_output": "24.00"}}
    batch = {"text_input": "1.50", "text_output": "6.00"}
    fields = {**MAINLINE_FIELDS, "rates": rates, "long_context": long, "batch": batch}
    model = mainline_prices("gpt-5.6", fields)
    assert model.cost(Usage(mainline_input=200, mainline_cache_write=200)) == 200 * 7_500
    assert model.for_batch().cost(Usage(mainline_input=10, mainline_cache_write=10)) == 10 * 1_875
    assert model.for_batch().rates["cache_write_input"] == Decimal("1.875")


def test_long_context_rates_are_built_from_a_plain_mapping() -> None:
    long = {"above_input_tokens": 100, "rates": {"text_input": "6.00", "text_output": "24.00"}}
    model = mainline_prices("gpt-6", {**MAINLINE_FIELDS, "long_context": long})
    assert model.cost(mainline_usage(uncached=100)) == 100 * 3_000
    # Without a long-context cached rate, cached tokens cost its input rate.
    assert model.cost(mainline_usage(uncached=100, cached=1)) == 101 * 6_000


@pytest.mark.parametrize(
    ("fields", "message", "at"),
    [
        ({"source": ""}, "every entry needs `source` and `effective_from`", ()),
        ({"effective_from": None}, "every entry needs `source` and `effective_from`", ()),
        ({"rates": None}, "`rates` needs text_input and text_output", ("rates",)),
        (
            {"rates": {"text_input": "1.00"}},
            "`rates` needs text_input and text_output",
            ("rates",),
        ),
        (
            {"rates": {"text_input": "one", "text_output": "8.00"}},
            "must be a number of USD >= 0, got 'one'",
            ("rates", "text_input"),
        ),
        (
            {"rates": {"text_input": "-1", "text_output": "8.00"}},
            "must be a number of USD >= 0, got '-1'",
            ("rates", "text_input"),
        ),
        (
            {"rates": {"text_input": "NaN", "text_output": "8.00"}},
            "must be a number of USD >= 0, got 'NaN'",
            ("rates", "text_input"),
        ),
        (
            {"rates": {"text_input": True, "text_output": "8.00"}},
            "must be a number of USD >= 0, got True",
            ("rates", "text_input"),
        ),
        (
            {"rates": {"text_input": "1", "text_output": "8", "image_output": "30"}},
            "unknown key 'image_output' (known: text_input, cached_text_input, text_output, "
            "cache_write_input)",
            ("rates", "image_output"),
        ),
        (
            {"qualities": ["low"]},
            "unknown key 'qualities' (known: source, effective_from, released, rates, "
            "long_context, aliases, batch, reasoning_context)",
            ("qualities",),
        ),
        ({"aliases": "gpt-6-latest"}, "`aliases` must be a list of model names", ("aliases",)),
        (
            {"long_context": {"above_input_tokens": 0, "rates": {}}},
            "`above_input_tokens` must be an integer >= 1, got 0",
            ("long_context", "above_input_tokens"),
        ),
        (
            {"long_context": {"above_input_tokens": 10, "rates": {"text_input": "1"}}},
            "`rates` needs text_input and text_output",
            ("long_context", "rates"),
        ),
        (
            {"long_context": {"above": 10}},
            "unknown key 'above' (known: above_input_tokens, rates)",
            ("long_context", "above"),
        ),
    ],
)
def test_a_mainline_entry_the_builder_cannot_read_names_the_key_at_fault(
    fields: dict[str, Any], message: str, at: tuple[str, ...]
) -> None:
    with pytest.raises(EntryError) as caught:
        mainline_prices("gpt-6", {**MAINLINE_FIELDS, **fields})
    assert str(caught.value).startswith(message)
    assert caught.value.at == at


def test_a_mainline_models_reasoning_context_is_current_turn_unless_written() -> None:
    """What the model reasons over when a request leaves `reasoning.context` to it: the
    gpt-5.6 family's default is `all_turns`, earlier models' `current_turn`."""
    assert mainline_prices("gpt-6", MAINLINE_FIELDS).reasoning_context == "current_turn"
    fields = {**MAINLINE_FIELDS, "reasoning_context": "all_turns"}
    assert mainline_prices("gpt-5.6", fields).reasoning_context == "all_turns"
    book = load_price_book()
    assert {book.mainline[name].reasoning_context for name in book.mainline} == {"current_turn"}


@pytest.mark.parametrize("raw", ["auto", "all_turn", True, ["all_turns"], None])
def test_a_reasoning_context_other_than_a_mode_is_refused(raw: Any) -> None:
    """`auto` is what a request says to leave it to the model: the book says what that is."""
    with pytest.raises(EntryError) as caught:
        mainline_prices("gpt-5.6", {**MAINLINE_FIELDS, "reasoning_context": raw})
    assert str(caught.value) == (
        f"`reasoning_context` is one of current_turn, all_turns, got {raw!r}"
    )
    assert caught.value.at == ("reasoning_context",)


@pytest.mark.parametrize("raw", [None, "gpt-6", ["rates"]])
def test_a_mainline_entry_that_is_not_a_mapping_is_refused(raw: Any) -> None:
    with pytest.raises(ENTRY_ERRORS):
        mainline_prices("gpt-6", raw)


def test_a_mainline_entry_with_a_bad_date_is_refused() -> None:
    with pytest.raises(ENTRY_ERRORS):
        mainline_prices("gpt-6", {**MAINLINE_FIELDS, "effective_from": "someday"})


# --- mainline models in a deployment's price book -------------------------------------------

BUILT_IN_LINE = {
    name: f"proxy/prices.yaml:{number}"
    for number, line in enumerate(
        resources.files("proxy").joinpath("prices.yaml").read_text().splitlines(), 1
    )
    for name in ("gpt-image-2", "gpt-5.5", "gpt-image-1")
    if line == f"  {name}:"
}

MAINLINE_OVERRIDE = """
    # negotiated rates: mainline models only
    mainline:
      gpt-6:
        source: negotiated contract 2027
        effective_from: 2027-01-01
        aliases: [gpt-6-2027-01-01]
        rates: {text_input: "3.00", cached_text_input: "0.30", text_output: "12.00"}
      gpt-5:
        rates: {text_input: "1.00", cached_text_input: "0.10", text_output: "8.00"}
"""


def test_override_file_adds_a_mainline_model(tmp_path: Path) -> None:
    book = load_price_book(write(tmp_path, MAINLINE_OVERRIDE))
    model = mainline_of(book, "gpt-6")
    assert mainline_of(book, "gpt-6-2027-01-01") is model
    assert model.source == "negotiated contract 2027"
    assert model.cost(mainline_usage(1000, 1000, 1000)) == 3_000_000 + 300_000 + 12_000_000
    # A file with `mainline:` only keeps every built-in image model.
    assert set(book.names()) == set(load_price_book().names())


def test_override_file_changes_the_rates_of_a_built_in_mainline_model(tmp_path: Path) -> None:
    book = load_price_book(write(tmp_path, MAINLINE_OVERRIDE))
    model = mainline_of(book, "gpt-5")
    assert model.cost(mainline_usage(1000, 1000, 1000)) == 1_000_000 + 100_000 + 8_000_000
    # The keys the file does not name are the built-in entry's, its aliases too.
    assert model.effective_from == date(2025, 8, 7)
    assert model.source == "https://developers.openai.com/api/docs/pricing"
    assert mainline_of(book, "gpt-5-2025-08-07") is model
    # Models the file does not name keep their built-in entry.
    assert mainline_of(book, "gpt-5.5").cost(mainline_usage(uncached=1)) == 5_000


def test_a_deployment_may_say_a_built_in_mainline_model_reasons_over_all_turns(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "mainline:\n  gpt-5.5:\n    reasoning_context: all_turns\n")
    model = mainline_of(load_price_book(path), "gpt-5.5")
    assert model.reasoning_context == "all_turns"
    assert model.rates == mainline_of(load_price_book(), "gpt-5.5").rates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """
            mainline:
              gpt-6:
                effective_from: 2027-01-01
                rates: {text_input: "3.00", text_output: "12.00"}
            """,
            "3: mainline.gpt-6: invalid price-book entry: "
            "every entry needs `source` and `effective_from`",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                rates: {text_input: "3.00", text_output: "12.00"}
            """,
            "3: mainline.gpt-6: invalid price-book entry: "
            "every entry needs `source` and `effective_from`",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: 2027-01-01
            """,
            "3: mainline.gpt-6.rates: invalid price-book entry: `rates` needs text_input and "
            "text_output (and cached_text_input where the model discounts cached input), "
            "USD per 1M tokens",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: 2027-01-01
                rates:
                  text_input: "3.00"
                  text_output: twelve
            """,
            "8: mainline.gpt-6.rates.text_output: invalid price-book entry: "
            "must be a number of USD >= 0, got 'twelve'",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: 2027-01-01
                rates: {text_input: "3.00", text_output: "12.00"}
                long_context: {above_input_tokens: 1000, rates: {text_input: "6.00"}}
            """,
            "7: mainline.gpt-6.long_context.rates: invalid price-book entry: `rates` needs "
            "text_input and text_output (and cached_text_input where the model discounts "
            "cached input), USD per 1M tokens",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: 2027-01-01
                rates: {text_input: "3.00", text_output: "12.00"}
                long_context:
                  above_input_tokens: lots
                  rates: {text_input: "6.00", text_output: "24.00"}
            """,
            "8: mainline.gpt-6.long_context.above_input_tokens: invalid price-book entry: "
            "`above_input_tokens` must be an integer >= 1, got 'lots'",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: 2027-01-01
                rates: {text_input: "3.00", text_output: "12.00"}
                qualities: [low]
            """,
            "7: mainline.gpt-6.qualities: invalid price-book entry: unknown key 'qualities' "
            "(known: source, effective_from, released, rates, long_context, aliases, batch, "
            "reasoning_context)",
        ),
        (
            """
            mainline:
              gpt-5.6:
                source: x
                effective_from: 2027-01-01
                rates: {text_input: "3.00", text_output: "12.00"}
                reasoning_context: all_turn
            """,
            "7: mainline.gpt-5.6.reasoning_context: invalid price-book entry: "
            "`reasoning_context` is one of current_turn, all_turns, got 'all_turn'",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: someday
                rates: {text_input: "3.00", text_output: "12.00"}
            """,
            "3: mainline.gpt-6: invalid price-book entry: "
            "ValueError(\"Invalid isoformat string: 'someday'\")",
        ),
        (
            """
            mainline:
              gpt-image-2:
                source: x
                effective_from: 2027-01-01
                rates: {text_input: "3.00", text_output: "12.00"}
            """,
            "3: mainline.gpt-image-2: 'gpt-image-2' is also an image model "
            f"(models.gpt-image-2 at {BUILT_IN_LINE['gpt-image-2']}); a name prices one model",
        ),
        (
            """
            mainline:
              gpt-6:
                source: x
                effective_from: 2027-01-01
                aliases: [gpt-image-2-2026-04-21]
                rates: {text_input: "3.00", text_output: "12.00"}
            """,
            "3: mainline.gpt-6: 'gpt-image-2-2026-04-21' is also an image model "
            f"(models.gpt-image-2 at {BUILT_IN_LINE['gpt-image-2']}); a name prices one model",
        ),
        ("mainline: [gpt-6]\n", "2: mainline: `mainline:` must be a mapping of models"),
        ("version: 1\n", "2: a price book needs a `models:` or `mainline:` mapping"),
    ],
    ids=[
        "no-source",
        "no-date",
        "no-rates",
        "rate-not-a-number",
        "long-context-rates-incomplete",
        "long-context-threshold",
        "unknown-key",
        "reasoning-context",
        "bad-date",
        "an-image-models-name",
        "an-image-models-alias",
        "section-not-a-mapping",
        "no-section",
    ],
)
def test_broken_mainline_entry_is_reported_at_its_own_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, "# negotiated\n" + textwrap.dedent(text).lstrip("\n"))
    assert problems_of(path) == [f"{path}:{expected}"]


def test_an_image_model_added_with_a_mainline_models_name_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, OVERRIDE.replace("gpt-image-3:", "gpt-5.5:", 1))
    assert problems_of(path) == [
        f"{BUILT_IN_LINE['gpt-5.5']}: mainline.gpt-5.5: 'gpt-5.5' is also an "
        f"image model (models.gpt-5.5 at {path}:4); a name prices one model"
    ]


def test_every_broken_entry_of_both_sections_is_reported_at_once(tmp_path: Path) -> None:
    text = """
        models:
          gpt-image-3: {source: x}
        mainline:
          gpt-6: {source: x}
          gpt-7: {source: x, effective_from: 2027-01-01, rates: {text_input: "1"}}
    """
    path = write(tmp_path, text.lstrip("\n"))
    problems = problems_of(path)
    assert [p.split(": ")[0:2] for p in problems] == [
        [f"{path}:2", "models.gpt-image-3"],
        [f"{path}:4", "mainline.gpt-6"],
        [f"{path}:5", "mainline.gpt-7.rates"],
    ]


@pytest.mark.parametrize(
    ("alias", "owner"),
    [("gpt-image-1", "gpt-image-1"), ("gpt-image-2-2026-04-21", "gpt-image-2")],
    ids=["a-models-name", "a-models-alias"],
)
def test_an_alias_cannot_reprice_another_image_model(
    tmp_path: Path, alias: str, owner: str
) -> None:
    # A cheap entry whose alias is a real model's name would price every request for that
    # model at its own rates, while OpenAI bills the real model's.
    path = write(tmp_path, OVERRIDE.replace("[gpt-image-3-2027-01-01]", f"[{alias}]", 1))
    path.write_text(path.read_text().split("  gpt-image-2:\n")[0])
    assert problems_of(path) == [
        f"{path}:4: models.gpt-image-3: '{alias}' is also '{owner}' "
        f"(models.{owner} at {BUILT_IN_LINE[owner]}); a name prices one model"
    ]


def test_a_new_model_cannot_take_a_dated_snapshots_name(tmp_path: Path) -> None:
    path = write(tmp_path, OVERRIDE.replace("gpt-image-3:", "gpt-image-2-2026-04-21:", 1))
    assert problems_of(path) == [
        f"{path}:4: models.gpt-image-2-2026-04-21: 'gpt-image-2-2026-04-21' is also "
        f"'gpt-image-2' (models.gpt-image-2 at {path}:16); a name prices one model"
    ]


def test_two_mainline_models_cannot_share_a_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        mainline:
          cheap-text:
            source: x
            effective_from: 2027-01-01
            aliases: [gpt-5]
            rates: {text_input: "0.01", text_output: "0.01"}
        """,
    )
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3: mainline.cheap-text: 'gpt-5' is also 'gpt-5' (")


def test_an_entry_may_repeat_its_own_name_as_an_alias(tmp_path: Path) -> None:
    path = write(tmp_path, OVERRIDE.replace("[gpt-image-3-2027-01-01]", "[gpt-image-3]", 1))
    assert load_price_book(path).find("gpt-image-3") is not None


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [(1250, 2501, 65 + 129 * 3), (2501, 1250, 65 + 129 * 3), (1024, 1024, 194), (2048, 1024, 323)],
)
def test_input_tiles_are_counted_rounding_scaled_sides_up(
    book: PriceBook, width: int, height: int, tokens: int
) -> None:
    # 1250x2501 scales to 512 x 1024.41: two tiles if the side is rounded, three if it is
    # rounded up. The published rule does not say which, so the bound counts three.
    rule = model_of(book, "gpt-image-1").input_tiles
    assert rule is not None
    assert rule.tokens(width, height, False) == tokens


def test_input_tiles_never_pass_the_ceiling(book: PriceBook) -> None:
    rule = model_of(book, "gpt-image-1").input_tiles
    assert rule is not None
    sides = [1, 511, 512, 513, 1023, 1025, 2047, 2048, 2049, 2501, 4097, 30_000]
    assert max(rule.tokens(w, h, True) for w in sides for h in sides) == rule.ceiling


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "        image_input: {ceiling: 5000}\n",
            "",
            "a token-priced entry needs `image_input` (the `tiles` rule or a per-image `ceiling`)",
        ),
        (
            'image_output: "20.00"}',
            'image_output: "20.00", text_output: "10.00"}',
            "an entry with a `text_output` rate needs a `text_output_ceiling`",
        ),
    ],
    ids=["no-image-input", "text-output-unbounded"],
)
def test_a_new_model_must_bound_its_input_images_and_text_output(
    tmp_path: Path, old: str, new: str, problem: str
) -> None:
    # Otherwise an edit of 16 URL images, or a model that bills text output, would reserve
    # nothing for tokens OpenAI bills.
    new_model = OVERRIDE.split("      gpt-image-2:\n")[0]
    path = write(tmp_path, new_model.replace(old, new, 1))
    assert problems_of(path) == [
        f"{path}:4: models.gpt-image-3: invalid price-book entry: ValueError('{problem}')"
    ]


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        (
            "  gpt-image-2:\n    qualities: [low, medium, high, ultra]\n",
            "2: models.gpt-image-2: invalid price-book entry: "
            "ValueError(\"quality 'ultra' at size 'auto' has no output token count\")",
        ),
        (
            "  gpt-image-1:\n    sizes: [1024x1024, 2048x2048]\n",
            "2: models.gpt-image-1: invalid price-book entry: "
            "ValueError(\"quality 'low' at size '2048x2048' has no output token count\")",
        ),
        (
            "  dall-e-3:\n    qualities: [standard, hd, ultra]\n",
            "2: models.dall-e-3: invalid price-book entry: "
            "ValueError(\"quality 'ultra' at size '1024x1024' has no price\")",
        ),
    ],
    ids=["quality-without-factor", "size-without-count", "per-image-quality-without-price"],
)
def test_a_ladder_or_size_the_table_lacks_is_refused_when_loaded(
    tmp_path: Path, override: str, problem: str
) -> None:
    # Otherwise every request for the model at that quality or size, and every `auto` one,
    # would fail when it is priced.
    path = write(tmp_path, "models:\n" + override)
    assert problems_of(path) == [f"{path}:{problem}"]


def test_a_mainline_entrys_batch_rates_price_a_batch_line_and_without_them_it_is_refused() -> None:
    fields = {
        "source": "s",
        "effective_from": "2026-01-01",
        "rates": {"text_input": "2.00", "cached_text_input": "0.50", "text_output": "8.00"},
        "batch": {"text_input": "1.00", "cached_text_input": "0.25", "text_output": "4.00"},
    }
    entry = mainline_prices("gpt-x", fields)
    usage = Usage(mainline_input=1000, mainline_cached_input=1000, mainline_output=1000)
    assert entry.accepts_batch and entry.for_batch().cost(usage) * 2 == entry.cost(usage)
    for closed in (False, None):
        entry = mainline_prices("gpt-x", {**fields, "batch": closed})
        assert not entry.accepts_batch
        with pytest.raises(BatchUnsupported, match="gpt-x"):
            entry.for_batch()
    with pytest.raises(ValueError, match="text_output"):
        mainline_prices("gpt-x", {**fields, "batch": {"text_input": "1.00"}})
    book = load_price_book()
    for name, found in book.mainline.items():  # the built-in book: 50 % of Standard
        assert found.batch_rates is not None, name
        assert {k: v * 2 for k, v in found.batch_rates.items()} == dict(found.rates), name


def test_a_mainline_models_long_context_rates_are_scaled_to_its_batch_rates() -> None:
    found = load_price_book().find_mainline("gpt-5.5")
    assert found is not None and found.long_context is not None
    batch = found.for_batch()
    assert batch.long_context is not None
    assert batch.long_context.above_input_tokens == found.long_context.above_input_tokens
    long = Usage(mainline_input=300_000, mainline_output=1000)
    assert batch.cost(long) * 2 == found.cost(long)  # half of the long-context rates too
    assert batch.rates_for(300_000) is batch.long_context.rates


# --- data residency: regional endpoints bill models released on or after 2026-03-05 +10 % --


def test_every_entry_has_the_release_date_the_simulated_upstream_bills_its_uplift_by(
    book: PriceBook,
) -> None:
    """The price book and the simulator write the models' release dates apart: they agree."""
    dated = {**book.models, **book.mainline}
    assert {name: dated[name].released for name in RELEASED} == dict(RELEASED)


def test_a_regional_book_uplifts_models_released_since_march_2026_rounding_once(
    book: PriceBook,
) -> None:
    regional = book.at_data_residency()
    usage = Usage(text_input=1, image_output=1)  # 35 micro-dollars, 38.5 at 110 %
    assert model_of(regional, "gpt-image-2-2026-04-21").cost(usage) == 38_500
    assert model_of(regional, "gpt-image-2.6-flare").cost(usage) == 38_500
    assert model_of(regional, "gpt-image-1.5").cost(usage) == 37_000
    # undated: a pointer to ChatGPT's current image model
    assert model_of(book, "chatgpt-image-latest").released is None
    assert model_of(regional, "chatgpt-image-latest").cost(usage) == 40_700
    # a cached text token in a batch: 0.625 USD per 1M, 687.5 nanos at 110 %, rounded up
    batch = model_of(regional, "gpt-image-2").for_batch()
    assert batch.cost(Usage(cached_text_input=1)) == 688
    assert batch.cost(Usage(cached_text_input=2)) == 1_375
    per_image = model_of(regional, "dall-e-3")
    assert per_image.image_price_nanos("hd", "1024x1024") == 80_000_000
    line = mainline_of(regional, "gpt-5.4-mini").for_batch()
    # 0.0375 USD per 1M × 1.1 = 41.25 nanos a token
    assert line.cost(Usage(mainline_cached_input=1)) == 42
    assert line.cost(Usage(mainline_cached_input=4)) == 165
    long = mainline_of(regional, "gpt-5.5")
    assert long.cost(Usage(mainline_input=272_001)) == 272_001 * 11_000
    assert long.for_batch().cost(Usage(mainline_input=272_001)) == 272_001 * 5_500
    assert model_of(regional, "gpt-image-2").for_batch().cost(usage) == 19_250


def test_an_entry_without_a_release_date_is_uplifted_on_a_regional_endpoint() -> None:
    """What Tollgate cannot date, it prices at the higher rate there."""
    undated = batch_model()
    dated = batch_model(released="2026-03-04")
    line = mainline_prices("gpt-6", MAINLINE_FIELDS)
    regional = price_book([undated, replace(dated, name="old")], [line]).at_data_residency()
    usage = Usage(image_output=1_000)
    assert model_of(regional, "gpt-image-3").cost(usage) == 33_000_000
    assert model_of(regional, "old").cost(usage) == 30_000_000
    assert mainline_of(regional, "gpt-6").cost(Usage(mainline_output=1_000)) == 13_200_000


def test_a_release_date_that_is_not_a_date_is_refused() -> None:
    with pytest.raises(EntryError, match="`released` must be a date"):
        mainline_prices("gpt-6", {**MAINLINE_FIELDS, "released": "March"})


def test_endpoints_name_the_images_endpoints_a_model_takes(book: PriceBook, tmp_path: Path) -> None:
    """Variations take dall-e-2 only, edits never dall-e-3; a deployment may list them, and
    anything else is refused at its own line."""
    assert model_of(book, "dall-e-2").endpoints == ("generations", "edits", "variations")
    assert model_of(book, "dall-e-3").endpoints == ("generations",)
    two = model_of(book, "gpt-image-2")
    assert two.takes_endpoint("edits") and not two.takes_endpoint("variations")
    assert two.takes_endpoint("responses")  # the image tool is checked by its own door
    with pytest.raises(InvalidRequest) as caught:
        book.check_endpoint(two, "variations")
    assert caught.value.param == "model"
    assert caught.value.message.endswith("/v1/images/variations takes dall-e-2.")
    text = "models:\n  gpt-image-1:\n    endpoints: [generations]\n"
    assert model_of(load_price_book(write(tmp_path, text)), "gpt-image-1").endpoints == (
        "generations",
    )
    path = write(tmp_path, "models:\n  gpt-image-1:\n    endpoints: [responses]\n")
    assert problems_of(path) == [
        f"{path}:3: models.gpt-image-1.endpoints: invalid price-book entry: `endpoints` is a "
        "list of the Images API endpoints the model takes (generations, edits, variations)"
    ]


def test_input_fidelity_names_the_values_a_model_takes(book: PriceBook, tmp_path: Path) -> None:
    """gpt-image-1-mini takes `input_fidelity` `low` only, gpt-image-2 none; a deployment
    may write either form, and anything else is refused at its own line."""
    mini, two = model_of(book, "gpt-image-1-mini"), model_of(book, "gpt-image-2")
    assert mini.takes_input_fidelity("low") and not mini.takes_input_fidelity("high")
    assert mini.takes_input_fidelity(None) and mini.accepts_input_fidelity
    assert not two.accepts_input_fidelity and not two.takes_input_fidelity("low")
    assert model_of(book, "gpt-image-1.5").takes_input_fidelity("high")
    text = "models:\n  gpt-image-1:\n    input_fidelity: [high]\n"
    assert model_of(load_price_book(write(tmp_path, text)), "gpt-image-1").input_fidelities == (
        "high",
    )
    path = write(tmp_path, "models:\n  gpt-image-1:\n    input_fidelity: [medium]\n")
    assert problems_of(path) == [
        f"{path}:3: models.gpt-image-1.input_fidelity: invalid price-book entry: "
        "`input_fidelity` is true, false or a list of the values the model takes (high, low)"
    ]
