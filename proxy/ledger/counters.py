"""Which budget_usage rows a write touches, in the one order every backend locks them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.core.models import Counter

ORGANIZATION_TOTAL = Counter("organization", "", "", "total", 0.0)
"""Written by every reservation, settlement and release: the first row each one locks."""


def key(c: Counter) -> tuple[Any, ...]:
    return (c.scope, c.team, c.user, c.period, c.start)


def with_organization(counters: Iterable[Counter]) -> list[Counter]:
    """`counters` plus the organization counter of each team counter's window, once each,
    in lock order (scope, team, user, period, start).

    The organization's counters are real rows that every team's writes update too
    (schema version 2), so reading one is reading one row."""
    found = set(counters)
    found |= {
        Counter("organization", "", "", c.period, c.start) for c in found if c.scope == "team"
    }
    return sorted(found, key=key)
