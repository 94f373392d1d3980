"""The ledger on both backends: reserve, settle, record, reclaim, read back; shared by several
workers (SQLite) or replicas (PostgreSQL); schema versions and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.core.errors import LedgerConnectionLost, LedgerError, LedgerUnavailable
from proxy.core.image_params import MAX_USER_CHARS
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.ledger import migrate_ledger, migrations, open_ledger, settle_patiently
from proxy.ledger.base import Chooser, Flagged, Owner, Reservation
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.postgres_schema import MIGRATION_LOCK
from proxy.ledger.sqlite import SCHEMA_VERSION, SqliteLedger
from tests import pg
from tests.pg import ledger_url

AnyLedger = SqliteLedger | PostgresLedger

DESIGN_DAY = Counter("team", "design", "", "day", 0.0)
ALICE_DAY = Counter("user", "design", "alice", "day", 0.0)
RESEARCH_DAY = Counter("team", "research", "", "day", 0.0)
ORG_DAY = Counter("organization", "", "", "day", 0.0)
ESTIMATE = Usage(text_input=20, image_output=7024, images=1)
ACTUAL = Usage(text_input=9, image_input=0, image_output=7024, images=1)
SETTLED = Settlement(
    finished_at=1010.0,
    outcome="ok",
    status=200,
    usage=ACTUAL,
    cost_nanos=210_765_000,
    upstream_request_id="req_abc",
    latency_ms=10_000.0,
)


def entry(
    request_id: str, started_at: float = 1000.0, estimate: int = 500_000_000, team: str = "design"
) -> Entry:
    return Entry(
        id=request_id,
        started_at=started_at,
        endpoint="generations",
        team=team,
        cost_center="CC-1042",
        key_id="web-app",
        user="alice",
        model_requested="gpt-image-2",
        model="gpt-image-2",
        quality_requested="auto",
        quality="high",
        size_requested="1024x1024",
        size="1024x1024",
        n_requested=1,
        n=1,
        stream=True,
        estimated_nanos=estimate,
        downgrades="quality=auto->high",
    )


def take(
    request_id: str,
    started_at: float = 1000.0,
    estimate: int = 500_000_000,
    counters: tuple[Counter, ...] = (DESIGN_DAY, ALICE_DAY),
    seen: list[Mapping[Counter, Totals]] | None = None,
) -> Chooser:
    """A chooser that always reserves, noting the totals it was shown."""

    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        if seen is not None:
            seen.append(dict(totals))
        team = counters[0].team if counters else "design"
        return Reservation(entry(request_id, started_at, estimate, team), ESTIMATE, counters)

    return choose


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyLedger]:
    url = ledger_url(request.param, tmp_path)
    opened = await open_ledger(url)
    assert isinstance(opened, SqliteLedger | PostgresLedger)
    yield opened
    await opened.close()
    if request.param == "postgresql":
        pg.drop_schema(url)


async def state(ledger: AnyLedger, request_id: str) -> tuple[str, int, int]:
    """The row's state, reservation and cost as stored (read through the audit export)."""
    # Closed here, not whenever the loop gets round to it: the export has a connection open.
    async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
        async for row in rows:
            if row["id"] == request_id:
                return row["state"], row["reserved_nanos"], row["cost_nanos"]
    raise AssertionError(f"no row {request_id}")


async def test_reserve_stores_an_in_flight_row_holding_the_estimate(
    ledger: AnyLedger,
) -> None:
    reservation = await ledger.reserve([DESIGN_DAY], take("r1"))
    assert reservation.entry == entry("r1")
    assert await state(ledger, "r1") == ("reserved", 500_000_000, 0)
    [row] = await ledger.rows()
    assert row.entry == entry("r1")
    assert row.settlement is None


async def test_reserve_adds_the_estimate_to_its_counters(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("r1"))
    totals = await ledger.totals([DESIGN_DAY, ALICE_DAY, RESEARCH_DAY])
    for counter in (DESIGN_DAY, ALICE_DAY):
        assert totals[counter] == Totals(
            spent_nanos=0,
            reserved_nanos=500_000_000,
            text_input_tokens=20,
            image_input_tokens=0,
            image_output_tokens=7024,
            total_tokens=7044,
        )
    assert totals[RESEARCH_DAY] == Totals()


async def test_a_user_of_the_longest_id_a_request_may_name_keys_its_counters(
    ledger: AnyLedger,
) -> None:
    # The longest end-user id of the longest UTF-8 characters, of a team of the longest name:
    # within what PostgreSQL indexes of a counter's key (a longer one was refused there).
    team = "t" * 64
    user = "".join(chr(0x10000 + i * 7919 % 50000) for i in range(MAX_USER_CHARS))
    counters = (Counter("team", team, "", "day", 0.0), Counter("user", team, user, "day", 0.0))
    await ledger.reserve([], take("r1", counters=counters))
    totals = await ledger.totals(list(counters))
    assert [t.reserved_nanos for t in totals.values()] == [500_000_000] * 2


async def test_reserve_shows_the_chooser_the_totals_it_reads(ledger: AnyLedger) -> None:
    seen: list[Mapping[Counter, Totals]] = []
    await ledger.reserve([DESIGN_DAY], take("r1", seen=seen))
    await ledger.reserve([DESIGN_DAY, RESEARCH_DAY], take("r2", seen=seen))
    assert seen[0] == {DESIGN_DAY: Totals()}
    assert seen[1][DESIGN_DAY].reserved_nanos == 500_000_000
    assert seen[1][RESEARCH_DAY] == Totals()


async def test_organization_counter_sums_every_team(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("r1", counters=(DESIGN_DAY,), estimate=3))
    await ledger.reserve([], take("r2", counters=(RESEARCH_DAY,), estimate=4))
    await ledger.reserve([], take("r3", counters=(ALICE_DAY,), estimate=100))
    assert (await ledger.totals([ORG_DAY]))[ORG_DAY].reserved_nanos == 7


