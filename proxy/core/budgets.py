"""Budgets and decisions: what a request may become, given what has been spent (pure).

For each request, in order (README, "Budgets and decisions"):

    allow     → a 403, or a clamp to `max_quality` (a downgrade for reason `policy`)
    throttle  → as the team's tightest USD budget fills, cap quality (reason `throttle`)
    budgets   → the most faithful variant that fits every budget (reason `budget`):
                the knobs of `downgrade.order` given up in that order (by default
                quality down the model's ladder, then a cheaper size of the same
                aspect ratio, then the fallback model); or a 429

`decide()` runs inside the ledger's reservation transaction, on the totals it
read there, so the choice and the reservation are one atomic step. The budgets that
apply to a request, each with its counter and window, come from `proxy.core.periods`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import islice
from math import gcd, isqrt, lcm
from typing import Literal, NoReturn
from zoneinfo import ZoneInfo

from proxy.core.allowed import check_params, check_size, size_allowed
from proxy.core.errors import BudgetExceeded, PolicyViolation
from proxy.core.image_tokens import parse_size
from proxy.core.models import (
    Change,
    Counter,
    Endpoint,
    Estimate,
    ImageRequest,
    Totals,
    Usage,
    usd_text,
)
from proxy.core.periods import UTC, Applied
from proxy.core.pricing import AUTO, ModelPrices, PriceBook, estimate
from proxy.core.settings import Allow, Knob, Team

STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536")

NO_BASE = Estimate(Usage(), 0)


@dataclass(frozen=True, slots=True)
class Variant:
    """A request as it would be sent, with what changed and its bound."""

    request: ImageRequest
    model: ModelPrices
    estimate: Estimate
    """The whole bound: the images' and `base`."""
    changes: tuple[Change, ...] = ()
    base: Estimate = NO_BASE
    """The part of the bound no downgrade changes (the Responses API's mainline model)."""


def priced(model: ModelPrices, request: ImageRequest, base: Estimate = NO_BASE) -> Estimate:
    """The bound of `request` on `model`, plus `base`."""
    images = estimate(model, request)
    if base is NO_BASE:
        return images
    return Estimate(images.usage + base.usage, images.cost_nanos + base.cost_nanos)


@dataclass(frozen=True, slots=True)
class Decision:
    """The variant to send, and the room left in the tightest USD budget after it."""

    variant: Variant
    remaining_nanos: int | None


def endpoint_path(endpoint: Endpoint) -> str:
    if endpoint in ("responses", "batches"):
        return f"/v1/{endpoint}"
    return f"/v1/images/{endpoint}"


def allow_endpoint(team: Team, endpoint: Endpoint) -> None:
    """Refuse an endpoint the team may not use, before its body is even read."""
    allowed = team.allow.endpoints
    if allowed is not None and endpoint not in allowed:
        raise PolicyViolation(
            f"Team {team.name} may not use {endpoint_path(endpoint)} (allow.endpoints: "
            f"{', '.join(sorted(allowed))})."
        )


def apply_allow(
    team: Team,
    request: ImageRequest,
    model: ModelPrices,
    base: Estimate = NO_BASE,
    *,
    params: bool = True,
) -> Variant:
    """The team's `allow` rules: a PolicyViolation, or the request clamped to `max_quality`
    (`base`: the part of the bound outside the images, see `Variant.base`; `params`: False
    where the request's other fields are not known, its `allow.params` checked before)."""
    allow = team.allow
    allow_endpoint(team, request.endpoint)
    if not model_allowed(allow, request.model, model):
        raise PolicyViolation(
            f"Team {team.name} may not use model {request.model!r} (allow.models: "
            f"{', '.join(sorted(allow.models or ()))}).",
            param="model",
        )
    if allow.max_n is not None and request.n > allow.max_n:
        raise PolicyViolation(
            f"Team {team.name} may request at most {allow.max_n} images at once "
            f"(allow.max_n), not {request.n}.",
            param="n",
        )
    check_size(team.name, allow, request)
    if params:
        check_params(team.name, allow, request, model)
    variant = Variant(request, model, priced(model, request, base), (), base)
    if allow.max_quality is not None:
        variant = clamp_quality(variant, allow.max_quality, "policy")
    return variant


