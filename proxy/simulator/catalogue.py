"""The simulated models and their rules, as data in one place (pure).

Adding a model to the simulator means adding one `ModelRule` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Literal

from proxy.core.models import Endpoint

OutputRule = Literal["table", "formula", "per_image"]
Fidelity = Literal["param", "low", "high"]

STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536")
GPT_QUALITIES = ("low", "medium", "high")
GPT_2X_QUALITIES = ("low", "medium", "high", "xhigh", "max")
GPT_ENDPOINTS: frozenset[Endpoint] = frozenset({"generations", "edits"})

# The image-generation guide's output tokens per image for models before gpt-image-2.
TABLE_TOKENS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
        "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
        "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
    }
)
# gpt-image-1-mini's output tokens per image: its published per-image prices (the de-DE
# model page: $0.005 / $0.011 / $0.036 at 1024x1024, $0.006 / $0.015 / $0.052 at 1024x1536
# and 1536x1024) at its $8 per 1M output rate. They do not match the guide's table (low
# 1024x1024 would be $0.0022), and OpenAI says to take mini's `usage` as the truth: the
# simulator reports what its price list charges.
MINI_TABLE_TOKENS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "low": {"1024x1024": 625, "1024x1536": 750, "1536x1024": 750},
        "medium": {"1024x1024": 1375, "1024x1536": 1875, "1536x1024": 1875},
        "high": {"1024x1024": 4500, "1024x1536": 6500, "1536x1024": 6500},
    }
)

# Quality factors of the community output-token formula (a fit to OpenAI's calculator).
GPT_2_FACTORS = MappingProxyType({"low": 16, "medium": 48, "high": 96})
GPT_25_FACTORS = MappingProxyType({"low": 16, "medium": 24, "high": 48, "xhigh": 64, "max": 96})
# A stand-in for the 3P measurements of 2.6 (docs.laozhang.ai, 2026-11-05): low measured
# 664 tokens at 1536x1024, where the 2.5 formula gives 158 (x4.2, more than the "3-4x"
# quoted with it); medium "3-4x" (x4); high and above as 2.5 (high measured 1353 at
# 1536x1024 against 1372). Each image's tokens are rounded up.
GPT_26_MULTIPLIERS: Mapping[str, Fraction] = MappingProxyType(
    {"low": Fraction(664, 158), "medium": Fraction(4), "high": Fraction(1)}
)


@dataclass(frozen=True)
class ModelRule:
    """What one model accepts and how it bills."""

    name: str
    qualities: tuple[str, ...]
    """Accepted quality values besides `auto`."""
    sizes: tuple[str, ...] | None
    """Accepted sizes besides `auto`; None means any `WxH` within the custom-size rules."""
    output_rule: OutputRule
    endpoints: frozenset[Endpoint] = GPT_ENDPOINTS
    table: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: TABLE_TOKENS)
    """Output tokens per image by quality and size, for the `table` rule."""
    factors: Mapping[str, int] = field(default_factory=dict)
    multipliers: Mapping[str, Fraction] = field(default_factory=dict)
    fidelity: Fidelity = "param"
    """`param`: the request's input_fidelity decides; `low`/`high`: fixed by the model."""
    fidelity_param_allowed: bool = True
    fidelities: tuple[str, ...] = ("high", "low")
    """The `input_fidelity` values it accepts (when it accepts the parameter at all)."""
    max_n: int = 10
    output_details: bool = False
    """Whether a non-stream answer's usage carries `output_tokens_details`."""
    batch: bool = True
    """Whether the Batch API accepts it (its lines are then billed at `BATCH_RATE`)."""

    @property
    def is_dalle(self) -> bool:
        return self.output_rule == "per_image"

    @property
    def default_quality(self) -> str:
        return "standard" if self.is_dalle else "medium"


def _table(
    name: str,
    *,
    fidelity: Fidelity = "param",
    fidelities: tuple[str, ...] = ("high", "low"),
    details: bool = False,
    table: Mapping[str, Mapping[str, int]] = TABLE_TOKENS,
) -> ModelRule:
    return ModelRule(
        name,
        GPT_QUALITIES,
        STANDARD_SIZES,
        "table",
        table=table,
        fidelity=fidelity,
        fidelities=fidelities,
        output_details=details,
    )


def _formula(
    name: str,
    factors: Mapping[str, int],
    multipliers: Mapping[str, Fraction] | None = None,
    *,
    fidelity_param_allowed: bool = True,
    batch: bool = True,
) -> ModelRule:
    return ModelRule(
        name,
        tuple(factors),
        None,
        "formula",
        factors=factors,
        multipliers=multipliers or {},
        fidelity="high",
        fidelity_param_allowed=fidelity_param_allowed,
        batch=batch,
    )


