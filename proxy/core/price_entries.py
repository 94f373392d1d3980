"""Price-book entries built from plain mappings, as a price-book file writes them (pure).

`proxy.config.prices` reads the files; this module turns each entry's mapping into the
values of `proxy.core.pricing`, or raises one of `ENTRY_ERRORS` (an `EntryError` naming the
key at fault):

    fields = {"source": "…", "effective_from": "2026-04-21", "rates": {...}, ...}
    book = price_book([model_prices("gpt-image-2", fields, CustomSizes())])
    book = price_book(images, [mainline_prices("gpt-5.5", fields)])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from decimal import Decimal
from typing import Any

from proxy.core.image_tokens import CustomSizes, TileRule
from proxy.core.models import IMAGES_ENDPOINTS, TOKEN_KINDS, ImagesEndpoint, TokenKind
from proxy.core.pricing import (
    DEFAULT_ENDPOINTS,
    INPUT_FIDELITIES,
    MAINLINE_KINDS,
    MAX_N,
    REASONING_CONTEXTS,
    LongContext,
    MainlinePrices,
    ModelPrices,
    PriceBook,
)


class EntryError(ValueError):
    """An entry the builder refuses, with the key `at` fault (empty: the entry itself), so
    that a reader of files can point at that key's line."""

    def __init__(self, message: str, at: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.at = at


ENTRY_ERRORS = (KeyError, TypeError, ValueError, ArithmeticError, AttributeError)
"""What `model_prices` and `mainline_prices` raise for an entry they cannot read."""


def price_book(
    entries: Iterable[ModelPrices], mainline: Iterable[MainlinePrices] = ()
) -> PriceBook:
    """The book of `entries` (and mainline models), each found by its name and its aliases
    (a later entry wins)."""
    models: dict[str, ModelPrices] = {}
    for entry in entries:
        for name in (entry.name, *entry.aliases):
            models[name] = entry
    texts: dict[str, MainlinePrices] = {}
    for text in mainline:
        for name in (text.name, *text.aliases):
            texts[name] = text
    return PriceBook(models, texts)


def _decimal(value: Any) -> Decimal:
    return Decimal(str(value))


MODEL_KEYS = (
    "source", "effective_from", "released", "aliases", "rates", "qualities", "sizes",
    "auto_size", "output_tokens", "image_input", "per_image", "text_output_ceiling",
    "partial_image_tokens", "max_n", "input_fidelity", "endpoints", "batch",
)  # fmt: skip
OUTPUT_TOKENS_KEYS = ("table", "formula", "scale", "floor")
IMAGE_INPUT_KEYS = ("tiles", "ceiling")


def model_prices(name: str, raw: Mapping[str, Any], custom: CustomSizes) -> ModelPrices:
    """One entry from its plain mapping, as a price-book file writes it (raises one of
    `ENTRY_ERRORS`); `custom` holds the rules of `sizes: custom`. Unknown keys are refused,
    in the entry and in its `rates`, `output_tokens` and `image_input`: a rate written
    `image_ouput` was dropped, and the model's images priced at its dearest other rate."""
    if isinstance(raw, Mapping):
        _known_keys(raw, MODEL_KEYS, ())
        for key, known in (
            ("rates", TOKEN_KINDS),
            ("output_tokens", OUTPUT_TOKENS_KEYS),
            ("image_input", IMAGE_INPUT_KEYS),
        ):
            if isinstance(raw.get(key), Mapping):
                _known_keys(raw[key], known, (key,))
    sizes = raw.get("sizes", [])
    output = raw.get("output_tokens", {})
    image_input = raw.get("image_input", {})
    per_image = raw.get("per_image")
    if not raw.get("source") or not raw.get("effective_from"):
        raise ValueError("every entry needs `source` and `effective_from`")
    if per_image is None and not raw.get("rates"):
        raise ValueError("an entry needs `rates` or `per_image`")
    if per_image is None and not ({"table", "formula"} & set(output)):
        # Without it the bound would reserve nothing for the images themselves.
        raise ValueError("a token-priced entry needs `output_tokens` (a table or a formula)")
    if per_image is None and not ({"tiles", "ceiling"} & set(image_input)):
        # Without it an edit's input images would be bounded at nothing.
        raise ValueError(
            "a token-priced entry needs `image_input` (the `tiles` rule or a per-image `ceiling`)"
        )
    if (
        per_image is None
        and _decimal(raw["rates"].get("text_output", 0))
        and not int(raw.get("text_output_ceiling", 0))
    ):
        # OpenAI publishes no bound of text output: without a ceiling none would be reserved.
        raise ValueError("an entry with a `text_output` rate needs a `text_output_ceiling`")
    effective = raw["effective_from"]
    return _complete(
        ModelPrices(
            name=name,
            source=str(raw["source"]),
            effective_from=effective
            if isinstance(effective, date)
            else date.fromisoformat(effective),
            qualities=tuple(raw["qualities"]),
            rates={
                kind: _decimal(v) for kind, v in raw.get("rates", {}).items() if kind in TOKEN_KINDS
            },
            sizes=() if sizes == "custom" else tuple(sizes),
            custom_sizes=custom if sizes == "custom" else None,
            auto_size=raw.get("auto_size"),
            output_table=output.get("table"),
            output_formula=output.get("formula"),
            output_scale={q: _decimal(v) for q, v in output.get("scale", {}).items()},
            output_floor=_floor(output.get("floor")),
            input_tiles=TileRule(**image_input["tiles"]) if "tiles" in image_input else None,
            input_ceiling=image_input.get("ceiling"),
            per_image=(
                {
                    q: {s: _decimal(p) for s, p in by_size.items()}
                    for q, by_size in per_image.items()
                }
                if per_image is not None
                else None
            ),
            text_output_ceiling=int(raw.get("text_output_ceiling", 0)),
            partial_image_tokens=int(raw.get("partial_image_tokens", 100)),
            max_n=int(raw.get("max_n", MAX_N)),
            input_fidelities=_input_fidelities(raw.get("input_fidelity", True)),
            endpoints=_endpoints(raw.get("endpoints", list(DEFAULT_ENDPOINTS))),
            aliases=tuple(raw.get("aliases", ())),
            batch_rates=_batch_rates(raw.get("batch"), raw.get("rates", {}), per_image is not None),
            released=_released(raw.get("released")),
        )
    )


def _input_fidelities(raw: Any) -> tuple[str, ...]:
    """`input_fidelity`: `true` (every value, the default), `false` (the model refuses the
    parameter) or the list of the values the model takes."""
    if raw is True:
        return INPUT_FIDELITIES
    if raw is False:
        return ()
    if (
        isinstance(raw, list)
        and raw
        and all(isinstance(v, str) and v in INPUT_FIDELITIES for v in raw)
    ):
        return tuple(raw)
    raise EntryError(
        "`input_fidelity` is true, false or a list of the values the model takes "
        f"({', '.join(INPUT_FIDELITIES)})",
        ("input_fidelity",),
    )


def _endpoints(raw: Any) -> tuple[ImagesEndpoint, ...]:
    """`endpoints`: the Images API endpoints the model takes (default: generations, edits)."""
    if isinstance(raw, list) and raw and all(v in IMAGES_ENDPOINTS for v in raw):
        return tuple(e for e in IMAGES_ENDPOINTS if e in raw)
    raise EntryError(
        "`endpoints` is a list of the Images API endpoints the model takes "
        f"({', '.join(IMAGES_ENDPOINTS)})",
        ("endpoints",),
    )


def _floor(raw: Any) -> dict[str, dict[str, int]] | None:
    """`output_tokens.floor`: quality -> size -> the fewest output tokens an image bills."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise EntryError("`floor` is a table: quality -> size -> tokens", ("output_tokens",))
    found = {str(q): {str(s): int(t) for s, t in sizes.items()} for q, sizes in raw.items()}
    if any(t < 0 for sizes in found.values() for t in sizes.values()):
        raise EntryError("`floor` tokens are whole numbers from 0", ("output_tokens",))
    return found


def _complete(model: ModelPrices) -> ModelPrices:
    """`model`, once every quality of its ladder at every size it accepts (and `auto`) has a
    count or a price: an entry whose ladder or sizes name one its table lacks would fail
    every such request, `auto` ones included, instead of being refused when loaded."""
    for quality in model.qualities:
        for size in (*model.sizes, "auto"):
            try:
                if model.per_image is not None:
                    model.image_price_nanos(quality, size)
                else:
                    model.max_output_tokens(quality, size)
            except (KeyError, TypeError, ValueError):
                what = "price" if model.per_image is not None else "output token count"
                raise ValueError(f"quality {quality!r} at size {size!r} has no {what}") from None
    return model


def _batch_rates(
    raw: Any, rates: Mapping[str, Any], per_image: bool
) -> Mapping[TokenKind, Decimal] | None:
    """`batch:`, the Batch API's rates by kind (USD per 1M tokens, at least the kinds of
    `rates`), or `false` where the Batch API does not take the model. Without it the model
    is not taken either: a batch line is never priced at rates nobody wrote."""
    at = ("batch",)
    if raw is None or raw is False:
        return None
    if per_image:
        raise EntryError("a per-image model has no token rates to batch: write `batch: false`", at)
    if not isinstance(raw, Mapping) or not raw:
        raise EntryError(
            "`batch` must be the Batch API's rates by kind (USD per 1M tokens, as `rates`) "
            "or false where the Batch API does not take the model",
            at,
        )
    _known_keys(raw, TOKEN_KINDS, at)
    missing = [kind for kind in rates if kind in TOKEN_KINDS and kind not in raw]
    if missing:
        raise EntryError(
            f"`batch` needs a rate for every kind of `rates` (missing: {', '.join(missing)})", at
        )
    return {kind: _usd(value, (*at, kind)) for kind, value in raw.items() if kind in TOKEN_KINDS}


def _released(raw: Any) -> date | None:
    """`released:`, OpenAI's release date of the model (it decides the data-residency
    uplift); absent: unknown."""
    if raw is None or isinstance(raw, date):
        return raw
    try:
        return date.fromisoformat(str(raw))
    except ValueError:
        raise EntryError("`released` must be a date (YYYY-MM-DD)", ("released",)) from None


MAINLINE_KEYS = (
    "source", "effective_from", "released", "rates", "long_context", "aliases", "batch",
    "reasoning_context",
)  # fmt: skip
LONG_CONTEXT_KEYS = ("above_input_tokens", "rates")


def mainline_prices(name: str, raw: Mapping[str, Any]) -> MainlinePrices:
    """One mainline model from its plain mapping, as a price-book file writes it under
    `mainline:` (raises one of `ENTRY_ERRORS`, an `EntryError` naming the key at fault):

        mainline_prices("gpt-5", {"source": "…", "effective_from": "2025-08-07",
                                  "rates": {"text_input": "1.25", "text_output": "10.00"}})
    """
    if not isinstance(raw, Mapping):
        raise EntryError(f"must be a mapping of {', '.join(MAINLINE_KEYS)}")
    _known_keys(raw, MAINLINE_KEYS, ())
    if not raw.get("source") or not raw.get("effective_from"):
        raise EntryError("every entry needs `source` and `effective_from`")
    effective = raw["effective_from"]
    long = raw.get("long_context")
    aliases = raw.get("aliases", ())
    if not isinstance(aliases, list | tuple) or not all(isinstance(a, str) for a in aliases):
        raise EntryError("`aliases` must be a list of model names", ("aliases",))
    return MainlinePrices(
        name=name,
        source=str(raw["source"]),
        effective_from=effective if isinstance(effective, date) else date.fromisoformat(effective),
        rates=_mainline_rates(raw.get("rates"), ("rates",)),
        long_context=None if long is None else _long_context(long),
        aliases=tuple(aliases),
        released=_released(raw.get("released")),
        batch_rates=_mainline_batch(raw.get("batch")),
        reasoning_context=_reasoning_context(raw.get("reasoning_context", "current_turn")),
    )


def _reasoning_context(raw: Any) -> str:
    """`reasoning_context`: what the model reasons over when a request leaves
    `reasoning.context` to it (default `current_turn`; the gpt-5.6 family's `all_turns`)."""
    if isinstance(raw, str) and raw in REASONING_CONTEXTS:
        return raw
    raise EntryError(
        f"`reasoning_context` is one of {', '.join(REASONING_CONTEXTS)}, got {raw!r}",
        ("reasoning_context",),
    )


def _mainline_batch(raw: Any) -> Mapping[str, Decimal] | None:
    """A mainline model's `batch:` rates (as `rates`), or None (`false`, or not written)."""
    if raw is None or raw is False:
        return None
    return _mainline_rates(raw, ("batch",))


def _long_context(raw: Any) -> LongContext:
    at = ("long_context",)
    if not isinstance(raw, Mapping):
        raise EntryError("`long_context` must be a mapping of above_input_tokens, rates", at)
    _known_keys(raw, LONG_CONTEXT_KEYS, at)
    above = raw.get("above_input_tokens")
    if isinstance(above, bool) or not isinstance(above, int) or above < 1:
        raise EntryError(
            f"`above_input_tokens` must be an integer >= 1, got {above!r}",
            (*at, "above_input_tokens"),
        )
    return LongContext(above, _mainline_rates(raw.get("rates"), (*at, "rates")))


def _mainline_rates(raw: Any, at: tuple[str, ...]) -> Mapping[str, Decimal]:
    """USD per million tokens by kind: `text_input` and `text_output` required; without
    `cached_text_input`, cached tokens are priced at `text_input` (never free)."""
    if not isinstance(raw, Mapping) or not {"text_input", "text_output"} <= set(raw):
        raise EntryError(
            "`rates` needs text_input and text_output (and cached_text_input where the "
            "model discounts cached input), USD per 1M tokens",
            at,
        )
    _known_keys(raw, MAINLINE_KINDS, at)
    return {kind: _usd(value, (*at, kind)) for kind, value in raw.items()}


def _usd(value: Any, at: tuple[str, ...]) -> Decimal:
    """A rate as written: a number of USD >= 0 (not a boolean, not NaN)."""
    try:
        rate = None if isinstance(value, bool) else _decimal(value)
    except ArithmeticError:
        rate = None
    if rate is None or not rate.is_finite() or rate < 0:
        raise EntryError(f"must be a number of USD >= 0, got {value!r}", at)
    return rate


def _known_keys(raw: Mapping[str, Any], known: tuple[str, ...], at: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            raise EntryError(f"unknown key {key!r} (known: {', '.join(known)})", (*at, key))
