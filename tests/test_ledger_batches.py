"""The ledger's files and batches on both backends: objects owned by their team, a batch input
file's priced lines (50,000 of them), a batch's reservation settled by its billed lines on the
day it ended (once, whoever settles it, whatever reserves meanwhile), schema version 5, and
copies that carry them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.core.errors import LedgerError
from proxy.core.models import Counter, Entry, Period, Settlement, Totals, Usage
from proxy.ledger import codecs, open_ledger, postgres_counters
from proxy.ledger.base import (
    Backend,
    BatchLine,
    BilledLine,
    Chooser,
    ObjectKind,
    Owner,
    Reservation,
    StoredObject,
    UserShare,
)
from proxy.ledger.copy import copy_between
from proxy.ledger.postgres import PostgresLedger
from tests import pg
from tests.test_ledger import SETTLED, ledger_url, take

DAY = 86_400.0
CREATED = 1000.0
"""The batch is created on day 0 of month 0..."""
ENDED = 32 * DAY + 500.0
"""...and ends on day 32, in the next month."""
MONTH_TWO = 31 * DAY


def counters(start: float, month: float) -> tuple[Counter, ...]:
    return (
        Counter("team", "design", "", "day", start),
        Counter("team", "design", "", "month", month),
        Counter("user", "design", "alice", "day", start),
    )


CREATION_COUNTERS = counters(0.0, 0.0)
END_COUNTERS = counters(32 * DAY, MONTH_TWO)


def organization(found: Sequence[Counter]) -> tuple[Counter, ...]:
    return tuple(
        Counter("organization", "", "", c.period, c.start) for c in found if c.scope == "team"
    )


EVERY_COUNTER = (
    *CREATION_COUNTERS,
    *END_COUNTERS,
    *organization(CREATION_COUNTERS),
    *organization(END_COUNTERS),
)
LINE_BOUND = 21_000_000
BOUND_USAGE = Usage(text_input=10, image_output=4160, images=1)


def priced(i: int, file_lines: int = 3) -> BatchLine:
    return BatchLine(
        custom_id=f"req-{i}",
        line=i,
        endpoint="generations",
        model="gpt-image-1",
        quality="medium",
        size="1024x1024",
        n=1,
        user="alice" if i % 2 else None,
        bound_nanos=LINE_BOUND,
    )


def input_file(file_id: str = "file-abc", lines: int = 3, team: str = "design") -> StoredObject:
    return StoredObject(
        id=file_id,
        team=team,
        kind="file",
        purpose="batch",
        created_at=900.0,
        lines=lines,
        bound_nanos=lines * LINE_BOUND,
        bound_usage=BOUND_USAGE.scaled(lines),
    )


def batch_entry(request_id: str, lines: int) -> Entry:
    return Entry(
        id=request_id,
        started_at=CREATED,
        endpoint="batches",
        team="design",
        cost_center="CC-1042",
        key_id="web-app",
        user="alice",
        model_requested="gpt-image-1",
        model="gpt-image-1",
        estimated_nanos=lines * LINE_BOUND,
    )


def take_batch(request_id: str, lines: int = 3) -> Chooser:
    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        entry = batch_entry(request_id, lines)
        return Reservation(entry, BOUND_USAGE.scaled(lines), CREATION_COUNTERS)

    return choose


def billed(
    i: int, batch_id: str | None = "batch_abc", row_id: str | None = None, cost: int = 0
) -> BilledLine:
    """The billed line `req-{i}` of a batch that ended on day 32."""
    entry = Entry(
        id=row_id or f"row-{i}",
        started_at=ENDED,
        endpoint="batches",
        team="design",
        cost_center="CC-1042",
        key_id="web-app",
        user="alice",
        model_requested="gpt-image-1",
        model="gpt-image-1",
        quality_requested="medium",
        quality="medium",
        size_requested="1024x1024",
        size="1024x1024",
        n_requested=1,
        n=1,
        estimated_nanos=LINE_BOUND,
        custom_id=f"req-{i}",
    )
    settlement = Settlement(
        finished_at=ENDED + 1.0,
        outcome="ok",
        status=200,
        usage=Usage(text_input=8 + i, image_output=4160, images=1),
        cost_nanos=cost or 10_000_000 + i,
        upstream_request_id=f"batch_req_{i}",
        response_id=batch_id,
    )
    return BilledLine(entry, settlement, END_COUNTERS)


async def every_row(ledger: Backend) -> list[dict[str, Any]]:
    async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
        return [row async for row in rows]


# -- files and batches owned --------------------------------------------------------------


async def test_an_object_is_its_teams_and_a_file_keeps_its_priced_lines(ledger: Backend) -> None:
    lines = [priced(i) for i in range(1, 4)]
    batch = StoredObject(
        "batch_abc", "design", "batch", None, 950.0, 3, 3 * LINE_BOUND, Usage(), "file-abc"
    )
    vision = StoredObject("file-img", "research", "file", "vision", 960.0)
    await ledger.own(input_file(), lines)
    await ledger.own(batch)
    await ledger.own(vision)
    assert await ledger.stored("file-abc") == input_file()
    assert await ledger.stored("batch_abc") == batch
    assert await ledger.stored("file-img") == vision
    assert await ledger.stored("file-unknown") is None
    assert await ledger.teams_of(["file-abc", "file-img", "file-unknown", "batch_abc"]) == {
        "file-abc": "design",
        "file-img": "research",
        "batch_abc": "design",
    }
    assert await ledger.teams_of([]) == {}
    kinds: tuple[ObjectKind, ...] = ("file", "batch")
    owned = [(t, k) for t in ("design", "research", "ops") for k in kinds
             if await ledger.owns_any(t, k)]  # fmt: skip
    assert owned == [("design", "file"), ("design", "batch"), ("research", "file")]
    assert await ledger.batch_lines("file-abc") == {line.custom_id: line for line in lines}
    assert await ledger.batch_lines("file-img") == {}
    assert (await ledger.contents()).objects == 3


async def test_a_teams_objects_past_a_time_in_either_order(ledger: Backend) -> None:
    """What a listing jumps to (`objects_past`): the team's objects of a kind, in its
    project now (or recorded before projects were), of a purpose when asked, from a time
    on in either direction, ties by id."""
    made = [
        StoredObject("file-b", "design", "file", "vision", 100.0, project="proj_a"),
        StoredObject("file-a", "design", "file", "vision", 100.0, project="proj_a"),
        StoredObject("file-c", "design", "file", "user_data", 90.0, project="proj_a"),
        StoredObject("file-d", "design", "file", "vision", 80.0, project=None, project_known=False),
        StoredObject("file-e", "design", "file", "vision", 70.0, project="proj_old"),
        StoredObject("file-f", "design", "file", "vision", 60.0, project=None),
        StoredObject("file-g", "research", "file", "vision", 95.0, project="proj_a"),
        StoredObject("batch_h", "design", "batch", None, 85.0, project="proj_a"),
        StoredObject("file-i", "design", "file", "vision", 120.0, project="proj_a"),
    ]
    for obj in made:
        await ledger.own(obj)

    async def ids(project: str | None, purpose: str | None, newest: bool, edge: float) -> list[str]:
        found = await ledger.objects_past("design", "file", project, purpose, newest, edge, 10)
        return [o.id for o in found]

    assert await ids("proj_a", None, True, 100.0) == ["file-b", "file-a", "file-c", "file-d"]
    assert await ids("proj_a", None, False, 90.0) == ["file-c", "file-a", "file-b", "file-i"]
    assert await ids("proj_a", "vision", True, 110.0) == ["file-b", "file-a", "file-d"]
    assert await ids(None, None, True, 1000.0) == ["file-d", "file-f"]
    assert await ids("proj_old", None, False, 0.0) == ["file-e", "file-d"]
    assert await ids("proj_a", None, True, 50.0) == []
    found = await ledger.objects_past("design", "file", "proj_a", None, True, 1000.0, 2)
    assert found == [made[-1], made[0]]
    batches = await ledger.objects_past("design", "batch", "proj_a", None, True, 1000.0, 5)
    assert [o.id for o in batches] == ["batch_h"]


async def test_an_object_recorded_again_keeps_its_first_owner(ledger: Backend) -> None:
    await ledger.own(input_file(lines=1), [priced(1)])
    # A retry whose first attempt committed unseen: nothing changes, nothing is duplicated.
    await ledger.own(input_file(lines=2), [priced(1), priced(2)])
    assert await ledger.stored("file-abc") == input_file(lines=1)
    assert list(await ledger.batch_lines("file-abc")) == ["req-1"]
    with pytest.raises(LedgerError, match="file file-abc belongs to another team"):
        await ledger.own(input_file(team="research"), [])
    assert await ledger.teams_of(["file-abc"]) == {"file-abc": "design"}


async def test_a_file_with_a_custom_id_twice_is_not_recorded(ledger: Backend) -> None:
    with pytest.raises(LedgerError):
        await ledger.own(input_file(lines=2), [priced(1), priced(1)])
    assert await ledger.stored("file-abc") is None
    assert await ledger.batch_lines("file-abc") == {}


async def test_a_file_of_50000_lines_is_recorded_and_read_back_whole(ledger: Backend) -> None:
    count = 50_000
    lines = [priced(i) for i in range(1, count + 1)]
    began = time.perf_counter()
    await ledger.own(input_file(lines=count), lines)
    owned = time.perf_counter() - began
    began = time.perf_counter()
    found = await ledger.batch_lines("file-abc")
    read = time.perf_counter() - began
    print(f"\n{type(ledger).__name__}: own {count} lines {owned:.3f}s, read back {read:.3f}s")
    assert len(found) == count
    assert found["req-1"] == lines[0] and found[f"req-{count}"] == lines[-1]
    assert list(found) == [line.custom_id for line in lines]  # in file order


# -- a batch settled by its billed lines ------------------------------------------------


async def reserve_batch(ledger: Backend, request_id: str = "b1", lines: int = 3) -> None:
    await ledger.reserve(CREATION_COUNTERS, take_batch(request_id, lines))
    await ledger.hold(request_id, "batch_abc")


def end_totals(lines: Sequence[BilledLine], user_lines: int | None = None) -> Totals:
    usage = sum((line.settlement.usage for line in lines), Usage())
    return Totals(
        spent_nanos=sum(line.settlement.cost_nanos for line in lines),
        text_input_tokens=usage.text_input,
        image_output_tokens=usage.image_output,
        total_tokens=usage.total_tokens,
    )


async def test_a_batch_becomes_its_billed_lines_on_the_day_it_ended(ledger: Backend) -> None:
    """Created on day 0 of one month, ended on day 32: the reservation leaves the creation
    day's and month's counters whole, and the lines' cost lands on the end day's and month's,
    the team's, the user's and the organization's alike."""
    await reserve_batch(ledger)
    before = await ledger.totals(EVERY_COUNTER)
    assert before[CREATION_COUNTERS[0]].reserved_nanos == 3 * LINE_BOUND
    # Line 2 failed: two billed lines, the second one's settlement naming no batch id.
    lines = [billed(1, row_id="ignored"), billed(3, batch_id=None)]
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == 2

    totals = await ledger.totals(EVERY_COUNTER)
    for counter in (*CREATION_COUNTERS, *organization(CREATION_COUNTERS)):
        assert totals[counter] == Totals(), counter
    for counter in (*END_COUNTERS, *organization(END_COUNTERS)):
        assert totals[counter] == end_totals(lines), counter
    assert totals[END_COUNTERS[0]].spent_nanos == 20_000_004

    first, second = await ledger.rows()
    # The reservation's row, now the first line's: its id stays, the rest is the line's.
    assert first.entry == replace(lines[0].entry, id="b1")
    assert (first.entry.custom_id, first.entry.started_at) == ("req-1", ENDED)
    assert first.settlement == lines[0].settlement
    assert second.entry == lines[1].entry
    assert second.settlement is not None and second.settlement.response_id == "batch_abc"
    stored = {row["id"]: row for row in await every_row(ledger)}
    assert set(stored) == {"b1", "row-3"}
    for row in stored.values():
        assert (row["state"], row["held"], row["reserved_nanos"]) == ("settled", 0, 0)
        assert row["response_id"] == "batch_abc"
        assert row["estimated_nanos"] == LINE_BOUND
    assert stored["row-3"]["custom_id"] == "req-3"
    assert await ledger.held() == []