async def test_totals_reads_the_counters_of_a_thousand_teams(ledger: AnyLedger) -> None:
    # As the budget gauges and `tollgate budgets` read them: one counter per budget.
    periods = ("day", "week", "month")
    many = [Counter("team", f"team-{n:04d}", "", p, 0.0) for n in range(1000) for p in periods]
    await ledger.reserve([], take("r1", counters=(many[-1],), estimate=5))
    found = await ledger.totals(many)
    assert len(found) == 3000
    assert found[many[-1]].reserved_nanos == 5
    assert found[many[0]] == Totals()


async def test_reservations_of_one_turn_commit_together_and_a_refusal_alone(
    ledger: AnyLedger,
) -> None:
    # SQLite gathers the reservations of one turn of the loop into one transaction: each
    # sees the ones before it, and one that refuses takes nothing of the others back.
    seen: list[Mapping[Counter, Totals]] = []

    def refuse(totals: Mapping[Counter, Totals]) -> Reservation:
        raise RuntimeError("over budget")

    choosers = [take(f"r{n}", estimate=10, seen=seen) for n in range(5)]
    choosers.insert(2, refuse)
    found = await asyncio.gather(
        *(ledger.reserve([DESIGN_DAY], c) for c in choosers), return_exceptions=True
    )
    assert [type(f).__name__ for f in found] == ["Reservation"] * 2 + ["RuntimeError"] + [
        "Reservation"
    ] * 3
    assert sorted(t[DESIGN_DAY].reserved_nanos for t in seen) == [0, 10, 20, 30, 40]
    assert len(await ledger.rows()) == 5
    assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY].reserved_nanos == 50
    await asyncio.gather(*(ledger.settle(f"r{n}", SETTLED) for n in range(5)))
    assert {(await state(ledger, f"r{n}"))[0] for n in range(5)} == {"settled"}
    assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY].reserved_nanos == 0


async def test_a_failing_statement_in_a_group_commit_fails_its_caller_alone(
    tmp_path: Path,
) -> None:
    opened = await open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert isinstance(opened, SqliteLedger)
    try:

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO alerts_sent (key, sent_at) VALUES ('k', 1)")
            conn.execute("INSERT INTO no_such_table VALUES (1)")

        found = await asyncio.gather(
            opened.reserve([DESIGN_DAY], take("r1")),
            opened.file.together(broken),
            opened.reserve([DESIGN_DAY], take("r2")),
            return_exceptions=True,
        )
        assert isinstance(found[1], LedgerError)
        assert "no_such_table" in str(found[1])
        assert len(await opened.rows()) == 2
        assert await opened.file.fetch("SELECT * FROM alerts_sent", ()) == []
    finally:
        await opened.close()


async def test_a_refusing_chooser_stores_nothing(ledger: AnyLedger) -> None:
    def refuse(totals: Mapping[Counter, Totals]) -> Reservation:
        raise RuntimeError("over budget")

    with pytest.raises(RuntimeError, match="over budget"):
        await ledger.reserve([DESIGN_DAY], refuse)
    assert await ledger.rows() == []
    assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY] == Totals()
    await ledger.reserve([DESIGN_DAY], take("after"))  # the transaction was rolled back
    assert len(await ledger.rows()) == 1


async def test_settle_replaces_the_reservation_with_the_cost(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("r1"))
    await ledger.settle("r1", SETTLED)
    assert await state(ledger, "r1") == ("settled", 0, 210_765_000)
    [row] = await ledger.rows()
    assert row.entry == entry("r1")
    assert row.settlement == SETTLED
    totals = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
    assert totals == Totals(
        spent_nanos=210_765_000,
        reserved_nanos=0,
        text_input_tokens=9,
        image_input_tokens=0,
        image_output_tokens=7024,
        total_tokens=7033,
    )


async def test_settling_an_unknown_request_raises_ledger_error(ledger: AnyLedger) -> None:
    with pytest.raises(LedgerError):
        await ledger.settle("nope", SETTLED)


async def test_record_stores_a_rejection_that_was_never_reserved(ledger: AnyLedger) -> None:
    rejection = Settlement(
        finished_at=1000.5, outcome="rejected_budget", status=429, error_code="budget_exceeded"
    )
    await ledger.record(entry("r2", estimate=9_000), rejection)
    assert await state(ledger, "r2") == ("settled", 0, 0)
    [row] = await ledger.rows()
    assert row.settlement == rejection
    assert row.entry.estimated_nanos == 9_000
    assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY] == Totals()


async def test_recording_the_same_id_twice_raises_ledger_error(ledger: AnyLedger) -> None:
    rejection = Settlement(finished_at=1.0, outcome="client_error", status=400)
    await ledger.record(entry("r1"), rejection)
    with pytest.raises(LedgerError):
        await ledger.record(entry("r1"), rejection)


async def test_reclaim_charges_reservations_older_than_the_horizon_at_their_bound(
    ledger: AnyLedger,
) -> None:
    """Its request may have been billed: the reservation is never freed, it becomes spend."""
    await ledger.reserve([], take("old", started_at=100.0))
    await ledger.reserve([], take("recent", started_at=900.0))
    await ledger.reserve([], take("settled-old", started_at=50.0))
    await ledger.settle("settled-old", SETTLED)

    assert await ledger.reclaim(started_before=500.0, now=1000.0) == 1

    rows = {row.entry.id: row for row in await ledger.rows()}
    old = rows["old"].settlement
    assert old is not None
    assert (old.outcome, old.error_code, old.flagged, old.finished_at) == (
        "upstream_error",
        "outcome_unknown",
        True,
        1000.0,
    )
    assert (old.cost_nanos, old.usage) == (500_000_000, ESTIMATE)  # its bound
    assert await state(ledger, "old") == ("settled", 0, 500_000_000)
    assert rows["recent"].settlement is None
    assert await state(ledger, "recent") == ("reserved", 500_000_000, 0)
    assert rows["settled-old"].settlement == SETTLED
    totals = await ledger.totals([DESIGN_DAY, ORG_DAY])
    for counter in (DESIGN_DAY, ORG_DAY):
        assert totals[counter].reserved_nanos == 500_000_000  # only `recent` is still held
        assert totals[counter].spent_nanos == 210_765_000 + 500_000_000
        assert totals[counter].image_output_tokens == 3 * 7024  # the bound's usage stays
    assert await ledger.reclaim(started_before=500.0, now=1001.0) == 0