def model_allowed(allow: Allow, asked: str, model: ModelPrices) -> bool:
    """Whether `allow.models` lets a team use `model`, asked for by the name `asked` (an
    alias or snapshot is allowed by its own name or the model's)."""
    return allow.models is None or asked in allow.models or model.name in allow.models


def fallback_of(team: Team, book: PriceBook) -> ModelPrices | None:
    """The team's fallback model; None without one, or where `allow.models` does not let
    the team use it (configuration refuses such a team; a downgrade never sends it)."""
    name = team.downgrade.fallback_model
    fallback = book.find(name) if name else None
    if fallback is None or name is None or not model_allowed(team.allow, name, fallback):
        return None
    return fallback


def clamp_quality(
    variant: Variant, max_quality: str, reason: Literal["policy", "throttle"]
) -> Variant:
    """Cap quality at `max_quality` on the model's own ladder (`auto` becomes explicit)."""
    ladder = variant.model.qualities
    if max_quality not in ladder:
        return variant
    cap = ladder.index(max_quality)
    quality = variant.request.quality
    current = len(ladder) - 1 if quality == AUTO else ladder.index(quality)
    if current <= cap:
        return variant
    return change(variant, "quality", max_quality, reason)


def change(
    variant: Variant,
    knob: Literal["quality", "size", "model"],
    value: str,
    reason: Literal["policy", "throttle", "budget"],
    model: ModelPrices | None = None,
) -> Variant:
    """`variant` with one knob changed, its bound recomputed and the change recorded."""
    before = {
        "quality": variant.request.quality,
        "size": variant.request.size,
        "model": variant.request.model,
    }[knob]
    request = variant.request.with_changes(**{knob: value})
    target = model or variant.model
    changes = (*variant.changes, Change(knob, before, value, reason))
    return Variant(request, target, priced(target, request, variant.base), changes, variant.base)


SUMMARY_ORDER = ("model", "quality", "size")


def summary(changes: Iterable[Change]) -> str:
    """The `x-tollgate-downgraded` header: one entry per knob, first value to last, the
    model first, then quality, then size (whatever order they were changed in).

    `summary([quality high->medium (policy), quality medium->low (budget)])`
    is `"quality=high->low"`."""
    merged: dict[str, Change] = {}
    for c in changes:
        first = merged.get(c.knob)
        merged[c.knob] = Change(c.knob, first.before if first else c.before, c.after, c.reason)
    ordered = sorted(merged.values(), key=lambda c: SUMMARY_ORDER.index(c.knob))
    return "; ".join(str(c) for c in ordered if c.before != c.after)


def throttle(
    team: Team, variant: Variant, budgets: Iterable[Applied], totals: Mapping[Counter, Totals]
) -> Variant:
    """Cap quality by the team's throttle tiers, on the fill of its tightest USD budget."""
    if not team.throttle:
        return variant
    fill = max(
        (
            Decimal(totals.get(a.counter, Totals()).used("usd")) / a.budget.limit
            for a in budgets
            if a.counter.scope == "team" and a.budget.metric == "usd" and a.budget.limit > 0
        ),
        default=Decimal(0),
    )
    tiers = [tier for tier in team.throttle if fill > tier.above]
    if not tiers:
        return variant
    return clamp_quality(variant, tiers[-1].max_quality, "throttle")


def decide(
    team: Team,
    variant: Variant,
    budgets: tuple[Applied, ...],
    totals: Mapping[Counter, Totals],
    book: PriceBook,
    tz: ZoneInfo = UTC,
) -> Decision:
    """The most faithful variant that fits every budget; BudgetExceeded when none does."""
    variant = throttle(team, variant, budgets, totals)
    if team.on_exhausted == "downgrade":
        if not blocking(variant, budgets, totals):
            return Decision(variant, remaining(variant, budgets, totals))
        # A request that fits in no form used to walk the whole ladder (315 variants of a
        # 2048x2048 request, ~7 ms inside the ledger's write lock): its floor answers first.
        cheapest = refused(variant, team, book, budgets, totals)
        if cheapest is not None:
            refuse(variant, cheapest, budgets, totals, tz)
    return _walk(team, variant, budgets, totals, book, tz)