@pytest.mark.parametrize("project", ["proj_A", None], ids=["project", "none"])
async def test_every_billed_line_keeps_the_project_its_batch_was_created_under(
    ledger: Backend, project: str | None
) -> None:
    """OpenAI bills a batch's lines to the project that created it: each line's row says
    so, as the reservation's did, for `reconcile --by project`."""
    await ledger.reserve(CREATION_COUNTERS, take_batch("b1"))
    await ledger.hold("b1", "batch_abc", project)
    lines = [billed(1), billed(2), billed(3)]
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == 3
    stored = {row["id"]: row["project"] for row in await every_row(ledger)}
    assert stored == dict.fromkeys(("b1", "row-2", "row-3"), project or "")


async def test_a_settled_batch_is_still_found_by_a_repeat_of_its_create(ledger: Backend) -> None:
    """The reservation's row becomes its first billed line's, but keeps what a repeat of the
    create finds it by: a retry after the batch ended is answered with it, not billed again."""
    entry = replace(batch_entry("b1", 3), content_digest="digest-1", idempotency_key="key-1")
    await ledger.reserve(
        CREATION_COUNTERS, lambda _: Reservation(entry, BOUND_USAGE.scaled(3), CREATION_COUNTERS)
    )
    await ledger.hold("b1", "batch_abc")
    lines = [billed(1), billed(2)]
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == 2
    by_key = await ledger.first_attempt("design", 0.0, key="key-1")
    by_content = await ledger.first_attempt("design", 0.0, content="digest-1")
    assert by_key is not None and by_content is not None
    assert replace(by_key, age_s=None) == replace(by_content, age_s=None)  # read apart
    assert (by_key.request_id, by_key.settled, by_key.content_digest) == ("b1", True, "digest-1")
    first = next(row for row in await ledger.rows() if row.entry.id == "b1")
    assert first.entry == replace(lines[0].entry, id="b1", content_digest="digest-1",
                                  idempotency_key="key-1")  # fmt: skip


