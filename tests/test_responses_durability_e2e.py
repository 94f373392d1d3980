"""The Responses API door end to end: a storm against a budget, a background response
that outlives its process, and the official Node SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    BACKENDS,
    DESIGN_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    backend_url,
    drop_ledger,
    nanos,
    start_tollgate,
    wait_for,
    write_config,
)
from tests.responses_e2e import (
    KEYS,
    NODE_PROJECT,
    TEAMS,
    billed,
    calm,
    check_charge,
    node_sdk,
    proxy,
    record_cost,
    rows_of,
    settled_row,
    team,
    tool,
)

__all__ = ["calm", "proxy"]  # the shared fixtures


# -- 4. a storm against a budget that fits a few bounds ----------------------------------

ADMIN = "admin-secret-token"
STORM_BODY: dict[str, Any] = {
    "model": "gpt-4.1-mini",
    "input": "A storm at sea",
    "tools": [tool()],
    "max_output_tokens": 200,
    "max_tool_calls": 1,
}


async def storm(url: str, count: int, background: bool) -> list[Any]:
    """`count` Responses requests at once: each one's response, or the error it raised."""
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key=KEYS["storm"], max_retries=0, timeout=60
    ) as sdk:

        async def one() -> Any:
            try:
                return await sdk.responses.create(**STORM_BODY, background=background)
            except openai.APIError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.parametrize("background", [False, True], ids=["answered", "background"])
