"""The ledger's Responses API rows on both backends: the mainline model's columns, schema
version 4, background responses held until they end (never reclaimed, adopted by a live
process when theirs stops), and a response looked up by its id."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.core.errors import LedgerError
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.ledger import open_ledger
from proxy.ledger.base import Backend, Chooser, Owner, Reservation, ResponseRow
from proxy.ledger.postgres import PostgresLedger
from proxy.ledger.sqlite import SqliteLedger
from tests import pg
from tests.test_ledger import ALICE_DAY, DESIGN_DAY, ORG_DAY, entry, take

AnyLedger = SqliteLedger | PostgresLedger

BOUND = Usage(
    text_input=60,
    image_input=500,
    image_output=4160,
    images=1,
    mainline_input=1200,
    mainline_cached_input=300,
    mainline_output=4000,
)
"""What a Responses request's reservation holds: the image tool's usage and the mainline's."""
METERED = Usage(
    text_input=41,
    cached_text_input=5,
    image_input=0,
    image_output=4160,
    images=1,
    mainline_input=900,
    mainline_cached_input=256,
    mainline_output=173,
)
ANSWERED = Settlement(
    finished_at=1030.0,
    outcome="ok",
    status=200,
    usage=METERED,
    cost_nanos=180_000_000,
    upstream_request_id="req_resp",
    latency_ms=30_000.0,
    mainline_cost_nanos=4_000_000,
    response_id="resp_abc",
)


def responses_entry(request_id: str, started_at: float = 1000.0) -> Entry:
    """`entry`'s team, key and user asking the Responses API: two image calls, unstreamed."""
    return replace(
        entry(request_id, started_at, 400_000_000),
        endpoint="responses",
        quality="medium",
        size_requested="auto",
        n=2,
        stream=False,
        downgrades="max_tool_calls=unset->2",
        mainline_model="gpt-5.1",
        context_images=3,
    )


def take_response(request_id: str, started_at: float = 1000.0) -> Chooser:
    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        return Reservation(responses_entry(request_id, started_at), BOUND, (DESIGN_DAY, ALICE_DAY))

    return choose


async def exported(ledger: Backend, request_id: str) -> dict[str, Any]:
    """The row as stored (read through the audit export)."""
    async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
        async for row in rows:
            if row["id"] == request_id:
                return row
    raise AssertionError(f"no row {request_id}")


async def test_a_responses_row_keeps_its_mainline_columns_reserved_then_settled(
    ledger: Backend,
) -> None:
    await ledger.reserve([], take_response("r1"))
    [row] = await ledger.rows()
    assert (row.entry, row.settlement) == (responses_entry("r1"), None)
    stored = await exported(ledger, "r1")
    assert (stored["mainline_model"], stored["context_images"]) == ("gpt-5.1", 3)
    assert (
        stored["mainline_input_tokens"],
        stored["mainline_cached_input_tokens"],
        stored["mainline_output_tokens"],
    ) == (1200, 300, 4000)
    assert (stored["held"], stored["response_id"], stored["mainline_cost_nanos"]) == (0, None, 0)
    reserved = (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY]
    # The text and image columns count the image tool's kinds; total_tokens every token.
    assert (reserved.text_input_tokens, reserved.image_input_tokens) == (60, 500)
    assert reserved.total_tokens == 60 + 500 + 4160 + 1200 + 300 + 4000

    await ledger.settle("r1", ANSWERED)
    [row] = await ledger.rows()
    assert (row.entry, row.settlement) == (responses_entry("r1"), ANSWERED)
    stored = await exported(ledger, "r1")
    assert (stored["mainline_cost_nanos"], stored["response_id"]) == (4_000_000, "resp_abc")
    totals = await ledger.totals([DESIGN_DAY, ORG_DAY])
    for counter in (DESIGN_DAY, ORG_DAY):
        assert totals[counter] == Totals(
            spent_nanos=180_000_000,
            text_input_tokens=46,
            image_output_tokens=4160,
            total_tokens=41 + 5 + 4160 + 900 + 256 + 173,
        )


async def test_a_responses_request_never_forwarded_is_recorded_with_its_columns(
    ledger: Backend,
) -> None:
    refused = Settlement(1000.5, "rejected_budget", 429, error_code="budget_exceeded")
    await ledger.record(responses_entry("r2"), refused)
    [row] = await ledger.rows()
    assert (row.entry, row.settlement) == (responses_entry("r2"), refused)


# -- held background responses ------------------------------------------------------------


