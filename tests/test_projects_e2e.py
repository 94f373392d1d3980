"""A project per team, end to end: each team's requests reach OpenAI under its own
`OpenAI-Project` (its `openai_project`, else `upstream.project`), through every door and
every follow-up call, and `tollgate reconcile --by project` agrees with the Costs API
grouped by project.

The module has a simulator of its own, so every request it records is this module's.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from proxy.simulator.billing import RECORDED_HEADERS
from tests.batches_e2e import (
    DAY,
    api_arrivals,
    batch_rows,
    check_settled,
    cli,
    ended,
    generations,
    settled_rows,
    upload,
)
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)
from tests.responses_e2e import check_charge, rows_of, settled_row, tool

PLAIN_KEY = "tg_test_plain_projects_key"
PROJECTS = {"design": "proj_design", "research": "proj_research", "plain": "proj_company"}
KEYS = {"design": DESIGN_KEY, "research": RESEARCH_KEY, "plain": PLAIN_KEY}
TEAMS = {
    "design": f"name: design\nopenai_project: proj_design\nkeys:\n"
    f"  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "research": f"name: research\nopenai_project: proj_research\nkeys:\n"
    f"  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
    "plain": f"name: plain\nkeys:\n  - {{id: plain-key, sha256: {key_hash(PLAIN_KEY)}}}\n",
}
CLIENT_PROJECT = "proj_chosen_by_the_client"
assert "openai-project" in RECORDED_HEADERS


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    simulator = start_simulator()
    simulator.configure(batch_delay_ms=400, batch_window_ms=DAY * 1000)
    yield simulator
    stop(simulator.process)


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("projects")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    settings = root / "tollgate.yaml"
    text = settings.read_text()
    settings.write_text(
        text.replace("  timeout_s: 3\n", "  timeout_s: 3\n  project: proj_company\n")
    )
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def projects_of(simulator: Simulator, *ids: str) -> list[str | None]:
    """The `OpenAI-Project` of every request that reached the simulator naming one of `ids`
    in its path, in order."""
    return [a["project"] for a in api_arrivals(simulator) if any(i in a["raw_path"] for i in ids)]


@pytest.mark.parametrize("team", list(TEAMS))
def test_each_teams_images_and_responses_go_under_its_project(
    proxy: Tollgate, simulator: Simulator, team: str
) -> None:
    sdk = proxy.client(KEYS[team], project=CLIENT_PROJECT)  # the client's own is not sent
    image = sdk.images.with_raw_response.generate(
        model="gpt-image-2", prompt="a lighthouse", quality="low", size="1024x1024"
    )
    record = simulator.record(image.headers["x-request-id"])
    assert record["headers"]["openai-project"] == PROJECTS[team]
    answer = sdk.responses.create(
        model="gpt-5.5", input="A red bicycle", tools=[tool()], max_output_tokens=300,
        max_tool_calls=1,
    )  # fmt: skip
    assert simulator.record(answer.id)["headers"]["openai-project"] == PROJECTS[team]
    assert sdk.responses.retrieve(answer.id).status == "completed"
    assert projects_of(simulator, answer.id) == [PROJECTS[team]]  # the retrieve


@pytest.mark.parametrize("team", ["research", "plain"])
def test_a_background_response_is_created_polled_and_read_under_its_teams_project(
    proxy: Tollgate, simulator: Simulator, team: str
) -> None:
    sdk = proxy.client(KEYS[team], project=CLIENT_PROJECT)
    simulator.configure(latency_ms=300)  # it runs for 0.3 s after it is answered
    try:
        queued = sdk.responses.create(
            model="gpt-5.5", input="A red bicycle", tools=[tool()], max_output_tokens=300,
            max_tool_calls=1, background=True,
        )  # fmt: skip
    finally:
        simulator.configure(latency_ms=0)
    assert queued.status in ("queued", "in_progress")
    # Settled by the follower's polls alone: no client has asked for it yet.
    assert settled_row(proxy, queued.id)["cost_nanos"] > 0
    polls = [a for a in api_arrivals(simulator) if a["raw_path"] == f"/v1/responses/{queued.id}"]
    assert polls and {a["method"] for a in polls} == {"GET"}
    assert {a["project"] for a in polls} == {PROJECTS[team]}
    assert sdk.responses.retrieve(queued.id).status == "completed"
    assert set(projects_of(simulator, queued.id)) == {PROJECTS[team]}
    assert simulator.record(queued.id)["headers"]["openai-project"] == PROJECTS[team]


@pytest.mark.parametrize("team", ["design", "plain"])
def test_a_batch_is_uploaded_created_followed_and_read_under_its_teams_project(
    proxy: Tollgate, simulator: Simulator, team: str
) -> None:
    sdk = proxy.client(KEYS[team], project=CLIENT_PROJECT)
    before = len(api_arrivals(simulator))
    uploaded = upload(sdk, generations("gpt-image-2", 2))
    assert sent(simulator, before, "POST", "/v1/files") == [PROJECTS[team]]
    before = len(api_arrivals(simulator))
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    assert sent(simulator, before, "POST", "/v1/batches") == [PROJECTS[team]]
    # Settled by the follower alone: it polled the batch and read its output file.
    assert sum(r["cost_nanos"] for r in settled_rows(proxy, batch.id)) > 0
    ended = sdk.batches.retrieve(batch.id)
    assert ended.status == "completed" and ended.output_file_id is not None
    assert sdk.files.retrieve(uploaded.id).id == uploaded.id
    followed = projects_of(simulator, batch.id, ended.output_file_id, uploaded.id)
    assert len(followed) >= 4 and set(followed) == {PROJECTS[team]}
    output_reads = projects_of(simulator, f"/v1/files/{ended.output_file_id}/content")
    assert output_reads == [PROJECTS[team]]  # the follower's
    lines = [r for r in simulator.billing() if r.get("batch_id") == batch.id]
    assert lines and {r["headers"]["openai-project"] for r in lines} == {PROJECTS[team]}
    before = len(api_arrivals(simulator))
    assert batch.id in {b.id for b in sdk.batches.list().data}
    assert sent(simulator, before, "GET", "/v1/batches") == [PROJECTS[team]]


@pytest.fixture
def own_simulator() -> Iterator[Simulator]:
    """A simulator of the test's own: the module's Costs API holds the module's teams only."""
    simulator = start_simulator()
    yield simulator
    stop(simulator.process)