async def test_a_batch_settled_again_is_left_as_it_is(ledger: Backend) -> None:
    await ledger.register(Owner("me", "host", 1))
    await reserve_batch(ledger)
    lines = [billed(1), billed(2)]
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == 2
    rows, totals = await ledger.rows(), await ledger.totals(EVERY_COUNTER)
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == 0
    assert await ledger.settle_batch("b1", [], Settlement(ENDED, "ok", 200)) == 0
    assert await ledger.rows() == rows
    assert await ledger.totals(EVERY_COUNTER) == totals
    # Nor does a settlement of the plain kind move anything.
    await ledger.settle("b1", SETTLED)
    assert await ledger.totals(EVERY_COUNTER) == totals


async def test_an_open_batch_is_listed_with_its_reservation_until_it_is_settled(
    ledger: Backend,
) -> None:
    await ledger.register(Owner("me", "host", 1))
    assert await ledger.open_batches() == []
    await reserve_batch(ledger)
    [held] = await ledger.open_batches()
    [row] = await ledger.rows()
    assert (held.batch_id, held.team) == ("batch_abc", row.entry.team)
    assert held.reserved_nanos == row.entry.estimated_nanos > 0
    await ledger.settle_batch("b1", [billed(1)], Settlement(ENDED, "ok", 200))
    assert await ledger.open_batches() == []


async def test_a_batch_with_no_billed_line_is_settled_at_no_cost(ledger: Backend) -> None:
    await reserve_batch(ledger)
    failed = Settlement(
        ENDED, "upstream_error", 200, Usage(images=3), 99, error_code="batch_failed"
    )
    assert await ledger.settle_batch("b1", [], failed) == 1
    assert (await ledger.totals(EVERY_COUNTER)) == {c: Totals() for c in EVERY_COUNTER}
    [row] = await ledger.rows()
    assert row.settlement is not None
    assert (row.settlement.outcome, row.settlement.error_code) == ("upstream_error", "batch_failed")
    assert (row.settlement.cost_nanos, row.settlement.usage) == (0, Usage())
    assert row.settlement.response_id == "batch_abc"  # kept from the hold


async def test_settling_an_unknown_batch_raises_ledger_error(ledger: Backend) -> None:
    with pytest.raises(LedgerError, match="no reservation nope"):
        await ledger.settle_batch("nope", [billed(1)], Settlement(ENDED, "ok", 200))


async def test_a_batch_of_many_lines_writes_each_counter_once_and_exactly(
    ledger: Backend,
) -> None:
    count = 5_000
    await reserve_batch(ledger, lines=count)
    lines = [billed(i, cost=1_000 + i) for i in range(count)]
    began = time.perf_counter()
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == count
    took = time.perf_counter() - began
    print(f"\n{type(ledger).__name__}: settle a batch of {count} lines {took:.3f}s")
    totals = await ledger.totals(EVERY_COUNTER)
    assert totals[END_COUNTERS[0]] == end_totals(lines)
    assert totals[CREATION_COUNTERS[1]] == Totals()
    assert (await ledger.contents()).requests == count


# -- users' shares ---------------------------------------------------------------------------

TEAM_COUNTERS = CREATION_COUNTERS[:2]
"""A batch naming several users reserves the whole bound in the team's counters only..."""
SHARE_USAGE = Usage(text_input=3, image_output=1000, images=1)


def shares(users: int) -> tuple[UserShare, ...]:
    """...and each user's share (here 7 nanos and a few tokens more than a line's bound) in
    that user's counters of the same windows."""
    return tuple(UserShare(f"u{i}", LINE_BOUND + 7, SHARE_USAGE) for i in range(users))


