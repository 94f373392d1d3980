"""A team's project changes on a reload: what it created before is read where OpenAI keeps
it, the project it was created under, and its new requests go under the new one.

A response answered at once, a background response, a batch input file, a batch and the
batch's output file are created under proj_A through Tollgate; the team's file then moves
it to proj_B and Tollgate reloads. Every read, cancel and delete of them through Tollgate
(the official SDK) reaches the simulator, which scopes objects to their project as OpenAI
does, under proj_A; a listing and a new image request go under proj_B; a new response
continuing one of proj_A, or a batch made from a file of proj_A, is refused in OpenAI's
error shape without reaching the upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.batches_e2e import (
    DAY,
    GENERATIONS,
    api_arrivals,
    ended,
    generations,
    settled_rows,
    upload,
)
from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)
from tests.responses_e2e import settled_row, tool
from tests.test_projects_e2e import TEAMS

ADMIN = "tg_admin_projects_reload"
RESPONSE = {
    "model": "gpt-5.5", "input": "A red bicycle", "tools": [tool()], "max_output_tokens": 300,
    "max_tool_calls": 1,
}  # fmt: skip


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """A simulator of the test's own: its arrivals are the test's alone."""
    simulator = start_simulator()
    simulator.configure(batch_delay_ms=400, batch_window_ms=DAY * 1000)
    yield simulator
    stop(simulator.process)


def since(simulator: Simulator, start: int) -> list[dict[str, Any]]:
    """The simulator's API arrivals from the `start`-th on."""
    return api_arrivals(simulator)[start:]


def in_project_a(simulator: Simulator, tmp_path: Path) -> Tollgate:
    """Tollgate started with the design team in proj_A (and an admin token, to reload)."""
    design = TEAMS["design"].replace("proj_design", "proj_A")
    settings = f"timezone: UTC\nadmin_token: {ADMIN}\n"
    write_config(tmp_path, f"{simulator.url}/v1", settings, teams={"design": design})
    return start_tollgate(tmp_path)