def test_what_is_held_across_a_restart_is_followed_under_the_project_it_was_created_under(
    own_simulator: Simulator, tmp_path: Path
) -> None:
    """A background response and a batch created under proj_A, still running when Tollgate
    is killed; the team's file then moves it to proj_B, and Tollgate restarts. The process
    that adopts them polls both, and reads the batch's output, under proj_A (OpenAI keeps
    them there), and settles them exactly; the team's new requests go under proj_B."""
    simulator = own_simulator
    design = TEAMS["design"].replace("proj_design", "proj_A")
    write_config(tmp_path, f"{simulator.url}/v1", "timezone: UTC\n", teams={"design": design})
    first = start_tollgate(tmp_path)
    simulator.configure(latency_ms=4000, batch_delay_ms=4000)  # running while it restarts
    try:
        sdk = first.client(DESIGN_KEY)
        queued = sdk.responses.create(
            model="gpt-5.5", input="A comet", tools=[tool()], max_output_tokens=300,
            max_tool_calls=1, background=True,
        )  # fmt: skip
        uploaded = upload(sdk, generations("gpt-image-2", 3))
        batch = sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    held = [*rows_of(first, queued.id), *batch_rows(first, batch.id)]
    assert [(r["state"], r["held"], r["project"]) for r in held] == [("reserved", 1, "proj_A")] * 2
    (tmp_path / "teams" / "design.yaml").write_text(design.replace("proj_A", "proj_B"))
    since = len(api_arrivals(simulator))
    second = start_tollgate(tmp_path)
    try:
        check_charge(second, simulator, queued.id, "gpt-5.5", "gpt-image-2")  # not flagged
        rows = settled_rows(second, batch.id)
        assert rows and all(r["flagged"] == 0 for r in rows)
        followed = api_arrivals(simulator)[since:]
        assert {a["method"] for a in followed} == {"GET"}  # the adopter's polls alone
        assert [a["project"] for a in followed if queued.id in a["raw_path"]]
        assert [a["project"] for a in followed if batch.id in a["raw_path"]]
        assert [a["raw_path"] for a in followed if a["raw_path"].endswith("/content")]
        assert {a["project"] for a in followed} == {"proj_A"}
        image = second.client(DESIGN_KEY).images.with_raw_response.generate(
            model="gpt-image-2", prompt="a lighthouse", quality="low", size="1024x1024"
        )
        assert simulator.record(image.headers["x-request-id"])["headers"]["openai-project"] == (
            "proj_B"
        )
        # Asked for at the simulator under proj_A, where the batch is: through Tollgate the
        # team now asks under proj_B, where OpenAI (and the simulator) would not find it.
        upstream = openai.OpenAI(
            base_url=f"{simulator.url}/v1", api_key=UPSTREAM_KEY, project="proj_A", max_retries=0
        )
        check_settled(second, simulator, ended(upstream, batch.id), "gpt-image-2", reader=upstream)
    finally:
        second.stop()


