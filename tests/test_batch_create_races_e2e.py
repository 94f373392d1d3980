"""Creates of one input file whose answers were lost, at the same time (README, "Batches"):
each batch the upstream made is followed by one reservation, never two, and none is left
with nothing reserved, so the ledger charges what the upstream bills, once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.batches_e2e import (
    GENERATIONS,
    TEAMS,
    batch_cost,
    billed_lines,
    calm,
    ended,
    generations,
    jsonl,
    record_tokens,
    settled_rows,
    upload,
)
from tests.conftest import (
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
    write_config,
)
from tests.test_batch_create_repeats_e2e import upstream_batches

__all__ = ["calm"]  # the shared fixture


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("batch-races")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Each of `calls` run on a thread of its own at once: what each returned or raised."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # what it raised is what the test reads
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def charged_once(
    proxy: Tollgate, simulator: Simulator, file_id: str, model: str, creates: list[str]
) -> None:
    """Every batch the upstream made of `file_id` ends, each followed by one reservation,
    and the rows of the `creates` (request ids) and of their batches' lines sum to what the
    upstream billed for those batches: no batch charged twice, none charged by no one."""
    made = upstream_batches(simulator, file_id) or []
    client = proxy.client()
    billed = 0
    for batch in made:
        assert ended(client, batch["id"]).status == "completed"
        lines = billed_lines(simulator, batch["id"])
        billed += sum(batch_cost(model, record_tokens(r)) for r in lines.values())
        rows = settled_rows(proxy, batch["id"])
        # One reservation's lines: each billed line once.
        assert sorted(r["custom_id"] for r in rows) == sorted(lines), batch["id"]
    assert billed > 0
    named = ",".join(f"'{i}'" for i in [*creates, *(b["id"] for b in made)])

    def all_settled() -> list[dict[str, Any]] | None:
        rows = proxy.query(
            f"SELECT * FROM requests WHERE id IN ({named}) OR response_id IN ({named})"
        )
        return rows if all(r["state"] == "settled" for r in rows) else None

    rows = wait_for("the rows settled", all_settled)
    assert sum(r["cost_nanos"] for r in rows) == billed


def test_two_creates_of_one_file_answered_a_server_error_each_follow_their_own_batch(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Both creates made their batch and were answered 500 (a gateway's, after the batch
    was made): each looks for a batch of the file that is no one's. Both found the newest:
    followed twice and its lines charged twice (or once, and the other batch's lines
    charged by no one)."""
    client = proxy.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 2))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    # Both batches exist before either create is answered.
    simulator.configure(batch_answer_status=500, batch_answer_ms=1_500)

    def create() -> Any:
        return client.batches.create(**asked)  # type: ignore[arg-type]

    try:
        first, second = together(create, create)
    finally:
        simulator.configure(batch_answer_status=0, batch_answer_ms=0)
    assert isinstance(first, openai.InternalServerError), first
    assert isinstance(second, openai.InternalServerError), second
    assert len(upstream_batches(simulator, uploaded.id) or []) == 2
    held = [proxy.row(e.response.headers["x-tollgate-request-id"]) for e in (first, second)]
    followed = {r["response_id"] for r in held}
    assert None not in followed, "a batch made is followed by no one"
    assert len(followed) == 2, "one batch followed twice"
    creates = [e.response.headers["x-tollgate-request-id"] for e in (first, second)]
    charged_once(proxy, simulator, uploaded.id, "gpt-image-2", creates)


def test_a_create_answered_a_server_error_never_takes_the_batch_another_create_made(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A create that made no batch (500 before making it) looks while another create of the
    file is being answered, its batch listed already: it took that batch as its own, and
    the create answered with it followed it too, its lines charged twice."""
    client = proxy.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 2))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    simulator.configure(batch_answer_ms=3_000 - 800)  # within `timeout_s: 3`

    def answered() -> Any:
        return client.batches.create(**asked)  # type: ignore[arg-type]

    def failed() -> Any:
        wait_for("the batch listed", lambda: upstream_batches(simulator, uploaded.id), 10)
        simulator.configure(batch_fail_status=500)
        try:
            return client.batches.create(**asked)  # type: ignore[arg-type]
        finally:
            simulator.configure(batch_fail_status=0)

    try:
        made, refused = together(answered, failed)
    finally:
        simulator.configure(batch_answer_ms=0, batch_fail_status=0)
    assert isinstance(refused, openai.InternalServerError), refused
    assert not isinstance(made, Exception), made
    assert [b["id"] for b in upstream_batches(simulator, uploaded.id) or []] == [made.id]
    row = proxy.row(refused.response.headers["x-tollgate-request-id"])
    assert (row["state"], row["held"], row["cost_nanos"]) == ("settled", 0, 0)
    # The answered create's row is its batch's first line's (found by the batch's id).
    charged_once(proxy, simulator, uploaded.id, "gpt-image-2", [row["id"]])


def test_the_batch_found_after_a_create_timed_out_settles_its_row_to_what_its_lines_cost(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The create got no answer in `timeout_s` while the upstream was still reading its
    file: charged its bound, flagged, no batch listed yet. The batch found later was the
    team's but not followed, the row left at the bound for `tollgate ledger resolve`. It
    is followed to its end, and the row settles to what the upstream billed its lines,
    still flagged (its answer was lost)."""
    client = proxy.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 2))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    simulator.configure(batch_read_ms=5_000)  # past `timeout_s: 3`
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            client.batches.create(**asked)  # type: ignore[arg-type]
    finally:
        simulator.configure(batch_read_ms=0)
    assert failed.value.status_code == 504
    request_id = failed.value.response.headers["x-tollgate-request-id"]
    charged = proxy.row(request_id)
    assert (charged["state"], charged["flagged"]) == ("settled", 1)
    assert charged["cost_nanos"] == charged["estimated_nanos"] > 0
    [made] = wait_for("the batch made upstream", lambda: upstream_batches(simulator, uploaded.id))

    def listed() -> bool | None:
        return made["id"] in [b.id for b in client.batches.list(limit=100)] or None

    wait_for("the batch in the team's list", listed)
    assert ended(client, made["id"]).status == "completed"
    lines = billed_lines(simulator, made["id"])
    billed = sum(batch_cost("gpt-image-2", record_tokens(r)) for r in lines.values())
    assert 0 < billed < charged["cost_nanos"]

    def resolved() -> dict[str, Any] | None:
        row = proxy.row(request_id)
        return row if row["resolved_at"] is not None else None

    row = wait_for("the create's row resolved", resolved)
    assert (row["state"], row["flagged"], row["response_id"]) == ("settled", 1, made["id"])
    assert row["cost_nanos"] == billed
    # Its lines are charged once: the create's row, no row of their own.
    assert [r["id"] for r in proxy.query(
        f"SELECT id FROM requests WHERE response_id = '{made['id']}'"
    )] == [request_id]  # fmt: skip


