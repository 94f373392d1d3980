"""A Responses API request's spend in its two parts, each under the model that billed it (pure).

    found = await ledger.summarize(start, end, [*columns, "mainline_model"])
    groups = split(found, columns)      # as if grouped by `columns`, the parts apart

OpenAI bills a Responses request under two models: its mainline text model's tokens and
its image tool's. A ledger row holds both (`model` is the image tool's, `mainline_model`
and `mainline_cost_nanos` the mainline's), so whatever groups rows by model, quality or
size splits them: the request itself (`requests` 1, its images, the image tool's tokens
and `cost_nanos - mainline_cost_nanos`) stays under its image model, quality and size;
the mainline model's input tokens and cost go under the mainline model, with no quality
or size and `requests` 0, so that a request is counted once and every dollar once. A
request that made no image (no image tool, or `tool_choice: none`) records no image model,
quality or size: it is counted whole under its mainline model, `requests` 1. The
ledger groups by the mainline model in SQL; this folds a few hundred groups, not rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from proxy.ledger.base import Aggregate, GroupColumn

MODEL_COLUMNS: frozenset[GroupColumn] = frozenset({"model", "quality", "size"})
"""What describes the image tool: the mainline part has its own model, and no quality or
size."""


def splits(columns: Sequence[GroupColumn]) -> bool:
    """Whether grouping by `columns` tells the two parts of a Responses request apart."""
    return not MODEL_COLUMNS.isdisjoint(columns)


def split(aggregates: Iterable[Aggregate], columns: Sequence[GroupColumn]) -> list[Aggregate]:
    """`aggregates` grouped by `columns`, then `mainline_model` (then, maybe, a time
    bucket), as grouped by `columns` (and the bucket), each group of Responses requests
    in two: its image part under its keys, its mainline part under the mainline model.

        split([Aggregate(("gpt-image-2", "gpt-5.5"), 1, 1, 1500, 0, 4160, 90, 1400, 30)],
              ["model"])
        → [Aggregate(("gpt-image-2",), 1, 1, 100, 0, 4160, 60),
           Aggregate(("gpt-5.5",), 0, 0, 1400, 0, 0, 30, 1400, 30)]

    Several groups may end up with the same keys (two image models called by one mainline
    model): callers add them up, as they add up time buckets."""
    at = len(columns)
    tool = [i for i, c in enumerate(columns) if c in MODEL_COLUMNS]
    found: list[Aggregate] = []
    for a in aggregates:
        keys = a.keys[:at] + a.keys[at + 1 :]
        mainline = a.keys[at]
        if mainline is not None and all(keys[i] is None for i in tool):
            # Requests that made no image (no image tool, or `tool_choice: none`) recorded no
            # image model: they ran their mainline model alone, and are counted under it.
            own = tuple(
                _mainline_key(c, k, mainline) for c, k in zip(columns, keys[:at], strict=True)
            )
            found.append(replace(a, keys=own + keys[at:]))
            continue
        if mainline is None or not (a.mainline_cost_nanos or a.mainline_text_input_tokens):
            found.append(replace(a, keys=keys, mainline_text_input_tokens=0, mainline_cost_nanos=0))
            continue
        found.append(
            replace(
                a,
                keys=keys,
                text_input_tokens=a.text_input_tokens - a.mainline_text_input_tokens,
                cost_nanos=a.cost_nanos - a.mainline_cost_nanos,
                mainline_text_input_tokens=0,
                mainline_cost_nanos=0,
            )
        )
        own = tuple(_mainline_key(c, k, mainline) for c, k in zip(columns, keys[:at], strict=True))
        found.append(
            Aggregate(
                own + keys[at:],
                text_input_tokens=a.mainline_text_input_tokens,
                cost_nanos=a.mainline_cost_nanos,
                mainline_text_input_tokens=a.mainline_text_input_tokens,
                mainline_cost_nanos=a.mainline_cost_nanos,
            )
        )
    return found


def _mainline_key(column: GroupColumn, key: object, mainline: object) -> object:
    if column == "model":
        return mainline
    return None if column in MODEL_COLUMNS else key


def is_mainline(a: Aggregate) -> bool:
    """Whether `a` (from `split`) is a mainline part: every dollar and text token its
    mainline model's (no request of its own, or requests that made no image)."""
    return (a.mainline_cost_nanos or a.mainline_text_input_tokens) != 0 and (
        a.cost_nanos,
        a.text_input_tokens,
    ) == (a.mainline_cost_nanos, a.mainline_text_input_tokens)
