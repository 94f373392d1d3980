"""The Batch API door end to end: failed lines, cancelled and expired batches, a team's own
files and batches only, and a batch outliving the process that created it.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types import Batch

from proxy.ledger.sqlite_batches import CHUNK_LINES
from tests import pg
from tests.batches_e2e import (
    GENERATIONS,
    TEAMS,
    api_arrivals,
    arrivals,
    batch_cost,
    batch_rows,
    billed_lines,
    calm,
    check_settled,
    create,
    ended,
    generations,
    proxy,
    record_tokens,
    reserved_total,
    settled_rows,
    upload,
)
from tests.conftest import (
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    drop_ledger,
    start_simulator,
    start_tollgate,
    stop,
    wait_for,
    write_config,
)

__all__ = ["calm", "proxy"]  # the shared fixtures


# -- 4. failed lines, cancelled and expired batches --------------------------------------


def test_lines_that_fail_upstream_are_not_billed(proxy: Tollgate, simulator: Simulator) -> None:
    sdk = proxy.client()
    lines = generations("gpt-image-2", 5)
    for index in (1, 3):
        lines[index]["body"]["prompt"] += " [[fault:500]]"
    batch = ended(sdk, create(sdk, lines).id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 2)
    rows = check_settled(proxy, simulator, batch, "gpt-image-2")
    assert [r["custom_id"] for r in rows] == [lines[i]["custom_id"] for i in (0, 2, 4)]
    assert batch.error_file_id is not None
    errors = [json.loads(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(e["custom_id"] for e in errors) == [lines[i]["custom_id"] for i in (1, 3)]
    assert reserved_total(proxy) == 0


def test_a_batch_cancelled_while_running_is_settled_for_the_lines_that_completed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(batch_delay_ms=6000)  # 12 lines, one each 0.4 s from 0.6 s
    sdk = proxy.client()
    created = create(sdk, generations("gpt-image-1.5", 12))

    def some_done() -> Batch | None:
        batch = sdk.batches.retrieve(created.id)
        counts = batch.request_counts
        return batch if counts is not None and counts.completed >= 3 else None

    wait_for("three lines done", some_done)
    assert sdk.batches.cancel(created.id).status == "cancelling"
    batch = ended(sdk, created.id)
    assert batch.status == "cancelled" and batch.request_counts is not None
    done = batch.request_counts.completed
    assert 3 <= done < 12
    rows = check_settled(proxy, simulator, batch, "gpt-image-1.5")
    assert len(rows) == done
    assert all(r["outcome"] == "ok" for r in rows)
    assert reserved_total(proxy) == 0


def test_an_expired_batch_is_settled_for_the_lines_that_completed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    # 10 lines run from 0.3 s to 2.7 s; the window closes at 1.5 s.
    simulator.configure(batch_delay_ms=3000, batch_window_ms=1500)
    sdk = proxy.client()
    batch = ended(sdk, create(sdk, generations("gpt-image-1-mini", 10)).id)
    assert batch.status == "expired" and batch.request_counts is not None
    done = batch.request_counts.completed
    assert 0 < done < 10 and batch.request_counts.failed == 10 - done
    rows = check_settled(proxy, simulator, batch, "gpt-image-1-mini")
    assert len(rows) == done
    assert batch.error_file_id is not None
    errors = [json.loads(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert reserved_total(proxy) == 0


def test_a_batch_whose_output_file_was_deleted_unread_is_settled_at_its_bound_flagged(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The team may delete the output file as soon as it sees the batch ended, before the
    follower (polling each second) has read it: OpenAI billed its lines all the same. The
    batch is settled, each line at its bound and flagged, not held for ever unsettled."""
    sdk = proxy.client()
    for _ in range(5):  # until the delete comes before the follower's read
        lines = generations("gpt-image-2", 3)
        batch = ended(sdk, create(sdk, lines).id)
        assert batch.output_file_id is not None
        assert sdk.files.delete(batch.output_file_id).deleted
        rows = settled_rows(proxy, batch.id)
        if all(r["flagged"] for r in rows):
            break
    else:
        pytest.fail("the follower read every output file before it was deleted")
    bounds = {r["custom_id"]: r["estimated_nanos"] for r in rows}
    assert sorted(bounds) == sorted(x["custom_id"] for x in lines)
    assert all(r["error_code"] == "batch_output_gone" for r in rows)
    assert all(r["cost_nanos"] == r["estimated_nanos"] > 0 for r in rows)
    assert reserved_total(proxy) == 0


# -- 6. a team's own files and batches only ----------------------------------------------