def user_counter(user: str, start: float = 0.0) -> Counter:
    return Counter("user", "design", user, "day", start)


async def reserve_shared(
    ledger: Backend,
    users: int,
    *,
    hold: bool = True,
    periods: tuple[Period, ...] = (),
    ahead: bool = False,
    request_id: str = "b1",
) -> None:
    """A batch naming `users` reserved (`ahead`: what it writes worked out before its
    transaction, as a batch create does, `codecs.written`)."""

    def choose(totals: Mapping[Counter, Totals]) -> Reservation:
        entry = replace(batch_entry(request_id, users), user=None)
        usage = BOUND_USAGE.scaled(users)
        held = shares(users)
        found = Reservation(entry, usage, TEAM_COUNTERS, shares=held, share_periods=periods)
        return replace(found, written=codecs.written(found)) if ahead else found

    await ledger.reserve(TEAM_COUNTERS, choose)
    if hold:
        await ledger.hold("b1", "batch_abc")


async def test_each_users_share_is_held_in_her_counters_and_settled_by_her_lines(
    ledger: Backend,
) -> None:
    """2,000 users: each one's counter holds her share, to the nano and the token, then
    exactly what her line cost once the batch is settled; nothing stays reserved."""
    users = 2_000
    await reserve_shared(ledger, users)
    held = await ledger.totals([user_counter(f"u{i}") for i in range(users)])
    for total in held.values():
        assert total == Totals(
            reserved_nanos=LINE_BOUND + 7,
            text_input_tokens=3,
            image_output_tokens=1000,
            total_tokens=1003,
        )
    team = (await ledger.totals(TEAM_COUNTERS))[TEAM_COUNTERS[0]]
    assert team.reserved_nanos == users * LINE_BOUND
    lines = [
        replace(
            billed(i, row_id=f"row-{i}", cost=1_000 + i),
            entry=replace(billed(i).entry, id=f"row-{i}", user=f"u{i}"),
            counters=(*END_COUNTERS[:2], user_counter(f"u{i}", 32 * DAY)),
        )
        for i in range(users)
    ]
    assert await ledger.settle_batch("b1", lines, Settlement(ENDED, "ok", 200)) == users
    before = await ledger.totals([user_counter(f"u{i}") for i in range(users)])
    assert set(before.values()) == {Totals()}
    after = await ledger.totals([user_counter(f"u{i}", 32 * DAY) for i in range(users)])
    for i, line in enumerate(lines):
        assert after[user_counter(f"u{i}", 32 * DAY)] == end_totals([line])


@pytest.mark.parametrize("periods", [(), ("day",)])
async def test_a_batch_written_ahead_of_its_transaction_holds_what_one_written_in_it_does(
    ledger: Backend, periods: tuple[Period, ...]
) -> None:
    """Its row's counters text and every counter the same, to the nano and the token, and
    settled alike."""
    month = [Counter("user", "design", f"u{i}", "month", 0.0) for i in range(50)]
    read = [user_counter(f"u{i}") for i in range(50)] + month + list(TEAM_COUNTERS)
    found = []
    for request_id, ahead in (("b1", False), ("b2", True)):
        await reserve_shared(ledger, 50, hold=False, periods=periods, ahead=ahead,
                             request_id=request_id)  # fmt: skip
        async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
            text = [r["counters"] async for r in rows if r["id"] == request_id]
        found.append((text, await ledger.totals(read)))
        settled = Settlement(CREATED + 1.0, "upstream_error", 400, Usage(), 0)
        await ledger.settle(request_id, settled)
        assert set((await ledger.totals(read)).values()) == {Totals()}
    assert found[0] == found[1]
    text, totals = found[0]
    assert len(text) == 1 and codecs.shared(text[0])
    assert sum(t.reserved_nanos > 0 for t in totals.values()) == 50 + 2 + 50 * (not periods)


async def test_a_batch_reservation_reclaimed_or_released_moves_each_share_whole(
    ledger: Backend,
) -> None:
    """Reclaimed at its bound (its process died before it was held), each user is charged
    her share; a resolution to $0 takes it back; a batch never created releases it."""
    await reserve_shared(ledger, 3, hold=False)
    assert await ledger.reclaim(CREATED + 10.0, started_before=CREATED + 1.0) == 1
    found = await ledger.totals([user_counter(f"u{i}") for i in range(3)])
    assert {t.spent_nanos for t in found.values()} == {LINE_BOUND + 7}
    assert {t.reserved_nanos for t in found.values()} == {0}
    await ledger.resolve("b1", 0, CREATED + 20.0)
    found = await ledger.totals([user_counter(f"u{i}") for i in range(3)] + list(TEAM_COUNTERS))
    assert set(found.values()) == {Totals()}
    async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
        assert [r["id"] async for r in rows] == ["b1"]


async def test_a_shared_batch_resolved_twice_leaves_no_user_counter_negative(
    ledger: Backend,
) -> None:
    """Reclaimed at its bound, then resolved at 1 nano, then at $0 (an operator's correction):
    every user's counter ends at zero, none below it, as the team's does."""
    await reserve_shared(ledger, 3, hold=False)
    assert await ledger.reclaim(CREATED + 10.0, started_before=CREATED + 1.0) == 1
    await ledger.resolve("b1", 1, CREATED + 20.0)
    await ledger.resolve("b1", 0, CREATED + 30.0)
    found = await ledger.totals([user_counter(f"u{i}") for i in range(3)] + list(TEAM_COUNTERS))
    assert set(found.values()) == {Totals()}


async def test_a_batch_never_created_releases_each_users_share(ledger: Backend) -> None:
    await reserve_shared(ledger, 3, hold=False)
    await ledger.settle("b1", Settlement(CREATED + 1.0, "upstream_error", 400, Usage(), 0))
    found = await ledger.totals([user_counter(f"u{i}") for i in range(3)] + list(TEAM_COUNTERS))
    assert set(found.values()) == {Totals()}