def _decide_by_walking(
    team: Team,
    variant: Variant,
    budgets: tuple[Applied, ...],
    totals: Mapping[Counter, Totals],
    book: PriceBook,
    tz: ZoneInfo = UTC,
) -> Decision:
    """`decide` without the floor: every form of the ladder tried in turn (what `decide`
    must always agree with)."""
    variant = throttle(team, variant, budgets, totals)
    return _walk(team, variant, budgets, totals, book, tz)


def _walk(
    team: Team,
    variant: Variant,
    budgets: tuple[Applied, ...],
    totals: Mapping[Counter, Totals],
    book: PriceBook,
    tz: ZoneInfo,
) -> Decision:
    # Under `reject` the request itself is the only form it may take. The ladder is built
    # lazily: pricing every downgrade of a request that fits was most of the request's CPU.
    ladder = variants(variant, team, book) if team.on_exhausted == "downgrade" else iter([variant])
    tried = []
    for candidate in ladder:
        if not blocking(candidate, budgets, totals):
            return Decision(candidate, remaining(candidate, budgets, totals))
        tried.append(candidate)
    refuse(variant, min(tried, key=lambda v: v.estimate.cost_nanos), budgets, totals, tz)


def refuse(
    variant: Variant,
    cheapest: Variant,
    budgets: tuple[Applied, ...],
    totals: Mapping[Counter, Totals],
    tz: ZoneInfo,
) -> NoReturn:
    """The 429 of `variant` when no form of it fits, `cheapest` the cheapest form."""
    blocker = blocking(cheapest, budgets, totals) or blocking(variant, budgets, totals)
    assert blocker is not None
    held = totals.get(blocker.counter, Totals())
    left = room(budgets, totals)
    raise BudgetExceeded(
        f"Budget exhausted: {blocker.describe()} ({blocker.limit_text(held)}) cannot cover "
        f"this request; the cheapest allowed form of it costs up to "
        f"${usd_text(cheapest.estimate.cost_nanos)}. The budget resets "
        f"{resets(blocker, tz)}; ask your Tollgate administrator to raise it.",
        remaining_usd=usd_text(max(left, 0)) if left is not None else None,
    )


def refused(
    start: Variant,
    team: Team,
    book: PriceBook,
    budgets: tuple[Applied, ...],
    totals: Mapping[Counter, Totals],
) -> Variant | None:
    """When no form of the ladder of `start` fits, a form as cheap as its cheapest and
    blocked by the same budget, found without walking the ladder; None when some form
    may fit, or when the floor cannot tell which budget the walk would name.

    The floor (`_floor`) is a few forms of the ladder below which no form goes: every
    form of the ladder has one of them, on the same model, bounded no higher in any
    metric a budget reads. So if all of them are blocked, every form is, the cheapest
    costs what the cheapest of them costs, and (equal costs on one model being equal
    usage) is blocked by the same budget first. Two models may tie at that cost with
    different usage; the walk's order then decides, so the walk answers."""
    fallback = fallback_of(team, book)
    if not start.model.costs_tell_tokens or (
        fallback is not None and not fallback.costs_tell_tokens
    ):
        return None
    floor = []
    for candidate in _floor(start, tuple(team.downgrade.order), fallback, team.allow):
        if not blocking(candidate, budgets, totals):
            return None
        floor.append(candidate)
    least = min(v.estimate.cost_nanos for v in floor)
    cheapest = [v for v in floor if v.estimate.cost_nanos == least]
    blocker = blocking(cheapest[0], budgets, totals)
    if any(blocking(v, budgets, totals) is not blocker for v in cheapest[1:]):
        return None
    return cheapest[0]


def _floor(
    variant: Variant, knobs: tuple[Knob, ...], fallback: ModelPrices | None, allow: Allow
) -> Iterator[Variant]:
    """A few forms of `_nested(variant, knobs, fallback, allow)`: for each of its forms, one
    of these on the same model bounded no higher in any metric (see `refused`)."""
    if not knobs:
        yield variant
        return
    *inner, outer = knobs
    for option in _floor_options(variant, outer, fallback, "model" in inner, allow):
        yield from _floor(option, tuple(inner), fallback, allow)


