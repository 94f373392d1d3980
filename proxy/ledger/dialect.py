"""How SQLite and PostgreSQL spell the few things the ledger's SQL says differently.

Every statement both backends run is written once, with `?` placeholders and the
reserved word `user` quoted (which SQLite reads as PostgreSQL does), then put in a
dialect's spelling by `Dialect.text`. What remains is listed here: column types,
binary values, placeholders, how a list is matched, byte-wise ordering of text, row locks, the
time buckets of reports, and the clock heartbeats are written and judged by.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Dialect:
    """One database's spelling of the ledger's SQL."""

    name: Literal["sqlite", "postgresql"]
    real: str
    """The type of timestamps and durations."""
    big: str
    """The type of nanos and token counts."""
    blob: str
    """The type of bytes (a kept answer's body)."""
    numbered: bool
    """Placeholders are `$1, $2, …` (PostgreSQL) rather than `?`."""
    collate: str
    """What makes `ORDER BY id` byte-wise, as SQLite's default is; PostgreSQL's follows
    the database's locale unless told."""
    for_update: str
    """What locks the rows a transaction reads until it commits. SQLite has no row locks:
    its transactions take the one write lock (`BEGIN IMMEDIATE`) before they read."""
    by_start: str
    """How rows read back are ordered: by start; ties in the order they were written on
    SQLite (its index keeps it), by id on PostgreSQL (which keeps none)."""
    clock: str
    """The ledger's clock, in seconds, which every process's heartbeat is written and
    judged by: the database server's on PostgreSQL (replicas on several hosts, whose
    clocks differ), the machine's time since it booted on SQLite (`ledger_clock()`, a
    function its connections define: every process sharing the file runs on that machine,
    and no change of the wall clock moves it)."""

    def text(self, sql: str) -> str:
        """`sql`, written with `?` placeholders, in this dialect's spelling."""
        if not self.numbered:
            return sql
        numbers = itertools.count(1)
        return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)

    def one_of(self, column: str, count: int) -> str:
        """A condition that `column` is one of `count` values (passed by `values`): one
        array parameter on PostgreSQL, so the statement's text does not vary with `count`."""
        if self.name == "postgresql":
            return f"{column} = ANY(?::text[])"
        return f"{column} IN ({', '.join('?' * count)})"

    def values(self, items: Sequence[Any]) -> tuple[Any, ...]:
        """The arguments of a `one_of` condition."""
        return (list(items),) if self.name == "postgresql" else tuple(items)

    def bucket(self, seconds: int) -> str:
        """The number of the `seconds`-wide time bucket a row started in."""
        if self.name == "postgresql":
            return f"floor(started_at / {int(seconds)})::bigint"
        # started_at is positive: CAST truncates, which is floor().
        return f"CAST(started_at / {int(seconds)} AS INTEGER)"


SQLITE = Dialect(
    name="sqlite",
    real="REAL",
    big="INTEGER",
    blob="BLOB",
    numbered=False,
    collate="",
    for_update="",
    by_start="started_at",
    clock="ledger_clock()",
)
POSTGRES = Dialect(
    name="postgresql",
    real="DOUBLE PRECISION",
    big="BIGINT",
    blob="BYTEA",
    numbered=True,
    collate=' COLLATE "C"',
    for_update=" FOR UPDATE",
    by_start='started_at, id COLLATE "C"',
    clock="extract(epoch FROM clock_timestamp())::float8",
)