async def test_shares_are_held_only_in_the_periods_of_the_per_user_budgets(
    ledger: Backend,
) -> None:
    """A team whose per-user budgets are daily: each user's share is held in her day
    counter, not her month one, which no budget reads; released, both are empty."""
    await reserve_shared(ledger, 3, hold=False, periods=("day",))
    month = [Counter("user", "design", f"u{i}", "month", 0.0) for i in range(3)]
    found = await ledger.totals([user_counter(f"u{i}") for i in range(3)] + month)
    assert {found[user_counter(f"u{i}")].reserved_nanos for i in range(3)} == {LINE_BOUND + 7}
    assert {found[c] for c in month} == {Totals()}
    await ledger.settle("b1", Settlement(CREATED + 1.0, "upstream_error", 400, Usage(), 0))
    found = await ledger.totals([user_counter(f"u{i}") for i in range(3)] + month)
    assert set(found.values()) == {Totals()}


# -- replicas settling together -------------------------------------------------------------


async def test_two_replicas_settling_one_batch_together_settle_it_once(shared: str) -> None:
    ledger = await open_ledger(shared)
    try:
        await reserve_batch(ledger, lines=200)
        lines = [billed(i) for i in range(200)]

        async def settle() -> int:
            replica = await open_ledger(shared)
            try:
                return await replica.settle_batch("b1", lines, Settlement(ENDED, "ok", 200))
            finally:
                await replica.close()

        # Each on a loop and connections of its own, as separate replicas would be.
        found = await asyncio.gather(*(asyncio.to_thread(pg.run, settle()) for _ in range(2)))
        assert sorted(found) == [0, 200]
        totals = await ledger.totals(EVERY_COUNTER)
        assert totals[END_COUNTERS[0]] == end_totals(lines)
        assert totals[organization(END_COUNTERS)[1]] == end_totals(lines)
        assert totals[CREATION_COUNTERS[0]] == Totals()
        assert (await ledger.contents()).requests == 200
    finally:
        await ledger.close()


def first_lock_taken(url: str) -> bool:
    """Whether a transaction holds the organization's total counter row, the first lock of
    every counter writer (`postgres_counters`), asked from a connection of its own."""
    sql = (
        "SELECT 1 FROM budget_usage WHERE scope = 'organization' AND period = 'total' "
        "FOR UPDATE NOWAIT"
    )
    try:
        pg.fetch(url, sql)
    except asyncpg.LockNotAvailableError:
        return True
    return False


def watch_first_lock(monkeypatch: pytest.MonkeyPatch, url: str) -> list[bool]:
    """From now on, whether the first lock was taken (`first_lock_taken`) each time the
    counter rows of users' shares are worked out, in order."""
    locked: list[bool] = []
    rows_of = codecs.counter_rows

    def watched(text: str, *rest: Any) -> Any:
        if codecs.shared(text):
            locked.append(first_lock_taken(url))
        return rows_of(text, *rest)

    monkeypatch.setattr(codecs, "counter_rows", watched)
    return locked


EXPIRED = Settlement(CREATED + 60.0, "upstream_error", 200, error_code="batch_expired")
SHARED_READ = [user_counter(f"u{i}") for i in range(200)] + list(TEAM_COUNTERS)


async def test_a_batch_naming_users_is_worked_out_before_its_settlement_takes_the_first_lock(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the counter rows of its users' shares (100,000 for 50,000 users) are worked
    out before the transaction, from its row read ahead, so that every replica's writers,
    which wait for the lock the transaction takes first, are not kept waiting meanwhile."""
    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200)
        locked = watch_first_lock(monkeypatch, shared)
        assert await ledger.settle_batch("b1", [], EXPIRED) == 1
        assert set((await ledger.totals(SHARED_READ)).values()) == {Totals()}
    finally:
        await ledger.close()
    assert locked == [False]


RELEASED = Settlement(CREATED + 1.0, "upstream_error", 400, Usage(), 0)


async def test_a_batch_naming_users_never_created_is_worked_out_before_the_first_lock(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a batch the upstream never created is released (`settle`); the counter
    rows of its users' shares, known to the process that reserved it, are worked out
    before the transaction, not under the lock every replica's writers wait for."""
    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200, hold=False)
        locked = watch_first_lock(monkeypatch, shared)
        await ledger.settle("b1", RELEASED)
        assert set((await ledger.totals(SHARED_READ)).values()) == {Totals()}
    finally:
        await ledger.close()
    assert locked == [False]


async def test_a_batch_naming_users_reclaimed_before_its_release_is_released_from_its_row(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row is no longer the reservation the process made (another replica reclaimed it
    at its bound meanwhile): what was worked out ahead is not written; the release is
    worked out again from the row, and each user's share leaves her counters once."""
    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200, hold=False)
        other = await open_ledger(shared)
        try:
            assert await other.reclaim(CREATED + 2.0, started_before=CREATED + 1.0) == 1
        finally:
            await other.close()
        charged = await ledger.totals(SHARED_READ)
        assert all(t.spent_nanos > 0 for t in charged.values())  # each share, at its bound
        locked = watch_first_lock(monkeypatch, shared)
        await ledger.settle("b1", RELEASED)
        assert set((await ledger.totals(SHARED_READ)).values()) == {Totals()}
    finally:
        await ledger.close()
    assert locked == [False, True]


def remembered(ledger: Backend) -> set[str]:
    """The batch reservations naming users that the PostgreSQL ledger `ledger` remembers."""
    assert isinstance(ledger, PostgresLedger)
    return set(ledger._shared)


async def test_a_batch_naming_users_settled_by_its_lines_unheld_is_forgotten(shared: str) -> None:
    """PostgreSQL: a batch whose hold was never written (recording it failed) is still
    followed and settled by its lines: the reservation the process remembers (its users'
    shares, megabytes for 50,000 users) is forgotten with it, not kept until the process
    ends."""
    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200, hold=False)
        assert remembered(ledger) == {"b1"}
        assert await ledger.settle_batch("b1", [], EXPIRED) == 1
        assert remembered(ledger) == set()
        assert set((await ledger.totals(SHARED_READ)).values()) == {Totals()}
    finally:
        await ledger.close()


