"""What both ledger backends share for finance reads: the grouped-sums query and its rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from proxy.ledger.base import Aggregate, GroupColumn

EXPORT_BATCH = 1000

# How each group column is read: what was sent, else (rejections) what was requested.
GROUP_SQL: dict[GroupColumn, str] = {
    "team": "team",
    "cost_center": "cost_center",
    "user": "user",
    "key_id": "key_id",
    "model": "COALESCE(model, model_requested)",
    "quality": "COALESCE(quality, quality_requested)",
    "size": "COALESCE(size, size_requested)",
    "endpoint": "endpoint",
    "outcome": "outcome",
}
SUMS = (
    "COUNT(*)",
    "SUM(images)",
    "SUM(text_input_tokens + cached_text_input_tokens)",
    "SUM(image_input_tokens + cached_image_input_tokens)",
    "SUM(image_output_tokens)",
    "SUM(cost_nanos)",
)


def summary_sql(keys: Sequence[str], start: str, end: str) -> str:
    """`SELECT keys…, sums… FROM requests` over settled rows in [start, end), grouped by
    the keys; `start`/`end` are the backend's placeholders (`?` or `$1`)."""
    select = ", ".join([*keys, *SUMS])
    group = f" GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}" if keys else ""
    return (
        f"SELECT {select} FROM requests "
        f"WHERE state = 'settled' AND started_at >= {start} AND started_at < {end}{group}"
    )


def aggregates(found: Iterable[Sequence[Any]], width: int) -> list[Aggregate]:
    """Rows of `summary_sql` with `width` keys as Aggregates."""
    return [
        Aggregate(tuple(r[:width]), *(int(v or 0) for v in tuple(r)[width:]))
        for r in found
        if r[width]  # an empty period still answers one all-NULL row when ungrouped
    ]