def test_a_storm_never_settles_past_the_limit(
    simulator: Simulator, tmp_path: Path, background: bool
) -> None:
    teams = {**TEAMS, "storm": team("storm", "budgets:\n  - {period: month, limit_usd: 100}\n")}
    write_config(tmp_path, f"{simulator.url}/v1", f"admin_token: {ADMIN}\n", teams)
    proxy = start_tollgate(tmp_path)
    try:
        probe = proxy.client().responses.create(**STORM_BODY)
        bound = settled_row(proxy, probe.id)["estimated_nanos"]
        limit = bound * 7 // 2  # three bounds and a half
        text = teams["storm"].replace("limit_usd: 100", f"limit_usd: {Decimal(limit) / 10**9}")
        (tmp_path / "teams" / "storm.yaml").write_text(text)
        reload = httpx.post(
            f"{proxy.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert reload.status_code == 200
        simulator.configure(latency_ms=300)
        answers = asyncio.run(storm(proxy.url, 24, background))
        simulator.configure(latency_ms=0)
        done = [a for a in answers if not isinstance(a, Exception)]
        refused = [a for a in answers if isinstance(a, Exception)]
        assert len(done) >= 3, answers
        assert refused, "the budget fits only a few bounds"
        for error in refused:
            assert isinstance(error, openai.RateLimitError), error
            assert error.code == "budget_exceeded"
        for answer in done:  # a background response is settled when it ends
            settled_row(proxy, answer.id)
        rows = [r for r in proxy.rows() if r["team"] == "storm"]
        assert all(r["state"] == "settled" and r["flagged"] == 0 for r in rows)
        spent = sum(r["cost_nanos"] for r in rows)
        billed_total = sum(record_cost(billed(simulator, a.id)) for a in done)
        assert billed_total <= spent <= limit
        for row in rows:
            assert row["estimated_nanos"] >= row["cost_nanos"]
        [reserved] = proxy.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")[0].values()
        assert reserved == 0
    finally:
        proxy.stop()


# -- 5. a background response outlives the process that sent it --------------------------


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_restart_adopts_a_held_background_response_and_settles_it_once(
    simulator: Simulator, tmp_path: Path, stop_with: signal.Signals
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(latency_ms=4000)  # queued while Tollgate restarts
    try:
        # Closed before the signal: a stopping server waits for an idle connection's next
        # request (up to its keep-alive timeout), and the response would end meanwhile.
        with first.client() as client:
            queued = client.responses.create(
                model="gpt-5.5",
                input="A comet",
                tools=[tool()],
                max_output_tokens=300,
                max_tool_calls=1,
                background=True,
            )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(stop_with)
        first.process.wait(timeout=30)
    [held] = rows_of(first, queued.id)
    assert (held["state"], held["held"]) == ("reserved", 1)  # not ended: still held
    second = start_tollgate(tmp_path)
    try:
        assert second.client().responses.retrieve(queued.id).id == queued.id  # still its team's
        row = check_charge(second, simulator, queued.id, "gpt-5.5", "gpt-image-2")
        assert row["owner"] != held["owner"]  # adopted by the new process
        assert row["error_code"] is None
        # design has no budget: the organization's counters (every period) count it.
        counted = second.query(
            "SELECT spent_nanos, reserved_nanos FROM budget_usage WHERE scope = 'organization'"
        )
        assert len(counted) == 4 and all(
            (c["spent_nanos"], c["reserved_nanos"]) == (row["cost_nanos"], 0) for c in counted
        )
        assert [r["state"] for r in second.rows()] == ["settled"]
    finally:
        second.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_adopted_background_response_that_makes_no_image_is_settled_from_its_usage(
    simulator: Simulator, tmp_path: Path, backend: str
) -> None:
    """Its row names no image model: the process that adopts it rebuilds its bound all the
    same (the image part, which bounds nothing, priced with the default image model) and
    settles it from its usage, not at its bound."""
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    ledger_url = backend_url(backend)
    first = start_tollgate(tmp_path, ledger_url=ledger_url)
    simulator.configure(latency_ms=4000)  # queued while Tollgate restarts
    try:
        with first.client() as client:
            queued = client.responses.create(
                model="gpt-5.5", input="A haiku", max_output_tokens=300, background=True
            )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    [held] = rows_of(first, queued.id)
    assert (held["state"], held["held"], held["model"]) == ("reserved", 1, None)
    second = start_tollgate(tmp_path, ledger_url=ledger_url)
    try:
        row = settled_row(second, queued.id)
        record = billed(simulator, queued.id)
        assert row["owner"] != held["owner"]  # adopted by the new process
        assert (row["flagged"], row["error_code"], row["outcome"]) == (0, None, "ok")
        assert row["cost_nanos"] == row["mainline_cost_nanos"] == record_cost(record) > 0
        assert (row["model"], row["quality"], row["size"]) == (None, None, None)
        assert row["mainline_model"] == "gpt-5.5"
    finally:
        second.stop()
        drop_ledger(ledger_url)


def test_a_response_followed_by_another_process_is_settled_there_before_it_is_deleted(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Two processes on one ledger (workers, replicas): the one that created a background
    response follows it; a delete that reaches the other waits, as it would there, for
    the response to be settled, never deleting what its follower must still read."""
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    creator, other = start_tollgate(tmp_path), start_tollgate(tmp_path)
    try:
        simulator.configure(latency_ms=30_000)  # stays queued
        queued = creator.client().responses.create(
            model="gpt-5.5",
            input="A lighthouse",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
            background=True,
        )
        simulator.configure(latency_ms=0)
        sdk = other.client()
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.responses.delete(queued.id)
        assert "cancel it first" in refused.value.message
        assert sdk.responses.cancel(queued.id).status == "cancelled"

        def deleted() -> bool | None:
            try:
                sdk.responses.delete(queued.id)
            except openai.BadRequestError:
                return None  # not settled by its follower yet
            return True

        wait_for("the delete, once the response is settled", deleted)
        record = billed(simulator, queued.id)
        row = settled_row(other, queued.id)
        assert row["cost_nanos"] == record_cost(record) > 0
        assert (row["flagged"], row["held"], row["error_code"]) == (0, 0, "response_cancelled")
    finally:
        other.stop()
        creator.stop()


# -- 8. the official Node SDK ----------------------------------------------------------


def test_the_node_sdk_is_metered_exactly(proxy: Tollgate, simulator: Simulator) -> None:
    node = node_sdk()
    simulator.configure(latency_ms=500)  # the background response is queued at first
    ran = subprocess.run(
        [node, str(NODE_PROJECT / "responses.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{proxy.url}/v1",
            "TOLLGATE_API_KEY": DESIGN_KEY,
            "MAINLINE_MODEL": "gpt-4.1-mini",
            "IMAGE_MODEL": "gpt-image-1.5",
        },
    )
    assert ran.returncode == 0, ran.stderr
    results = json.loads(ran.stdout)
    plain, streamed, background = results["plain"], results["stream"], results["background"]
    assert plain["status"] == streamed["status"] == background["status"] == "completed"
    assert background["queued"] in ("queued", "in_progress")
    for result in (plain, streamed, background):
        row = check_charge(proxy, simulator, result["id"], "gpt-4.1-mini", "gpt-image-1.5")
        assert row["team"] == "design"
    row = settled_row(proxy, plain["id"])
    assert row["id"] == plain["request_id"]
    assert nanos(plain["cost_usd"]) == row["cost_nanos"]


@pytest.mark.parametrize("meanwhile", ["cancelled", "deleted"])
def test_a_response_ended_elsewhere_while_tollgate_was_down_is_settled_on_restart(
    simulator: Simulator, tmp_path: Path, meanwhile: str
) -> None:
    """Cancelled upstream: settled from the usage it reports. Deleted upstream: its usage
    can no longer be read, so it is charged its bound, flagged."""
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(latency_ms=30_000)
    try:
        queued = first.client().responses.create(
            model="gpt-4.1-mini",
            input="A nebula",
            tools=[tool()],
            max_output_tokens=300,
            max_tool_calls=1,
            background=True,
        )
    finally:
        simulator.configure(latency_ms=0)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    upstream = {"authorization": f"Bearer {UPSTREAM_KEY}"}
    path = f"{simulator.url}/v1/responses/{queued.id}"
    if meanwhile == "cancelled":
        httpx.post(f"{path}/cancel", headers=upstream).raise_for_status()
    else:
        httpx.delete(path, headers=upstream).raise_for_status()
    second = start_tollgate(tmp_path)
    try:
        row = settled_row(second, queued.id)
        assert row["estimated_nanos"] >= row["cost_nanos"] > 0
        if meanwhile == "cancelled":
            assert row["cost_nanos"] == record_cost(billed(simulator, queued.id))
            assert row["flagged"] == 0
        else:
            assert row["cost_nanos"] == row["estimated_nanos"]
            assert (row["flagged"], row["error_code"]) == (1, "response_not_found")
        [[reserved]] = [
            r.values() for r in second.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")
        ]
        assert reserved == 0
    finally:
        second.stop()


def post_quietly(url: str, body: dict[str, Any]) -> None:
    """POST `body` as the design team, whatever becomes of the answer."""
    headers = {"authorization": f"Bearer {DESIGN_KEY}"}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(url, json=body, headers=headers, timeout=30)


def test_a_response_reclaimed_at_its_bound_is_charged_to_both_its_models(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A Tollgate killed while a response renders: the restart charges its bound, and
    OpenAI bills it under two models, so the bound is split as its reservation was priced
    (the mainline model's part under that model in reports and `reconcile`), not put whole
    under the image model."""
    write_config(tmp_path, f"{simulator.url}/v1", teams={"design": TEAMS["design"]})
    simulator.configure(latency_ms=3000)
    killed = start_tollgate(tmp_path)
    body = {**STORM_BODY, "model": "gpt-5.5"}
    try:
        # The client's request, left hanging by the kill.
        client = threading.Thread(target=post_quietly, args=(f"{killed.url}/v1/responses", body))
        client.start()
        wait_for(
            "the response reserved",
            lambda: killed.query("SELECT id FROM requests WHERE state = 'reserved'") or None,
        )
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait()
        client.join()
        restarted = start_tollgate(tmp_path)
    finally:
        simulator.configure(latency_ms=0)
    try:
        [row] = restarted.query(
            "SELECT cost_nanos, estimated_nanos, mainline_cost_nanos, mainline_model, model, "
            "error_code FROM requests"
        )
        assert (row["error_code"], row["mainline_model"]) == ("outcome_unknown", "gpt-5.5")
        assert row["cost_nanos"] == row["estimated_nanos"]
        assert 0 < row["mainline_cost_nanos"] < row["cost_nanos"]
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "report", "--config", str(tmp_path), "--by",
             "model", "--format", "json", "--from", "1970-01-02", "--to", "9998-12-31"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        spent = {r["model"]: Decimal(r["cost_usd"]) for r in json.loads(done.stdout)["rows"]}
        assert spent == {
            "gpt-5.5": Decimal(row["mainline_cost_nanos"]) / 10**9,
            row["model"]: Decimal(row["cost_nanos"] - row["mainline_cost_nanos"]) / 10**9,
        }
    finally:
        restarted.stop()