def test_a_batchs_output_file_can_be_read_as_soon_as_the_batch_ended(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The client sees `completed` before Tollgate's follower does (it polls each second):
    the output file is the batch's team's at once."""
    sdk = proxy.client()
    batch = ended(sdk, create(sdk, generations("gpt-image-2", 2)).id)
    assert batch.output_file_id is not None
    text = sdk.files.content(batch.output_file_id).text
    assert len(text.splitlines()) == 2
    check_settled(proxy, simulator, batch, "gpt-image-2")


def test_a_create_repeated_after_its_batch_ended_is_answered_with_that_batch(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Once a batch is settled its reservation's row is its first billed line's: a repeat of
    the create (same key, same content) still finds it, and is not sent upstream to be
    billed a second time."""
    sdk = proxy.client()
    uploaded = upload(sdk, generations("gpt-image-2", 2))
    keyed = {"extra_headers": {"Idempotency-Key": "batch-after-end"}}
    fields = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    first = sdk.batches.create(**fields, **keyed)
    batch = ended(sdk, first.id)
    check_settled(proxy, simulator, batch, "gpt-image-2")
    creates = arrivals(simulator, "POST", "/v1/batches")
    settled = settled_rows(proxy, first.id)
    again = sdk.batches.with_raw_response.create(**fields, **keyed)
    assert again.parse().id == first.id
    assert again.headers["x-tollgate-replay-of"]
    assert arrivals(simulator, "POST", "/v1/batches") == creates
    assert settled_rows(proxy, first.id) == settled


def test_teams_cannot_see_each_others_files_and_batches(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(batch_delay_ms=1500)
    design, research = proxy.client(), proxy.client(RESEARCH_KEY)
    mine = [upload(design, generations("gpt-image-2", 1)) for _ in range(3)]
    batches = [
        design.batches.create(input_file_id=f.id, endpoint=GENERATIONS, completion_window="24h")
        for f in mine[:2]
    ]
    theirs = [upload(research, generations("gpt-image-2", 1)) for _ in range(3)]
    their_batch = research.batches.create(
        input_file_id=theirs[0].id, endpoint=GENERATIONS, completion_window="24h"
    )
    finished = [ended(design, b.id) for b in batches]
    ended(research, their_batch.id)
    outputs = [b.output_file_id for b in finished]
    assert all(outputs)
    for batch_id in (*(b.id for b in batches), their_batch.id):
        settled_rows(proxy, batch_id)  # nothing followed: only the attempts may arrive

    attempts: list[tuple[str, Callable[[], Any]]] = [
        (mine[0].id, lambda: research.files.retrieve(mine[0].id)),
        (mine[0].id, lambda: research.files.content(mine[0].id)),
        (mine[1].id, lambda: research.files.delete(mine[1].id)),
        (str(outputs[0]), lambda: research.files.content(str(outputs[0]))),
        (str(outputs[0]), lambda: research.files.retrieve(str(outputs[0]))),
        (batches[0].id, lambda: research.batches.retrieve(batches[0].id)),
        (batches[1].id, lambda: research.batches.cancel(batches[1].id)),
        (mine[2].id, lambda: research.batches.create(
            input_file_id=mine[2].id, endpoint=GENERATIONS, completion_window="24h")),
    ]  # fmt: skip
    for object_id, attempt in attempts:
        count = len(api_arrivals(simulator))
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert object_id in caught.value.message
        found = api_arrivals(simulator)
        assert len(found) == count, (object_id, found[count:])  # nothing reached the upstream

    # Their own: every one listed (across pages, by the SDK's auto-pagination), no other.
    mine_ids = {f.id for f in mine} | {str(o) for o in outputs}
    theirs_ids = {f.id for f in theirs}
    listed = {f.id for f in design.files.list(limit=2)}
    assert mine_ids <= listed and not listed & theirs_ids
    listed = {f.id for f in research.files.list(limit=2)}
    assert theirs_ids <= listed and not listed & mine_ids
    assert {b.id for b in design.batches.list(limit=1)} >= {b.id for b in batches}
    assert their_batch.id not in {b.id for b in design.batches.list(limit=1)}
    owned = proxy.query("SELECT id FROM stored_objects WHERE kind = 'batch' AND team = 'research'")
    assert {b.id for b in research.batches.list(limit=1)} == {r["id"] for r in owned}
    assert design.files.retrieve(str(outputs[0])).purpose == "batch_output"
    assert design.files.delete(mine[1].id).deleted
    assert design.batches.retrieve(batches[0].id).status == "completed"


# -- 5. a batch outlives the process that created it -------------------------------------


def exactly_once(proxy: Tollgate, simulator: Simulator, batch: Batch, model: str) -> None:
    """The batch settled once: its billed lines' rows, no more, and the counters holding
    exactly their cost and nothing reserved (those of the windows it was reserved in but
    did not end in, nothing at all)."""
    rows = check_settled(proxy, simulator, batch, model)
    assert len(rows) == len(billed_lines(simulator, batch.id))
    assert len({r["id"] for r in rows}) == len(rows)
    spent = sum(r["cost_nanos"] for r in rows)
    counted = proxy.query(
        "SELECT scope, spent_nanos, reserved_nanos FROM budget_usage WHERE team = 'design' "
        "OR scope = 'organization'"
    )
    assert counted and all(c["reserved_nanos"] == 0 for c in counted)
    assert all(c["spent_nanos"] in (0, spent) for c in counted)
    assert {c["scope"] for c in counted if c["spent_nanos"] == spent} == {"team", "organization"}
    everything = proxy.query("SELECT COUNT(*) AS n, SUM(cost_nanos) AS v FROM requests")[0]
    assert (everything["n"], everything["v"]) == (len(rows), spent)


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_restart_adopts_a_running_batch_and_settles_it_once(
    simulator: Simulator, tmp_path: Path, stop_with: signal.Signals
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(batch_delay_ms=4000)  # running while Tollgate restarts
    try:
        # Closed before the signal: a stopping server waits for an idle connection's next
        # request (up to its keep-alive timeout), and the batch would end meanwhile.
        with first.client() as client:
            created = create(client, generations("gpt-image-2", 6))
    finally:
        first.process.send_signal(stop_with)
        first.process.wait(timeout=30)
    [held] = batch_rows(first, created.id)
    assert (held["state"], held["held"]) == ("reserved", 1)  # not ended: still held
    second = start_tollgate(tmp_path)
    try:
        sdk = second.client()
        batch = ended(sdk, created.id)  # still the team's
        assert batch.status == "completed"
        exactly_once(second, simulator, batch, "gpt-image-2")
        assert held["owner"] not in {r["owner"] for r in batch_rows(second, batch.id)}
    finally:
        second.stop()


@pytest.fixture
def own_simulator() -> Iterator[Simulator]:
    """A simulator for one test, stopped after: a batch of ten thousand lines would leave as
    many entries in the shared one's billing record, which later tests read whole."""
    simulator = start_simulator()
    yield simulator
    stop(simulator.process)


def test_a_process_killed_half_way_through_a_settlement_leaves_it_to_be_settled_once(
    own_simulator: Simulator, tmp_path: Path
) -> None:
    """SQLite settles a batch of many lines a chunk at a time (`sqlite_batches`): killed
    (SIGKILL) with some of its lines written, the batch's reservation and counters stay
    whole, and the next process settles it exactly once, the written lines replaced."""
    simulator = own_simulator
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    lines = CHUNK_LINES * 5 + 7
    with first.client() as client:
        created = create(client, generations("gpt-image-2", lines))
    ledger = sqlite3.connect(tmp_path / "tollgate.db", isolation_level=None, timeout=30)
    try:

        def claimed() -> int | None:
            found = ledger.execute(
                "SELECT billed_lines FROM requests WHERE response_id = ? AND state = 'reserved' "
                "AND billing_by IS NOT NULL",
                (created.id,),
            ).fetchone()
            return found[0] if found and found[0] > 0 else None

        wait_for("the first chunk written", claimed, timeout=120)
        # The write lock taken between two chunks: the settlement waits for it, half-way.
        ledger.execute("BEGIN IMMEDIATE")
        written = claimed()
        assert written is not None and written < lines - 1
        counters = ledger.execute(
            "SELECT scope, spent_nanos, reserved_nanos FROM budget_usage WHERE team = 'design' "
            "AND reserved_nanos > 0"
        ).fetchall()
        assert counters and all(spent == 0 for _, spent, _ in counters)  # the bound, whole
        first.process.kill()
        first.process.wait(timeout=30)
        ledger.execute("ROLLBACK")
    finally:
        ledger.close()
    rows = first.query(f"SELECT COUNT(*) AS n FROM requests WHERE response_id = '{created.id}'")
    assert rows[0]["n"] == written + 1  # the lines written, and the reservation
    second = start_tollgate(tmp_path)
    try:
        batch = ended(second.client(), created.id)
        exactly_once(second, simulator, batch, "gpt-image-2")
    finally:
        second.stop()


def test_two_replicas_follow_a_batch_whose_creator_died_and_one_settles_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    shared = pg.migrated_schema()
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    replicas: list[Tollgate] = []
    try:
        creator = start_tollgate(tmp_path, ledger_url=shared)
        simulator.configure(batch_delay_ms=5000)
        try:
            created = create(creator.client(), generations("gpt-image-1.5", 8))
        finally:
            creator.process.kill()
            creator.process.wait(timeout=30)
        [held] = batch_rows(creator, created.id)
        assert (held["state"], held["held"]) == ("reserved", 1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replicas = list(pool.map(lambda _: start_tollgate(tmp_path, ledger_url=shared), [1, 2]))
        batch = ended(replicas[1].client(), created.id)
        assert batch.status == "completed"
        exactly_once(replicas[0], simulator, batch, "gpt-image-1.5")
        owners = {r["owner"] for r in batch_rows(replicas[0], batch.id)} - {None}
        assert len(owners) == 1 and held["owner"] not in owners  # adopted by one replica
    finally:
        for replica in replicas:
            replica.stop()
        drop_ledger(shared)


# -- a create whose answer never came ------------------------------------------------------


def test_a_create_that_timed_out_but_ran_upstream_is_charged_not_released(
    proxy: Tollgate, simulator: Simulator
) -> None:
    client = proxy.client(RESEARCH_KEY)
    uploaded = upload(client, generations("gpt-image-2", 3))
    # The upstream reads the file for longer than Tollgate waits (`timeout_s: 3`): the create
    # times out, Tollgate finds no batch of the file yet, and the batch is created after.
    simulator.configure(batch_read_ms=8_000)
    since = time.time()
    with pytest.raises(openai.APIError):
        client.batches.create(
            input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
        )
    simulator.configure(batch_read_ms=0)

    def upstream_batch() -> dict[str, Any] | None:
        page = httpx.get(
            f"{simulator.url}/v1/batches",
            headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
            params={"limit": 100},
        ).json()
        found = [b for b in page["data"] if b["input_file_id"] == uploaded.id]
        return found[0] if found and found[0]["status"] == "completed" else None

    ran = wait_for("the batch created upstream ran", upstream_batch)
    billed = sum(
        batch_cost("gpt-image-2", record_tokens(r))
        for r in billed_lines(simulator, ran["id"]).values()
    )
    assert billed > 0
    [row] = wait_for(
        "the create's reservation settled",
        lambda: (
            [
                r
                for r in proxy.query("SELECT * FROM requests WHERE endpoint = 'batches'")
                if r["team"] == "research" and r["state"] == "settled" and r["started_at"] >= since
            ]
            or None
        ),
    )
    # The upstream may have created the batch (and did): its bound is charged, flagged,
    # never released for spend the ledger would not see.
    assert row["cost_nanos"] >= billed, row
    assert row["flagged"] == 1


def test_a_repeat_of_a_create_whose_batch_was_found_after_its_answer_was_lost_makes_none(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The upstream made the batch but its answer came after Tollgate stopped waiting
    (`timeout_s: 3`): Tollgate finds the batch of the file and follows it, and the client
    gets the 504 (`x-should-retry: false`). A repeat of that create (same Idempotency-Key)
    gets that failure again; it waited out its deadline and made a second batch, billed
    again."""
    client = proxy.client(RESEARCH_KEY)
    uploaded = upload(client, generations("gpt-image-2", 2))
    simulator.configure(batch_answer_ms=8_000)
    key = {"Idempotency-Key": f"create-{uploaded.id}"}
    try:
        with pytest.raises(openai.APIStatusError) as first:
            client.batches.create(
                input_file_id=uploaded.id,
                endpoint=GENERATIONS,
                completion_window="24h",
                extra_headers=key,
            )
        assert first.value.status_code == 504
        assert first.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.APIStatusError) as again:
            client.batches.create(
                input_file_id=uploaded.id,
                endpoint=GENERATIONS,
                completion_window="24h",
                extra_headers=key,
            )
    finally:
        simulator.configure(batch_answer_ms=0)
    first_id = first.value.response.headers["x-tollgate-request-id"]
    assert again.value.status_code == 504
    assert again.value.response.headers["x-tollgate-replay-of"] == first_id
    assert again.value.response.headers["x-should-retry"] == "false"
    page = httpx.get(
        f"{simulator.url}/v1/batches",
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        params={"limit": 100},
    ).json()
    made = [b["id"] for b in page["data"] if b["input_file_id"] == uploaded.id]
    assert len(made) == 1, "one batch made upstream"
    row = proxy.row(first_id)
    assert row["state"] in ("held", "settled") and row["estimated_nanos"] > 0