def _floor_options(
    variant: Variant,
    knob: Knob,
    fallback: ModelPrices | None,
    switched_inside: bool,
    allow: Allow,
) -> Iterator[Variant]:
    """Those of `_options(variant, knob, fallback)` that `_floor` needs. A lower quality
    or a smaller size is bounded no higher on the same model, where the model's book says
    so (`cheaper_down_the_ladder`, `cheaper_when_smaller`), so the lowest of the options
    stands for all of them; except where the fallback model is given up inside them: it
    keeps a quality and a size when it takes them, so a higher one can be its cheaper."""
    if knob == "model":
        yield from _options(variant, knob, fallback, allow)
        return
    yield variant
    model, request = variant.model, variant.request
    if knob == "quality":
        if switched_inside or not model.cheaper_down_the_ladder:
            yield from quality_steps(variant)
        elif request.quality == AUTO or model.qualities.index(request.quality) > 0:
            yield change(variant, "quality", model.qualities[0], "budget")
        return
    if request.size == AUTO or not model.cheaper_when_smaller:
        yield from size_steps(variant, allow.sizes)
        return
    allowed = (s for s in _same_aspect_sizes(model, request.size) if size_allowed(allow, s))
    if not switched_inside or fallback is None:
        kept = list(islice(allowed, 1))
    else:
        # The fallback keeps a size it takes and maps every other one to the same size.
        sizes = list(allowed)
        kept = sizes[:1]
        taken = [s for s in sizes if fallback.accepts_size(s)]
        kept += taken[:1] if fallback.cheaper_when_smaller else taken
        kept += [s for s in sizes if not fallback.accepts_size(s)][:1]
    for size in dict.fromkeys(kept):
        smaller = change(variant, "size", size, "budget")
        if smaller.estimate.cost_nanos < variant.estimate.cost_nanos:
            yield smaller


def resets(applied: Applied, tz: ZoneInfo) -> str:
    if applied.window.end is None:
        return "never (a total budget)"
    return "at " + datetime.fromtimestamp(applied.window.end, tz).isoformat(timespec="minutes")


def blocking(
    variant: Variant, budgets: Iterable[Applied], totals: Mapping[Counter, Totals]
) -> Applied | None:
    """The first budget `variant` does not fit in, or None."""
    usage = variant.estimate.usage
    need = {
        "usd": variant.estimate.cost_nanos,
        "text_input_tokens": usage.text_input + usage.cached_text_input,
        "image_input_tokens": usage.image_input + usage.cached_image_input,
        "image_output_tokens": usage.image_output,
        "total_tokens": usage.total_tokens,
    }
    for applied in budgets:
        used = totals.get(applied.counter, Totals()).used(applied.budget.metric)
        if used + need[applied.budget.metric] > applied.budget.limit:
            return applied
    return None


def share_fits(
    estimate: Estimate, budgets: Iterable[Applied], totals: Mapping[Counter, Totals]
) -> tuple[Applied | None, int | None]:
    """What `decide` finds for a request costing `estimate` under a strict policy (reject,
    no throttle), in one pass over `budgets` and without building the request: the first
    budget it does not fit in (None: it fits), and the room left in the tightest USD budget
    once it is reserved (`remaining`). A batch decides each user's share so, thousands of
    times in its reservation's transaction; on a refusal `decide` says why."""
    usage = estimate.usage
    blocker: Applied | None = None
    left: int | None = None
    for applied in budgets:
        metric = applied.budget.metric
        used = totals.get(applied.counter, _NOTHING).used(metric)
        if metric == "usd":
            need = estimate.cost_nanos
            after = applied.budget.limit - used - need
            left = after if left is None or after < left else left
        elif metric == "text_input_tokens":
            need = usage.text_input + usage.cached_text_input
        elif metric == "image_input_tokens":
            need = usage.image_input + usage.cached_image_input
        elif metric == "image_output_tokens":
            need = usage.image_output
        else:
            need = usage.total_tokens
        if blocker is None and used + need > applied.budget.limit:
            blocker = applied
    return blocker, left


_NOTHING = Totals()