def test_a_create_answered_a_server_error_finds_its_batch_past_the_newest_100(
    upstream: Simulator, tmp_path: Path
) -> None:
    """The team (or the organization) made more than 100 batches between the create's
    batch and its look: the look read the newest 100 only, missed it, and released the
    create at $0, its batch billed with nothing reserved. It reads the list back to the
    create's send time."""
    write_config(tmp_path, f"{upstream.url}/v1", "timezone: UTC\n", teams=TEAMS)
    tollgate = start_tollgate(tmp_path)
    try:
        client = tollgate.client().with_options(max_retries=0)
        uploaded = upload(client, generations("gpt-image-2", 1))
        asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
        company = httpx.Client(
            base_url=f"{upstream.url}/v1", headers={"authorization": f"Bearer {UPSTREAM_KEY}"}
        )
        other = company.post(
            "/files",
            files={"file": ("other.jsonl", jsonl(generations("gpt-image-1", 1)))},
            data={"purpose": "batch"},
        ).json()["id"]
        # The create's batch is made, then its answer waits (a 500, within `timeout_s: 3`).
        upstream.configure(batch_answer_status=500, batch_answer_ms=2_800)

        def others() -> None:
            wait_for("the batch listed", lambda: upstream_batches(upstream, uploaded.id), 10)
            upstream.configure(batch_answer_ms=0)  # the others are made at once (answered 500)
            for _ in range(120):
                company.post(
                    "/batches",
                    json={"input_file_id": other, "endpoint": GENERATIONS,
                          "completion_window": "24h"},
                )  # fmt: skip

        def create() -> Any:
            return client.batches.create(**asked)  # type: ignore[arg-type]

        try:
            failed, _ = together(create, others)
        finally:
            upstream.configure(batch_answer_status=0, batch_answer_ms=0)
        assert isinstance(failed, openai.InternalServerError), failed
        page = company.get("/batches", params={"limit": 100}).json()["data"]
        assert all(b["input_file_id"] == other for b in page), "the others were made too late"
        second = company.get("/batches", params={"limit": 100, "after": page[-1]["id"]})
        [made] = [b for b in second.json()["data"] if b["input_file_id"] == uploaded.id]
        row = tollgate.row(failed.response.headers["x-tollgate-request-id"])
        assert row["response_id"] == made["id"], "the batch made was followed by no one"
    finally:
        tollgate.stop()


def test_the_batch_found_after_a_create_timed_out_is_settled_after_a_restart(
    simulator: Simulator, tmp_path: Path
) -> None:
    """The process that found the batch is killed before the batch ends: the restarted
    Tollgate follows it from the ledger (the create's row names it) and resolves the row
    to what its lines cost."""
    write_config(tmp_path, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    first = start_tollgate(tmp_path)
    client = first.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 2))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    simulator.configure(batch_read_ms=5_000, batch_delay_ms=20_000)
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            client.batches.create(**asked)  # type: ignore[arg-type]
    finally:
        simulator.configure(batch_read_ms=0)
    request_id = failed.value.response.headers["x-tollgate-request-id"]
    [made] = wait_for("the batch made upstream", lambda: upstream_batches(simulator, uploaded.id))

    def found() -> bool | None:
        return first.row(request_id)["response_id"] == made["id"] or None

    wait_for("the batch found for the create", found)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    second = start_tollgate(tmp_path)
    try:
        assert ended(second.client(), made["id"]).status == "completed"
        lines = billed_lines(simulator, made["id"])
        billed = sum(batch_cost("gpt-image-2", record_tokens(r)) for r in lines.values())

        def resolved() -> dict[str, Any] | None:
            row = second.row(request_id)
            return row if row["resolved_at"] is not None else None

        row = wait_for("the create's row resolved", resolved)
        assert (row["flagged"], row["cost_nanos"]) == (1, billed)
    finally:
        second.stop()
