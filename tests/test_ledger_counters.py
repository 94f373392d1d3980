"""The SQLite ledger's counter writes: every counter of a request's row in one statement,
which adds to the counters exactly what a statement a counter added."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.core.models import Counter, Settlement, Usage
from proxy.ledger import codecs
from proxy.ledger.base import Reservation
from proxy.ledger.sqlite import _UPSERT, SqliteLedger, _add
from tests.test_ledger import entry

DAY, WEEK, MONTH = 86_400.0, 7 * 86_400.0, 30 * 86_400.0


def periods(scope: str, team: str, user: str, starts: tuple[float, ...]) -> list[Counter]:
    return [
        Counter(scope, team, user, period, start)
        for period, start in zip(("day", "week", "month", "total"), starts, strict=True)
    ]


STARTS = (3 * DAY, 2 * DAY, DAY, 0.0)
TEAM_AND_USER = (
    *periods("team", "design", "", STARTS),
    *periods("user", "design", "alice", STARTS),
)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    opened = SqliteLedger(tmp_path / "ledger.db")
    await opened.open()
    yield opened
    await opened.close()


async def test_a_reservation_and_its_settlement_write_their_twelve_counters_in_one_statement(
    ledger: SqliteLedger,
) -> None:
    written: list[str] = []
    inline = ledger.file._inline
    assert inline is not None
    inline.set_trace_callback(lambda sql: written.append(sql))

    def choose(totals: object) -> Reservation:
        return Reservation(entry("r1"), Usage(text_input=20, image_output=7024), TEAM_AND_USER)

    await ledger.reserve([], choose)
    reserving = [s for s in written if "budget_usage" in s]
    written.clear()
    await ledger.settle("r1", Settlement(1010.0, "ok", 200, cost_nanos=210_765_000))
    settling = [s for s in written if "budget_usage" in s]
    assert len(reserving) == len(settling) == 1
    totals = await ledger.totals([*TEAM_AND_USER, *periods("organization", "", "", STARTS)])
    assert len(totals) == 12
    assert {t.spent_nanos for t in totals.values()} == {210_765_000}
    assert {t.reserved_nanos for t in totals.values()} == {0}


COUNTER_SETS = [
    TEAM_AND_USER,
    # A week and a month that start the day the day does; a user named as her team is.
    (
        *periods("team", "design", "", (DAY, DAY, DAY, 0.0)),
        *periods("user", "design", "design", (DAY, DAY, DAY, 0.0)),
    ),
    # No user; windows whose starts are other counters' (and a start equal to a delta).
    tuple(periods("team", "research", "", (WEEK, MONTH, 5.0, 0.0))),
    # One counter, and none at all.
    (Counter("user", "design", "", "day", 0.0),),
    (),
    # A team named as a period, a user as a scope, starts given as integers and floats.
    (
        *periods("team", "day", "", (0, 0.0, DAY, 86_400)),
        *periods("user", "day", "team", (0, 0.0, DAY, 86_400)),
    ),
    # Past `ONE_STATEMENT_COUNTERS`: a statement a counter.
    tuple(Counter("user", "design", f"u{n}", "day", DAY) for n in range(70)),
]
DELTAS: list[codecs.Deltas] = [
    (0, 500_000_000, (20, 0, 7024, 7044)),
    (210_765_000, -500_000_000, (-11, 0, 0, -11)),
    (5, 5, (5, 5, 0, 1)),
    (-210_765_005, 0, (0, -5, 0, 0)),
]


@pytest.mark.parametrize("counters", COUNTER_SETS)
async def test_one_statement_adds_what_a_statement_a_counter_adds(
    tmp_path: Path, counters: tuple[Counter, ...]
) -> None:
    found = []
    for name, write in (("each", each), ("one", _add)):
        ledger = SqliteLedger(tmp_path / f"{name}.db")
        await ledger.open()
        try:
            conn = ledger.file._inline
            assert conn is not None
            text = codecs.counters_text(counters)
            for deltas in DELTAS * 2:
                write(conn, text, deltas)
            found.append(
                conn.execute("SELECT * FROM budget_usage ORDER BY 1, 2, 3, 4, 5").fetchall()
            )
        finally:
            await ledger.close()
    assert found[0] == found[1]
    assert {row[:5] for row in found[0]} >= set(codecs.written_keys(codecs.counters_text(counters)))


def each(conn: sqlite3.Connection, text: str, deltas: codecs.Deltas) -> None:
    """A statement a counter, as the counters were written before."""
    conn.executemany(_UPSERT, codecs.counter_rows(text, deltas))
