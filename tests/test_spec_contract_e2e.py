"""Statements of the product specification that no other end-to-end test checks, each
checked as its reader would: Tollgate and the simulated upstream as real processes, the
official `openai` client (or raw httpx where the statement is about bytes), the CLI run
as a command.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from proxy.core.auth import key_hash
from tests.conftest import (
    DEFAULT_TEAMS,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    run_tollgate,
    write_config,
)
from tests.test_cli import tollgate as cli
from tests.test_proxy_e2e import wait_settled

ERROR_KEYS = {"message", "type", "param", "code"}
LOW = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}
THROTTLED_KEY = "tg_test_throttled_key_0003"
THROTTLED = f"""
    name: throttled
    keys:
      - {{id: k, sha256: {key_hash(THROTTLED_KEY)}}}
    budgets:
      - {{period: day, limit_usd: 10}}
    allow:
      max_quality: medium
    throttle:
      - {{above: 0.0001, max_quality: low}}
"""


@pytest.fixture(scope="module")
def gate(upstream: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """A Tollgate without `admin_token` in front of the module's own simulator."""
    root = tmp_path_factory.mktemp("contract")
    write_config(root, f"{upstream.url}/v1", teams={**DEFAULT_TEAMS, "throttled": THROTTLED})
    yield from run_tollgate(root)


# -- §4 "Upstream `x-request-id` is kept and recorded" -----------------------------------


def test_a_502_for_an_answer_that_cannot_be_read_keeps_the_upstream_request_id(
    gate: Tollgate, upstream: Simulator
) -> None:
    """The upstream billed a generation whose body is not JSON: Tollgate answers its own
    502 (charged the bound, flagged), and the team still gets the upstream's request id,
    the one OpenAI's support and the ledger know the charge by."""
    with pytest.raises(openai.APIStatusError) as caught:
        gate.client().images.generate(prompt="[[fault:garbage]] kept id", **LOW)
    answer = caught.value.response
    assert answer.status_code == 502
    assert caught.value.code == "upstream_unavailable"
    upstream_id = answer.headers.get("x-request-id")
    assert upstream_id, dict(answer.headers)
    assert upstream.record(upstream_id)["id"] == upstream_id
    row = wait_settled(gate, answer.headers["x-tollgate-request-id"])
    assert row["upstream_request_id"] == upstream_id
    assert row["flagged"] == 1 and row["cost_nanos"] > 0


# -- §4 "Without a configured admin token the admin API is off" -------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/budgets"), ("GET", "/admin/report"), ("POST", "/admin/reload")],
)
@pytest.mark.parametrize("token", [None, DESIGN_KEY, "0123456789abcdef0123456789abcdef"])
def test_the_admin_api_is_off_without_a_configured_admin_token(
    gate: Tollgate, method: str, path: str, token: str | None
) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    answer = httpx.request(method, f"{gate.url}{path}", headers=headers, timeout=30)
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["type"] == "invalid_request_error" and isinstance(error["code"], str)
    assert "admin_token" in error["message"]


# -- §2 "`--ledger` overrides the configuration's ledger URL" ---------------------------


def test_report_and_budgets_read_the_ledger_ledger_names_not_the_configurations(
    gate: Tollgate, tmp_path: Path
) -> None:
    answer = gate.client().images.with_raw_response.generate(prompt="counted", **LOW)
    wait_settled(gate, answer.http_response.headers["x-tollgate-request-id"])
    # The same configuration, its own ledger absent: only `--ledger` names one.
    elsewhere = tmp_path / "policies"
    shutil.copytree(gate.root, elsewhere, ignore=shutil.ignore_patterns("tollgate.db*"))
    ledger = f"sqlite:///{gate.root / 'tollgate.db'}"
    today = datetime.now(UTC).date().isoformat()
    report = cli(
        "report",
        "--config",
        str(elsewhere),
        "--ledger",
        ledger,
        "--by",
        "team",
        "--format",
        "csv",
        "--from",
        today,
        "--to",
        today,
    )
    assert report.returncode == 0, report.stderr
    rows = {r["team"]: r for r in csv.DictReader(io.StringIO(report.stdout))}
    assert int(rows["design"]["requests"]) >= 1
    budgets = cli("budgets", "--config", str(elsewhere), "--ledger", ledger, "--format", "json")
    assert budgets.returncode == 0, budgets.stderr
    assert "budgets" in json.loads(budgets.stdout)
    without = cli("report", "--config", str(elsewhere))
    assert without.returncode != 0  # the configuration's own ledger is not there


# -- §6 and §8: a downgrade is named in its header and counted by knob and reason --------


def test_a_policy_clamp_and_a_throttle_are_named_and_counted_by_their_reason(
    gate: Tollgate,
) -> None:
    """`allow.max_quality` clamps a request (reason `policy`); once the team has spent
    more than `throttle.above` of its budget, the throttle caps quality (reason
    `throttle`); each is named in `x-tollgate-downgraded` and counted once in
    `tollgate_downgrades_total{team, knob, reason}`."""
    team = gate.client(THROTTLED_KEY)
    first = team.images.with_raw_response.generate(
        model="gpt-image-2", prompt="clamped", quality="high", size="1024x1024"
    )
    assert first.http_response.headers["x-tollgate-downgraded"] == "quality=high->medium"
    wait_settled(gate, first.http_response.headers["x-tollgate-request-id"])
    second = team.images.with_raw_response.generate(
        model="gpt-image-2", prompt="throttled", quality="medium", size="1024x1024"
    )
    assert second.http_response.headers["x-tollgate-downgraded"] == "quality=medium->low"
    wait_settled(gate, second.http_response.headers["x-tollgate-request-id"])
    counted = {
        reason: gate.metric(
            "tollgate_downgrades_total", team="throttled", knob="quality", reason=reason
        )
        for reason in ("policy", "throttle", "budget")
    }
    assert counted == {"policy": 1.0, "throttle": 1.0, "budget": 0.0}
    rows = {r["id"]: r for r in gate.rows() if r["team"] == "throttled"}
    assert {r["outcome"] for r in rows.values()} == {"downgraded"}
    assert {r["quality_requested"] for r in rows.values()} == {"high", "medium"}
    assert {r["quality"] for r in rows.values()} == {"medium", "low"}


# -- §5 "A request with no `model` gets the configured `default_model`" -------------------


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, "PNG")
    return buffer.getvalue()


def test_an_edit_or_a_variation_without_a_model_names_the_model_it_was_sent_with(
    gate: Tollgate, upstream: Simulator
) -> None:
    """An edit gets `default_model` (never OpenAI's implicit default, gpt-image-1.5); a
    variation, which only dall-e-2 ever took, gets dall-e-2: either is written into the
    request the upstream gets and named in `x-tollgate-model`."""
    image = ("a.png", png(), "image/png")
    edit = gate.client().images.with_raw_response.edit(
        image=image, prompt="no model", quality="low", size="1024x1024"
    )
    variation = gate.client().images.with_raw_response.create_variation(image=image, size="256x256")
    for raw, model in ((edit, "gpt-image-2"), (variation, "dall-e-2")):
        answer = raw.http_response
        assert answer.headers["x-tollgate-model"] == model
        assert upstream.record(answer.headers["x-request-id"])["model"] == model
        row = wait_settled(gate, answer.headers["x-tollgate-request-id"])
        assert row["model"] == model