async def test_reclaim_charges_the_reservations_of_dead_owners_at_their_bound(
    ledger: AnyLedger,
) -> None:
    await ledger.register(Owner("dead", "host", 1))
    await ledger.reserve([], take("orphan", started_at=900.0))
    assert await ledger.reclaim(now=1000.0, owners=["dead"]) == 1
    assert await state(ledger, "orphan") == ("settled", 0, 500_000_000)
    totals = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
    assert (totals.spent_nanos, totals.reserved_nanos) == (500_000_000, 0)
    assert [o.id for o in await ledger.owners()] == []


async def test_settling_after_a_reclaim_replaces_the_bound_with_the_cost(
    ledger: AnyLedger,
) -> None:
    await ledger.reserve([], take("late", started_at=100.0))
    await ledger.reclaim(started_before=500.0, now=1000.0)
    await ledger.settle("late", SETTLED)
    await ledger.settle("late", SETTLED)  # a retry changes nothing
    totals = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
    assert (totals.spent_nanos, totals.reserved_nanos) == (210_765_000, 0)
    assert (totals.text_input_tokens, totals.image_output_tokens) == (9, 7024)
    [row] = await ledger.rows()
    assert row.settlement == SETTLED


async def test_flagged_lists_settled_flagged_rows_of_a_period(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("lost", started_at=100.0))
    await ledger.reserve([], take("fine", started_at=150.0))
    await ledger.settle("fine", SETTLED)
    await ledger.reserve([], take("later", started_at=600.0))
    await ledger.reclaim(started_before=700.0, now=1000.0)
    found = await ledger.flagged(0.0, 500.0)
    assert found == [
        Flagged(
            id="lost",
            team="design",
            started_at=100.0,
            estimated_nanos=500_000_000,
            cost_nanos=500_000_000,
            outcome="upstream_error",
            error_code="outcome_unknown",
            upstream_request_id=None,
        )
    ]
    assert [f.id for f in await ledger.flagged(0.0, 1000.0)] == ["lost", "later"]


async def test_resolve_sets_the_true_cost_and_adjusts_the_counters(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("lost", started_at=100.0))
    await ledger.reclaim(started_before=500.0, now=1000.0)
    assert await ledger.resolve("lost", 120_000_000, now=2000.0, note="costs API") == 500_000_000
    totals = await ledger.totals([DESIGN_DAY, ALICE_DAY, ORG_DAY])
    for counter in (DESIGN_DAY, ALICE_DAY, ORG_DAY):
        assert (totals[counter].spent_nanos, totals[counter].reserved_nanos) == (120_000_000, 0)
        assert totals[counter].image_output_tokens == 7024  # its usage is not known better
    [found] = await ledger.flagged(0.0, 500.0)
    assert (found.cost_nanos, found.estimated_nanos) == (120_000_000, 500_000_000)
    assert (found.error_code, found.resolved_at, found.resolution) == (
        "outcome_unknown",
        2000.0,
        "costs API",
    )
    # A settlement that arrives after the operator's word changes nothing.
    await ledger.settle("lost", SETTLED)
    assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY].spent_nanos == 120_000_000


async def test_resolving_as_free_takes_back_the_cost_and_the_usage(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("lost", started_at=100.0))
    await ledger.reserve([], take("held", started_at=900.0))
    await ledger.reclaim(started_before=500.0, now=1000.0)
    assert await ledger.resolve("lost", 0, now=2000.0) == 500_000_000
    totals = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
    assert (totals.spent_nanos, totals.reserved_nanos) == (0, 500_000_000)
    assert totals.image_output_tokens == 7024  # `held`'s reservation only
    rows = {row.entry.id: row for row in await ledger.rows()}
    lost = rows["lost"].settlement
    assert lost is not None and (lost.cost_nanos, lost.usage, lost.flagged) == (0, Usage(), True)


async def test_only_settled_flagged_rows_can_be_resolved(ledger: AnyLedger) -> None:
    await ledger.reserve([], take("flying"))
    await ledger.reserve([], take("known"))
    await ledger.settle("known", SETTLED)
    for request_id, why in (("flying", "in flight"), ("known", "not flagged"), ("nope", "no")):
        with pytest.raises(LedgerError, match=why):
            await ledger.resolve(request_id, 0, now=2000.0)
    totals = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
    assert (totals.spent_nanos, totals.reserved_nanos) == (210_765_000, 500_000_000)


