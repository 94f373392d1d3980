"""`GET /v1/organization/costs` built from the billing record (pure; `now` passed in).

Prices are OpenAI's published rates (USD, Standard tier), written here (and, for the
Responses API's mainline models, in `catalogue`) apart from the proxy's price book.
Line items are named `"<model>, <kind>"`: e.g. `"gpt-image-2, image output"` or
`"dall-e-3, images"` for image models; and as OpenAI names a text model's,
`"gpt-5.5, input"` (uncached), `"gpt-5.5, cached input"` and `"gpt-5.5, output"`
(reasoning included) for a Responses request's mainline model (and
`"gpt-5.6-sol, cache write"` for the input a model that bills its prompt-cache writes
wrote, at its write rate, out of its input item), with `", long context"`
appended when the request was billed at the model's long-context rates. A Responses
request adds both: its mainline model's line items and its image tool's, priced at the
image model's rates as for the Images API.

A line of a batch is billed at the batch rate (`catalogue.BATCH_RATE`, half of every
rate) and named as OpenAI's Cost export names batch spend, by modality:
`"batch api | <model> image"` (image input and image output tokens together) and
`"batch api | <model> text"` (text input and text output tokens together), each
quantity the tokens summed, unit `tokens`; e.g. `"batch api | gpt-image-2.5-sunburst
image"`. A per-image model would be `"batch api | <model> images"`, but the simulated
Batch API accepts no DALL·E model. Its entries' `time` is the batch's end, so batch
spend falls in the UTC day's bucket the batch completed (was cancelled, expired) on.
Run as a regional (data-residency) endpoint, each model's line items are billed at
`catalogue.residency_uplift` of its amount (x1.1 for models released on or after
2026-03-05), names unchanged.
A Responses line of a batch adds its image tool's items so and its mainline model's at
the batch rate, named as directly under the prefix: `"batch api | gpt-5.5, input"`,
`"… cached input"`, `"… output"` (no export of OpenAI's was seen for them: the
simulator's choice; `reconcile` reads the model either way).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any

from starlette.datastructures import QueryParams

from proxy.simulator.billing import Entry, MainlineUsage
from proxy.simulator.catalogue import BATCH_RATE, MAINLINE_MODELS, residency_uplift

DAY = 86_400
DEFAULT_LIMIT = 7
MAX_LIMIT = 180
PER_MILLION = Decimal(1_000_000)
GROUPS = ("line_item", "project_id")

LONG_CONTEXT = ", long context"
BATCH_PREFIX = "batch api | "
_BATCH_KINDS = (("image", ("image_input", "image_output")), ("text", ("text_input", "text_output")))

_TOKEN_KINDS = (
    ("text_input", "text input"),
    ("image_input", "image input"),
    ("image_output", "image output"),
    ("text_output", "text output"),
)


def _per_million(text_in: str, image_in: str, image_out: str, text_out: str) -> dict[str, Decimal]:
    return {
        "text_input": Decimal(text_in),
        "image_input": Decimal(image_in),
        "image_output": Decimal(image_out),
        "text_output": Decimal(text_out),
    }


_GPT_2 = _per_million("5.00", "8.00", "30.00", "0")
_GPT_15 = _per_million("5.00", "8.00", "32.00", "10.00")
TOKEN_PRICES: Mapping[str, Mapping[str, Decimal]] = MappingProxyType(
    {
        "gpt-image-1": _per_million("5.00", "10.00", "40.00", "0"),
        "gpt-image-1-mini": _per_million("2.00", "2.50", "8.00", "0"),
        "gpt-image-1.5": _GPT_15,
        "chatgpt-image-latest": _GPT_15,
        "gpt-image-2": _GPT_2,
        "gpt-image-2-2026-04-21": _GPT_2,
        "gpt-image-2.5-sunburst": _GPT_2,
        "gpt-image-2.5-sunburst-2026-09-08": _GPT_2,
        "gpt-image-2.5-flare": _GPT_2,
        "gpt-image-2.5-flare-2026-09-08": _GPT_2,
        "gpt-image-2.6-sunburst": _GPT_2,
        "gpt-image-2.6-flare": _GPT_2,
    }
)
# Per image, by (model, quality, size); dall-e-2 has one quality.
IMAGE_PRICES: Mapping[tuple[str, str, str], Decimal] = MappingProxyType(
    {
        ("dall-e-3", "standard", "1024x1024"): Decimal("0.04"),
        ("dall-e-3", "standard", "1792x1024"): Decimal("0.08"),
        ("dall-e-3", "standard", "1024x1792"): Decimal("0.08"),
        ("dall-e-3", "hd", "1024x1024"): Decimal("0.08"),
        ("dall-e-3", "hd", "1792x1024"): Decimal("0.12"),
        ("dall-e-3", "hd", "1024x1792"): Decimal("0.12"),
        ("dall-e-2", "standard", "256x256"): Decimal("0.016"),
        ("dall-e-2", "standard", "512x512"): Decimal("0.018"),
        ("dall-e-2", "standard", "1024x1024"): Decimal("0.020"),
    }
)


class CostsQueryError(ValueError):
    """A bad query parameter, named in `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LineCost:
    """What one billed request adds to one line item."""

    line_item: str
    project_id: str | None
    amount: Decimal
    quantity: int
    unit: str


def line_costs(entry: Entry) -> list[LineCost]:
    """The priced line items of one record entry (none when it was not billed)."""
    if not entry.billed:
        return []
    project = entry.headers.get("openai-project")
    mainline, image = _mainline_costs(entry, project), _image_costs(entry, project)
    if entry.data_residency:
        mainline = _at_residency(mainline, entry.mainline_model)
        image = _at_residency(image, entry.model)
    return [*mainline, *image]


def _at_residency(lines: list[LineCost], model: str | None) -> list[LineCost]:
    """`lines` as a regional endpoint bills them: `model`'s uplift on each amount."""
    uplift = residency_uplift(model or "")
    return [replace(line, amount=line.amount * uplift) for line in lines]


def _image_costs(entry: Entry, project: str | None) -> list[LineCost]:
    """The image model's line items (for `responses`, its image tool's)."""
    if entry.model is None:
        return []
    if entry.usage is None:
        price = IMAGE_PRICES.get((entry.model, entry.quality or "", entry.size or ""))
        if price is None:
            return []
        return [
            LineCost(
                f"{entry.model}, images", project, price * entry.images, entry.images, "images"
            )
        ]
    prices = TOKEN_PRICES.get(entry.model, {})
    if entry.batch_id is not None:
        return _batch_costs(entry, project, prices)
    lines = []
    for kind, label in _TOKEN_KINDS:
        tokens: int = getattr(entry.usage, kind)
        if tokens:
            amount = prices.get(kind, Decimal(0)) * tokens / PER_MILLION
            lines.append(LineCost(f"{entry.model}, {label}", project, amount, tokens, "tokens"))
    return lines


def _batch_costs(
    entry: Entry, project: str | None, prices: Mapping[str, Decimal]
) -> list[LineCost]:
    """A batch line's items: by modality, at the batch rate."""
    assert entry.model is not None and entry.usage is not None
    lines = []
    for label, kinds in _BATCH_KINDS:
        tokens = sum(getattr(entry.usage, kind) for kind in kinds)
        if tokens:
            amount = sum(
                prices.get(kind, Decimal(0)) * BATCH_RATE * getattr(entry.usage, kind)
                for kind in kinds
            )
            name = f"{BATCH_PREFIX}{entry.model} {label}"
            lines.append(LineCost(name, project, amount / PER_MILLION, tokens, "tokens"))
    return lines


def _mainline_costs(entry: Entry, project: str | None) -> list[LineCost]:
    """A Responses request's mainline model's line items, at that model's rates."""
    usage: MainlineUsage | None = entry.mainline
    rule = MAINLINE_MODELS.get(entry.mainline_model or "")
    if usage is None or rule is None:
        return []
    rates = rule.rates_for(usage.input)
    suffix = LONG_CONTEXT if rates is not rule.rates else ""
    prefix, share = (BATCH_PREFIX, BATCH_RATE) if entry.batch_id is not None else ("", 1)
    lines = []
    write = rates.cache_write if rates.cache_write is not None else rates.input
    for label, tokens, rate in (
        ("input", usage.input - usage.cached_input - usage.cache_write, rates.input),
        ("cache write", usage.cache_write, write),
        ("cached input", usage.cached_input, rates.cached_input),
        ("output", usage.output, rates.output),
    ):
        if tokens:
            name = f"{prefix}{rule.name}, {label}{suffix}"
            amount = rate * share * tokens / PER_MILLION
            lines.append(LineCost(name, project, amount, tokens, "tokens"))
    return lines


def _int_param(query: QueryParams, name: str, default: int | None) -> int | None:
    value = query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise CostsQueryError(f"Invalid '{name}': expected an integer.", name) from exc


def _results(lines: Iterable[LineCost], group_by: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple[str | None, str | None], list[LineCost]] = defaultdict(list)
    for line in lines:
        key = (
            line.line_item if "line_item" in group_by else None,
            line.project_id if "project_id" in group_by else None,
        )
        groups[key].append(line)
    results = []
    for (line_item, project_id), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        result: dict[str, Any] = {
            "object": "organization.costs.result",
            "amount": {"value": float(sum(m.amount for m in members)), "currency": "usd"},
            "line_item": line_item,
            "project_id": project_id,
        }
        if "line_item" in group_by:
            result["quantity"] = sum(m.quantity for m in members)
            result["quantity_unit"] = members[0].unit
        results.append(result)
    return results


def costs_page(entries: Iterable[Entry], query: QueryParams, *, now: float) -> dict[str, Any]:
    """One page of daily cost buckets from `start_time`, OpenAI's Costs API shape."""
    asked = _CostsQuery.of(query, now)
    starts = list(range(asked.start, asked.end, DAY))
    chosen = starts[asked.first : asked.first + asked.limit]
    data = [_bucket(entries, start, min(start + DAY, asked.end), asked) for start in chosen]
    has_more = asked.first + asked.limit < len(starts)
    return {
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": f"page_{asked.first + asked.limit}" if has_more else None,
    }


@dataclass(frozen=True)
class _CostsQuery:
    """The Costs API's parameters: the time range, the page and the grouping."""

    start: int
    end: int
    limit: int
    first: int
    """The index of the page's first bucket (its cursor is `page_<first>`)."""
    group_by: list[str]
    project_ids: frozenset[str] = frozenset()
    """Only these projects' costs (`project_ids[]`; none: every project's)."""
    line_items: frozenset[str] = frozenset()
    """Only these line items' (`line_items[]`, exact names; none: every line item's)."""

    def keeps(self, line: LineCost) -> bool:
        """Whether `line` passes the query's filters."""
        if self.project_ids and line.project_id not in self.project_ids:
            return False
        return not self.line_items or line.line_item in self.line_items

    @classmethod
    def of(cls, query: QueryParams, now: float) -> _CostsQuery:
        start = _int_param(query, "start_time", None)
        if start is None:
            raise CostsQueryError("Missing required parameter: 'start_time'.", "start_time")
        end = _int_param(query, "end_time", int(now) + 1)
        assert end is not None
        if query.get("bucket_width", "1d") != "1d":
            raise CostsQueryError("Invalid 'bucket_width': only '1d' is supported.", "bucket_width")
        limit = _int_param(query, "limit", DEFAULT_LIMIT)
        assert limit is not None
        if not 1 <= limit <= MAX_LIMIT:
            raise CostsQueryError(f"Invalid 'limit': expected 1 to {MAX_LIMIT}.", "limit")
        group_by = query.getlist("group_by[]") + query.getlist("group_by")
        for group in group_by:
            if group not in GROUPS:
                raise CostsQueryError(
                    f"Invalid 'group_by': '{group}' is not supported.", "group_by"
                )
        page = query.get("page") or "0"
        try:
            first = int(page.removeprefix("page_"))
        except ValueError as exc:
            raise CostsQueryError("Invalid 'page' cursor.", "page") from exc
        if first < 0:
            raise CostsQueryError("Invalid 'page' cursor.", "page")
        projects = frozenset(query.getlist("project_ids[]") + query.getlist("project_ids"))
        items = frozenset(query.getlist("line_items[]") + query.getlist("line_items"))
        return cls(start, end, limit, first, group_by, projects, items)


def _bucket(entries: Iterable[Entry], start: int, end: int, asked: _CostsQuery) -> dict[str, Any]:
    """One day's bucket: the cost of every entry billed from `start` to `end`, of the
    projects and line items asked for."""
    lines = [
        line
        for entry in entries
        if start <= entry.time < end
        for line in line_costs(entry)
        if asked.keeps(line)
    ]
    return {
        "object": "bucket",
        "start_time": start,
        "end_time": end,
        "results": _results(lines, asked.group_by) if lines else [],
    }
