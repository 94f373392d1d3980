"""The price book: what each model charges and how many tokens a request may use (pure).

Prices and token rules are data (`prices.yaml` inside the package, extended or
overridden by a deployment's own file, both read by `proxy.config.prices`);
`proxy.core.price_entries` builds the book from plain mappings, and this module
interprets it:

    book = price_book([model_prices("gpt-image-2", fields, CustomSizes())])
    model = book.find("gpt-image-2-2026-04-21")       # aliases resolve
    model.output_tokens("high", "1024x1024")            # 7024
    estimate(model, request).cost_nanos                  # an upper bound, reserved
    model.bound_cost(usage)                              # the most reserved usage may charge
    model.cost(usage)                                    # the exact price of reported usage
    model.charge(usage)                                  # that price as the ledger records it
    model.for_batch().charge(usage)                      # the same usage sent through a batch

The Responses API's mainline text models (the model that calls the image tool) are a
second table of the same book:

    book = price_book(images, [mainline_prices("gpt-5.5", fields)])
    book.find_mainline("gpt-5.5").cost(usage)            # its `mainline_*` tokens only
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from decimal import ROUND_CEILING, Decimal
from typing import Any

from proxy.core.errors import BatchUnsupported, InvalidRequest
from proxy.core.image_tokens import CustomSizes, TileRule, formula_tokens, parse_size
from proxy.core.models import (
    IMAGES_ENDPOINTS,
    INPUT_KINDS,
    OUTPUT_KINDS,
    TOKEN_KINDS,
    Charge,
    Estimate,
    ImageRequest,
    ImagesEndpoint,
    TokenKind,
    Usage,
)

AUTO = "auto"
MAX_N = 10
INPUT_FIDELITIES = ("high", "low")
"""OpenAI's `input_fidelity` values."""
DEFAULT_ENDPOINTS: tuple[ImagesEndpoint, ...] = ("generations", "edits")
"""The Images API endpoints a GPT image model takes (variations took dall-e-2 only)."""