def sent(simulator: Simulator, since: int, method: str, path: str) -> list[str | None]:
    """The `OpenAI-Project` of each `method path` request from the `since`-th arrival on."""
    found = api_arrivals(simulator)[since:]
    return [a["project"] for a in found if (a["method"], a["raw_path"]) == (method, path)]


def test_reconcile_by_project_agrees_with_the_costs_api_per_team(
    proxy: Tollgate, simulator: Simulator
) -> None:
    # Spend for every team, whichever tests ran before.
    for team, key in KEYS.items():
        proxy.client(key).images.generate(
            model="gpt-image-2", prompt=f"a lighthouse for {team}", quality="low"
        )
    for team in KEYS:
        rows = proxy.query(f"SELECT state FROM requests WHERE team = '{team}'")
        assert rows and all(r["state"] == "settled" for r in rows), team
    done = cli(proxy, "reconcile", "--by", "project", "--admin-key-env", "OPENAI_ADMIN_KEY",
               "--format", "json")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["by"] == "project" and result["off_days"] == []
    lines = {line["project"]: line for line in result["lines"]}
    assert set(lines) == set(PROJECTS.values())
    costs = costs_by_project(simulator)
    for team, project in PROJECTS.items():
        line = lines[project]
        assert line["teams"] == [team] and line["status"] == "ok"
        spent = proxy.query(f"SELECT SUM(cost_nanos) AS v FROM requests WHERE team = '{team}'")
        ours = Decimal(spent[0]["v"]) / 10**9
        assert abs(Decimal(line["tollgate_usd"]) - ours) < Decimal("0.000001")
        assert abs(Decimal(line["openai_usd"]) - costs[project]) < Decimal("0.000001")
        assert abs(costs[project] - ours) < Decimal("0.01")
    table = cli(proxy, "reconcile", "--by", "project", "--admin-key-env", "OPENAI_ADMIN_KEY")
    assert "Every project matches within the tolerance" in table.stdout
    assert all(p in table.stdout for p in PROJECTS.values())


def costs_by_project(simulator: Simulator) -> dict[str | None, Decimal]:
    """The simulator's Costs API, grouped by project alone, summed over the last 32 days."""
    start = int(time.time()) // DAY * DAY - 31 * DAY
    page: dict[str, Any] = httpx.get(
        f"{simulator.url}/v1/organization/costs",
        params={"start_time": start, "group_by[]": "project_id", "limit": 60},
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
    ).json()
    found: dict[str | None, Decimal] = {}
    for bucket in page["data"]:
        for result in bucket["results"]:
            project = result["project_id"]
            found[project] = found.get(project, Decimal(0)) + Decimal(
                str(result["amount"]["value"])
            )
    return found


def test_reconcile_by_project_live_shows_spend_under_no_project_unmapped(
    own_simulator: Simulator, tmp_path: Path
) -> None:
    """No team names a project and neither does `upstream`: fetched live, grouped by
    project as asked, the Costs API books the spend to no project. It is shown unmapped,
    not refused as an export that was not grouped by project."""
    write_config(tmp_path, f"{own_simulator.url}/v1", teams={"plain": TEAMS["plain"]})
    proxy = start_tollgate(tmp_path)
    try:
        proxy.client(PLAIN_KEY).images.generate(
            model="gpt-image-2", prompt="a lighthouse", quality="low"
        )
        done = cli(proxy, "reconcile", "--by", "project", "--admin-key-env", "OPENAI_ADMIN_KEY",
                   "--format", "json")  # fmt: skip
    finally:
        proxy.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    [line] = json.loads(done.stdout)["lines"]
    assert (line["project"], line["teams"], line["status"]) == (None, ["plain"], "unmapped")
    assert Decimal(line["openai_usd"]) > 0 and Decimal(line["tollgate_usd"]) > 0
