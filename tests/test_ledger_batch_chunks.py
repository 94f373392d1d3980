"""A finished batch settled on SQLite a chunk of lines a transaction (`sqlite_batches`): the
write lock free between two chunks, nothing counted twice or lost meanwhile, a settlement
stopped half-way (an error, the process gone) or raced by another completed exactly, and
the same rows and counters as the whole batch in one transaction."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.errors import LedgerError
from proxy.core.models import Settlement
from proxy.ledger import open_ledger, sqlite_batches
from proxy.ledger.base import BilledLine
from proxy.ledger.copy import copy_between
from proxy.ledger.sqlite import SqliteLedger
from tests import pg
from tests.pg import ledger_url
from tests.test_ledger import take
from tests.test_ledger_batches import (
    CREATION_COUNTERS,
    END_COUNTERS,
    ENDED,
    EVERY_COUNTER,
    LINE_BOUND,
    billed,
    every_row,
    reserve_batch,
    take_batch,
)

DONE = Settlement(ENDED, "ok", 200)
LINES = 10
CHUNK = 3


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Callable[[], Awaitable[None]]]]:
    """`CHUNK` lines a transaction, and what runs between two chunks' transactions: the
    calls appended, one per pause, in order (no pause once they are used up)."""
    pauses: list[Callable[[], Awaitable[None]]] = []

    async def between() -> None:
        if pauses:
            await pauses.pop(0)()

    monkeypatch.setattr(sqlite_batches, "CHUNK_LINES", CHUNK)
    monkeypatch.setattr(sqlite_batches, "between_chunks", between)
    yield pauses


def lines_of(count: int, cost: int = 0) -> list[BilledLine]:
    return [billed(i, cost=cost and cost + i) for i in range(1, count + 1)]


def counted(ledger: SqliteLedger) -> list[int]:
    """How many write transactions `ledger` runs from now on (one item each)."""
    found: list[int] = []
    transaction = ledger.file.transaction

    async def counting(work: Any, *, long: bool = False) -> Any:
        found.append(1)
        return await transaction(work, long=long)

    ledger.file.transaction = counting  # type: ignore[method-assign]
    return found


async def opened(path: Path) -> SqliteLedger:
    ledger = SqliteLedger(path)
    await ledger.open()
    return ledger


def kept(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as a report or an export reads them, but which settlement call wrote each line
    (`billing_by`: none when one transaction wrote them all) and the ledger's clock when
    the batch was reserved (`reserved_clock`: two ledgers reserve it at two moments)."""
    return [{k: v for k, v in r.items() if k not in UNKEPT} for r in rows]


UNKEPT = ("billing_by", "reserved_clock")


async def settled_at_once(path: Path, lines: list[BilledLine]) -> tuple[list[Any], Any]:
    """The rows (`kept`) and counters of the same batch settled in one transaction."""
    ledger = await opened(path)
    try:
        await reserve_batch(ledger, lines=LINES)
        chunk, sqlite_batches.CHUNK_LINES = sqlite_batches.CHUNK_LINES, len(lines) + 1
        try:
            assert await ledger.settle_batch("b1", lines, DONE) == max(len(lines), 1)
        finally:
            sqlite_batches.CHUNK_LINES = chunk
        return kept(await every_row(ledger)), await ledger.totals(EVERY_COUNTER)
    finally:
        await ledger.close()


