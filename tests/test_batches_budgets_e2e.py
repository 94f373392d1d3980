"""A batch's budgets hold when its lines are billed: on the day it ends, to the user each
line names. Its reservation is taken when it is created, so it must already hold room in
every budget those lines' cost will be booked to.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web.batch_follow import BATCH_SPAN_S
from tests.batches_e2e import (
    GENERATIONS,
    LOW,
    jsonl,
    line,
)
from tests.conftest import (
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    in_process,
    start_simulator,
    start_tollgate,
    stop,
    wait_for,
    write_config,
)

KEY = "tg_test_batch_budgets_key"
DAY = 86_400
USER_LIMIT_USD = Decimal("0.02")
TEAM = f"""
name: users
keys:
  - {{id: k, sha256: {key_hash(KEY)}}}
per_user:
  - {{period: day, limit_usd: {USER_LIMIT_USD}}}
on_exhausted: reject
"""
HIGH = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "high", "size": "1024x1024"}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Simulator, Tollgate]]:
    simulator = start_simulator()
    root = tmp_path_factory.mktemp("batch-budgets")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n", teams={"users": TEAM})
    proxy = start_tollgate(root)
    simulator.configure(batch_delay_ms=300)
    try:
        yield simulator, proxy
    finally:
        proxy.stop()
        stop(simulator.process)


def test_a_batch_is_held_to_the_per_user_budget_of_the_user_its_lines_name(
    running: tuple[Simulator, Tollgate],
) -> None:
    """Five high-quality lines for `alice` cost about $0.53 at batch rates; her day budget
    is $0.02. Sent directly, one such request is refused; sent as a batch, it must be
    refused too, not billed to her past her limit when the batch ends."""
    simulator, proxy = running
    sdk = proxy.client(KEY)
    with pytest.raises(openai.RateLimitError):
        sdk.images.generate(**HIGH, user="alice")
    lines = [line(f"l{i}", {**HIGH, "user": "alice"}) for i in range(5)]
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.batches.create(input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h")
    assert refused.value.code == "budget_exceeded"
    assert "user 'alice'" in refused.value.message
    arrived = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"]
    assert not [a for a in arrived if a["raw_path"] == "/v1/batches"]
    spent = proxy.query("SELECT coalesce(sum(cost_nanos), 0) AS s FROM requests")[0]["s"]
    assert spent == 0


def test_a_batch_of_one_user_that_fits_is_settled_within_her_budget(
    running: tuple[Simulator, Tollgate],
) -> None:
    _, proxy = running
    sdk = proxy.client(KEY)
    body = {**HIGH, **LOW}
    lines = [line(f"b{i}", {**body, "safety_identifier": "bob"}) for i in range(2)]
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
    )

    def settled() -> list[dict[str, Any]] | None:
        rows = proxy.query(
            f"SELECT * FROM requests WHERE response_id = '{batch.id}' AND state != 'reserved'"
        )
        return rows if len(rows) == 2 else None

    rows = wait_for(f"batch {batch.id} settled", settled)
    assert {r["user"] for r in rows} == {"bob"}
    assert sum(r["cost_nanos"] for r in rows) <= USER_LIMIT_USD * 10**9


# -- the day it ends ---------------------------------------------------------------------

DAY_LIMIT_USD = Decimal("0.03")
NIGHT = f"""
name: night
keys:
  - {{id: k, sha256: {key_hash(KEY)}}}
budgets:
  - {{period: day, limit_usd: {DAY_LIMIT_USD}}}
on_exhausted: reject
"""


def batch_of(client: TestClient, headers: dict[str, str], lines: list[dict[str, Any]]) -> str:
    """The id of a batch of `lines`, uploaded and created through an app in process."""
    uploaded = client.post(
        "/v1/files",
        headers=headers,
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", jsonl(lines), "application/jsonl")},
    )
    assert uploaded.status_code == 200, uploaded.text
    made = client.post(
        "/v1/batches",
        headers=headers,
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": GENERATIONS,
            "completion_window": "24h",
        },
    )
    assert made.status_code == 200, made.text
    batch_id: str = made.json()["id"]
    return batch_id


def test_a_batch_created_before_midnight_and_ending_after_it_keeps_the_next_days_limit(
    tmp_path: Path,
) -> None:
    """Created late one day (Tollgate's clock), the batch ends the next (the upstream's
    clock), where OpenAI books its lines. The next day's direct requests must leave room
    for them: the day's settled spend stays within its limit once the batch is billed."""
    write_config(tmp_path, "http://simulated/v1", "timezone: UTC\n", teams={"night": NIGHT})
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY, batch_delay_ms=3000))
    now = [time.time() - DAY]
    app = in_process(tmp_path, simulator, clock=lambda: now[0])
    headers = {"authorization": f"Bearer {KEY}"}
    body = {**HIGH, **LOW}
    with TestClient(app) as client:
        lines = [line(f"n{i}", body) for i in range(4)]
        batch_id = batch_of(client, headers, lines)
        now[0] = time.time()  # the next day: the batch ends in it
        direct = 0
        while direct < 20:
            answer = client.post("/v1/images/generations", headers=headers, json=body)
            if answer.status_code != 200:
                assert answer.status_code == 429, answer.text
                break
            direct += 1
        assert direct >= 1
        ledger = tmp_path / "tollgate.db"
        settled = (
            f"SELECT count(*) FROM requests WHERE response_id = '{batch_id}' AND state = 'settled'"
        )

        def billed() -> bool | None:
            with sqlite3.connect(ledger) as db:
                return db.execute(settled).fetchone()[0] == len(lines) or None

        wait_for(f"batch {batch_id} settled", billed)
        budget = client.get("/v1/tollgate/budget", headers=headers).json()
        (day,) = [b for b in budget["budgets"] if b["period"] == "day"]
        assert Decimal(day["reserved"]) == 0, day
        assert Decimal(day["spent"]) <= DAY_LIMIT_USD, day


def test_a_batch_that_ends_past_its_span_is_booked_within_it(tmp_path: Path) -> None:
    """Reserved in every window of the 26 hours after its creation, a batch whose end comes
    later (here the upstream's clock is two days past Tollgate's at creation) is booked at
    the span's end, inside windows it held room in, never in one it did not."""
    write_config(tmp_path, "http://simulated/v1", "timezone: UTC\n", teams={"night": NIGHT})
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY, batch_delay_ms=300))
    created = time.time() - 2 * DAY
    app = in_process(tmp_path, simulator, clock=lambda: created)
    headers = {"authorization": f"Bearer {KEY}"}
    with TestClient(app) as client:
        batch_id = batch_of(client, headers, [line("n0", {**HIGH, **LOW})])
        query = (
            "SELECT started_at, finished_at FROM requests "
            f"WHERE response_id = '{batch_id}' AND state = 'settled'"
        )

        def booked() -> list[tuple[float, float]] | None:
            with sqlite3.connect(tmp_path / "tollgate.db") as db:
                return db.execute(query).fetchall() or None

        (row,) = wait_for(f"batch {batch_id} settled", booked)
        assert row == (created + BATCH_SPAN_S, created + BATCH_SPAN_S)
        budget = client.get("/v1/tollgate/budget", headers=headers).json()
        (day,) = [b for b in budget["budgets"] if b["period"] == "day"]
        # The day it was created in: held while it ran, released, nothing booked there.
        assert (Decimal(day["reserved"]), Decimal(day["spent"])) == (0, 0), day
