"""What the ledger keeps for repeats, on both backends: the first attempt a repeat repeats
(by content or by idempotency key, within the window, never a replay nor another team's),
the answers kept for repeats within `store_bytes` (however many replicas keep them
together), schema version 6, and copies that leave the kept answers behind."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import statistics
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.core.errors import RepeatArrived
from proxy.core.models import Counter, Settlement, Totals
from proxy.ledger import open_ledger
from proxy.ledger.base import Backend, Reservation
from proxy.ledger.copy import copy_between
from proxy.ledger.kept import KeptAnswer, RepeatGuard
from proxy.ledger.postgres import SQL
from tests import pg
from tests.test_ledger import ESTIMATE, SETTLED, entry, ledger_url

MB = 1024 * 1024
HEADERS = (("content-type", "application/json"), ("x-request-id", "req_abc"))


async def reserve(
    ledger: Backend,
    request_id: str,
    started_at: float,
    *,
    team: str = "design",
    content: str | None = "digest-a",
    key: str | None = None,
    guard: RepeatGuard | None = None,
) -> None:
    """Reserve a request of `team` with that content digest and idempotency key (a repeat's
    `guard` checked in the same transaction)."""
    day = Counter("team", team, "", "day", 0.0)
    made = replace(
        entry(request_id, started_at, team=team), content_digest=content, idempotency_key=key
    )

    def choose(_: Mapping[Counter, Totals]) -> Reservation:
        return Reservation(made, ESTIMATE, (day,))

    await ledger.reserve([day], choose, guard=guard)


async def record_replay(ledger: Backend, request_id: str, started_at: float, **of: Any) -> None:
    """Record a repeat answered from its first attempt: outcome `replayed`, at no cost."""
    made = replace(entry(request_id, started_at), **of)
    await ledger.record(made, Settlement(started_at + 0.1, "replayed", 200))


def answer(request_id: str, size: int = 100, kept_at: float = 1000.0) -> KeptAnswer:
    body = (request_id.encode() * (size // max(len(request_id), 1) + 1))[:size]
    return KeptAnswer(request_id, "design", 200, HEADERS, body, False, kept_at)


async def kept(ledger: Backend) -> dict[str, int]:
    """The kept answers as stored (request id: body size), read as a copy reads a table."""
    found: dict[str, int] = {}
    async for columns, rows in ledger.dump("kept_answers"):
        at, size = columns.index("request_id"), columns.index("size")
        found |= {r[at]: r[size] for r in rows}
    return found


async def every_row(ledger: Backend) -> list[dict[str, Any]]:
    async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
        return [row async for row in rows]


# -- first attempts --------------------------------------------------------------------------


async def test_entries_keep_their_content_digest_and_idempotency_key(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0, content="digest-a", key="key-1")
    await ledger.record(
        replace(entry("r2", 1001.0), content_digest="digest-b"),
        Settlement(1001.0, "rejected_budget", 429),
    )
    await reserve(ledger, "r3", 1002.0, content=None)
    found = {r.entry.id: r.entry for r in await ledger.rows()}
    assert (found["r1"].content_digest, found["r1"].idempotency_key) == ("digest-a", "key-1")
    assert (found["r2"].content_digest, found["r2"].idempotency_key) == ("digest-b", None)
    assert (found["r3"].content_digest, found["r3"].idempotency_key) == (None, None)
    exported = {
        r["id"]: (r["content_digest"], r["idempotency_key"]) for r in await every_row(ledger)
    }
    assert exported == {"r1": ("digest-a", "key-1"), "r2": ("digest-b", None), "r3": (None, None)}


async def test_the_first_attempt_in_flight_then_settled(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0)
    first = await ledger.first_attempt("design", 900.0, content="digest-a")
    assert first is not None
    assert (first.request_id, first.started_at, first.settled) == ("r1", 1000.0, False)
    assert (first.outcome, first.status, first.cost_nanos) == (None, None, 0)
    assert first.content_digest == "digest-a"
    await ledger.settle("r1", SETTLED)
    first = await ledger.first_attempt("design", 900.0, content="digest-a")
    assert first is not None
    assert (first.request_id, first.settled, first.outcome, first.status) == ("r1", True, "ok", 200)
    assert first.cost_nanos == SETTLED.cost_nanos


async def test_the_latest_attempt_with_that_content_wins(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0)
    await ledger.settle("r1", replace(SETTLED, outcome="upstream_error", status=500, cost_nanos=0))
    await reserve(ledger, "r2", 1005.0)
    await reserve(ledger, "other", 1010.0, content="digest-b")
    first = await ledger.first_attempt("design", 900.0, content="digest-a")
    assert first is not None and first.request_id == "r2"
    assert await ledger.first_attempt("design", 900.0, content="digest-z") is None


async def test_attempts_started_before_the_window_are_not_found(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0)
    found = await ledger.first_attempt("design", 1000.0, content="digest-a")
    assert found is not None and found.request_id == "r1"  # at `since` is within
    assert await ledger.first_attempt("design", 1000.5, content="digest-a") is None


async def test_a_replay_is_never_a_first_attempt(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0, key="key-1")
    await ledger.settle("r1", SETTLED)
    await record_replay(ledger, "r2", 1001.0, content_digest="digest-a", idempotency_key="key-1")
    by_content = await ledger.first_attempt("design", 900.0, content="digest-a")
    by_key = await ledger.first_attempt("design", 900.0, key="key-1")
    assert by_content is not None and by_content.request_id == "r1"
    assert by_key is not None and by_key.request_id == "r1"
    await record_replay(ledger, "r3", 1002.0, content_digest="digest-c")
    assert await ledger.first_attempt("design", 900.0, content="digest-c") is None


async def test_another_teams_attempt_is_never_found(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0, team="research", key="key-1")
    assert await ledger.first_attempt("design", 900.0, content="digest-a") is None
    assert await ledger.first_attempt("design", 900.0, key="key-1") is None
    found = await ledger.first_attempt("research", 900.0, key="key-1")
    assert found is not None and found.request_id == "r1"


async def test_by_key_the_first_attempt_is_found_whatever_its_content(ledger: Backend) -> None:
    await reserve(ledger, "r1", 1000.0, content="digest-a", key="key-1")
    await reserve(ledger, "r2", 1001.0, content="digest-b", key="key-2")
    found = await ledger.first_attempt("design", 900.0, content="digest-b", key="key-1")
    assert found is not None
    assert (found.request_id, found.content_digest) == ("r1", "digest-a")  # a conflict
    assert await ledger.first_attempt("design", 900.0, key="key-3") is None
    assert await ledger.first_attempt("design", 900.0) is None


async def test_a_repeat_is_not_reserved_when_another_attempt_reserved_since_it_looked(
    ledger: Backend,
) -> None:
    """Two attempts of one request arriving together each find no first: the one that
    reserves second finds the other in its own transaction and is not reserved."""
    by_key = RepeatGuard("design", 900.0, "digest-a", "key-1", past=None)
    await reserve(ledger, "r1", 1000.0, key="key-1", guard=by_key)
    with pytest.raises(RepeatArrived):
        await reserve(ledger, "r2", 1000.1, key="key-1", guard=by_key)
    # Gone past r1 (it failed without a charge, say): forwarded, and then the latest.
    await reserve(ledger, "r3", 1000.2, key="key-1", guard=replace(by_key, past="r1"))
    with pytest.raises(RepeatArrived):
        await reserve(ledger, "r4", 1000.3, key="key-1", guard=replace(by_key, past="r1"))
    # An SDK retry without a key is checked by its content; another team's never counts.
    by_content = RepeatGuard("design", 900.0, "digest-b", None, past=None)
    await reserve(ledger, "r5", 1000.4, content="digest-b", guard=by_content)
    with pytest.raises(RepeatArrived):
        await reserve(ledger, "r6", 1000.5, content="digest-b", guard=by_content)
    other = replace(by_content, team="research")
    await reserve(ledger, "r7", 1000.6, team="research", content="digest-b", guard=other)
    reserved = {r.entry.id for r in await ledger.rows()}
    assert reserved == {"r1", "r3", "r5", "r7"}


async def test_a_first_attempt_is_one_lookup_in_its_index_on_postgresql(shared: str) -> None:
    conn = await asyncpg.connect(shared.split("?")[0], server_settings=search_path(shared))
    try:
        await conn.execute("SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
        for sql, index in (
            (SQL.first_by_content, "requests_content"),
            (SQL.first_by_key, "requests_idempotency"),
        ):
            plan = await conn.fetch(f"EXPLAIN {sql}", "design", "digest-a", 900.0)
            text = "\n".join(r[0] for r in plan)
            assert f"Index Scan Backward using {index}" in text, text
            assert "Sort" not in text, text
    finally:
        await conn.close()


def search_path(url: str) -> dict[str, str]:
    return {"search_path": url.rsplit("search_path=", 1)[1]}


# -- kept answers ----------------------------------------------------------------------------


async def test_an_answer_kept_is_read_back_as_the_client_got_it(ledger: Backend) -> None:
    events = b'event: image_generation.completed\ndata: {"b64_json": "\xff\x00"}\n\n'
    stream = KeptAnswer("r1", "design", 200, HEADERS, events, True, 1000.5)
    assert await ledger.keep_answer(stream, 10 * MB)
    assert await ledger.kept_answer("r1") == stream
    assert await ledger.kept_answer("r2") is None


async def test_keeping_an_answer_again_replaces_it(ledger: Backend) -> None:
    assert await ledger.keep_answer(answer("r1", 600), 1000)
    again = replace(answer("r1", 900), status=201, kept_at=1001.0)
    assert await ledger.keep_answer(again, 1000)  # the first's 600 bytes are not counted
    assert await ledger.kept_answer("r1") == again
    assert await kept(ledger) == {"r1": 900}


async def test_the_oldest_answers_are_forgotten_to_make_room(ledger: Backend) -> None:
    for i in range(4):
        assert await ledger.keep_answer(answer(f"r{i}", 300, kept_at=1000.0 + i), 1000)
    assert await kept(ledger) == {"r1": 300, "r2": 300, "r3": 300}
    assert await ledger.keep_answer(answer("r4", 700, kept_at=1004.0), 1000)
    assert await kept(ledger) == {"r3": 300, "r4": 700}
    assert await ledger.kept_answer("r0") is None


async def test_a_team_keeping_many_answers_forgets_its_own_not_another_teams(
    ledger: Backend,
) -> None:
    """A team that sends many keyed requests fills the store with its answers: making room,
    they go first, oldest first, so a quieter team's answer is still there for its retry
    (forgotten, the retry would be forwarded and paid again)."""
    quiet = replace(answer("q0", 200, kept_at=1000.0), team="quiet")
    assert await ledger.keep_answer(quiet, 1000)
    for i in range(6):
        flood = replace(answer(f"f{i}", 200, kept_at=1001.0 + i), team="flood")
        assert await ledger.keep_answer(flood, 1000)
    assert await kept(ledger) == {"q0": 200, "f2": 200, "f3": 200, "f4": 200, "f5": 200}
    assert await ledger.kept_answer("q0") == quiet
    # Once the quiet team keeps the most, its oldest go first in turn.
    for i in range(1, 4):
        again = replace(answer(f"q{i}", 200, kept_at=1010.0 + i), team="quiet")
        assert await ledger.keep_answer(again, 1000)
    assert await kept(ledger) == {"f4": 200, "f5": 200, "q1": 200, "q2": 200, "q3": 200}


async def test_an_answer_larger_than_the_store_is_not_kept(ledger: Backend) -> None:
    assert await ledger.keep_answer(answer("r1", 500), 1000)
    assert not await ledger.keep_answer(answer("r2", 1001), 1000)
    assert await kept(ledger) == {"r1": 500}  # nothing forgotten for it either
    assert await ledger.keep_answer(answer("r3", 1000, kept_at=1001.0), 1000)
    assert await kept(ledger) == {"r3": 1000}


async def test_answers_kept_before_the_window_are_forgotten(ledger: Backend) -> None:
    for i in range(5):
        assert await ledger.keep_answer(answer(f"r{i}", kept_at=1000.0 + i), 10 * MB)
    assert await ledger.forget_answers(1002.0) == 2
    assert sorted(await kept(ledger)) == ["r2", "r3", "r4"]
    assert await ledger.kept_answer("r1") is None
    assert await ledger.forget_answers(1002.0) == 0


def image_answer(request_id: str, kept_at: float) -> KeptAnswer:
    """A 2 MB answer as OpenAI sends one: JSON around a base64 image (which hardly
    compresses)."""
    image = base64.b64encode(random.Random(request_id).randbytes(2 * MB * 3 // 4 - 30))
    body = b'{"created": 1, "data": [{"b64_json": "' + image + b'"}]}'
    return KeptAnswer(request_id, "design", 200, HEADERS, body, False, kept_at)


async def test_many_2_mb_answers_stay_within_the_store(ledger: Backend) -> None:
    store = 9 * MB
    took = []
    for i in range(40):
        kept_now = image_answer(f"r{i:02}", 1000.0 + i)
        began = time.perf_counter()
        assert await ledger.keep_answer(kept_now, store)
        took.append(time.perf_counter() - began)
        sizes = await kept(ledger)
        assert sum(sizes.values()) <= store
        assert f"r{i:02}" in sizes
    assert sorted(await kept(ledger)) == ["r36", "r37", "r38", "r39"]
    assert (await ledger.kept_answer("r39")) == image_answer("r39", 1039.0)
    median, worst = statistics.median(took) * 1000, max(took) * 1000
    print(
        f"\n{type(ledger).__name__}: keep a 2 MB answer {median:.1f} ms median, {worst:.1f} ms max"
    )


# -- replicas keeping answers together -------------------------------------------------------


async def test_replicas_keeping_answers_together_stay_within_the_store(shared: str) -> None:
    store, replicas, each = 5 * MB, 4, 12
    observed: list[int] = []

    async def keep(k: int) -> None:
        replica = await open_ledger(shared)
        try:
            for i in range(each):
                kept_at = 1000.0 + i + k / 10
                assert await replica.keep_answer(answer(f"r{k}-{i}", MB, kept_at), store)
        finally:
            await replica.close()

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            [found] = await asyncio.to_thread(
                pg.fetch, shared, "SELECT coalesce(sum(size), 0) AS s FROM kept_answers"
            )
            observed.append(int(found["s"]))

    done = asyncio.Event()
    watching = asyncio.create_task(watch(done))
    # Each on a loop and connections of its own, as separate replicas would be.
    await asyncio.gather(*(asyncio.to_thread(pg.run, keep(k)) for k in range(replicas)))
    done.set()
    await watching
    ledger = await open_ledger(shared)
    try:
        sizes = await kept(ledger)
    finally:
        await ledger.close()
    assert sum(sizes.values()) == store  # five of 1 MB: full, never over
    assert observed and max(observed) <= store
    assert set(sizes) == {f"r{k}-{each - 1}" for k in range(replicas)} | {"r3-10"}


# -- schema version 6 ------------------------------------------------------------------------

V5_ROW = (
    "INSERT INTO requests (id, started_at, finished_at, team, endpoint, model, state, "
    "outcome, status, image_output_tokens, images, cost_nanos, counters) VALUES "
    "('old', 100.0, 101.0, 'design', 'generations', 'gpt-image-1', 'settled', 'ok', 200, "
    "4160, 1, 167000000, '[]')"
)
"""One settled request, as a version 5 ledger holds it."""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_version_5_ledger_migrates_and_keeps_answers(kind: str, tmp_path: Path) -> None:
    async with pg.migrated_from(kind, tmp_path, 5, V5_ROW) as ledger:
        [row] = await ledger.rows()
        assert (row.entry.id, row.entry.content_digest, row.entry.idempotency_key) == (
            "old",
            None,
            None,
        )
        assert await ledger.first_attempt("design", 0.0, content="digest-a") is None
        await reserve(ledger, "new", 200.0, key="key-1")
        found = await ledger.first_attempt("design", 0.0, key="key-1")
        assert found is not None and found.request_id == "new"
        assert await ledger.keep_answer(answer("new"), MB)
        assert await ledger.kept_answer("new") == answer("new")


# -- copies ----------------------------------------------------------------------------------


async def test_a_copy_carries_the_digests_and_leaves_the_kept_answers(tmp_path: Path) -> None:
    first = ledger_url("sqlite", tmp_path / "first")
    shared = ledger_url("postgresql", tmp_path)
    last = ledger_url("sqlite", tmp_path / "last")
    try:
        source = await open_ledger(first)
        try:
            await reserve(source, "r1", 1000.0, key="key-1")
            await source.settle("r1", SETTLED)
            await record_replay(source, "r2", 1001.0, content_digest="digest-a")
            assert await source.keep_answer(answer("r1", 2 * MB), 10 * MB)
            rows, held = await source.rows(), await source.contents()
        finally:
            await source.close()
        assert await copy_between(first, shared) == held
        assert await copy_between(shared, last) == held
        for url in (shared, last):
            target = await open_ledger(url)
            try:
                assert await target.rows() == rows
                assert await kept(target) == {}
                found = await target.first_attempt("design", 900.0, key="key-1")
                assert found is not None and found.request_id == "r1"
            finally:
                await target.close()
    finally:
        pg.drop_schema(shared)
