"""`tollgate reconcile` end to end while the ledger still holds spend OpenAI has billed: a
background response that ended upstream while its Tollgate was down, not yet settled."""

from __future__ import annotations

import json
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.batches_e2e import cli
from tests.conftest import (
    BACKENDS,
    Simulator,
    Tollgate,
    backend_url,
    drop_ledger,
    query_ledger,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)
from tests.responses_e2e import TEAMS, billed, record_cost, settled_row, tool


def reconcile(root: Path, ledger_url: str | None, by: str) -> tuple[int, dict[str, Any], str]:
    """Today's live reconciliation `--by` model or project: its exit code, JSON and table."""
    today = time.strftime("%Y-%m-%d", time.gmtime())
    ledger = ["--ledger", ledger_url] if ledger_url else []
    asked = ["reconcile", "--admin-key-env", "OPENAI_ADMIN_KEY", "--from", today, "--by", by]
    proxy = Tollgate("", root, None, ledger_url)  # type: ignore[arg-type]  # no process
    done = cli(proxy, *asked, *ledger, "--format", "json")
    return done.returncode, json.loads(done.stdout), cli(proxy, *asked, *ledger).stdout


RESERVED = "SELECT reserved_nanos FROM requests WHERE state = 'reserved'"


def held_response(simulator: Simulator, root: Path, ledger_url: str | None) -> str:
    """A background response sent through a Tollgate killed before it ended: OpenAI bills
    it, the ledger holds its reservation, unsettled. Its id."""
    first = start_tollgate(root, ledger_url=ledger_url)
    simulator.configure(latency_ms=1500)
    try:
        queued = first.client().responses.create(
            model="gpt-4.1-mini", input="A nebula", tools=[tool(quality="high", size="1024x1536")],
            max_output_tokens=300, max_tool_calls=1, background=True,
        )  # fmt: skip
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    billed(simulator, queued.id)
    simulator.configure(latency_ms=0)
    return queued.id


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("by", ["model", "project"])
def test_spend_openai_billed_that_tollgate_holds_is_told_from_spend_that_bypassed_it(
    tmp_path: Path, backend: str, by: str
) -> None:
    """OpenAI billed a background response that the ledger holds, not settled: the day is
    off (it differs beyond the tolerance: exit 1), with what is held beside it and said to
    be unsettled, not bypassed. Settled, the day is even."""
    simulator = start_simulator()  # of its own: the Costs API holds only this response
    ledger_url = backend_url(backend)
    team = TEAMS["design"] + "openai_project: proj_design\n"
    write_config(tmp_path, f"{simulator.url}/v1", "timezone: UTC\n", teams={"design": team})
    try:
        response_id = held_response(simulator, tmp_path, ledger_url)
        cost = record_cost(billed(simulator, response_id))
        code, found, table = reconcile(tmp_path, ledger_url, by)
        today = time.strftime("%Y-%m-%d", time.gmtime())
        assert code == 1, found
        assert found["off_days"] == found["held_days"] == [today]
        lines = found["lines"]
        # The image model's line is off (its few mainline tokens are within the tolerance).
        assert [
            line["model" if by == "model" else "project"]
            for line in lines
            if line["status"] == "off"
        ] == ["gpt-image-2" if by == "model" else "proj_design"]
        billed_usd = sum(Decimal(line["openai_usd"]) for line in lines)
        assert abs(billed_usd * 10**9 - cost) <= 1_000  # micro-dollars, per line
        [[bound]] = [r.values() for r in query_ledger(tmp_path, ledger_url, RESERVED)]
        held = sum(Decimal(line["held_usd"]) for line in lines) * 10**9
        assert abs(held - bound) <= 1_000 and bound > cost
        for line in lines:
            assert Decimal(line["tollgate_usd"]) == 0
            assert Decimal(line["held_usd"]) >= Decimal(line["difference_usd"]) > 0
            assert "bypassed" not in line["note"]
            assert ("Tollgate holds $" in line["note"]) == (line["status"] == "off")
        assert f"Of these, {today}: off only by what Tollgate holds in flight" in table
        restarted = start_tollgate(tmp_path, ledger_url=ledger_url)
        try:
            assert settled_row(restarted, response_id)["cost_nanos"] == cost
        finally:
            restarted.stop()
        code, settled, table = reconcile(tmp_path, ledger_url, by)
        assert code == 0, settled
        assert settled["held_days"] == []
        assert all(Decimal(line["held_usd"]) == 0 for line in settled["lines"])
    finally:
        stop(simulator.process)
        drop_ledger(ledger_url)