async def test_a_held_response_is_never_reclaimed_then_adopted_followed_and_settled(
    url: str,
) -> None:
    first, second = await open_ledger(url), await open_ledger(url)
    try:
        await first.register(Owner("first", "host-a", 11))
        await first.reserve([], take_response("bg", started_at=100.0))
        await first.reserve([], take("plain", started_at=100.0))
        await first.hold("bg", "resp_bg")
        assert await first.held() == [("bg", "resp_bg")]

        # Past every deadline, and its process dead: only the plain reservation is charged.
        assert await second.reclaim(1000.0, started_before=500.0, owners=["first"]) == 1
        assert await second.reclaim(1001.0, started_before=2000.0, owners=["first"]) == 0
        assert (await exported(second, "bg"))["state"] == "reserved"
        assert (await exported(second, "plain"))["error_code"] == "outcome_unknown"

        await second.register(Owner("second", "host-b", 22))
        assert await second.adopt(["first"]) == 1
        assert await second.adopt(["first"]) == 0
        assert await second.held() == [("bg", "resp_bg")]
        assert await first.held() == []

        await second.settle("bg", replace_response(ANSWERED, None))
        assert await second.held() == []
        stored = await exported(second, "bg")
        assert (stored["state"], stored["held"], stored["response_id"]) == (
            "settled",
            0,
            "resp_bg",  # kept from the hold: the settlement did not repeat it
        )
        totals = (await second.totals([DESIGN_DAY]))[DESIGN_DAY]
        assert (totals.spent_nanos, totals.reserved_nanos) == (180_000_000 + 500_000_000, 0)
        assert totals.total_tokens == METERED.total_tokens + 7044  # `plain`'s bound stays
        await first.settle("bg", ANSWERED)  # settled already: nothing changes
        assert (await second.totals([DESIGN_DAY]))[DESIGN_DAY] == totals
    finally:
        await first.close()
        await second.close()


def replace_response(settlement: Settlement, response_id: str | None) -> Settlement:
    return Settlement(
        settlement.finished_at,
        settlement.outcome,
        settlement.status,
        settlement.usage,
        settlement.cost_nanos,
        upstream_request_id=settlement.upstream_request_id,
        latency_ms=settlement.latency_ms,
        mainline_cost_nanos=settlement.mainline_cost_nanos,
        response_id=response_id,
    )


async def test_a_held_response_survives_its_process_and_is_adopted_by_the_next(url: str) -> None:
    """The process that held it stops (its memory of the reservation with it); a process
    opening the ledger afterwards adopts it and settles it from the row alone."""
    gone = await open_ledger(url)
    await gone.register(Owner("gone", "host-a", 11))
    await gone.reserve([], take_response("bg"))
    await gone.hold("bg", "resp_bg")
    await gone.unregister()
    await gone.close()

    after = await open_ledger(url)
    try:
        await after.register(Owner("after", "host-a", 12))
        assert {o.id for o in await after.owners()} == {"after", "gone"}
        assert await after.adopt(["gone"]) == 1
        assert await after.held() == [("bg", "resp_bg")]
        await after.settle("bg", ANSWERED)
        totals = (await after.totals([DESIGN_DAY]))[DESIGN_DAY]
        assert (totals.spent_nanos, totals.reserved_nanos) == (180_000_000, 0)
        assert totals.total_tokens == METERED.total_tokens
        assert await after.held() == []
    finally:
        await after.close()


async def test_adopt_takes_held_reservations_of_no_owner_and_leaves_the_others(
    ledger: Backend,
) -> None:
    await ledger.reserve([], take_response("orphan"))  # reserved before it registered
    await ledger.hold("orphan", "resp_orphan")
    await ledger.reserve([], take_response("unheld"))
    assert await ledger.adopt([]) == 0  # not registered: no id to own them by
    assert await ledger.held() == []
    await ledger.register(Owner("me", "host", 1))
    await ledger.reserve([], take_response("mine"))
    await ledger.hold("mine", "resp_mine")
    assert await ledger.adopt(["someone-else"]) == 1
    assert await ledger.held() == [("mine", "resp_mine"), ("orphan", "resp_orphan")]
    assert (await exported(ledger, "unheld"))["owner"] is None


async def test_holding_an_unknown_request_raises_ledger_error(ledger: Backend) -> None:
    with pytest.raises(LedgerError, match="no request nope"):
        await ledger.hold("nope", "resp_x")


async def test_holding_a_settled_request_records_its_response_id_only(ledger: Backend) -> None:
    await ledger.register(Owner("me", "host", 1))
    await ledger.reserve([], take_response("quick"))
    await ledger.settle("quick", replace_response(ANSWERED, None))
    await ledger.hold("quick", "resp_quick")
    assert await ledger.held() == []
    found = await ledger.response("resp_quick")
    assert found is not None and not found.held