def written_by(path: Path) -> dict[str, int]:
    """How many line rows (the reservation's aside) each settlement call wrote."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        found = db.execute(
            "SELECT billing_by, count(*) FROM requests WHERE billing_by IS NOT NULL "
            "AND id <> 'b1' GROUP BY billing_by"
        ).fetchall()
    return dict(found)


async def test_a_batch_settles_a_chunk_a_transaction_and_the_lock_is_free_between_them(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """Ten lines, three a transaction: the reservation's row takes the first, the other
    nine are written in three transactions, and a last one settles them. Between two of
    them another worker takes the write lock without waiting, and reserves."""
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    other = await opened(path)
    await reserve_batch(ledger, lines=LINES)
    before = await ledger.totals(EVERY_COUNTER)
    took: list[str] = []

    async def another_worker() -> None:
        with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")  # no busy timeout: raises if the lock is held
            db.execute("ROLLBACK")
        await other.reserve(CREATION_COUNTERS[:1], take("r1", estimate=5))
        took.append("r1")

    chunks.append(another_worker)
    transactions = counted(ledger)
    assert await ledger.settle_batch("b1", lines_of(LINES), DONE) == LINES
    assert took == ["r1"]
    assert len(transactions) == math.ceil((LINES - 1) / CHUNK) + 1 == 4
    assert list(written_by(path).values()) == [LINES - 1]
    after = await ledger.totals(EVERY_COUNTER)
    assert after[CREATION_COUNTERS[0]].reserved_nanos == 5  # the other worker's alone
    assert after != before
    await other.close()
    await ledger.close()


async def test_between_chunks_nothing_is_counted_twice_by_reports_holdings_or_budgets(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """Half-way, a report sums the lines written so far, and the reservation holds the rest
    of its bound (the reconciliation and the project reports add the two); the counters are
    the reservation's, whole, as before the settlement began; a line written cannot be
    resolved yet (its counters have not moved)."""
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await reserve_batch(ledger, lines=LINES)
    bound = LINES * LINE_BOUND
    totals = await ledger.totals(EVERY_COUNTER)
    assert await ledger.summarize(0.0, 10 * ENDED, ["team"]) == []
    [held] = await ledger.holding(10 * ENDED)
    assert held.reserved_nanos == bound
    lines = [replace(line, settlement=replace(line.settlement, flagged=True))
             for line in lines_of(LINES)]  # fmt: skip
    seen: list[int] = []

    async def look() -> None:
        written = lines[1 : 1 + CHUNK * (len(seen) + 1)]
        assert sum(written_by(path).values()) == len(written)
        [report] = await ledger.summarize(0.0, 10 * ENDED, ["team"])
        assert report.requests == len(written)
        assert report.cost_nanos == sum(line.settlement.cost_nanos for line in written)
        [holding] = await ledger.holding(10 * ENDED)
        assert report.cost_nanos + holding.reserved_nanos == bound
        assert await ledger.totals(EVERY_COUNTER) == totals
        assert [b.reserved_nanos for b in await ledger.open_batches()] == [bound]
        flagged = await ledger.flagged(0.0, 10 * ENDED)
        assert {f.id for f in flagged} == {line.entry.id for line in written}
        with pytest.raises(LedgerError, match="still being settled"):
            await ledger.resolve(written[0].entry.id, 0, ENDED + 5.0)
        seen.append(1)

    chunks.extend([look, look])
    assert await ledger.settle_batch("b1", lines, DONE) == LINES
    assert seen == [1, 1]
    [summary] = await ledger.summarize(0.0, 10 * ENDED, ["team"])
    assert summary.requests == LINES
    assert summary.cost_nanos == sum(line.settlement.cost_nanos for line in lines)
    assert await ledger.holding(10 * ENDED) == []
    assert await ledger.open_batches() == []
    before = (await ledger.totals(EVERY_COUNTER))[END_COUNTERS[0]].spent_nanos
    assert await ledger.resolve(lines[1].entry.id, 0, ENDED + 5.0) == lines[1].settlement.cost_nanos
    after = (await ledger.totals(EVERY_COUNTER))[END_COUNTERS[0]].spent_nanos
    assert before - after == lines[1].settlement.cost_nanos
    await ledger.close()


async def test_a_chunk_that_fails_leaves_nothing_counted_and_a_retry_settles_it_exactly(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await reserve_batch(ledger, lines=LINES)
    totals = await ledger.totals(EVERY_COUNTER)
    transaction = ledger.file.transaction
    calls: list[int] = []

    async def failing_second(work: Any, *, long: bool = False) -> Any:
        calls.append(1)
        if len(calls) != 2:
            return await transaction(work, long=long)

        def broken(conn: sqlite3.Connection) -> Any:
            work(conn)  # the second chunk written, then the transaction fails
            raise LedgerError("disk I/O error")

        return await transaction(broken, long=long)

    ledger.file.transaction = failing_second  # type: ignore[method-assign]
    lines = lines_of(LINES)
    with pytest.raises(LedgerError, match="disk I/O error"):
        await ledger.settle_batch("b1", lines, DONE)
    assert sum(written_by(path).values()) == CHUNK  # the first chunk's
    assert await ledger.totals(EVERY_COUNTER) == totals
    [reserved] = [r for r in await every_row(ledger) if r["id"] == "b1"]
    first_chunk = sum(line.settlement.cost_nanos for line in lines[1 : 1 + CHUNK])
    assert (reserved["state"], reserved["billed_lines"]) == ("reserved", CHUNK)
    assert reserved["billed_nanos"] == first_chunk
    ledger.file.transaction = transaction  # type: ignore[method-assign]

    assert await ledger.settle_batch("b1", lines, DONE) == LINES
    assert list(written_by(path).values()) == [LINES - 1]  # the retry's, not the first's
    rows, after = kept(await every_row(ledger)), await ledger.totals(EVERY_COUNTER)
    await ledger.close()
    assert (rows, after) == await settled_at_once(tmp_path / "once.db", lines)
    assert len(rows) == LINES and len({r["id"] for r in rows}) == LINES


async def test_a_settlement_whose_process_is_gone_half_way_is_completed_exactly_after_reopening(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await reserve_batch(ledger, lines=LINES)
    totals = await ledger.totals(EVERY_COUNTER)

    async def gone() -> None:
        await ledger.close()  # the process killed between two chunks

    chunks.extend([lambda: asyncio.sleep(0), gone])
    lines = lines_of(LINES)
    with pytest.raises(LedgerError):
        await ledger.settle_batch("b1", lines, DONE)
    assert sum(written_by(path).values()) == 2 * CHUNK

    again = await opened(path)
    assert await again.totals(EVERY_COUNTER) == totals
    assert await again.settle_batch("b1", lines, DONE) == LINES
    assert list(written_by(path).values()) == [LINES - 1]
    rows, after = kept(await every_row(again)), await again.totals(EVERY_COUNTER)
    assert await again.settle_batch("b1", lines, DONE) == 0
    await again.close()
    assert (rows, after) == await settled_at_once(tmp_path / "once.db", lines)


@pytest.mark.parametrize("second", [LINES, 2], ids=["chunked", "at-once"])
async def test_two_workers_settling_one_batch_together_write_each_line_once(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]], second: int
) -> None:
    """A worker that adopted the batch settles it while the first is between two chunks:
    the second deletes the first's rows and writes its own (in chunks, or at once when its
    lines fit one transaction), and the first stops, having written nothing that counts."""
    path = tmp_path / "ledger.db"
    first, other = await opened(path), await opened(path)
    await reserve_batch(first, lines=LINES)
    lines = lines_of(LINES)
    theirs = [billed(i, row_id=f"theirs-{i}") for i in range(1, second + 1)]

    async def adopted_and_settled() -> None:
        assert await other.settle_batch("b1", theirs, DONE) == second

    chunks.append(adopted_and_settled)
    assert await first.settle_batch("b1", lines, DONE) == 0
    rows, totals = kept(await every_row(first)), await first.totals(EVERY_COUNTER)
    await first.close()
    await other.close()
    assert sum(written_by(path).values()) == (second - 1 if second > CHUNK + 1 else 0)
    assert sorted(r["id"] for r in rows) == sorted(
        ["b1", *(f"theirs-{i}" for i in range(2, second + 1))]
    )
    assert (rows, totals) == await settled_at_once(tmp_path / "once.db", theirs)


async def test_a_worker_whose_settlement_was_taken_over_stops_at_its_next_chunk(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """The other way round: the second worker is paused half-way after taking the
    settlement over; the first, resuming, finds the claim is no longer its own."""
    path = tmp_path / "ledger.db"
    first, other = await opened(path), await opened(path)
    await reserve_batch(first, lines=LINES)
    resume_first = asyncio.Event()
    resume_other = asyncio.Event()

    async def first_pauses() -> None:
        resume_other.set()
        await resume_first.wait()

    async def other_pauses() -> None:
        resume_first.set()

    chunks.extend([first_pauses, other_pauses])
    theirs = [billed(i, row_id=f"theirs-{i}") for i in range(1, LINES + 1)]

    async def other_settles() -> int:
        await resume_other.wait()
        return await other.settle_batch("b1", theirs, DONE)

    found = await asyncio.gather(first.settle_batch("b1", lines_of(LINES), DONE), other_settles())
    assert list(found) == [0, LINES]
    rows, totals = kept(await every_row(first)), await first.totals(EVERY_COUNTER)
    await first.close()
    await other.close()
    assert list(written_by(path).values()) == [LINES - 1]
    assert (rows, totals) == await settled_at_once(tmp_path / "once.db", theirs)


class Stopped(Exception):
    """The settling process gone between two chunks."""


def billed_by(i: int, user: str, cost: int) -> BilledLine:
    """Line `i` of `user` ('': none), its own tokens, charged `cost`."""
    line = billed(i, cost=cost)
    counters = tuple(
        replace(c, user=user) for c in END_COUNTERS if c.scope != "user" or user
    )  # fmt: skip
    usage = replace(line.settlement.usage, image_output=4000 + i, text_output=i)
    return BilledLine(
        replace(line.entry, user=user or None),
        replace(line.settlement, usage=usage),
        counters,
    )


@settings(max_examples=40, deadline=None)
@given(
    chunk=st.integers(1, 4),
    lines=st.lists(
        st.tuples(st.sampled_from(["alice", "bob", ""]), st.integers(1, 30_000_000)),
        max_size=12,
    ),
    stop=st.integers(0, 5),
)
def test_chunked_settlement_leaves_the_rows_and_counters_of_one_transaction(
    chunk: int, lines: list[tuple[str, int]], stop: int
) -> None:
    """Whatever the lines, their users and the chunk size, and wherever a first settlement
    stopped (`stop`: after that many chunks; 0: it did not), the same rows and counters as
    the batch settled in one transaction."""
    billed_lines = [billed_by(i, user, cost) for i, (user, cost) in enumerate(lines, 1)]
    bob = [replace(c, user="bob") for c in END_COUNTERS if c.scope == "user"]
    counters = [*EVERY_COUNTER, *bob]
    pauses: list[int] = []

    async def between() -> None:
        pauses.append(1)
        if len(pauses) == stop:
            raise Stopped

    async def chunked(path: Path) -> tuple[list[Any], Any]:
        ledger = await opened(path)
        try:
            await reserve_batch(ledger, lines=LINES)
            with contextlib.suppress(Stopped):
                written = await ledger.settle_batch("b1", billed_lines, DONE)
                assert written == max(len(lines), 1)
            await ledger.settle_batch("b1", billed_lines, DONE)
            return kept(await every_row(ledger)), await ledger.totals(counters)
        finally:
            await ledger.close()

    async def at_once(path: Path) -> tuple[list[Any], Any]:
        rows, _ = await settled_at_once(path, billed_lines)
        ledger = await opened(path)
        try:
            return rows, await ledger.totals(counters)
        finally:
            await ledger.close()

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite_batches, "CHUNK_LINES", chunk)
        patch.setattr(sqlite_batches, "between_chunks", between)
        found = asyncio.run(chunked(Path(tmp) / "chunked.db"))
        once = asyncio.run(at_once(Path(tmp) / "once.db"))
    assert found == once
    assert len(found[0]) == max(len(lines), 1)


async def test_a_ledger_copied_half_way_through_a_settlement_settles_it_exactly_on_postgresql(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """Stopped between two chunks, then copied to PostgreSQL (as "Several replicas" says,
    Tollgate stopped first): the settlement there replaces the lines written on SQLite."""
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await reserve_batch(ledger, lines=LINES)

    async def gone() -> None:
        await ledger.close()

    chunks.append(gone)
    lines = lines_of(LINES)
    with pytest.raises(LedgerError):
        await ledger.settle_batch("b1", lines, DONE)
    assert sum(written_by(path).values()) == CHUNK
    shared = ledger_url("postgresql", tmp_path)
    try:
        await copy_between(f"sqlite:///{path}", shared)
        target = await open_ledger(shared)
        try:
            [held] = await target.holding(10 * ENDED)
            assert held.reserved_nanos == LINES * LINE_BOUND - sum(
                line.settlement.cost_nanos for line in lines[1 : 1 + CHUNK]
            )
            assert await target.settle_batch("b1", lines, DONE) == LINES
            rows, totals = kept(await every_row(target)), await target.totals(EVERY_COUNTER)
        finally:
            await target.close()
    finally:
        pg.drop_schema(shared)
    assert (rows, totals) == await settled_at_once(tmp_path / "once.db", lines)


async def test_while_a_retry_deletes_a_stopped_settlements_lines_reports_count_each_once(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """A settlement stopped after two chunks, then settled again: while the retry deletes
    the lines the first wrote, a chunk a transaction, the lines still there and what the
    reservation holds add up to its bound (neither its whole bound beside lines not yet
    deleted), and the counters are the reservation's, whole."""
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await reserve_batch(ledger, lines=LINES)
    bound = LINES * LINE_BOUND
    totals = await ledger.totals(EVERY_COUNTER)

    async def stop() -> None:
        raise Stopped

    chunks.extend([lambda: asyncio.sleep(0), stop])
    lines = lines_of(LINES)
    with pytest.raises(Stopped):
        await ledger.settle_batch("b1", lines, DONE)
    assert sum(written_by(path).values()) == 2 * CHUNK
    seen: list[int] = []

    async def look() -> None:
        reports = await ledger.summarize(0.0, 10 * ENDED, ["team"])
        cost = sum(r.cost_nanos for r in reports)
        [holding] = await ledger.holding(10 * ENDED)
        assert cost + holding.reserved_nanos == bound
        assert await ledger.totals(EVERY_COUNTER) == totals
        seen.append(sum(written_by(path).values()))

    async def look_and_stop() -> None:
        await look()
        raise Stopped

    # The retry stopped in turn, having deleted one chunk of the first's lines; the next
    # deletes the rest.
    chunks.extend([look_and_stop])
    with pytest.raises(Stopped):
        await ledger.settle_batch("b1", lines, DONE)
    chunks.extend([look, look, look])
    assert await ledger.settle_batch("b1", lines, DONE) == LINES
    # Lines written as each transaction ended: the first's deleted, then the last's own.
    assert seen == [CHUNK, 0, 0, CHUNK]
    rows, after = kept(await every_row(ledger)), await ledger.totals(EVERY_COUNTER)
    await ledger.close()
    assert (rows, after) == await settled_at_once(tmp_path / "once.db", lines)


