"""A batch whose lines name several users, of a team with per-user budgets, holds each
user's share of its bound in that user's counters, against that user's budgets, as a
direct request of that user is held, and settles each share exactly, moved to spent by
that user's lines or released. A team without per-user budgets holds no share."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import ROUND_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.batches_e2e import GENERATIONS, LOW, ended, jsonl, line, settled_rows
from tests.conftest import (
    Simulator,
    Tollgate,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)

KEY = "tg_test_batch_users_key"
ADMIN = "tg_admin_batch_users"
HIGH = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "high", "size": "1024x1024"}
SMALL = {**HIGH, **LOW}


def team_yaml(per_user_usd: Decimal | None) -> str:
    per_user = f"per_user:\n  - {{period: day, limit_usd: {per_user_usd}}}\n"
    return (
        f"name: users\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"
        + (per_user if per_user_usd is not None else "")
        + "on_exhausted: reject\n"
    )


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    started = start_simulator()
    try:
        yield started
    finally:
        stop(started.process)


@pytest.fixture
def gate(simulator: Simulator, tmp_path: Path) -> Iterator[Tollgate]:
    settings = f"timezone: UTC\nadmin_token: {ADMIN}\n"
    write_config(tmp_path, f"{simulator.url}/v1", settings, teams={"users": team_yaml(None)})
    proxy = start_tollgate(tmp_path)
    try:
        yield proxy
    finally:
        proxy.stop()


def set_per_user(gate: Tollgate, limit_usd: Decimal | None) -> None:
    """The team's per-user day budget changed by a reload."""
    (gate.root / "teams" / "users.yaml").write_text(team_yaml(limit_usd))
    answer = httpx.post(f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200, answer.text


def user_counters(gate: Tollgate) -> dict[str, tuple[int, int]]:
    """(spent, reserved) nanos of each user's day counters, summed over the days."""
    found: dict[str, tuple[int, int]] = {}
    for row in gate.query(
        "SELECT user, spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'user' AND period = 'day'"
    ):
        spent, reserved = found.get(row["user"], (0, 0))
        found[row["user"]] = (spent + row["spent_nanos"], reserved + row["reserved_nanos"])
    return found


def day_reserved(gate: Tollgate, user: str) -> int:
    """What `user`'s day counter of today holds reserved (the batch holds every day it spans
    alike)."""
    rows = gate.query(
        "SELECT reserved_nanos FROM budget_usage WHERE scope = 'user' AND period = 'day' "
        f"AND user = '{user}' ORDER BY start LIMIT 1"
    )
    return int(rows[0]["reserved_nanos"]) if rows else 0


def create(sdk: openai.OpenAI, lines: list[dict[str, Any]]) -> Any:
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return sdk.batches.create(
        input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
    )


def test_a_batch_naming_several_users_is_refused_when_one_share_passes_her_budget(
    simulator: Simulator, gate: Tollgate
) -> None:
    """Alice's five high-quality lines cost about $0.53 at batch rates, her day budget is
    $0.02: the batch is refused as a direct request of hers is, 429 `budget_exceeded`
    naming her budget, though Bob's line alone would fit his."""
    simulator.configure(batch_delay_ms=300)
    set_per_user(gate, Decimal("0.02"))
    sdk = gate.client(KEY)
    with pytest.raises(openai.RateLimitError) as direct:
        sdk.images.generate(**HIGH, user="alice")
    lines = [line(f"a{i}", {**HIGH, "user": "alice"}) for i in range(5)]
    lines.append(line("b0", {**SMALL, "safety_identifier": "bob"}))
    with pytest.raises(openai.RateLimitError) as refused:
        create(sdk, lines)
    assert refused.value.code == direct.value.code == "budget_exceeded"
    assert "user 'alice''s day budget" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert gate.query("SELECT count(*) AS n FROM requests WHERE state = 'reserved'")[0]["n"] == 0
    assert all(reserved == 0 for _, reserved in user_counters(gate).values())


def test_each_users_share_is_held_while_the_batch_runs_and_released_when_it_is_cancelled(
    simulator: Simulator, gate: Tollgate
) -> None:
    """Created under a generous per-user budget, a batch of three lines for Alice and one
    for Bob holds each one's share in their counters. A reload that lowers the budget
    while it runs then counts Alice's share: her direct request that would pass the limit
    once the batch is billed is refused, while Carol's fits. Cancelled before any line ran,
    the batch releases every share, to the nano (what a line that ran meanwhile cost stays
    spent)."""
    simulator.configure(batch_delay_ms=40_000)  # its first line would end 12 s after
    set_per_user(gate, Decimal("1"))
    sdk = gate.client(KEY)
    lines = [line(f"a{i}", {**SMALL, "user": "alice"}) for i in range(3)]
    lines.append(line("b0", {**SMALL, "safety_identifier": "bob"}))
    batch = create(sdk, lines)
    [row] = gate.query(f"SELECT estimated_nanos FROM requests WHERE response_id = '{batch.id}'")
    bound = int(row["estimated_nanos"])
    alice, bob = day_reserved(gate, "alice"), day_reserved(gate, "bob")
    assert alice >= 3 * bound // 4 and bob >= bound // 4, (bound, alice, bob)
    assert alice + bob >= bound and max(alice, bob) <= bound
    # A limit Alice's share fills: one more request of hers would pass it, one of Carol's
    # (a direct low-quality image costs less than three at batch rates) fits.
    limit = (Decimal(alice) / 10**9).quantize(Decimal("0.000001"), rounding=ROUND_UP)
    set_per_user(gate, limit)
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.images.generate(**SMALL, user="alice")
    assert refused.value.code == "budget_exceeded"
    assert "user 'alice''s day budget" in refused.value.message
    assert sdk.images.generate(**SMALL, user="carol").data
    sdk.batches.cancel(batch.id)
    assert ended(sdk, batch.id).status == "cancelled"
    rows = settled_rows(gate, batch.id)
    counters = user_counters(gate)
    for user in ("alice", "bob"):
        billed = sum(r["cost_nanos"] for r in rows if r["user"] == user)
        assert counters[user] == (billed, 0), user
    assert counters["carol"][1] == 0 and counters["carol"][0] > 0


def test_a_completed_batch_moves_each_users_share_to_her_lines_spend(
    simulator: Simulator, gate: Tollgate
) -> None:
    """Each user's counters end with exactly what her billed lines cost, nothing reserved;
    the team's too."""
    simulator.configure(batch_delay_ms=300)
    set_per_user(gate, Decimal("1"))
    sdk = gate.client(KEY)
    users = ["alice", "bob", "carol"]
    lines = [
        line(f"{u}{i}", {**SMALL, "user": u}) for u in users for i in range(users.index(u) + 1)
    ]
    batch = create(sdk, lines)
    assert ended(sdk, batch.id).status == "completed"
    rows = settled_rows(gate, batch.id)
    assert len(rows) == len(lines)
    counters = user_counters(gate)
    for user in users:
        cost = sum(r["cost_nanos"] for r in rows if r["user"] == user)
        assert cost > 0
        assert counters[user] == (cost, 0), user
    [team] = gate.query(
        "SELECT sum(spent_nanos) AS spent, sum(reserved_nanos) AS reserved FROM budget_usage "
        "WHERE scope = 'team' AND period = 'total'"
    )
    assert (team["spent"], team["reserved"]) == (sum(r["cost_nanos"] for r in rows), 0)


def test_a_team_without_per_user_budgets_holds_no_users_share(
    simulator: Simulator, gate: Tollgate
) -> None:
    """No budget reads a user's counters: the batch is held in the team's alone (a file
    naming thousands of users would otherwise write thousands of counters), and its lines
    are still booked to their users when it ends."""
    simulator.configure(batch_delay_ms=300)
    sdk = gate.client(KEY)
    lines = [line("a0", {**SMALL, "user": "alice"}), line("b0", {**SMALL, "user": "bob"})]
    batch = create(sdk, lines)
    assert day_reserved(gate, "alice") == day_reserved(gate, "bob") == 0
    assert ended(sdk, batch.id).status == "completed"
    rows = settled_rows(gate, batch.id)
    counters = user_counters(gate)
    for user in ("alice", "bob"):
        cost = sum(r["cost_nanos"] for r in rows if r["user"] == user)
        assert cost > 0 and counters[user] == (cost, 0), user