@dataclass(frozen=True)
class ModelPrices:
    """One price-book entry."""

    name: str
    source: str
    effective_from: date
    qualities: tuple[str, ...]
    rates: Mapping[TokenKind, Decimal] = field(default_factory=dict)
    sizes: tuple[str, ...] = ()
    custom_sizes: CustomSizes | None = None
    auto_size: str | None = None
    output_table: Mapping[str, Mapping[str, int]] | None = None
    output_formula: Mapping[str, int] | None = None
    output_scale: Mapping[str, Decimal] = field(default_factory=dict)
    output_floor: Mapping[str, Mapping[str, int]] | None = None
    """The fewest image output tokens an image bills, by quality and size, where the token
    rule is above what OpenAI's usage reports (see `least_output_tokens`)."""
    input_tiles: TileRule | None = None
    input_ceiling: int | None = None
    per_image: Mapping[str, Mapping[str, Decimal]] | None = None
    text_output_ceiling: int = 0
    partial_image_tokens: int = 100
    max_n: int = MAX_N
    input_fidelities: tuple[str, ...] = INPUT_FIDELITIES
    """The `input_fidelity` values the model takes: none where it refuses the parameter
    (gpt-image-2), `low` alone for gpt-image-1-mini."""
    endpoints: tuple[ImagesEndpoint, ...] = DEFAULT_ENDPOINTS
    """The Images API endpoints the model takes."""
    aliases: tuple[str, ...] = ()
    batch_rates: Mapping[TokenKind, Decimal] | None = None
    """The Batch API's rates, by kind as `rates`; None: the Batch API does not take the model."""
    released: date | None = None
    """OpenAI's release date of the model (None: unknown, taken as eligible for the data
    residency uplift, see `residency_eligible`)."""

    @property
    def accepts_input_fidelity(self) -> bool:
        """Whether the model takes the `input_fidelity` parameter at all."""
        return bool(self.input_fidelities)

    def takes_input_fidelity(self, value: str | None) -> bool:
        """Whether a request with this `input_fidelity` (None: none given) is one the model
        takes."""
        return value is None or value in self.input_fidelities

    def takes_endpoint(self, endpoint: str) -> bool:
        """Whether the model takes a request of `endpoint` (the Responses API's image tool is
        not an Images API endpoint: its models are checked by its door)."""
        return endpoint not in IMAGES_ENDPOINTS or endpoint in self.endpoints

    @property
    def per_image_billing(self) -> bool:
        return self.per_image is not None

    @property
    def accepts_batch(self) -> bool:
        """Whether the Batch API takes the model (the price book gives its batch rates)."""
        return self.batch_rates is not None

    def for_batch(self) -> ModelPrices:
        """This entry priced at its Batch API rates, every other rule kept (token tables or
        formula, ceilings, aliases, stand-in rates), so that `estimate(model.for_batch(), r)`
        and `model.for_batch().charge(usage)` price a batch line. Raises BatchUnsupported
        where the Batch API does not take the model (see `accepts_batch`)."""
        return self._batch

    @functools.cached_property
    def _batch(self) -> ModelPrices:
        # Built once per entry: a batch file asks for it on each of its 50,000 lines, and the
        # batch entry's own `_nano_rates` are then computed once too.
        if self.batch_rates is None:
            raise BatchUnsupported(
                f"The Batch API does not accept {self.name!r}: send its requests to the Images "
                "API directly, or choose a model the Batch API accepts.",
                param="model",
            )
        return replace(self, rates=self.batch_rates)

    @property
    def arbitrary_sizes(self) -> bool:
        return self.custom_sizes is not None

    def accepts_quality(self, quality: str) -> bool:
        return quality == AUTO or quality in self.qualities

    def accepts_size(self, size: str) -> bool:
        if size == AUTO or size in self.sizes:
            return True
        if self.custom_sizes is None:
            return False
        dims = parse_size(size)
        return dims is not None and self.custom_sizes.accepts(*dims)

    def explicit_quality(self, quality: str) -> str:
        """`auto` bounded by the most expensive quality of the ladder."""
        return self.qualities[-1] if quality == AUTO else quality

    def candidate_sizes(self, size: str) -> tuple[str, ...]:
        """The explicit sizes a request's `size` may produce (several for `auto`)."""
        if size != AUTO:
            return (size,)
        if self.auto_size is not None:
            return (self.auto_size,)
        return self.sizes

    @functools.cached_property
    def cheaper_down_the_ladder(self) -> bool:
        """Whether, at any one explicit size, a lower quality of the ladder never bounds an
        image above a higher one, in cost or in tokens (`auto` is the top). Only quality
        changes the output tokens or the per-image price among these, so this is a fact
        of the book's data, which a deployment's own entries may break: per-image prices
        and token tables are read size by size; a formula holds when its factors and its
        scales (1 where none is given) never fall up the ladder (`formula_tokens` rises
        with the factor at every size)."""
        ladder = self.qualities
        if self.per_image is not None or self.output_table is not None:
            table: Mapping[str, Mapping[str, Any]] = self.per_image or self.output_table or {}
            if any(q not in table for q in ladder):
                return False
            sizes = set(table[ladder[0]])
            return all(
                set(table[q]) == sizes and all(table[q][s] <= table[r][s] for s in sizes)
                for q, r in itertools.pairwise(ladder)
            )
        if self.output_formula is not None:
            formula, scale = self.output_formula, self.output_scale
            if any(q not in formula for q in ladder):
                return False
            return all(
                0 <= formula[q] <= formula[r] and 0 <= scale.get(q, 1) <= scale.get(r, 1)
                for q, r in itertools.pairwise(ladder)
            )
        return True

    @property
    def cheaper_when_smaller(self) -> bool:
        """Whether an explicit size bounds an image at least as high as every smaller size
        of its aspect ratio, in cost and in tokens: true of the size formula of a model that
        takes arbitrary sizes (`formula_tokens` keeps its steps at a fixed aspect ratio and
        rises with the pixels; a scale rounds up a rising number)."""
        return (
            self.custom_sizes is not None
            and self.output_formula is not None
            and self.output_table is None
            and self.per_image is None
        )

    @functools.cached_property
    def costs_tell_tokens(self) -> bool:
        """Whether, of two bounds of one request at two qualities or sizes of this model,
        the one that costs no more has no more of any token (so equal costs are equal
        usage): no rate is negative, and each image output token, the only kind quality
        and size change, adds at least a nano-dollar. Per-image models reserve the same
        usage at every quality and size."""
        if self.per_image is not None:
            return True
        rates, denominator = self._nano_rates
        if any(rate < 0 for _, rate in rates):
            return False
        return dict(rates).get("image_output", 0) >= denominator

    def output_tokens(self, quality: str, size: str) -> int:
        """Image output tokens of one image at an explicit quality and size (0 for DALL·E)."""
        if self.output_table is not None:
            return self.output_table[quality][size]
        if self.output_formula is not None:
            dims = parse_size(size)
            if dims is None:
                raise ValueError(f"not an explicit size: {size!r}")
            tokens = formula_tokens(self.output_formula[quality], *dims)
            scale = self.output_scale.get(quality)
            if scale is not None:
                tokens = int((tokens * scale).to_integral_value(ROUND_CEILING))
            return tokens
        return 0

    def least_output_tokens(self, quality: str, size: str) -> int:
        """The fewest image output tokens one completed image of `quality` and `size` (as
        its image_generation_call item names them) bills: the book's `floor` where it gives
        one, else its token rule, which is what OpenAI bills (a table, an unscaled formula).
        0 where that is not known: a scaled formula (only a ceiling is known), per-image
        models, a quality or size the model does not take, `auto` size of a model that takes
        any size. `auto` quality (or a listed model's `auto` size) is the least it may be."""
        if self.per_image is not None:
            return 0
        qualities = self.qualities if quality == AUTO else (quality,)
        if size == AUTO:
            sizes = () if self.custom_sizes is not None else self.sizes
        else:
            sizes = (size,) if self.accepts_size(size) else ()
        if not sizes or any(q not in self.qualities for q in qualities):
            return 0
        return min(self._least_output_tokens(q, s) for q in qualities for s in sizes)

    def _least_output_tokens(self, quality: str, size: str) -> int:
        if self.output_floor is not None:
            return self.output_floor.get(quality, {}).get(size, 0)
        if quality in self.output_scale:
            return 0
        try:
            return self.output_tokens(quality, size)
        except (KeyError, ValueError):
            return 0

    def max_output_tokens(self, quality: str, size: str) -> int:
        """The most one image can cost in output tokens, `auto` included."""
        q = self.explicit_quality(quality)
        return max(self.output_tokens(q, s) for s in self.candidate_sizes(size))

    def input_image_tokens(
        self, width: int | None, height: int | None, fidelity: str | None
    ) -> int:
        """Upper bound of the input tokens of one image; the ceiling when its size is unknown."""
        if self.input_tiles is not None:
            if width is None or height is None:
                return self.input_tiles.ceiling
            return self.input_tiles.tokens(width, height, fidelity == "high")
        return self.input_ceiling or 0

    def image_price_nanos(self, quality: str, size: str) -> int:
        """Price of one image for per-image models (DALL·E), in nano-dollars."""
        assert self.per_image is not None
        q = self.explicit_quality(quality)
        prices = self.per_image[q]
        return max(to_nanos(prices[s]) for s in self.candidate_sizes(size))

    def per_image_charge(self, quality: str, size: str, images: int) -> Charge:
        """What `images` images cost a per-image model (DALL·E): its price list, not
        reported usage, so the charge is flagged for reconciliation with the bill."""
        return Charge(Usage(images=images), self.image_price_nanos(quality, size) * images, True)

    def cost(self, usage: Usage) -> int:
        """The price of reported usage, in nano-dollars (rounded up). Every token is priced
        (fail closed): a kind without its own rate, and unclassified tokens, at the dearest
        rate of their side (`stand_in_rate`)."""
        rates, denominator = self._nano_rates
        total: int = sum(rate * getattr(usage, name) for name, rate in rates)
        return -(-total // denominator)

    def bound_cost(self, usage: Usage) -> int:
        """What `usage`, reserved as a bound, may be charged once OpenAI reports it: priced as
        it reads, or with no `output_tokens_details` (the Images API's stream events have
        none, and its answers have been seen without them), which `usage_from_openai` reads
        as image output, so that the reserved text output (gpt-image-1.5's, $10/M) is then
        priced at the image output rate ($32/M). The dearer of the two: a bound below it
        lets a charge pass what was reserved, and settled spend a hard limit."""
        if not usage.text_output:
            return self.cost(usage)  # nothing to read otherwise: one pricing (the hot path)
        undetailed = replace(
            usage, image_output=usage.image_output + usage.text_output, text_output=0
        )
        return max(self.cost(usage), self.cost(undetailed))

    def charge(self, usage: Usage) -> Charge:
        """What reported usage costs, as the ledger records it: unclassified tokens folded
        into the kind whose rate priced them (so the row's kinds give the same cost and
        its token counters count them), flagged when anything was priced at a stand-in rate."""
        unclassified = bool(usage.unclassified_input or usage.unclassified_output)
        flagged = unclassified or any(
            usage.tokens(kind) for kind in TOKEN_KINDS if kind not in self.rates
        )
        if unclassified:
            into_input, into_output = (
                self._dearest_kind(INPUT_KINDS),
                self._dearest_kind(OUTPUT_KINDS),
            )
            folded = {
                into_input: usage.tokens(into_input) + usage.unclassified_input,
                into_output: usage.tokens(into_output) + usage.unclassified_output,
            }
            usage = replace(usage, **folded, unclassified_input=0, unclassified_output=0)
        return Charge(usage, self.cost(usage), flagged)

    def stand_in_rate(self, side: tuple[TokenKind, ...]) -> Decimal:
        """The rate of a token of `side` (INPUT_KINDS or OUTPUT_KINDS) that has no rate of its
        own: the dearest rate of that side, else the dearest of the model (an upper bound:
        OpenAI bills these tokens at some rate, Tollgate never at none)."""
        own = [self.rates[k] for k in side if k in self.rates]
        return max(own or self.rates.values(), default=Decimal(0))

    def _dearest_kind(self, side: tuple[TokenKind, ...]) -> TokenKind:
        """The kind of `side` priced at `stand_in_rate(side)`: unclassified tokens go there."""
        rate = self.stand_in_rate(side)
        return next((k for k in side if self.rates.get(k) == rate), side[0])

    def rate(self, kind: TokenKind) -> Decimal:
        """The rate a token of `kind` is priced at: its own, else the stand-in of its side."""
        own = self.rates.get(kind)
        if own is not None:
            return own
        return self.stand_in_rate(INPUT_KINDS if kind in INPUT_KINDS else OUTPUT_KINDS)

    @functools.cached_property
    def _nano_rates(self) -> tuple[tuple[tuple[str, int], ...], int]:
        """The rate of every Usage field in nano-dollars per token, as integers over one
        denominator, so that a cost is exact integer arithmetic (Decimal sums cost more than
        the rest of pricing). USD per million tokens × tokens / 10**6 USD = rate × 1000 nanos
        per token."""
        fields: dict[str, Decimal] = {kind: self.rate(kind) for kind in TOKEN_KINDS}
        fields["unclassified_input"] = self.stand_in_rate(INPUT_KINDS)
        fields["unclassified_output"] = self.stand_in_rate(OUTPUT_KINDS)
        ratios = {k: (r * 1000).as_integer_ratio() for k, r in fields.items() if r}
        denominator = math.lcm(1, *(d for _, d in ratios.values()))
        rates = tuple((k, n * (denominator // d)) for k, (n, d) in ratios.items())
        return rates, denominator

    def validate(self, request: ImageRequest) -> None:
        """Refuse what the model does not accept, before anything is sent upstream."""
        if not self.accepts_quality(request.quality):
            raise InvalidRequest(
                f"Invalid value for 'quality': {request.quality!r}. {self.name} accepts "
                f"{', '.join((*self.qualities, AUTO))}.",
                param="quality",
            )
        if not self.accepts_size(request.size):
            accepted = (
                f"{self.custom_sizes.describe()}, or auto"
                if self.custom_sizes is not None
                else ", ".join((*self.sizes, AUTO))
            )
            raise InvalidRequest(
                f"Invalid value for 'size': {request.size!r}. {self.name} accepts {accepted}.",
                param="size",
            )
        if not 1 <= request.n <= self.max_n:
            raise InvalidRequest(
                f"Invalid value for 'n': {request.n}. {self.name} accepts 1 to {self.max_n}.",
                param="n",
            )


def estimate(model: ModelPrices, request: ImageRequest) -> Estimate:
    """An upper bound of what `request` can cost: reserved before it is forwarded."""
    if model.per_image_billing:
        charge = model.per_image_charge(request.quality, request.size, request.n)
        return Estimate(charge.usage, charge.cost_nanos)
    # A mask and a markup are priced as input images too: OpenAI publishes no rule that
    # leaves them out, and the bound must hold whatever it counts.
    images = (*request.images, *(i for i in (request.mask, request.markup) if i is not None))
    image_input = sum(
        model.input_image_tokens(image.width, image.height, request.input_fidelity)
        for image in images
    )
    per_image = model.max_output_tokens(request.quality, request.size)
    partials = request.partial_images if request.stream else 0
    # Every image is bounded as if it were billed its own input and text output: each call
    # of the Responses image tool is, and OpenAI does not say that a request for `n` images
    # bills its prompt and input images only once.
    image_input *= request.n
    if request.mainline is not None:
        # The Responses image tool: call k may also be given the k images the calls before
        # it made (a chain of edits), each bounded as an input image of unknown size.
        made = model.input_image_tokens(None, None, request.input_fidelity)
        image_input += made * (request.n * (request.n - 1) // 2)
    usage = Usage(
        # A text token is at least one byte of the prompt.
        text_input=request.prompt_bytes * request.n,
        image_input=image_input,
        image_output=(per_image + partials * model.partial_image_tokens) * request.n,
        text_output=model.text_output_ceiling * request.n,
        images=request.n,
    )
    return Estimate(usage, model.bound_cost(usage))


def to_nanos(usd: Decimal) -> int:
    return int((usd * 10**9).to_integral_value(ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class LongContext:
    """Rates that replace a mainline model's own for a whole request whose input passes
    `above_input_tokens` (OpenAI bills such a request entirely at the higher rates)."""

    above_input_tokens: int
    rates: Mapping[str, Decimal]


MAINLINE_KINDS = ("text_input", "cached_text_input", "text_output", "cache_write_input")
REASONING_CONTEXTS = ("current_turn", "all_turns")
"""The `reasoning.context` modes a mainline model runs in (`auto`: the model's default)."""


@dataclass(frozen=True)
class MainlinePrices:
    """A Responses API mainline model (the text model that calls the image tool): USD per
    million tokens of text input, cached text input and text output (reasoning included)."""

    name: str
    source: str
    effective_from: date
    rates: Mapping[str, Decimal]
    """`text_input`, `cached_text_input`, `text_output`, and `cache_write_input` for a model
    that bills the input it writes to the prompt cache above `text_input` (gpt-5.6 and
    later; without it, written tokens cost `text_input`, as before gpt-5.6)."""
    long_context: LongContext | None = None
    aliases: tuple[str, ...] = ()
    released: date | None = None
    """As `ModelPrices.released`."""
    batch_rates: Mapping[str, Decimal] | None = None
    """The Batch API's rates, by kind as `rates`; None: a batch line naming the model is
    refused. In a batch, `long_context`'s rates are scaled by the same ratio, kind by kind
    (the pricing page: long context is "2x input and 1.5x output … for standard, batch, and
    flex"); a kind whose ratio is unknown keeps its long-context rate."""
    reasoning_context: str = "current_turn"
    """The context the model reasons over when a request leaves `reasoning.context` out or
    `auto` (one of `REASONING_CONTEXTS`): the gpt-5.6 family's is `all_turns`, which renders
    every earlier turn's reasoning again as input, earlier models' `current_turn`."""

    @property
    def accepts_batch(self) -> bool:
        return self.batch_rates is not None

    def for_batch(self) -> MainlinePrices:
        """This entry at its Batch API rates; BatchUnsupported where it has none."""
        if self.batch_rates is None:
            raise BatchUnsupported(
                f"The Batch API does not accept {self.name!r} in Tollgate's price book: send "
                "its requests to the Responses API directly, or choose a mainline model with "
                "batch rates."
            )
        batch, long = self.batch_rates, self.long_context
        if "cache_write_input" not in batch and "cache_write_input" in self.rates:
            # The batch column gives no write rate: the standard premium, scaled as input is.
            batch = {**batch, "cache_write_input": self._write_rate(batch)}
        if long is not None:
            scaled = {
                kind: rate * batch[kind] / self.rates[kind]
                if kind in batch and self.rates.get(kind)
                else rate
                for kind, rate in long.rates.items()
            }
            long = LongContext(long.above_input_tokens, scaled)
        return replace(self, rates=batch, batch_rates=None, long_context=long)

    def rates_for(self, input_tokens: int) -> Mapping[str, Decimal]:
        """The rates of a request with `input_tokens` of input (cached included)."""
        long = self.long_context
        if long is not None and input_tokens > long.above_input_tokens:
            return long.rates
        return self.rates

    def cost(self, usage: Usage) -> int:
        """The price of `usage`'s mainline tokens in nano-dollars (rounded up)."""
        uncached, cached, output = (
            usage.mainline_input,
            usage.mainline_cached_input,
            usage.mainline_output,
        )
        rates = self.rates_for(uncached + cached)
        # Written tokens are uncached input, billed at the write rate rather than text_input.
        written = min(usage.mainline_cache_write, uncached)
        premium = max(self._write_rate(rates) - rates["text_input"], Decimal(0))
        # USD per million × tokens = micro-dollars × 1000 nanos.
        total = (
            rates["text_input"] * uncached
            + premium * written
            + rates.get("cached_text_input", rates["text_input"]) * cached
            + rates["text_output"] * output
        ) * 1000
        return int(total.to_integral_value(ROUND_CEILING))

    def _write_rate(self, rates: Mapping[str, Decimal]) -> Decimal:
        """What an input token written to the prompt cache costs under `rates` (this
        entry's own, its long-context or its batch rates): their `cache_write_input`; else,
        when this entry bills writes, its premium over `text_input` scaled to `rates`'
        input (a long-context request's writes are not billed below its input); else
        `text_input` (no premium)."""
        if "cache_write_input" in rates:
            return rates["cache_write_input"]
        own, base = self.rates.get("cache_write_input"), self.rates["text_input"]
        if own is None:
            return rates["text_input"]
        if not base:
            return max(own, rates["text_input"])
        return rates["text_input"] * own / base


DATA_RESIDENCY_FROM = date(2026, 3, 5)
DATA_RESIDENCY_UPLIFT = Decimal("1.1")
"""OpenAI's regional (data-residency) endpoints bill 10 % above the price book's rates for
"eligible models released on or after 2026-03-05" (the pricing page and the data-residency
guide, as a third party quotes them)."""


def residency_eligible(released: date | None) -> bool:
    """Whether a model released on `released` is billed the uplift on a regional endpoint;
    an unknown release date is (what Tollgate cannot tell, it prices at the higher rate)."""
    return released is None or released >= DATA_RESIDENCY_FROM


def _uplifted(rates: Mapping[Any, Decimal]) -> dict[Any, Decimal]:
    return {kind: rate * DATA_RESIDENCY_UPLIFT for kind, rate in rates.items()}


def _at_residency_image(model: ModelPrices) -> ModelPrices:
    if not residency_eligible(model.released):
        return model
    per_image = model.per_image
    return replace(
        model,
        rates=_uplifted(model.rates),
        batch_rates=None if model.batch_rates is None else _uplifted(model.batch_rates),
        per_image=None
        if per_image is None
        else {q: _uplifted(by_size) for q, by_size in per_image.items()},
    )


def _at_residency_mainline(model: MainlinePrices) -> MainlinePrices:
    if not residency_eligible(model.released):
        return model
    long = model.long_context
    return replace(
        model,
        rates=_uplifted(model.rates),
        batch_rates=None if model.batch_rates is None else _uplifted(model.batch_rates),
        long_context=None
        if long is None
        else LongContext(long.above_input_tokens, _uplifted(long.rates)),
    )


@dataclass(frozen=True)
class PriceBook:
    """Every priced model by name and alias: image models, and the Responses API's
    mainline models."""

    models: Mapping[str, ModelPrices]
    mainline: Mapping[str, MainlinePrices] = field(default_factory=dict)

    def find(self, model: str) -> ModelPrices | None:
        return self.models.get(model)

    def find_mainline(self, model: str) -> MainlinePrices | None:
        return self.mainline.get(model)

    def at_data_residency(self) -> PriceBook:
        """This book as a regional (data-residency) endpoint bills: every eligible model's
        rates (standard, batch, long context, per image) × `DATA_RESIDENCY_UPLIFT`, exact
        Decimals, so that a cost is still rounded up once, in nano-dollars."""
        images = {id(m): _at_residency_image(m) for m in self.models.values()}
        mainline = {id(m): _at_residency_mainline(m) for m in self.mainline.values()}
        return PriceBook(
            {name: images[id(m)] for name, m in self.models.items()},
            {name: mainline[id(m)] for name, m in self.mainline.items()},
        )

    def check_endpoint(self, model: ModelPrices, endpoint: str) -> None:
        """Refuse `model` on an Images API endpoint it does not take, naming the models the
        endpoint takes, before anything is sent upstream."""
        if model.takes_endpoint(endpoint):
            return
        takers = [m.name for m in self.models.values() if endpoint in m.endpoints]
        takes = ", ".join(sorted(set(takers))) or "no model of Tollgate's price book"
        raise InvalidRequest(
            f"Invalid value for 'model': {model.name!r} does not support image {endpoint}. "
            f"/v1/images/{endpoint} takes {takes}.",
            param="model",
        )

    def names(self) -> tuple[str, ...]:
        """Canonical model names (aliases excluded), sorted."""
        return tuple(sorted({m.name for m in self.models.values()}))