_RULES: tuple[ModelRule, ...] = (
    _table("gpt-image-1"),
    # input_fidelity: `low` only ("Unsupported for gpt-image-1-mini", the SDK's docstring).
    _table("gpt-image-1-mini", fidelity="low", fidelities=("low",), table=MINI_TABLE_TOKENS),
    _table("gpt-image-1.5", details=True),
    _table("chatgpt-image-latest", details=True),
    _formula("gpt-image-2", GPT_2_FACTORS, fidelity_param_allowed=False),
    _formula("gpt-image-2-2026-04-21", GPT_2_FACTORS, fidelity_param_allowed=False),
    _formula("gpt-image-2.5-sunburst", GPT_25_FACTORS),
    _formula("gpt-image-2.5-sunburst-2026-09-08", GPT_25_FACTORS),
    _formula("gpt-image-2.5-flare", GPT_25_FACTORS),
    _formula("gpt-image-2.5-flare-2026-09-08", GPT_25_FACTORS),
    # "Batch is not supported in 2.6" (a third party); 2.5 was seen billed at 50 %.
    _formula("gpt-image-2.6-sunburst", GPT_25_FACTORS, GPT_26_MULTIPLIERS, batch=False),
    _formula("gpt-image-2.6-flare", GPT_25_FACTORS, GPT_26_MULTIPLIERS, batch=False),
    ModelRule(
        "dall-e-2",
        ("standard",),
        ("256x256", "512x512", "1024x1024"),
        "per_image",
        endpoints=frozenset({"generations", "edits", "variations"}),
        batch=False,
    ),
    ModelRule(
        "dall-e-3",
        ("standard", "hd"),
        ("1024x1024", "1792x1024", "1024x1792"),
        "per_image",
        endpoints=frozenset({"generations"}),
        max_n=1,
        batch=False,
    ),
)

# The Batch API bills every accepted model at half its rates (gpt-image-2's published
# Batch rates are exactly half; 2.5 was seen billed at 50 %).
BATCH_RATE = Decimal("0.5")

MODELS: Mapping[str, ModelRule] = MappingProxyType({rule.name: rule for rule in _RULES})

# The defaults of OpenAI's OpenAPI description when `model` is omitted.
DEFAULT_MODELS: Mapping[Endpoint, str] = MappingProxyType(
    {"generations": "dall-e-2", "edits": "gpt-image-1.5", "variations": "dall-e-2"}
)

# The custom-size rules of gpt-image-2 and 2.x (the image-generation guide).
SIZE_EDGE_MULTIPLE = 16
SIZE_MAX_EDGE = 3840
SIZE_MAX_ASPECT = 3
SIZE_MIN_PIXELS = 655_360
SIZE_MAX_PIXELS = 8_294_400
AUTO_SIZE = (1024, 1024)


def find_model(name: str) -> ModelRule | None:
    """The rule of a model by its exact name, or None when the simulator does not know it."""
    return MODELS.get(name)


@dataclass(frozen=True)
class MainlineRates:
    """What a mainline model bills, in USD per 1M tokens (OpenAI's Standard tier)."""

    input: Decimal
    """Uncached input."""
    cached_input: Decimal
    output: Decimal
    """Output, reasoning included."""
    cache_write: Decimal | None = None
    """An input token written to the prompt cache (None: writes are billed as input, as
    before gpt-5.6)."""


def _rates(
    uncached: str, cached: str, output: str, cache_write: str | None = None
) -> MainlineRates:
    write = Decimal(cache_write) if cache_write is not None else None
    return MainlineRates(Decimal(uncached), Decimal(cached), Decimal(output), write)


@dataclass(frozen=True)
class MainlineRule:
    """A mainline model of the Responses API that can call the image_generation tool."""

    name: str
    rates: MainlineRates
    reasoning: bool = False
    """Whether it reasons (and so bills reasoning tokens as output)."""
    long_context: tuple[int, MainlineRates] | None = None
    """(threshold, rates): a request with more input tokens than the threshold (cached
    ones included) is billed at these rates, every one of its tokens."""
    image_tokens: int | None = None
    """What one input image (simulated as 1024x1024) bills as its input, when the model
    has its own rule (None: the common tile rule)."""

    def rates_for(self, input_tokens: int) -> MainlineRates:
        """The rates a request of `input_tokens` input tokens is billed at."""
        if self.long_context is not None and input_tokens > self.long_context[0]:
            return self.long_context[1]
        return self.rates