def move_to(proxy: Tollgate, tmp_path: Path, project: str) -> None:
    """The design team's file moves it to `project`, and Tollgate reloads."""
    design = TEAMS["design"].replace("proj_design", project)
    (tmp_path / "teams" / "design.yaml").write_text(design)
    reload = httpx.post(f"{proxy.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert reload.status_code == 200, reload.text


def test_after_a_project_change_a_team_reads_what_it_made_where_it_was_made(
    simulator: Simulator, tmp_path: Path
) -> None:
    proxy = in_project_a(simulator, tmp_path)
    try:
        sdk = proxy.client(DESIGN_KEY)
        answered = sdk.responses.create(**RESPONSE)
        simulator.configure(latency_ms=300)  # it runs for 0.3 s after it is answered
        try:
            queued = sdk.responses.create(**RESPONSE, background=True)
        finally:
            simulator.configure(latency_ms=0)
        settled_row(proxy, queued.id)  # followed to its end under proj_A
        uploaded = upload(sdk, generations("gpt-image-2", 2))
        batch = sdk.batches.create(
            input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
        )
        settled_rows(proxy, batch.id)
        done = ended(sdk, batch.id)
        assert done.status == "completed" and done.output_file_id is not None
        assert {a["project"] for a in api_arrivals(simulator)} == {"proj_A"}

        move_to(proxy, tmp_path, "proj_B")

        start = len(api_arrivals(simulator))
        assert sdk.responses.retrieve(answered.id).status == "completed"
        assert sdk.responses.input_items.list(answered.id).data
        assert sdk.responses.retrieve(queued.id).status == "completed"
        assert sdk.responses.cancel(queued.id).status == "completed"  # it had ended
        assert sdk.files.retrieve(uploaded.id).purpose == "batch"
        assert len(sdk.files.content(uploaded.id).text.splitlines()) == 2
        assert sdk.batches.retrieve(batch.id).output_file_id == done.output_file_id
        with pytest.raises(openai.ConflictError):  # found (else 404), but it has ended
            sdk.batches.cancel(batch.id)
        output = sdk.files.content(done.output_file_id).text.splitlines()
        assert len(output) == 2
        assert sdk.files.retrieve(done.output_file_id).purpose == "batch_output"
        assert sdk.responses.delete(answered.id) is None
        assert sdk.files.delete(uploaded.id).deleted
        reads = since(simulator, start)
        assert len(reads) == 12
        assert {a["project"] for a in reads} == {"proj_A"}, reads

        # What the ledger recorded of each object: the project it was created under.
        owned = proxy.query("SELECT id, project FROM stored_objects ORDER BY id")
        assert {o["id"] for o in owned} == {uploaded.id, batch.id, done.output_file_id}
        assert {o["project"] for o in owned} == {"proj_A"}

        # A listing shows the team's project now; new requests go under it.
        start = len(api_arrivals(simulator))
        assert batch.id not in {b.id for b in sdk.batches.list().data}
        image = sdk.images.with_raw_response.generate(
            model="gpt-image-2", prompt="a lighthouse", quality="low", size="1024x1024"
        )
        assert image.headers["x-tollgate-team"] == "design"
        assert {a["project"] for a in since(simulator, start)} == {"proj_B"}
        record = simulator.record(image.headers["x-request-id"])
        assert record["headers"]["openai-project"] == "proj_B"
    finally:
        proxy.stop()


def test_after_a_project_change_a_new_request_cannot_build_on_the_former_projects_objects(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Continuing a response of proj_A, or making a batch of a file uploaded under proj_A,
    is refused (400 `object_in_other_project`): under proj_B OpenAI would not find the
    object, and under proj_A it would bill the new request to a project the team left. A
    repeat of such a request answered before the change is still answered as it was."""
    proxy = in_project_a(simulator, tmp_path)
    try:
        sdk = proxy.client(DESIGN_KEY)
        first = sdk.responses.create(**RESPONSE)
        uploaded = upload(sdk, generations("gpt-image-2", 2))
        keyed = {
            "continue": {**RESPONSE, "previous_response_id": first.id},
            "batch": {"input_file_id": uploaded.id, "endpoint": GENERATIONS,
                      "completion_window": "24h"},
        }  # fmt: skip
        simulator.configure(batch_delay_ms=30_000)  # still running when it is repeated
        try:
            before = {
                "continue": sdk.responses.create(
                    **keyed["continue"], extra_headers={"Idempotency-Key": "continue-1"}
                ).id,
                "batch": sdk.batches.create(
                    **keyed["batch"], extra_headers={"Idempotency-Key": "batch-1"}
                ).id,
            }
        finally:
            simulator.configure(batch_delay_ms=400)
        move_to(proxy, tmp_path, "proj_B")
        start = len(api_arrivals(simulator))
        with pytest.raises(openai.BadRequestError) as continued:
            sdk.responses.create(**RESPONSE, previous_response_id=first.id)
        assert continued.value.code == "object_in_other_project"
        assert continued.value.param == "previous_response_id"
        assert "proj_A" in continued.value.message and "proj_B" in continued.value.message
        with pytest.raises(openai.BadRequestError) as batched:
            sdk.batches.create(
                input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
            )
        assert batched.value.code == "object_in_other_project"
        assert batched.value.param == "input_file_id"
        # Repeats of those answered under proj_A: answered as they were, from the ledger.
        again_continued = sdk.responses.with_raw_response.create(
            **keyed["continue"], extra_headers={"Idempotency-Key": "continue-1"}
        )
        again_batched = sdk.batches.with_raw_response.create(
            **keyed["batch"], extra_headers={"Idempotency-Key": "batch-1"}
        )
        for again, first_id in [(again_continued, before["continue"]),
                                (again_batched, before["batch"])]:  # fmt: skip
            assert again.headers["x-tollgate-replay-of"]
            assert again.parse().id == first_id
        # None reached the upstream (the batch of proj_A is still polled there).
        reached = since(simulator, start)
        assert all((a["method"], a["project"]) == ("GET", "proj_A") for a in reached), reached
        refused = proxy.query("SELECT outcome, status, cost_nanos FROM requests WHERE status = 400")
        assert refused == [{"outcome": "client_error", "status": 400, "cost_nanos": 0}] * 2
        # Started again in proj_B, both go through.
        again = sdk.responses.create(**RESPONSE)
        assert sdk.responses.create(**RESPONSE, previous_response_id=again.id).id
        fresh = upload(sdk, generations("gpt-image-2", 2))
        batch = sdk.batches.create(
            input_file_id=fresh.id, endpoint=GENERATIONS, completion_window="24h"
        )
        settled_rows(proxy, batch.id)
        for arrival in since(simulator, start):
            polled = before["batch"] in arrival["raw_path"]
            assert arrival["project"] == ("proj_A" if polled else "proj_B"), arrival
    finally:
        proxy.stop()