async def test_a_stream_named_in_flight_is_found_by_its_id_and_not_held(
    ledger: Backend,
) -> None:
    await ledger.register(Owner("me", "host", 1))
    await ledger.reserve([], take_response("streaming"))
    await ledger.name_response("streaming", "resp_abc", "proj_A")
    found = await ledger.response("resp_abc")
    assert found is not None
    assert (found.request_id, found.held, found.project) == ("streaming", False, "proj_A")
    assert found.in_flight
    assert found.input_tokens == 1200 + 300  # its bound, while it runs
    assert await ledger.held() == []  # a stream read to its end is settled by its reader
    await ledger.settle("streaming", ANSWERED)
    settled = await ledger.response("resp_abc")
    assert settled is not None and settled.output_tokens == 173 and not settled.in_flight
    with pytest.raises(LedgerError, match="no request nope"):
        await ledger.name_response("nope", "resp_x")


async def test_response_reads_a_settled_a_held_and_no_response(ledger: Backend) -> None:
    await ledger.reserve([], take_response("done"))
    await ledger.settle("done", ANSWERED)
    await ledger.reserve([], take_response("running", started_at=1001.0))
    await ledger.hold("running", "resp_running")
    assert await ledger.response("resp_abc") == ResponseRow(
        response_id="resp_abc",
        request_id="done",
        team="design",
        input_tokens=900 + 256,
        output_tokens=173,
        images=1,
        context_images=3,
        held=False,
    )
    assert await ledger.response("resp_running") == ResponseRow(
        response_id="resp_running",
        request_id="running",
        team="design",
        input_tokens=1200 + 300,  # its bound, while it runs
        output_tokens=4000,
        images=1,
        context_images=3,
        held=True,
        in_flight=True,
    )
    assert await ledger.response("resp_unknown") is None


async def test_two_replicas_adopting_together_never_adopt_the_same_response() -> None:
    """Four replicas adopt the held reservations of a stopped one at once: they all wait for
    the rows (locked here until they do), then each row goes to exactly one of them."""
    url = pg.migrated_schema()
    holder = await asyncpg.connect(url)
    try:
        gone = await open_ledger(url)
        await gone.register(Owner("gone", "host-a", 1))
        count = 50
        for i in range(count):
            await gone.reserve([], take_response(f"bg{i:03}"))
            await gone.hold(f"bg{i:03}", f"resp_{i:03}")
        await gone.close()

        async def adopt(name: str) -> tuple[int, list[tuple[str, str]]]:
            replica = await open_ledger(url)
            try:
                await replica.register(Owner(name, "host-b", 2))
                adopted = await replica.adopt(["gone"])
                return adopted, await replica.held()
            finally:
                await replica.close()

        locked = holder.transaction()
        await locked.start()
        await holder.execute("SELECT id FROM requests WHERE held = 1 FOR UPDATE")
        # Each on a loop and connections of its own, as separate replicas would be.
        adopting = asyncio.gather(
            *(asyncio.to_thread(pg.run, adopt(f"replica-{i}")) for i in range(4))
        )
        deadline = time.monotonic() + 30
        while await adopters_waiting(holder) < 4:
            assert time.monotonic() < deadline, "the adopters never waited for the rows"
            await asyncio.sleep(0.02)
        await locked.commit()
        found = await adopting
        assert sum(adopted for adopted, _ in found) == count
        assert [adopted for adopted, _ in found] == [len(held) for _, held in found]
        every = [pair for _, held in found for pair in held]
        assert sorted(every) == [(f"bg{i:03}", f"resp_{i:03}") for i in range(count)]
    finally:
        await holder.close()
        pg.drop_schema(url)


async def adopters_waiting(conn: asyncpg.Connection) -> int:
    """How many sessions wait for a lock in the middle of an adoption."""
    # Within a transaction the activity view is read once, unless told to read it again.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    found: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE 'UPDATE requests SET owner = %' AND datname = current_database()"
    )
    return found


# -- schema version 4 ------------------------------------------------------------------------

V3_ROW = (
    "INSERT INTO requests (id, started_at, finished_at, team, endpoint, model, state, "
    "outcome, status, image_output_tokens, images, cost_nanos, counters) VALUES "
    "('old', 100.0, 101.0, 'design', 'generations', 'gpt-image-1', 'settled', 'ok', 200, "
    "4160, 1, 167000000, '[]')"
)
"""One settled image row, as a version 3 ledger holds it."""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_3_ledger_migrates_and_reads_its_rows(kind: str, tmp_path: Path) -> None:
    async with pg.migrated_from(kind, tmp_path, 3, V3_ROW) as ledger:
        [row] = await ledger.rows()
        assert (row.entry.id, row.entry.mainline_model, row.entry.context_images) == (
            "old",
            None,
            0,
        )
        assert row.settlement is not None
        assert (row.settlement.usage, row.settlement.cost_nanos) == (
            Usage(image_output=4160, images=1),
            167_000_000,
        )
        assert (row.settlement.mainline_cost_nanos, row.settlement.response_id) == (0, None)
        assert (await exported(ledger, "old"))["held"] == 0
        await ledger.reserve([], take_response("new"))  # and it takes the new rows
        await ledger.hold("new", "resp_new")
        found = await ledger.response("resp_new")
        assert found is not None and found.request_id == "new"