async def test_rows_since_returns_rows_started_at_or_after_oldest_first(
    ledger: AnyLedger,
) -> None:
    for request_id, started in (("c", 300.0), ("a", 100.0), ("b", 200.0)):
        await ledger.reserve([], take(request_id, started_at=started))
    assert [r.entry.id for r in await ledger.rows()] == ["a", "b", "c"]
    assert [r.entry.id for r in await ledger.rows(since=200.0)] == ["b", "c"]
    assert await ledger.rows(since=301.0) == []


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One ledger that several processes (workers, replicas) open."""
    url = ledger_url(request.param, tmp_path)
    yield url
    if request.param == "postgresql":
        pg.drop_schema(url)


async def test_two_processes_on_one_ledger_share_rows_and_counters(shared_url: str) -> None:
    first, second = await open_ledger(shared_url), await open_ledger(shared_url)
    try:
        await first.reserve([], take("from-first", started_at=1.0))
        await second.reserve([], take("from-second", started_at=2.0))
        await second.settle("from-first", SETTLED)
        for ledger in (first, second):
            rows = await ledger.rows()
            assert [r.entry.id for r in rows] == ["from-first", "from-second"]
            assert rows[0].settlement == SETTLED
            totals = await ledger.totals([DESIGN_DAY, ORG_DAY])
            for counter in (DESIGN_DAY, ORG_DAY):
                assert (totals[counter].spent_nanos, totals[counter].reserved_nanos) == (
                    210_765_000,
                    500_000_000,
                )
    finally:
        await first.close()
        await second.close()
    assert await migrate_ledger(shared_url) == (SCHEMA_VERSION, SCHEMA_VERSION)


async def test_a_reservation_reclaimed_by_another_process_is_settled_without_a_double_release(
    shared_url: str,
) -> None:
    """The process that reserved knows what its reservation held; another one (a worker's
    housekeeping) reclaimed it meanwhile at its bound, which the settlement replaces."""
    first, second = await open_ledger(shared_url), await open_ledger(shared_url)
    try:
        await first.reserve([], take("late", started_at=100.0))
        assert await second.reclaim(started_before=500.0, now=1000.0) == 1
        assert await state(first, "late") == ("settled", 0, 500_000_000)  # its bound
        await first.settle("late", SETTLED)
        totals = (await first.totals([DESIGN_DAY]))[DESIGN_DAY]
        assert (totals.spent_nanos, totals.reserved_nanos) == (210_765_000, 0)
        assert totals.image_output_tokens == 7024
        assert await state(first, "late") == ("settled", 0, 210_765_000)
    finally:
        await first.close()
        await second.close()


async def test_reopening_keeps_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.reserve([], take("r1"))
    await ledger.close()
    again = SqliteLedger(path)
    await again.open()
    try:
        assert [r.entry.id for r in await again.rows()] == ["r1"]
    finally:
        await again.close()


async def test_a_newer_schema_version_raises_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError) as caught:
        await SqliteLedger(path).open()
    assert "upgrade Tollgate" in str(caught.value)


async def test_ping_succeeds_on_an_open_ledger(ledger: AnyLedger) -> None:
    await ledger.ping()


async def test_a_closed_ledger_raises_ledger_error(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "t.db")
    with pytest.raises(LedgerError):
        await ledger.ping()
    await ledger.open()
    await ledger.close()
    await ledger.close()
    with pytest.raises(LedgerError):
        await ledger.ping()
    with pytest.raises(LedgerError):
        await ledger.reserve([], take("r1"))


async def test_a_path_that_cannot_be_opened_raises_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(LedgerError):
        await SqliteLedger(blocker / "tollgate.db").open()


async def test_open_ledger_understands_sqlite_urls(tmp_path: Path) -> None:
    ledger = await open_ledger(f"sqlite:///{tmp_path / 'url.db'}")
    try:
        await ledger.ping()
    finally:
        await ledger.close()


async def test_open_ledger_refuses_other_urls() -> None:
    with pytest.raises(LedgerError, match="use sqlite"):
        await open_ledger("mysql://localhost/tollgate")


async def test_concurrent_reservations_from_two_processes_never_exceed_a_limit(
    shared_url: str,
) -> None:
    workers = [await open_ledger(shared_url), await open_ledger(shared_url)]
    limit, estimate = 500, 100

    def within_limit(request_id: str, counter: Counter) -> Chooser:
        def choose(totals: Mapping[Counter, Totals]) -> Reservation:
            if totals[counter].used("usd") + estimate > limit:
                raise RuntimeError("over budget")
            team = "research" if request_id.endswith("r") else "design"
            counters = (RESEARCH_DAY,) if team == "research" else (DESIGN_DAY,)
            return take(request_id, estimate=estimate, counters=counters)(totals)

        return choose

    async def attempt(i: int) -> bool:
        # Two teams under one organization budget: the organization row is what is contended.
        request_id = f"r{i}" + ("r" if i % 3 == 0 else "d")
        try:
            await workers[i % 2].reserve([ORG_DAY], within_limit(request_id, ORG_DAY))
        except RuntimeError:
            return False
        return True

    try:
        results = await asyncio.gather(*(attempt(i) for i in range(40)))
        assert sum(results) == limit // estimate
        totals = await workers[0].totals([DESIGN_DAY, RESEARCH_DAY, ORG_DAY])
        assert totals[ORG_DAY].reserved_nanos == limit
        assert totals[DESIGN_DAY].reserved_nanos + totals[RESEARCH_DAY].reserved_nanos == limit
    finally:
        for worker in workers:
            await worker.close()


async def test_settling_twice_on_postgresql_charges_once() -> None:
    # A settlement retried after its first attempt committed unseen (a lost acknowledgement;
    # SQLite commits locally and cannot lose one).
    url = pg.migrated_schema()
    ledger = await open_ledger(url)
    try:
        await ledger.reserve([], take("r1"))
        await ledger.settle("r1", SETTLED)
        await ledger.settle("r1", SETTLED)
        totals = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
        assert (totals.spent_nanos, totals.reserved_nanos) == (210_765_000, 0)
    finally:
        await ledger.close()
        pg.drop_schema(url)


async def test_a_version_1_sqlite_ledger_gains_organization_counters_when_opened(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for sql in migrations.SQLITE[0]:
            db.execute(sql)
        db.execute("INSERT INTO schema_version VALUES (1)")
        for team, spent in (("design", 3), ("research", 4)):
            db.execute(
                "INSERT INTO budget_usage (scope, team, user, period, start, spent_nanos) "
                "VALUES ('team', ?, '', 'day', 0.0, ?)",
                (team, spent),
            )
    assert await migrate_ledger(f"sqlite:///{path}") == (1, SCHEMA_VERSION)
    ledger = await open_ledger(f"sqlite:///{path}")
    try:
        assert (await ledger.totals([ORG_DAY]))[ORG_DAY].spent_nanos == 7
    finally:
        await ledger.close()


async def test_an_empty_postgresql_database_is_initialised_when_opened() -> None:
    url = pg.new_schema()
    try:
        ledger = await open_ledger(url)
        try:
            await ledger.reserve([], take("r1"))
            await ledger.settle("r1", SETTLED)
        finally:
            await ledger.close()
        versions = pg.fetch(url, "SELECT version FROM schema_version")
        assert versions == [{"version": SCHEMA_VERSION}]
        tables = pg.fetch(
            url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        assert {t["tablename"] for t in tables} == set(migrations.TABLES)
        assert await migrate_ledger(url) == (SCHEMA_VERSION, SCHEMA_VERSION)
    finally:
        pg.drop_schema(url)


async def test_replicas_opening_one_empty_postgresql_database_together_initialise_it_once() -> None:
    """Four opens see the empty database, then all wait for the migration lock (held here
    until they do): the first to get it initialises, the others find its tables."""
    url = pg.new_schema()

    async def open_and_close() -> int:
        ledger = await open_ledger(url)
        try:
            return await ledger.version()
        finally:
            await ledger.close()

    holder = await asyncpg.connect(pg.SERVER)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        # Each on a loop and connections of its own, as separate replicas would be.
        opening = asyncio.gather(*(asyncio.to_thread(pg.run, open_and_close()) for _ in range(4)))
        deadline = time.monotonic() + 30
        while await holder.fetchval(WAITING_FOR_LOCK, MIGRATION_LOCK) < 4:
            assert time.monotonic() < deadline, "the opens never waited for the lock"
            await asyncio.sleep(0.02)
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        assert await opening == [SCHEMA_VERSION] * 4
        assert pg.fetch(url, "SELECT version FROM schema_version") == [{"version": SCHEMA_VERSION}]
        organization = pg.fetch(
            url, "SELECT count(*) AS n FROM budget_usage WHERE scope = 'organization'"
        )
        assert organization == [{"n": 1}]
    finally:
        await holder.close()
        pg.drop_schema(url)


WAITING_FOR_LOCK = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
    "AND objid = $1::bigint AND classid = 0"
)


async def test_postgresql_with_some_tables_but_no_version_is_not_initialised() -> None:
    url = pg.new_schema()
    try:
        pg.fetch(url, "CREATE TABLE requests (id TEXT PRIMARY KEY)")
        with pytest.raises(LedgerError, match="tollgate ledger migrate"):
            await open_ledger(url)
        assert pg.fetch(url, "SELECT to_regclass('schema_version') IS NULL AS absent") == [
            {"absent": True}
        ]
    finally:
        pg.drop_schema(url)


async def test_postgresql_refuses_a_schema_behind_and_migrate_brings_it_up() -> None:
    url = pg.schema_at_version(1)
    try:
        with pytest.raises(LedgerError, match="tollgate ledger migrate"):
            await open_ledger(url)
        assert await migrate_ledger(url) == (1, SCHEMA_VERSION)
        assert await migrate_ledger(url) == (SCHEMA_VERSION, SCHEMA_VERSION)
        ledger = await open_ledger(url)
        await ledger.ping()
        await ledger.close()
        pg.fetch(url, "UPDATE schema_version SET version = version + 1")
        with pytest.raises(LedgerError, match="upgrade Tollgate"):
            await open_ledger(url)
    finally:
        pg.drop_schema(url)


async def test_an_unreachable_postgresql_is_ledger_unavailable_naming_it() -> None:
    with pytest.raises(LedgerUnavailable, match="cannot reach the PostgreSQL ledger") as caught:
        await open_ledger("postgresql://tollgate:secret@127.0.0.1:9/tollgate")
    assert "secret" not in str(caught.value)


async def test_pool_size_comes_from_the_url_and_is_checked() -> None:
    assert PostgresLedger("postgresql://h/db?pool_size=3&search_path=x").pool_size == 3
    assert "pool_size" not in PostgresLedger("postgresql://h/db?pool_size=3").dsn
    with pytest.raises(LedgerError, match="pool_size"):
        PostgresLedger("postgresql://h/db?pool_size=lots")


async def test_postgresql_replaces_every_connection_once_one_is_found_lost() -> None:
    """A connection found lost (ended by the server here) expires the pool's others, and
    the transaction that found it, rolled back, runs again once on a fresh connection."""
    url = pg.migrated_schema()
    ledger = await open_ledger(url)
    try:
        db = ledger.db  # type: ignore[attr-defined]

        async def backend(conn: Any) -> int:
            found: int = await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.2)")
            return found

        before = set(await asyncio.gather(*(db.transaction(backend) for _ in range(3))))
        assert len(before) == 3
        ran: list[int] = []

        async def ended_once(conn: Any) -> int:
            ran.append(await backend(conn))
            if len(ran) == 1:
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            return len(ran)

        assert await db.transaction(ended_once) == 2
        assert ran[1] not in before  # not one of the others, still idle in the pool
        assert {r[0] for r in await db.fetch("SELECT pg_backend_pid()")} <= {ran[1]}

        async def ended_always(conn: Any) -> None:
            ran.append(await backend(conn))
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(LedgerConnectionLost):
            await db.transaction(ended_always)
        assert len(ran) == 4  # once more only
        await ledger.ping()
    finally:
        await ledger.close()
        pg.drop_schema(url)


class Flaky:
    """A ledger whose settle fails `failures` times as if the database were restarting."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise LedgerUnavailable("connection refused")