def room(budgets: Iterable[Applied], totals: Mapping[Counter, Totals]) -> int | None:
    """Room left in the tightest USD budget before anything more is reserved (None: no USD
    budget applies)."""
    rooms = [
        a.budget.limit - totals.get(a.counter, Totals()).used("usd")
        for a in budgets
        if a.budget.metric == "usd"
    ]
    return min(rooms) if rooms else None


def remaining(
    variant: Variant, budgets: Iterable[Applied], totals: Mapping[Counter, Totals]
) -> int | None:
    """Room left in the tightest USD budget once `variant` is reserved."""
    rooms = [
        a.budget.limit - totals.get(a.counter, Totals()).used("usd") - variant.estimate.cost_nanos
        for a in budgets
        if a.budget.metric == "usd"
    ]
    return min(rooms) if rooms else None


def variants(start: Variant, team: Team, book: PriceBook) -> Iterator[Variant]:
    """`start`, then ever less faithful variants in the team's `downgrade.order`, most
    faithful first. The knobs are given up in that order, so a variant that keeps a later
    knob closer to the request comes before every variant that gives more of it up: each
    step of a later knob tries the earlier ones afresh from the top. (The later knobs used
    to start from the cheapest form of the earlier ones: under `order: [size, quality]` a
    request that fitted at medium quality and its own size was sent at medium and the
    smallest size.) The fallback model starts from the request as it came, or as the knobs
    before it in the order left it."""
    fallback = fallback_of(team, book)
    return _nested(start, tuple(team.downgrade.order), fallback, team.allow)


def _nested(
    variant: Variant, knobs: tuple[Knob, ...], fallback: ModelPrices | None, allow: Allow
) -> Iterator[Variant]:
    """Every form of `variant` over `knobs`, the last one outermost (given up last)."""
    if not knobs:
        yield variant
        return
    *inner, outer = knobs
    for option in _options(variant, outer, fallback, allow):
        yield from _nested(option, tuple(inner), fallback, allow)


def _options(
    variant: Variant, knob: Knob, fallback: ModelPrices | None, allow: Allow
) -> Iterator[Variant]:
    """`variant`, then its cheaper forms on one knob, most faithful first (lazily: pricing
    the downgrades of a request that fits was most of the request's CPU), each within the
    team's `allow` (a size it lists, a fallback its `allow.params` hold on)."""
    yield variant
    if knob == "quality":
        yield from quality_steps(variant)
    elif knob == "size":
        yield from size_steps(variant, allow.sizes)
    elif knob == "model" and fallback is not None and fallback.name != variant.model.name:
        switched = switch_model(variant, fallback, allow)
        if switched is not None:
            yield switched


def quality_steps(variant: Variant) -> Iterator[Variant]:
    """One step at a time down the model's ladder (`auto` first becomes the top)."""
    ladder = variant.model.qualities
    quality = variant.request.quality
    top = len(ladder) if quality == AUTO else ladder.index(quality)
    for q in reversed(ladder[:top]):
        variant = change(variant, "quality", q, "budget")
        yield variant


def size_steps(variant: Variant, allowed: frozenset[str] | None = None) -> list[Variant]:
    """Cheaper accepted sizes of the same aspect ratio, most expensive (most faithful) first;
    only those in `allowed` (the team's `allow.sizes`) when it is given."""
    model, size = variant.model, variant.request.size
    if size == AUTO:
        candidates = [s for s in (model.sizes or STANDARD_SIZES) if model.accepts_size(s)]
    else:
        candidates = same_aspect_sizes(model, size)
    found = [
        change(variant, "size", s, "budget")
        for s in candidates
        if s != size and (allowed is None or s in allowed)
    ]
    cheaper = [v for v in found if v.estimate.cost_nanos < variant.estimate.cost_nanos]
    return sorted(cheaper, key=lambda v: -v.estimate.cost_nanos)


def same_aspect_sizes(model: ModelPrices, size: str) -> list[str]:
    """Sizes the model accepts with exactly the aspect ratio (and orientation) of `size`."""
    return list(_same_aspect_sizes(model, size))