@pytest.mark.parametrize("where", ["here", "on another replica"])
async def test_a_batch_naming_users_never_settled_here_is_forgotten_once_reclaimed(
    shared: str, where: str
) -> None:
    """PostgreSQL: a batch reservation neither held nor released by the process that made
    it (its create cancelled, say) is reclaimed at its bound by the housekeeping of this
    process or of another: once this process's reclaim has passed its age, it is
    forgotten, not kept until the process ends. A younger one is remembered still."""
    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200, hold=False)
        await reserve_shared(ledger, 3, hold=False, request_id="b2")
        assert remembered(ledger) == {"b1", "b2"}
        if where == "here":
            assert await ledger.reclaim(CREATED + 10.0, started_before=CREATED + 1.0) == 2
        else:
            other = await open_ledger(shared)
            try:
                assert await other.reclaim(CREATED + 10.0, started_before=CREATED + 1.0) == 2
            finally:
                await other.close()
            assert await ledger.reclaim(CREATED + 10.0, started_before=CREATED + 1.0) == 0
        assert remembered(ledger) == set()
        await reserve_shared(ledger, 3, hold=False, request_id="b3")
        assert await ledger.reclaim(CREATED + 10.0, started_before=CREATED) == 0
        assert remembered(ledger) == {"b3"}
        await ledger.settle("b3", RELEASED)
        assert remembered(ledger) == set()
    finally:
        await ledger.close()


async def test_a_batch_settled_by_another_replica_after_it_was_read_ahead_is_left_as_it_is(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row read ahead of the transaction has changed once it is locked: what was worked
    out from it is not written, and each user's share leaves her counters once."""
    rows_of = codecs.counter_rows
    asked: list[str] = []
    settled: list[int] = []

    async def on_replica() -> int:
        replica = await open_ledger(shared)
        try:
            return await replica.settle_batch("b1", [], EXPIRED)
        finally:
            await replica.close()

    def watched(text: str, *rest: Any) -> Any:
        if codecs.shared(text) and not asked:
            asked.append(text)  # once: the replica works its rows out here too
            settled.append(pg.run(on_replica()))  # while this one works out what it writes
        return rows_of(text, *rest)

    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200)
        monkeypatch.setattr(codecs, "counter_rows", watched)
        assert await ledger.settle_batch("b1", [], EXPIRED) == 0
        assert settled == [1]
        assert set((await ledger.totals(SHARED_READ)).values()) == {Totals()}
    finally:
        await ledger.close()