# The mainline models the image-generation guide names for the tool, at OpenAI's published
# rates (input / cached input / output), kept apart from the proxy's price book.
_MAINLINE: tuple[MainlineRule, ...] = (
    MainlineRule("gpt-4o", _rates("2.50", "1.25", "10.00")),
    # Vision priced per image as gpt-4o's: 2,833 tokens plus 5,667 a 512-px tile, so a
    # 1024x1024 image (768x768 at high detail, 4 tiles) bills 25,501 input tokens.
    MainlineRule("gpt-4o-mini", _rates("0.15", "0.075", "0.60"), image_tokens=2833 + 4 * 5667),
    MainlineRule("gpt-4.1", _rates("2.00", "0.50", "8.00")),
    MainlineRule("gpt-4.1-mini", _rates("0.40", "0.10", "1.60")),
    MainlineRule("gpt-4.1-nano", _rates("0.10", "0.025", "0.40")),
    MainlineRule("o3", _rates("2.00", "0.50", "8.00"), reasoning=True),
    MainlineRule("gpt-5", _rates("1.25", "0.125", "10.00"), reasoning=True),
    MainlineRule("gpt-5-mini", _rates("0.25", "0.025", "2.00"), reasoning=True),
    MainlineRule("gpt-5-nano", _rates("0.05", "0.005", "0.40"), reasoning=True),
    # "prompts with >272K input tokens are priced at 2x input and 1.5x output for the full
    # session" (the gpt-5.4 model page).
    MainlineRule(
        "gpt-5.4",
        _rates("2.50", "0.25", "15.00"),
        reasoning=True,
        long_context=(272_000, _rates("5.00", "0.50", "22.50")),
    ),
    MainlineRule("gpt-5.4-mini", _rates("0.75", "0.075", "4.50"), reasoning=True),
    MainlineRule("gpt-5.4-nano", _rates("0.20", "0.02", "1.25"), reasoning=True),
    MainlineRule(
        "gpt-5.5",
        _rates("5.00", "0.50", "30.00"),
        reasoning=True,
        long_context=(272_000, _rates("10.00", "1.00", "45.00")),
    ),
    # From gpt-5.6 on, OpenAI bills the input it writes to the prompt cache (one implicit
    # breakpoint by default) at 1.25x the input rate, reported as
    # `input_tokens_details.cache_write_tokens` (a live gpt-5.6-sol call, coder/mux#3705).
    MainlineRule("gpt-5.6-sol", _rates("5.00", "0.50", "30.00", "6.25"), reasoning=True),
)

BOOKLESS_MAINLINE = frozenset({"gpt-5.6-sol"})
"""Mainline models the simulator serves that Tollgate's built-in price book does not list (a
deployment's own book may)."""

MAINLINE_MODELS: Mapping[str, MainlineRule] = MappingProxyType({m.name: m for m in _MAINLINE})

# The tool's documented default image model (retired upstream, still simulated).
DEFAULT_TOOL_MODEL = "gpt-image-1"

# OpenAI's release dates of the simulated models (the model pages; gpt-image-2.6's from a
# third party). chatgpt-image-latest has none (a pointer to ChatGPT's current model): it
# is billed the uplift. A regional (data-residency) endpoint bills "eligible models released on or
# after 2026-03-05" 10 % above their rates (a third party citing OpenAI's pricing and
# data-residency guide), image and mainline models alike.
DATA_RESIDENCY_FROM = date(2026, 3, 5)
DATA_RESIDENCY_UPLIFT = Decimal("1.1")
_GPT_IMAGE_2 = date(2026, 4, 21)
_GPT_IMAGE_25 = date(2026, 9, 8)
_GPT_IMAGE_15 = date(2025, 12, 16)
_GPT_5 = date(2025, 8, 7)
_GPT_54 = date(2026, 3, 5)
_GPT_41 = date(2025, 4, 14)
RELEASED: Mapping[str, date] = MappingProxyType(
    {
        "dall-e-2": date(2022, 11, 3),
        "dall-e-3": date(2023, 11, 6),
        "gpt-image-1": date(2025, 4, 23),
        "gpt-image-1-mini": date(2025, 10, 6),
        "gpt-image-1.5": _GPT_IMAGE_15,
        "gpt-image-2": _GPT_IMAGE_2,
        "gpt-image-2-2026-04-21": _GPT_IMAGE_2,
        "gpt-image-2.5-sunburst": _GPT_IMAGE_25,
        "gpt-image-2.5-sunburst-2026-09-08": _GPT_IMAGE_25,
        "gpt-image-2.5-flare": _GPT_IMAGE_25,
        "gpt-image-2.5-flare-2026-09-08": _GPT_IMAGE_25,
        "gpt-image-2.6-sunburst": date(2026, 11, 4),
        "gpt-image-2.6-flare": date(2026, 11, 4),
        "gpt-4o": date(2024, 5, 13),
        "gpt-4o-mini": date(2024, 7, 18),
        "gpt-4.1": _GPT_41,
        "gpt-4.1-mini": _GPT_41,
        "gpt-4.1-nano": _GPT_41,
        "o3": date(2025, 4, 16),
        "gpt-5": _GPT_5,
        "gpt-5-mini": _GPT_5,
        "gpt-5-nano": _GPT_5,
        "gpt-5.4": _GPT_54,
        "gpt-5.4-mini": _GPT_54,
        "gpt-5.4-nano": _GPT_54,
        "gpt-5.5": date(2026, 4, 23),
    }
)


def residency_uplift(model: str) -> Decimal:
    """What a regional endpoint multiplies `model`'s rates by (1 for a model released
    before 2026-03-05)."""
    released = RELEASED.get(model)
    if released is not None and released < DATA_RESIDENCY_FROM:
        return Decimal(1)
    return DATA_RESIDENCY_UPLIFT