async def test_a_line_copied_half_way_through_a_settlement_is_not_resolved_on_postgresql(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """The lines a settlement stopped between two chunks wrote, copied to PostgreSQL, are
    not resolved there before the batch is settled: their counters never moved, and the
    settlement replaces them. Once it has, they resolve as any line."""
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await reserve_batch(ledger, lines=LINES)

    async def gone() -> None:
        await ledger.close()

    chunks.append(gone)
    lines = [replace(line, settlement=replace(line.settlement, flagged=True))
             for line in lines_of(LINES)]  # fmt: skip
    with pytest.raises(LedgerError):
        await ledger.settle_batch("b1", lines, DONE)
    shared = ledger_url("postgresql", tmp_path)
    try:
        await copy_between(f"sqlite:///{path}", shared)
        target = await open_ledger(shared)
        try:
            with pytest.raises(LedgerError, match="still being settled"):
                await target.resolve(lines[1].entry.id, 0, ENDED + 5.0)
            assert await target.settle_batch("b1", lines, DONE) == LINES
            rows, totals = kept(await every_row(target)), await target.totals(EVERY_COUNTER)
            cost = lines[1].settlement.cost_nanos
            assert await target.resolve(lines[1].entry.id, 0, ENDED + 5.0) == cost
        finally:
            await target.close()
    finally:
        pg.drop_schema(shared)
    assert (rows, totals) == await settled_at_once(tmp_path / "once.db", lines)


async def test_a_reservation_reclaimed_half_way_through_its_settlement_keeps_no_line(
    tmp_path: Path, chunks: list[Callable[[], Awaitable[None]]]
) -> None:
    """A batch whose reservation was never held (recording it failed), reclaimed between two
    chunks of its settlement: charged its bound, the lines written so far deleted (the bound
    stands for them), and the settlement stops. Nothing is counted twice, nor resolved for
    counters that never moved."""
    path = tmp_path / "ledger.db"
    ledger = await opened(path)
    await ledger.reserve(CREATION_COUNTERS, take_batch("b1", LINES))
    await ledger.name_response("b1", "batch_abc")  # not held: reclaimed as any request
    bound = LINES * LINE_BOUND

    async def reclaimed() -> None:
        assert await ledger.reclaim(ENDED, started_before=ENDED) == 1

    chunks.append(reclaimed)
    lines = [replace(line, settlement=replace(line.settlement, flagged=True))
             for line in lines_of(LINES)]  # fmt: skip
    assert await ledger.settle_batch("b1", lines, DONE) == 0
    [report] = await ledger.summarize(0.0, 10 * ENDED, ["team"])
    assert (report.requests, report.cost_nanos) == (1, bound)
    assert await ledger.holding(10 * ENDED) == []
    assert [f.id for f in await ledger.flagged(0.0, 10 * ENDED)] == ["b1"]
    assert [(r["id"], r["billing_by"]) for r in await every_row(ledger)] == [("b1", None)]
    totals = await ledger.totals(EVERY_COUNTER)
    assert totals[CREATION_COUNTERS[0]].spent_nanos == bound
    await ledger.close()