def _same_aspect_sizes(model: ModelPrices, size: str) -> Iterator[str]:
    """`same_aspect_sizes`, lazily; for a model that takes any size, the smaller ones,
    smallest first."""
    dims = parse_size(size)
    if dims is None:
        return
    width, height = dims
    if model.custom_sizes is None:
        yield from (s for s in model.sizes if _same_aspect(s, width, height))
        return
    g = gcd(width, height)
    base_w, base_h = width // g, height // g
    # Only the multiples whose edges are both multiples of `multiple_of` can be accepted:
    # stepping by the least such multiple asks about 128 sizes of a 2048x2048 request, not
    # 2,048 (a refused request walks them inside the ledger's transaction).
    m = model.custom_sizes.multiple_of
    step = lcm(m // gcd(m, base_w), m // gcd(m, base_h))
    # Nor those below `min_pixels`: the smallest accepted one of a 2048x2048 request is the
    # 51st multiple (816x816), which the floor of a refused request asks for.
    least = isqrt(model.custom_sizes.min_pixels // (base_w * base_h))
    for k in range(max(step, least // step * step), g + 1, step):
        w, h = base_w * k, base_h * k
        if w < width and model.accepts_size(f"{w}x{h}"):
            yield f"{w}x{h}"


def _same_aspect(size: str, width: int, height: int) -> bool:
    dims = parse_size(size)
    return dims is not None and dims[0] * height == dims[1] * width


DALLE_ONLY = (("style", None), ("response_format", "url"))
"""What only DALL·E takes (a parameter, or one of its values): `style` ("unsupported for GPT
image models") and `response_format: url` (a GPT image model answers base64 only)."""


def _dalle_only(request: ImageRequest) -> bool:
    """Whether the request names an option that only DALL·E takes (`DALLE_ONLY`)."""
    return any(
        name == param and (value is None or given == value)
        for name, given in request.params
        for param, value in DALLE_ONLY
    )


def _params_hold(allow: Allow, request: ImageRequest, model: ModelPrices) -> bool:
    try:
        check_params("", allow, request, model)
    except PolicyViolation:
        return False
    return True


def switch_model(
    variant: Variant, fallback: ModelPrices, allow: Allow | None = None
) -> Variant | None:
    """`variant` on the fallback model, its quality and size re-checked on that model; None
    where the fallback would refuse it, or where the team's `allow` (a size it may request,
    `allow.params` on the fallback's defaults) would."""
    request = variant.request
    if (
        request.n > fallback.max_n
        or not fallback.takes_endpoint(request.endpoint)
        or (fallback.per_image_billing and (request.stream or request.endpoint != "generations"))
        or not fallback.takes_input_fidelity(request.input_fidelity)
        or (not fallback.per_image_billing and _dalle_only(request))
    ):
        # It would be refused: variations take dall-e-2 only (the price book's `endpoints`);
        # dall-e-3 makes one image; DALL·E never streams, is no model of the Responses API's
        # image tool, takes no JSON edit (dall-e-3 no edit at all, dall-e-2 one square PNG);
        # gpt-image-2 takes no input_fidelity, gpt-image-1-mini only `low`; a GPT image model
        # takes no `style` and answers no URL.
        return None
    quality = request.quality
    if quality != AUTO and quality not in fallback.qualities:
        quality = fallback.qualities[-1]
    size = request.size
    if not fallback.accepts_size(size):
        dims = parse_size(size)
        same = [
            s
            for s in fallback.sizes
            if dims and _same_aspect(s, *dims) and (allow is None or size_allowed(allow, s))
        ]
        if not same:
            return None  # it cannot keep the orientation: not a fallback for this request
        size = same[0]
    changes = [Change("model", request.model, fallback.name, "budget")]
    if quality != request.quality:
        changes.append(Change("quality", request.quality, quality, "budget"))
    if size != request.size:
        changes.append(Change("size", request.size, size, "budget"))
    switched = request.with_changes(model=fallback.name, quality=quality, size=size)
    if allow is not None and not _params_hold(allow, switched, fallback):
        return None  # a default of the fallback's (input_fidelity: high) the team does not allow
    return Variant(
        switched,
        fallback,
        priced(fallback, switched, variant.base),
        (*variant.changes, *changes),
        variant.base,
    )