async def test_settle_patiently_retries_while_the_ledger_is_unavailable() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    flaky = Flaky(failures=5)
    await settle_patiently(flaky, "r1", SETTLED, 10.0, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert flaky.calls == 6
    assert 0 < now[0] < 10.0


async def test_settle_patiently_gives_up_after_its_time_is_up() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    forever = Flaky(failures=10_000)
    with pytest.raises(LedgerUnavailable):
        await settle_patiently(forever, "r1", SETTLED, 3.0, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert now[0] <= 3.0


class Paused:
    """A ledger whose process is paused (the clock jumps by `pause_s`) in the middle of its
    first settlement, which then fails with `error` (what the pause broke), as do `failures`
    more."""

    def __init__(
        self, now: list[float], pause_s: float, error: LedgerUnavailable, failures: int = 0
    ) -> None:
        self.now, self.pause_s, self.error, self.failures = now, pause_s, error, failures
        self.calls = 0

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        self.calls += 1
        if self.calls == 1:
            self.now[0] += self.pause_s
        if self.calls <= 1 + self.failures:
            raise self.error


LOST = LedgerConnectionLost("connection was closed in the middle of operation")
ACQUIRE_TIMED_OUT = LedgerUnavailable("ledger unreachable: TimeoutError")


@pytest.mark.parametrize("error", [LOST, ACQUIRE_TIMED_OUT], ids=["lost", "timed-out"])
async def test_settle_patiently_tries_again_after_a_pause_past_its_deadline(
    error: LedgerUnavailable,
) -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    paused = Paused(now, 60.0, error)
    await settle_patiently(paused, "r1", SETTLED, 3.0, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert paused.calls == 2


async def test_settle_patiently_tries_once_more_only_past_its_deadline() -> None:
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    paused = Paused(now, 60.0, LOST, failures=10_000)
    with pytest.raises(LedgerConnectionLost):
        await settle_patiently(paused, "r1", SETTLED, 3.0, sleep=sleep, clock=lambda: now[0])  # type: ignore[arg-type]
    assert paused.calls == 2 and now[0] == 60.0  # straight away


# -- SQLite: transactions on the loop, the thread when the write lock is taken ---------------


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[threading.Event]:
    """Another connection (as another worker would) holds the write lock until the event
    yielded is set, or the block ends (a minute at most, should a test never set it)."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            taken.set()
            release.wait(60)
            other.execute("COMMIT")

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait()
    try:
        yield release
    finally:
        release.set()
        holder.join()


async def test_a_transaction_that_finds_the_lock_taken_waits_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    ticks = 0

    try:
        with write_lock_held(path) as release:

            async def ticker() -> None:
                # The lock is let go only once the loop has turned while it was taken.
                nonlocal ticks
                while True:
                    ticks += 1
                    if ticks > 3:
                        release.set()
                    await asyncio.sleep(0.01)

            beat = asyncio.create_task(ticker())
            await ledger.reserve([DESIGN_DAY], take("r1"))
            beat.cancel()
        # The reservation waited for the lock, and the loop went on meanwhile.
        assert ticks > 3
        assert [r.entry.id for r in await ledger.rows()] == ["r1"]
        assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY].reserved_nanos == 500_000_000
    finally:
        await ledger.close()


async def test_a_lock_held_too_long_is_a_retryable_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.ledger.sqlite_connections.LOCK_WAIT_MS", 100)
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        with write_lock_held(path), pytest.raises(LedgerUnavailable):
            await ledger.reserve([DESIGN_DAY], take("r1"))  # the lock is held throughout
        assert await ledger.rows() == []
        await ledger.reserve([DESIGN_DAY], take("r1"))  # the lock is free again
    finally:
        await ledger.close()


# -- SQLite: reads on a connection of their own ---------------------------------------------


def first_then_fail(rows: Iterable[tuple[object, ...]]) -> None:
    """A decoder that reads one row of many and fails: its statement is left unfinished."""
    next(iter(rows))
    raise ValueError("undecodable")


async def test_reads_go_on_while_a_long_write_holds_the_writers_thread(tmp_path: Path) -> None:
    """A budget read does not wait for a transaction on the writers' thread (a batch's
    settlement writing 50,000 lines): it reads what had committed, and once that
    transaction has returned, what it wrote."""
    ledger = SqliteLedger(tmp_path / "t.db")
    await ledger.open()
    writing, release = threading.Event(), threading.Event()

    def long_write(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM budget_usage")
        writing.set()
        release.wait(60)

    try:
        await ledger.reserve([DESIGN_DAY], take("r1"))
        held = asyncio.create_task(ledger.file.transaction(long_write, long=True))
        try:
            assert await asyncio.to_thread(writing.wait, 20)
            # The bound only tells a hang from an answer: a read queued behind the write
            # would wait until `release` is set.
            totals = await asyncio.wait_for(ledger.totals([DESIGN_DAY]), 20)
            assert totals[DESIGN_DAY].reserved_nanos == 500_000_000
            assert [r.entry.id for r in await asyncio.wait_for(ledger.rows(), 20)] == ["r1"]
            await asyncio.wait_for(ledger.ping(), 20)
        finally:
            release.set()
        await held
        assert (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY] == Totals()
    finally:
        await ledger.close()


async def test_a_read_sees_every_write_that_returned_before_it(tmp_path: Path) -> None:
    """Whether the write ran on the loop or on the writers' thread, and even after a read
    that left a statement unfinished."""
    ledger = SqliteLedger(tmp_path / "t.db")
    await ledger.open()
    try:
        for i in range(1, 11):
            await ledger.reserve([DESIGN_DAY], take(f"r{i}"))
            with pytest.raises(ValueError, match="undecodable") as caught:
                await ledger.file.fetch_as("SELECT id FROM requests", (), first_then_fail)
            assert len(await ledger.rows()) == i
            totals = await ledger.totals([DESIGN_DAY])
            assert totals[DESIGN_DAY].reserved_nanos == i * 500_000_000
        del caught
        await ledger.file.transaction(lambda c: c.execute("DELETE FROM requests"), long=True)
        assert await ledger.rows() == []
    finally:
        await ledger.close()


async def test_a_failing_read_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        with contextlib.closing(sqlite3.connect(path)) as other:
            other.execute("DROP TABLE budget_usage")
        with pytest.raises(LedgerError, match="ledger read failed"):
            await ledger.totals([DESIGN_DAY])
        with pytest.raises(LedgerError, match="ledger read failed"):
            await ledger.file.fetch("SELECT * FROM budget_usage", ())
    finally:
        await ledger.close()


async def test_close_ends_every_connection_and_its_thread(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    ledger = SqliteLedger(tmp_path / "t.db")
    await ledger.open()
    await ledger.reserve([DESIGN_DAY], take("r1"))
    await ledger.totals([DESIGN_DAY])
    started = set(threading.enumerate()) - before
    await ledger.close()
    assert started  # the writers' thread and the readers'
    for thread in started:
        thread.join(20)
        assert not thread.is_alive()
    for read in (ledger.totals([DESIGN_DAY]), ledger.rows(), ledger.ping()):
        with pytest.raises(LedgerError):
            await read


# -- SQLite: the WAL's bound ----------------------------------------------------------------

WAL_LIMIT = 256 * 1024
"""A small limit, so a few hundred requests reach it dozens of times."""
ONE_TRANSACTION = 16 * (4096 + 24)
"""What one transaction here may add to the WAL: twice the pages a reservation writes."""


@contextlib.contextmanager
def machine_loaded() -> Iterator[None]:
    """A busy Python thread beside the ledger's (they take turns at the interpreter) and a
    process burning a core: the conditions that leave a checkpoint on the thread late."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()
        burner.kill()
        burner.wait()


def emptied(sizes: list[int]) -> int:
    """How many times the WAL file shrank between two of `sizes` seen in turn."""
    return sum(1 for a, b in itertools.pairwise(sizes) if b < a)


def wal_size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def settled_count(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (count,) = db.execute("SELECT count(*) FROM requests WHERE state = 'settled'").fetchone()
    return int(count)


def bound_the_wal(monkeypatch: pytest.MonkeyPatch, lock_wait_ms: int | None = None) -> None:
    """`WAL_LIMIT`, and no periodic checkpoint: the writers alone keep the bound."""
    monkeypatch.setattr("proxy.ledger.sqlite_connections.CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr("proxy.ledger.sqlite_connections.WAL_LIMIT_BYTES", WAL_LIMIT)
    if lock_wait_ms is not None:
        monkeypatch.setattr("proxy.ledger.sqlite_connections.LOCK_WAIT_MS", lock_wait_ms)


async def test_the_wal_stays_under_its_limit_however_late_checkpoints_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Back-to-back writes that never let the loop turn, on a loaded machine, with the
    periodic checkpoints never due: the worst case for a checkpoint on the thread. The
    writers keep the bound themselves, checked after every commit."""
    bound_the_wal(monkeypatch)
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    sizes = []
    try:
        with machine_loaded():
            for i in range(400):
                await ledger.reserve([DESIGN_DAY], take(f"r{i}"))
                sizes.append(wal_size(path))
                await ledger.settle(f"r{i}", SETTLED)
                sizes.append(wal_size(path))
    finally:
        await ledger.close()
    # 800 commits of several pages each write some 15 MB of WAL: the limit was reached
    # again and again, and the file emptied each time.
    assert max(sizes) <= WAL_LIMIT + ONE_TRANSACTION
    assert emptied(sizes) >= 20
    assert settled_count(path) == 400


async def test_a_reader_holding_the_wal_makes_writers_wait_rather_than_grow_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint cannot empty a WAL that a reader still reads from: writers wait for it
    (`LOCK_WAIT_MS`), then fail as a retryable outage, nothing written past the bound."""
    bound_the_wal(monkeypatch, lock_wait_ms=100)
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        await ledger.reserve([DESIGN_DAY], take("r0"))
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM requests").fetchone()  # a snapshot in the WAL
            written = 0
            with pytest.raises(LedgerUnavailable):
                for i in range(1, 1000):
                    await ledger.reserve([DESIGN_DAY], take(f"r{i}"))
                    written = i
                    assert wal_size(path) <= WAL_LIMIT + ONE_TRANSACTION
            assert 0 < written < 999
            assert wal_size(path) <= WAL_LIMIT + ONE_TRANSACTION
            reader.execute("COMMIT")
        await ledger.reserve([DESIGN_DAY], take("after"))  # the checkpoint gets through now
        assert wal_size(path) < WAL_LIMIT
        assert len(await ledger.rows()) == written + 2
    finally:
        await ledger.close()


async def test_a_checkpoint_the_disk_refuses_is_an_outage_that_a_settlement_waits_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A WAL at its limit must be checkpointed before the next write: a checkpoint the disk
    refuses (full, failing) was a plain LedgerError, so a settlement gave up at once (its
    request left to be charged its bound by the reclaim) and `/readyz` said ready. It is an
    outage like any write the disk refuses: the settlement is retried and commits once the
    disk takes writes again."""
    import resource

    bound_the_wal(monkeypatch)
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    unlimited = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        await ledger.reserve([DESIGN_DAY], take("pending"))
        for i in itertools.count():
            await ledger.reserve([DESIGN_DAY], take(f"r{i}"))
            await ledger.settle(f"r{i}", SETTLED)
            if wal_size(path) >= WAL_LIMIT:
                break
        # No file of this process may be written from now on (EFBIG: Python ignores
        # SIGXFSZ), as on a disk that refuses writes.
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, unlimited[1]))
        with pytest.raises(LedgerUnavailable, match="checkpoint"):
            await ledger.settle("pending", SETTLED)
        assert isinstance(ledger.file.failing, LedgerUnavailable)

        async def disk_freed(_: float) -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)

        await settle_patiently(ledger, "pending", SETTLED, 5.0, sleep=disk_freed)
        assert ledger.file.failing is None
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
        await ledger.close()
    assert settled_count(path) == i + 2


WAL_WRITER = """
import asyncio, json, os, sys
import proxy.ledger.sqlite as sqlite
import proxy.ledger.sqlite_connections as sqlite_connections
from proxy.core.models import Counter
from proxy.ledger.base import Entry, Reservation, Settlement
from proxy.core.models import Usage

sqlite_connections.CHECKPOINT_EVERY = 10**9
sqlite_connections.WAL_LIMIT_BYTES = int(sys.argv[2])
path, name, count = sys.argv[1], sys.argv[3], int(sys.argv[4])
DAY = Counter("team", "design", "", "day", 0.0)
USAGE = Usage(text_input=20, image_output=7024, images=1)


def choose(request_id):
    entry = Entry(id=request_id, started_at=1000.0, endpoint="generations", team="design",
                  user="alice", model="gpt-image-2", estimated_nanos=500_000_000)
    return lambda totals: Reservation(entry, USAGE, (DAY,))


async def main():
    ledger = sqlite.SqliteLedger(path)
    await ledger.open()
    sizes = []
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        await ledger.reserve([DAY], choose(f"{name}-{i}"))
        sizes.append(os.stat(path + "-wal").st_size)
        await ledger.settle(f"{name}-{i}", Settlement(1010.0, "ok", 200, usage=USAGE))
        sizes.append(os.stat(path + "-wal").st_size)
    await ledger.close()
    print(json.dumps(sizes), flush=True)


asyncio.run(main())
"""


async def test_the_wal_limit_holds_across_worker_processes(tmp_path: Path) -> None:
    """Two worker processes writing to one file, on a loaded machine: the WAL they share
    stays under the bound, as each of them sees it after each of its commits."""
    path = tmp_path / "t.db"
    first = SqliteLedger(path)  # the schema, before the writers race to create it
    await first.open()
    await first.close()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WAL_WRITER, str(path), str(WAL_LIMIT), name, "300"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    try:
        for w in writers:
            assert w.stdout is not None
            assert w.stdout.readline() == "ready\n"
        with machine_loaded():
            for w in writers:  # both start writing at once
                assert w.stdin is not None
                w.stdin.write("go\n")
                w.stdin.flush()
            answers = [w.communicate(timeout=600)[0] for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in writers] == [0, 0]
    for answer in answers:
        sizes = json.loads(answer)
        assert len(sizes) == 600
        assert max(sizes) <= WAL_LIMIT + ONE_TRANSACTION
    assert sum(emptied(json.loads(answer)) for answer in answers) >= 10
    assert settled_count(path) == 600


async def test_an_export_read_slowly_does_not_hold_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit export reads a batch at a time and holds no snapshot between batches: a
    client that stops reading halfway never keeps writers from emptying the WAL."""
    bound_the_wal(monkeypatch, lock_wait_ms=100)
    monkeypatch.setattr("proxy.ledger.sqlite.EXPORT_BATCH", 10)
    path = tmp_path / "t.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        for i in range(25):
            await ledger.reserve([DESIGN_DAY], take(f"r{i:03}", started_at=1000.0 + i))
        async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
            first = [(await anext(rows))["id"]]  # one batch read, the client pauses
            for i in range(25, 200):  # some 6 MB of WAL, 25 times the limit
                await ledger.reserve([DESIGN_DAY], take(f"r{i:03}", started_at=1000.0 + i))
                assert wal_size(path) <= WAL_LIMIT + ONE_TRANSACTION
            rest = [row["id"] async for row in rows]
        # Every row once, in order, the ones written meanwhile too.
        assert first + rest == [f"r{i:03}" for i in range(200)]
    finally:
        await ledger.close()


async def test_a_summary_read_a_slice_at_a_time_sums_each_group_once(
    ledger: AnyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite reads a summary in slices of time (two threads) and adds the groups up: the
    # sums are those of one statement over the whole period.
    for n in range(12):
        team = Counter("team", ("design", "research")[n % 2], "", "day", 0.0)
        at = 1000.0 + n * 20_000  # three days
        await ledger.reserve([], take(f"r{n}", started_at=at, counters=(team,), estimate=n))
        await ledger.settle(f"r{n}", SETTLED)
    await ledger.record(entry("refused", 5000.0), Settlement(5001.0, "rejected_budget", 429))
    whole = await ledger.summarize(0.0, 1e6, ["team", "outcome"])
    monkeypatch.setattr("proxy.ledger.sqlite_reports.REPORT_SLICE_SECONDS", 7_000.0)
    sliced = await ledger.summarize(0.0, 1e6, ["team", "outcome"])
    assert sorted(sliced, key=repr) == sorted(whole, key=repr)
    assert {a.keys: a.requests for a in whole} == {
        ("design", "ok"): 6,
        ("research", "ok"): 6,
        ("design", "rejected_budget"): 1,
    }
    [total] = await ledger.summarize(0.0, 1e6, [])
    assert total.requests == 13
    assert total.cost_nanos == 12 * SETTLED.cost_nanos
    assert await ledger.summarize(2e6, 3e6, ["team"]) == []


async def test_a_summary_that_cannot_open_the_file_is_a_ledger_error(tmp_path: Path) -> None:
    """A report's first connection (the period's range of rows) was opened outside the
    summary's error handling: a file it could not open failed `tollgate report` with a
    traceback, and the admin API's report with SQLite's own error rather than the 503 of a
    ledger that cannot be read."""
    ledger = await open_ledger(f"sqlite:///{tmp_path / 'gone' / 'tollgate.db'}")
    try:
        (tmp_path / "gone").rename(tmp_path / "moved")
        with pytest.raises(LedgerError, match="ledger read failed"):
            await ledger.summarize(0.0, 1e6, ["team"])
    finally:
        await ledger.close()