async def test_a_batch_naming_users_adds_to_their_counters_a_few_thousand_a_statement(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: released, settled or not, its users' counters are added to
    `ADD_AT_ONCE` a statement, in lock order: asyncpg encodes a statement's arguments on the
    event loop, which the 100,000 counters of 50,000 users kept a quarter of a second."""
    sizes: list[int] = []
    execute = asyncpg.Connection.execute

    async def watched(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == postgres_counters.ADD_SQL:
            sizes.append(len(args[0]))
            assert list(zip(*args[:5], strict=True)) == sorted(zip(*args[:5], strict=True))
        return await execute(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", watched)
    monkeypatch.setattr(postgres_counters, "ADD_AT_ONCE", 50)
    ledger = await open_ledger(shared)
    try:
        await reserve_shared(ledger, 200, request_id="b1")
        sizes.clear()
        assert await ledger.settle_batch("b1", [], EXPIRED) == 1
        assert max(sizes) == 50 and sum(sizes) == 2 * 200 + 4  # users' windows, team's, org's
        await reserve_shared(ledger, 200, hold=False, request_id="b2")
        sizes.clear()
        await ledger.settle("b2", Settlement(CREATED + 1.0, "upstream_error", 400, Usage(), 0))
        assert max(sizes) == 50 and sum(sizes) == 2 * 200 + 4
        assert set((await ledger.totals(SHARED_READ)).values()) == {Totals()}
    finally:
        await ledger.close()


async def test_batches_settled_among_reservations_of_their_team_never_deadlock(
    shared: str,
) -> None:
    """Replicas reserve for the team on the creation and the end day while others settle
    batches onto those same counters: everything ends, and every total is exact."""
    replicas = [await open_ledger(shared)]
    batches, per_batch, requests = 6, 300, 60
    try:
        for b in range(batches):
            await reserve_batch(replicas[0], f"b{b}", lines=per_batch)
        billed_lines = {
            f"b{b}": [billed(i, row_id=f"b{b}-{i}", cost=1_000_000 + i) for i in range(per_batch)]
            for b in range(batches)
        }

        async def settle(replica: Backend, request_id: str) -> int:
            lines = billed_lines[request_id]
            return await replica.settle_batch(request_id, lines, Settlement(ENDED, "ok", 200))

        async def reserve(replica: Backend, i: int) -> None:
            on = END_COUNTERS if i % 2 else CREATION_COUNTERS
            await replica.reserve(on, take(f"r{i}", estimate=1_000, counters=on))

        async def on_replica(k: int) -> list[Any]:
            own = await open_ledger(shared)
            try:
                work = [settle(own, f"b{b}") for b in range(batches) if b % 3 == k]
                work += [reserve(own, i) for i in range(requests) if i % 3 == k]
                return await asyncio.gather(*work)
            finally:
                await own.close()

        found = await asyncio.wait_for(
            asyncio.gather(*(asyncio.to_thread(pg.run, on_replica(k)) for k in range(3))),
            timeout=120,
        )
        assert sum(n for done in found for n in done if n) == batches * per_batch
        every = [line for lines in billed_lines.values() for line in lines]
        totals = await replicas[0].totals(EVERY_COUNTER)
        reserved = (requests // 2) * 1_000
        expected = end_totals(every)
        for counter in END_COUNTERS[:2] + organization(END_COUNTERS):
            assert totals[counter].spent_nanos == expected.spent_nanos
            assert totals[counter].reserved_nanos == reserved
            assert (
                totals[counter].image_output_tokens
                == expected.image_output_tokens + (requests // 2) * 7024
            )
        for counter in CREATION_COUNTERS[:2] + organization(CREATION_COUNTERS):
            assert (totals[counter].spent_nanos, totals[counter].reserved_nanos) == (0, reserved)
    finally:
        for replica in replicas:
            await replica.close()


# -- schema version 5 ----------------------------------------------------------------------

V4_ROW = (
    "INSERT INTO requests (id, started_at, finished_at, team, endpoint, model, state, "
    "outcome, status, image_output_tokens, images, cost_nanos, counters, response_id) VALUES "
    "('old', 100.0, 101.0, 'design', 'responses', 'gpt-image-1', 'settled', 'ok', 200, "
    "4160, 1, 167000000, '[]', 'resp_old')"
)
"""One settled response, as a version 4 ledger holds it."""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_4_ledger_migrates_and_takes_files_and_batches(
    kind: str, tmp_path: Path
) -> None:
    async with pg.migrated_from(kind, tmp_path, 4, V4_ROW) as ledger:
        [row] = await ledger.rows()
        assert (row.entry.id, row.entry.custom_id) == ("old", None)
        assert (await every_row(ledger))[0]["custom_id"] is None
        await ledger.own(input_file(), [priced(1), priced(2), priced(3)])
        assert await ledger.teams_of(["file-abc"]) == {"file-abc": "design"}
        await reserve_batch(ledger)
        assert await ledger.settle_batch("b1", [billed(1)], Settlement(ENDED, "ok", 200)) == 1


# -- copies ----------------------------------------------------------------------------------


async def test_a_copy_there_and_back_keeps_files_batches_and_billed_lines(tmp_path: Path) -> None:
    first = ledger_url("sqlite", tmp_path / "first")
    shared = ledger_url("postgresql", tmp_path)
    last = ledger_url("sqlite", tmp_path / "last")
    batch = StoredObject("batch_abc", "design", "batch", None, 950.0, 3, 0, Usage(), "file-abc")
    lines = [priced(i) for i in range(1, 4)]
    try:
        source = await open_ledger(first)
        try:
            await source.own(input_file(), lines)
            await source.own(batch)
            await reserve_batch(source)
            await source.settle_batch("b1", [billed(1), billed(2)], Settlement(ENDED, "ok", 200))
            rows, stored = await source.rows(), await every_row(source)
            totals, held = await source.totals(EVERY_COUNTER), await source.contents()
        finally:
            await source.close()
        assert (held.requests, held.objects) == (2, 2)
        assert await copy_between(first, shared) == held
        assert await copy_between(shared, last) == held
        target = await open_ledger(last)
        try:
            assert await target.rows() == rows
            assert await every_row(target) == stored
            assert await target.totals(EVERY_COUNTER) == totals
            assert await target.stored("file-abc") == input_file()
            assert await target.stored("batch_abc") == batch
            assert await target.batch_lines("file-abc") == {line.custom_id: line for line in lines}
        finally:
            await target.close()
        assert [row["custom_id"] for row in stored] == ["req-1", "req-2"]
    finally:
        pg.drop_schema(shared)


async def test_a_ledger_holding_only_files_is_never_copied_into(tmp_path: Path) -> None:
    source_url = ledger_url("sqlite", tmp_path / "source")
    target_url = ledger_url("sqlite", tmp_path / "target")
    target = await open_ledger(target_url)
    try:
        await target.own(StoredObject("file-img", "research", "file", "vision", 960.0))
    finally:
        await target.close()
    with pytest.raises(LedgerError, match=r"is not empty \(1 files and batches\)"):
        await copy_between(source_url, target_url)


def test_a_batch_adds_to_each_counter_once_in_lock_order() -> None:
    """However many lines, one delta per counter: the lines' costs and usage summed, less
    the reservation's bound and usage on the creation day's counters."""
    bob = Counter("user", "design", "bob", "day", 32 * DAY)
    lines = [billed(i) for i in range(1, 5)]
    lines.append(replace(billed(5), counters=(*END_COUNTERS[:2], bob)))
    reserved = codecs.counters_text(CREATION_COUNTERS)
    found = codecs.batch_settled(codecs.billed(lines), reserved, 99, Usage(image_output=7))
    keys = [row[:5] for row in found]
    assert keys == sorted(set(keys))
    by_key = {row[:5]: row[5:] for row in found}
    spent = sum(line.settlement.cost_nanos for line in lines)
    texts = sum(line.settlement.usage.text_input for line in lines)
    images = 5 * 4160
    assert by_key[codecs.counter_key(END_COUNTERS[0])] == (
        spent,
        0,
        texts,
        0,
        images,
        texts + images,
    )
    assert by_key[codecs.counter_key(bob)][0] == lines[-1].settlement.cost_nanos
    assert by_key[codecs.counter_key(END_COUNTERS[2])][0] == spent - lines[-1].settlement.cost_nanos
    for counter in (*CREATION_COUNTERS, *organization(CREATION_COUNTERS)):
        assert by_key[codecs.counter_key(counter)] == (0, -99, 0, 0, -7, -7)
    assert len(found) == len(CREATION_COUNTERS) + 2 + len(END_COUNTERS) + 2 + 1


def shared_rows(text: str, deltas: codecs.Deltas, spent_before: int) -> list[tuple[Any, ...]]:
    """`codecs.counter_rows` of a text with users' shares, as plainly as it can be put: every
    counter's deltas summed key by key, then sorted."""
    spent, held, tokens = deltas
    *keys, shares = json.loads(text)
    plain = codecs.with_organization([Counter(*key) for key in keys])
    found = {codecs.counter_key(c): [spent, held, *tokens] for c in plain}
    bound, periods = shares["bound"], shares.get("periods")

    def part(delta: int, share: int, whole: int) -> int:
        return delta * share // whole if whole else 0

    for user, nanos, *own in shares["users"]:
        after = spent_before + spent
        added = [part(after, nanos, bound) - part(spent_before, nanos, bound)]
        added += [part(held, nanos, bound)]
        added += [part(d, p, w) for d, p, w in zip(tokens, own, shares["tokens"], strict=True)]
        for c in keys:
            if c[0] == "team" and (periods is None or c[3] in periods):
                total = found.setdefault(("user", c[1], user, c[3], c[4]), [0] * len(added))
                for i, value in enumerate(added):
                    total[i] += value
    return [(*key, *found[key]) for key in sorted(found)]


def test_a_shared_reservations_counter_rows_are_each_users_part_once_in_lock_order() -> None:
    """Random shares (users in any order, any amounts), periods and deltas: the counters'
    rows are those of summing every counter's part key by key, in lock order; and so when a
    text names a user twice, or a user's counter among the team's."""
    rng = random.Random(1206)
    team = [*CREATION_COUNTERS[:2], Counter("team", "design", "", "day", DAY)]
    for _ in range(200):
        users = rng.sample(range(1000), rng.randint(1, 40))
        held = [
            UserShare(
                f"u{u}", rng.randint(0, 10**9), Usage(*(rng.randint(0, 9999) for _ in range(6)))
            )
            for u in users
        ]
        counters = tuple(team)
        if rng.random() < 0.2:
            held.append(replace(held[0], nanos=rng.randint(0, 10**9)))
        if rng.random() < 0.2:
            counters += (user_counter(held[-1].user),)
        periods: tuple[Period, ...] = rng.choice(((), ("day",), ("month",), ("day", "month")))
        bound = sum(s.nanos for s in held) + rng.randint(0, 10**6)
        entry = replace(batch_entry("b1", 1), user=None, estimated_nanos=bound)
        usage = Usage(*(10**6 + rng.randint(0, 10**6) for _ in range(6)))
        reservation = Reservation(entry, usage, counters, shares=tuple(held), share_periods=periods)
        text = codecs.reservation_text(reservation)
        tokens = tuple(rng.randint(-(10**6), 10**6) for _ in range(4))
        for deltas, before in (
            (codecs.reserved(entry, usage), 0),
            ((rng.randint(0, bound), -bound, tokens), rng.randint(0, bound)),
            ((-rng.randint(0, bound), 0, tokens), rng.randint(0, bound)),
        ):
            assert codecs.counter_rows(text, deltas, before) == shared_rows(text, deltas, before)


# -- a batch claimed by one reservation -----------------------------------------------------


async def test_a_batch_is_claimed_by_one_reservation_however_many_claim_it_at_once(
    ledger: Backend,
) -> None:
    """Creates of one file whose answers were lost may find the same batch at once: one
    reservation only holds it, on either backend; the others claim another or none."""
    for request_id in ("b1", "b2", "b3"):
        await ledger.reserve(CREATION_COUNTERS, take_batch(request_id))
    claims = await asyncio.gather(
        *(ledger.claim(r, "batch_abc", "proj_a") for r in ("b1", "b2", "b3"))
    )
    assert sorted(claims) == [False, False, True]
    holder = ("b1", "b2", "b3")[claims.index(True)]
    assert await ledger.claim(holder, "batch_abc") is True  # its own, claimed again
    rows = {r.entry.id: r for r in await ledger.rows()}
    assert [i for i in rows if (await ledger.held_entry(i)) is not None] == [holder]
    [held] = await ledger.open_batches()
    assert held.batch_id == "batch_abc"
    other = next(r for r in ("b1", "b2", "b3") if r != holder)
    assert await ledger.claim(other, "batch_def") is True
    with pytest.raises(LedgerError):
        await ledger.claim("nobody", "batch_ghi")


async def test_a_create_waiting_for_its_answer_is_unanswered_until_held_or_looking(
    ledger: Backend,
) -> None:
    for request_id in ("b1", "b2", "b3"):
        await ledger.reserve(CREATION_COUNTERS, take_batch(request_id))
    assert sorted(await ledger.unanswered("design", "b1", CREATED + 1)) == [CREATED] * 2
    assert await ledger.unanswered("design", "b1", CREATED) == []  # started since
    assert await ledger.unanswered("research", "b1", CREATED + 1) == []
    await ledger.seeking("b2", "batch_maybe_created")
    assert await ledger.claim("b3", "batch_abc")
    assert await ledger.unanswered("design", "b1", CREATED + 1) == []
    assert len(await ledger.unanswered("design", "b2", CREATED + 1)) == 1  # b1


async def test_a_batch_found_for_a_create_charged_its_bound_is_listed_until_resolved(
    ledger: Backend,
) -> None:
    """A create charged its bound when its answer was lost, whose row names the batch found
    for it since: listed for a follower (its entry, project and batch) until resolved."""
    timed_out = Settlement(
        CREATED + 3, "upstream_error", 504, BOUND_USAGE.scaled(3), 3 * LINE_BOUND,
        flagged=True, error_code="upstream_timeout",
    )  # fmt: skip
    gone = replace(timed_out, status=0, error_code="outcome_unknown")  # models gone
    for request_id, settled in (("b1", timed_out), ("b2", timed_out), ("b3", gone)):
        await ledger.reserve(CREATION_COUNTERS, take_batch(request_id))
        await ledger.settle(request_id, settled)
    assert await ledger.lost_batches(0.0) == []  # no batch found yet
    assert await ledger.claim("b1", "batch_abc", "proj_a")
    assert await ledger.claim("b3", "batch_def")
    [(held, batch_id)] = await ledger.lost_batches(0.0)
    assert (held.entry.id, held.project, batch_id) == ("b1", "proj_a", "batch_abc")
    assert held.entry.estimated_nanos == 3 * LINE_BOUND
    assert await ledger.lost_batches(CREATED + 1) == []  # started before
    assert not await ledger.claim("b2", "batch_abc")  # the batch is b1's
    await ledger.resolve("b1", 12_345, ENDED, "batch_abc's lines")
    assert await ledger.lost_batches(0.0) == []
