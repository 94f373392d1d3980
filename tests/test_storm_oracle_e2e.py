"""Storms near a hard limit, checked against the upstream's own record and the counters.

Line by line: requests come through the official `openai` client, each under a `user`
of its own, so that every request the simulator received (its billing record keeps the
`user` it was sent) is matched with its ledger row. Some make the upstream misbehave (a
reset, a 500, a 200 without usage or with a body that is not JSON, text tokens no image
model bills), chosen by a fixed seed; a replica of two on PostgreSQL, or a worker of a
two-worker server on SQLite, is killed (SIGKILL) while requests are in flight. After the
reclaim:

- every request the upstream billed is one settled row, charged at least its bill (what
  the usage said, or the bound when the answer never came or said nothing);
- every charged row that is not flagged is a request the upstream billed, at that price;
- nothing is left reserved, and the counters hold exactly the rows' charges, within the
  limit but for what the upstream reported beyond a bound (flagged).

Then, over two replicas: an organization cap shared by two teams (one capped per user,
one in tokens) whose counters stay exact; one Idempotency-Key sent with two bodies at
once; a limit lowered mid-storm; and a replica killed with every door in flight, whose
reservations, background responses and batches the survivor alone settles.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.batches_e2e import GENERATIONS, check_settled, ended, generations, upload
from tests.conftest import (
    DEADLINE_S,
    Simulator,
    Tollgate,
    nanos,
    start_tollgate,
    workers_of,
    write_config,
)
from tests.test_crash_storm_e2e import wait_for_no_reservation
from tests.test_mixed_storm_e2e import check as mixed_check
from tests.test_mixed_storm_e2e import mixed_config, settle_everything
from tests.test_mixed_storm_e2e import spend as mixed_spend
from tests.test_proxy_e2e import expected_cost

KEY = "tg_test_oracle_storm_key"
LIMIT = Decimal("0.25")
SEED = 20261207
FAULTS = ["", "", "", "", "", "", "[[fault:reset]]", "[[fault:500]]", "[[fault:nousage]]",
          "[[fault:garbage]]", "[[fault:texttokens]]"]  # fmt: skip


def oracle_config(root: Path, simulator: Simulator) -> None:
    write_config(
        root,
        f"{simulator.url}/v1",
        teams={
            "oracle": f"name: oracle\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"
            f"budgets:\n  - {{period: month, limit_usd: {LIMIT}}}\non_exhausted: reject\n"
        },
    )


async def spend(url: str, tag: str, count: int, seed: int) -> dict[str, str]:
    """`count` generations through the official client, each under its own user (`tag-i`),
    a fault drawn for some of them; what each came to, by user."""
    pick = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    outcomes: dict[str, str] = {}

    async def one(i: int, fault: str) -> None:
        user = f"{tag}-{i}"
        try:
            await client.images.generate(
                model="gpt-image-2", prompt=f"a lighthouse {fault}", quality="low",
                size="1024x1024", user=user,
            )  # fmt: skip
            outcomes[user] = "ok"
        except openai.APIStatusError as exc:
            outcomes[user] = str(exc.status_code)
        except (openai.APIConnectionError, openai.APITimeoutError):
            outcomes[user] = "gone"

    await asyncio.gather(*(one(i, pick.choice(FAULTS)) for i in range(count)))
    await client.close()
    return outcomes


async def kill_when_busy(gate: Tollgate, victim: int) -> None:
    reserved = "SELECT count(*) AS n FROM requests WHERE state = 'reserved'"
    while (await asyncio.to_thread(gate.query, reserved))[0]["n"] < 5:
        await asyncio.sleep(0.02)
    os.kill(victim, signal.SIGKILL)


def check_line_by_line(gate: Tollgate, simulator: Simulator, billed_before: int) -> None:
    rows = gate.query("SELECT * FROM requests WHERE team = 'oracle'")
    by_user = {r["user"]: r for r in rows}
    assert len(by_user) == len(rows), "one row per request"
    records = [r for r in simulator.billing()[billed_before:] if r["endpoint"] == "generations"]
    by_id = {r["id"]: r for r in records}
    for record in records:
        user = record["params"]["user"]
        row = by_user.get(user)
        assert row is not None, f"{user} reached the upstream but is not in the ledger"
        assert row["state"] == "settled", row
        if not record["billed"]:
            continue
        bill = nanos(expected_cost(record)) if record["usage"] else row["estimated_nanos"]
        if row["flagged"]:
            assert row["cost_nanos"] >= bill, (row, record)
        else:
            assert row["upstream_request_id"] == record["id"], (row, record)
            assert row["cost_nanos"] == bill, (row, record)
    reached = {r["params"]["user"] for r in records}
    for row in rows:
        if row["cost_nanos"] and not row["flagged"]:
            record = by_id.get(row["upstream_request_id"])
            assert record is not None and record["billed"], row
        if row["user"] not in reached:
            assert row["cost_nanos"] == 0 or row["flagged"], row
    [usage] = gate.query(
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'team' AND team = 'oracle' AND period = 'month'"
    )
    assert usage["reserved_nanos"] == 0
    assert usage["spent_nanos"] == sum(r["cost_nanos"] for r in rows)
    # Past the limit only by what the upstream reported beyond a bound (text output of an
    # image model that has no such rate: charged fail-closed at the image-output rate),
    # each such row flagged.
    over = sum(r["cost_nanos"] - r["estimated_nanos"] for r in rows if r["cost_nanos"] >
               r["estimated_nanos"])  # fmt: skip
    assert all(r["flagged"] for r in rows if r["cost_nanos"] > r["estimated_nanos"])
    assert Decimal(usage["spent_nanos"] - over) / 10**9 <= LIMIT
    billed = sum((expected_cost(r) for r in records if r["billed"] and r["usage"]), Decimal(0))
    assert billed <= LIMIT


def test_a_storm_with_faults_over_two_replicas_one_killed_is_in_the_ledger_line_by_line(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    oracle_config(tmp_path, simulator)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=1200)
    first, second = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    again = None
    try:

        async def storm() -> list[dict[str, str]]:
            a, b, _ = await asyncio.gather(
                spend(first.url, "a", 60, SEED),
                spend(second.url, "b", 60, SEED + 1),
                kill_when_busy(first, first.process.pid),
            )
            return [a, b]

        a, b = asyncio.run(storm())
        first.process.wait()
        simulator.configure(latency_ms=0)
        assert "429" in b.values(), b  # the limit was reached
        again = start_tollgate(tmp_path, ledger_url=shared)
        wait_for_no_reservation(again)
        print(
            f"\nkilled replica: {sorted(a.values())}\nsurvivor: {sorted(b.values())}\n"
            f"upstream arrivals: {len(simulator.billing()) - billed_before}"
        )
        check_line_by_line(again, simulator, billed_before)
    finally:
        simulator.configure(latency_ms=0)
        for gate in (again, second, first):
            if gate is not None:
                gate.stop()


def test_a_storm_with_faults_on_two_sqlite_workers_one_killed_is_in_the_ledger_line_by_line(
    simulator: Simulator, tmp_path: Path
) -> None:
    oracle_config(tmp_path, simulator)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=1200)
    gate = start_tollgate(tmp_path, "--workers", "2")
    try:

        async def storm() -> dict[str, str]:
            victim = workers_of(gate.process.pid)[0]
            outcomes, _ = await asyncio.gather(
                spend(gate.url, "w", 120, SEED), kill_when_busy(gate, victim)
            )
            return outcomes

        outcomes = asyncio.run(storm())
        simulator.configure(latency_ms=0)
        assert "429" in outcomes.values(), outcomes  # the limit was reached
        wait_for_no_reservation(gate)
        print(
            f"\nworkers: {sorted(outcomes.values())}\n"
            f"upstream arrivals: {len(simulator.billing()) - billed_before}"
        )
        check_line_by_line(gate, simulator, billed_before)
    finally:
        simulator.configure(latency_ms=0)
        gate.stop()


# -- an organization, its teams, their users and their tokens, under one storm --------------

RED, BLUE = "tg_test_storm_red_key", "tg_test_storm_blue_key"
ONE_BOUND = 196 * 30 + 4 * 5  # micro-dollars: gpt-image-2 low 1024x1024, 4 prompt bytes
ORG_FITS, USER_FITS, USERS, BLUE_FITS = 30, 6, 3, 14


def shared_config(root: Path, simulator: Simulator) -> None:
    """An organization cap tighter than what its two teams could spend together: `red`
    capped per user (three users), `blue` capped in image output tokens."""
    write_config(
        root,
        f"{simulator.url}/v1",
        settings="organization:\n  budgets:\n"
        f"    - {{period: month, limit_usd: {Decimal(ONE_BOUND * ORG_FITS) / 10**6}}}\n",
        teams={
            "red": f"name: red\nkeys:\n  - {{id: r, sha256: {key_hash(RED)}}}\n"
            f"budgets:\n  - {{period: month, limit_usd: 100}}\n"
            f"per_user:\n  - {{period: day, limit_usd: {Decimal(ONE_BOUND * USER_FITS) / 10**6}}}\n"
            "on_exhausted: reject\n",
            "blue": f"name: blue\nkeys:\n  - {{id: b, sha256: {key_hash(BLUE)}}}\n"
            f"budgets:\n  - {{period: month, image_output_tokens: {196 * BLUE_FITS}}}\n"
            "on_exhausted: reject\n",
        },
    )


async def team_storm(url: str, key: str, count: int, users: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)

    async def one(i: int) -> str:
        try:
            await client.images.generate(
                model="gpt-image-2", prompt="abcd", quality="low", size="1024x1024",
                user=f"u{i % users}",
            )  # fmt: skip
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        except (openai.APIConnectionError, openai.APITimeoutError):
            return "gone"
        return "ok"

    outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    await client.close()
    return list(outcomes)


def test_an_organization_cap_over_two_teams_and_two_replicas_keeps_every_counter_exact(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    shared_config(tmp_path, simulator)
    simulator.configure(latency_ms=300)
    replicas = [start_tollgate(tmp_path, ledger_url=shared) for _ in range(2)]
    try:

        async def storm() -> list[str]:
            found = await asyncio.gather(
                *(team_storm(r.url, key, 40, USERS) for r in replicas for key in (RED, BLUE))
            )
            return [o for each in found for o in each]

        outcomes = asyncio.run(storm())
    finally:
        simulator.configure(latency_ms=0)
        for replica in replicas:
            replica.stop()
    assert set(outcomes) == {"ok", "429"}, outcomes
    spent = exact_counters(replicas[0])
    assert outcomes.count("ok") == sum(r["outcome"] == "ok" for r in replicas[0].rows())
    assert ONE_BOUND * ORG_FITS * 1000 - spent < ONE_BOUND * 1000  # no room left unused


def test_an_organization_cap_over_two_teams_keeps_every_counter_exact_when_a_replica_dies(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """What the killed replica held is charged at its bound to every counter it was
    reserved against: the organization's, its team's, its user's, the tokens'."""
    shared_config(tmp_path, simulator)
    simulator.configure(latency_ms=1500)
    first, second = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    again = None
    try:

        async def storm() -> list[str]:
            found = await asyncio.gather(
                *(
                    team_storm(r.url, key, 40, USERS)
                    for r in (first, second)
                    for key in (RED, BLUE)
                ),
                kill_when_busy(first, first.process.pid),
            )
            return [o for each in found if each is not None for o in each]

        outcomes = asyncio.run(storm())
        first.process.wait()
        simulator.configure(latency_ms=0)
        again = start_tollgate(tmp_path, ledger_url=shared)
        wait_for_no_reservation(again)
        assert "gone" in outcomes and "429" in outcomes, outcomes
        exact_counters(again)
        lost = again.query("SELECT id FROM requests WHERE error_code = 'outcome_unknown'")
        print(f"\n{len(lost)} reservations of the killed replica charged at their bound")
        assert lost
    finally:
        simulator.configure(latency_ms=0)
        for gate in (again, second, first):
            if gate is not None:
                gate.stop()


def exact_counters(gate: Tollgate) -> int:
    """Check that every counter holds exactly its rows' charges and tokens, none held and
    none past its limit; the organization's spend."""
    rows = gate.query("SELECT * FROM requests")
    assert all(r["state"] == "settled" for r in rows)
    usage = gate.query("SELECT * FROM budget_usage WHERE period IN ('month', 'day')")
    assert all(u["reserved_nanos"] == 0 for u in usage), usage

    def counted(scope: str, team: str = "", user: str = "", period: str = "month") -> Any:
        return next(
            u for u in usage
            if (u["scope"], u["team"], u["user"], u["period"]) == (scope, team, user, period)
        )  # fmt: skip

    def charged(team: str | None = None, user: str | None = None) -> int:
        return sum(
            r["cost_nanos"] for r in rows
            if (team is None or r["team"] == team) and (user is None or r["user"] == user)
        )  # fmt: skip

    organization = counted("organization")
    assert organization["spent_nanos"] == charged()
    assert organization["spent_nanos"] == sum(
        counted("team", t)["spent_nanos"] for t in ("red", "blue")
    )
    for team in ("red", "blue"):
        assert counted("team", team)["spent_nanos"] == charged(team)
    for column in ("image_output_tokens", "text_input_tokens", "total_tokens"):
        assert organization[column] == sum(counted("team", t)[column] for t in ("red", "blue"))
    assert organization["spent_nanos"] <= ONE_BOUND * ORG_FITS * 1000
    for user in (f"u{i}" for i in range(USERS)):
        spent = counted("user", "red", user, "day")["spent_nanos"]
        assert spent == charged("red", user) <= ONE_BOUND * USER_FITS * 1000
    blue = counted("team", "blue")
    assert blue["image_output_tokens"] == sum(
        r["image_output_tokens"] for r in rows if r["team"] == "blue"
    )
    assert blue["image_output_tokens"] <= 196 * BLUE_FITS
    print(
        f"\norganization: spent {organization['spent_nanos']} of "
        f"{ONE_BOUND * ORG_FITS * 1000} nanos; red {charged('red')}, blue {charged('blue')} "
        f"({blue['image_output_tokens']} tokens)"
    )
    return int(organization["spent_nanos"])


# -- one Idempotency-Key, two bodies, two replicas, all at once ------------------------------


def test_one_idempotency_key_sent_with_two_bodies_at_once_to_two_replicas_is_forwarded_once(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """Eight attempts with one key, half of them with another prompt, sent together to two
    replicas: one is forwarded; those with its body replay its answer, the others are
    409 idempotency_conflict, none of them forwarded."""
    oracle_config(tmp_path, simulator)
    (tmp_path / "teams" / "oracle.yaml").write_text(
        f"name: oracle\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"
    )
    a, b = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    user = f"idempotency-race-{SEED}"
    try:
        simulator.configure(latency_ms=1500)

        def attempt(i: int) -> tuple[str, int, str | None]:
            client = openai.OpenAI(
                base_url=f"{(a, b)[i % 2].url}/v1", api_key=KEY, max_retries=0, timeout=60
            )
            prompt = ("a lighthouse", "a windmill")[(i // 2) % 2]
            try:
                raw = client.images.with_raw_response.generate(
                    model="gpt-image-2", prompt=prompt, quality="low", size="1024x1024",
                    user=user, extra_headers={"Idempotency-Key": "one-key-two-bodies"},
                )  # fmt: skip
            except openai.ConflictError as exc:
                assert exc.code == "idempotency_conflict", exc
                return prompt, 409, None
            return prompt, raw.status_code, raw.headers.get("x-tollgate-replay-of")

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(attempt, range(8)))
    finally:
        simulator.configure(latency_ms=0)
        a.stop()
        b.stop()
    arrived = [r for r in simulator.billing() if r["params"].get("user") == user]
    assert len(arrived) == 1, answers
    served = [(p, replay) for p, status, replay in answers if status == 200]
    [winner] = {p for p, _ in served}
    assert len(served) == 4 and sum(replay is None for _, replay in served) == 1, answers
    assert all(status == 409 for p, status, _ in answers if p != winner), answers
    rows = a.query("SELECT outcome, cost_nanos FROM requests WHERE team = 'oracle'")
    assert sorted(r["outcome"] for r in rows) == ["client_error"] * 4 + ["ok"] + ["replayed"] * 3
    assert sum(r["cost_nanos"] > 0 for r in rows) == 1


# -- a limit lowered mid-storm ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["replicas", "workers"])
def test_a_limit_lowered_mid_storm_admits_nothing_more(
    simulator: Simulator, tmp_path: Path, request: pytest.FixtureRequest, layout: str
) -> None:
    """Requests in flight under the old limit end and are charged; once every replica (two
    on PostgreSQL) or every worker (two on SQLite) has reloaded a limit below what is
    already reserved, every new request is refused, and what was reserved is all that is
    spent."""
    oracle_config(tmp_path, simulator)
    config = tmp_path / "tollgate.yaml"
    config.write_text(config.read_text() + "admin_token: storm-admin-token-16\n")
    team_file = tmp_path / "teams" / "oracle.yaml"
    if layout == "replicas":
        shared = request.getfixturevalue("shared")
        replicas = [start_tollgate(tmp_path, ledger_url=shared) for _ in range(2)]
    else:
        replicas = [start_tollgate(tmp_path, "--workers", "2")]
    simulator.configure(latency_ms=2500)
    try:

        async def storm() -> tuple[list[str], list[str], float]:
            each = 40 // len(replicas)
            waves = enumerate(replicas)
            first = asyncio.gather(*(spend(r.url, f"first{i}", each, SEED) for i, r in waves))
            reserved = "SELECT count(*) AS n FROM requests WHERE state = 'reserved'"
            while (await asyncio.to_thread(replicas[0].query, reserved))[0]["n"] < 10:
                await asyncio.sleep(0.02)
            team_file.write_text(
                team_file.read_text().replace(f"limit_usd: {LIMIT}", "limit_usd: 0.01")
            )
            async with httpx.AsyncClient(timeout=60) as http:
                for replica in replicas:
                    answer = await http.post(
                        f"{replica.url}/admin/reload",
                        headers={"authorization": "Bearer storm-admin-token-16"},
                    )
                    assert answer.status_code == 200, answer.text
            reloaded = time.time()
            waves = enumerate(replicas)
            later = await asyncio.gather(
                *(spend(r.url, f"later{i}", each // 2, SEED) for i, r in waves)
            )
            before = await first
            return (
                [o for each in before for o in each.values()],
                [o for each in later for o in each.values()],
                reloaded,
            )

        before, after, reloaded = asyncio.run(storm())
    finally:
        simulator.configure(latency_ms=0)
        for replica in replicas:
            replica.stop()
    rows = replicas[0].query("SELECT * FROM requests WHERE team = 'oracle'")
    assert all(r["state"] == "settled" for r in rows)
    assert set(after) == {"429"}, after
    admitted_late = [r for r in rows if r["started_at"] > reloaded and r["estimated_nanos"]]
    assert not admitted_late, admitted_late
    [usage] = replicas[0].query(
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'team' AND team = 'oracle' AND period = 'month'"
    )
    assert usage["reserved_nanos"] == 0
    assert usage["spent_nanos"] == sum(r["cost_nanos"] for r in rows)
    print(f"\nlowered mid-storm: before {sorted(before)}; spent {usage['spent_nanos']} nanos")


# -- the survivor adopts what a killed replica held ------------------------------------------


def test_a_replica_killed_with_every_door_in_flight_is_settled_by_the_survivor_alone(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """No restart: the other replica's housekeeping sees the killed one gone, charges its
    reservations at their bound, adopts its background responses and batches and follows
    them to their end."""
    mixed_config(tmp_path, simulator)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=800, batch_delay_ms=2000)
    first, second = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    held_by_first = (
        "SELECT count(*) AS n FROM requests r JOIN processes p ON r.owner = p.owner "
        f"WHERE p.pid = {first.process.pid} AND r.state = 'reserved' AND r.held = 1"
    )
    try:
        holds = asyncio.Event()

        async def kill_once_it_holds() -> int:
            # Once it holds a background response or a batch.
            deadline = time.monotonic() + DEADLINE_S
            while (held := (await asyncio.to_thread(first.query, held_by_first))[0]["n"]) < 1:
                assert time.monotonic() < deadline, "the replica to kill never held anything"
                await asyncio.sleep(0.02)
            holds.set()
            first.process.kill()
            return int(held)

        async def then_the_survivor() -> None:
            # Its storm once the first holds something: run at once, the two storms could
            # spend the whole budget before the first's background responses and batches
            # (the slowest to reserve) were reserved, leaving it nothing to be killed with.
            await holds.wait()
            await mixed_spend(second.url, "b")

        async def storm() -> int:
            *_, held = await asyncio.gather(
                mixed_spend(first.url, "a"), then_the_survivor(), kill_once_it_holds()
            )
            return int(held)

        held = asyncio.run(storm())
        first.process.wait()
        simulator.configure(latency_ms=0)
        settle_everything(second)
        mixed_check(second, simulator, billed_before)
        print(f"\nthe killed replica held {held}; the survivor adopted and settled them")
        assert held >= 1
    finally:
        simulator.configure(latency_ms=0)
        second.stop()
        first.stop()


# -- downgrades under a storm ------------------------------------------------------------------

BARGAIN = "tg_test_storm_bargain_key"


def test_downgrades_under_a_storm_over_two_replicas_send_what_was_priced_within_the_limit(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """High-quality requests racing for the last of a budget come down the quality, size
    and model ladder: what each sent upstream is what its row says (model, quality, size),
    billed at what it was charged, and the sum stays within the limit."""
    limit = Decimal("0.60")
    write_config(
        tmp_path,
        f"{simulator.url}/v1",
        teams={
            "bargain": f"name: bargain\nkeys:\n  - {{id: k, sha256: {key_hash(BARGAIN)}}}\n"
            f"budgets:\n  - {{period: month, limit_usd: {limit}}}\non_exhausted: downgrade\n"
            "downgrade: {order: [quality, size, model], fallback_model: gpt-image-1-mini}\n"
        },
    )
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=400)
    replicas = [start_tollgate(tmp_path, ledger_url=shared) for _ in range(2)]
    try:

        async def storm() -> list[str]:
            client = [
                openai.AsyncOpenAI(base_url=f"{r.url}/v1", api_key=BARGAIN, max_retries=0)
                for r in replicas
            ]

            async def one(i: int) -> str:
                try:
                    await client[i % 2].images.generate(
                        model="gpt-image-2", prompt="a lighthouse", quality="high",
                        size="1536x1024", user=f"bargain-{i}",
                    )  # fmt: skip
                except openai.APIStatusError as exc:
                    return str(exc.status_code)
                return "ok"

            return list(await asyncio.gather(*(one(i) for i in range(80))))

        outcomes = asyncio.run(storm())
    finally:
        simulator.configure(latency_ms=0)
        for replica in replicas:
            replica.stop()
    assert "429" in outcomes, outcomes
    rows = {r["user"]: r for r in replicas[0].query("SELECT * FROM requests")}
    records = simulator.billing()[billed_before:]
    assert len(records) == outcomes.count("ok")
    for record in records:
        row = rows[record["params"]["user"]]
        assert (row["model"], row["quality"], row["size"]) == (
            record["model"], record["quality"], record["size"]
        ), (row, record)  # fmt: skip
        assert row["cost_nanos"] == nanos(expected_cost(record)) <= row["estimated_nanos"]
    spent = sum(r["cost_nanos"] for r in rows.values())
    assert Decimal(spent) / 10**9 <= limit
    [usage] = replicas[0].query(
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'team' AND period = 'month'"
    )
    assert (usage["spent_nanos"], usage["reserved_nanos"]) == (spent, 0)
    sent = sorted({(r["model"], r["quality"], r["size"]) for r in records})
    print(f"\ndowngrade storm: {outcomes.count('ok')} served, spent {spent} nanos; sent {sent}")


# -- batch creates racing with images for the last of a budget ---------------------------------


def test_batch_creates_and_images_racing_over_two_replicas_stay_within_the_limit(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """Ten batch creates and forty generations at once, over two replicas, for a budget
    that holds a few of them: every batch created is settled line by line from what the
    upstream billed, and the sum of everything stays within the limit."""
    oracle_config(tmp_path, simulator)
    simulator.configure(latency_ms=600, batch_delay_ms=1500)
    replicas = [start_tollgate(tmp_path, ledger_url=shared) for _ in range(2)]
    clients = [openai.OpenAI(base_url=f"{r.url}/v1", api_key=KEY, max_retries=0) for r in replicas]
    try:
        files = [upload(clients[0], generations("gpt-image-1.5", 4)) for _ in range(10)]

        def create_batch(i: int) -> str:
            try:
                batch = clients[i % 2].batches.create(
                    input_file_id=files[i].id, endpoint=GENERATIONS, completion_window="24h"
                )
            except openai.APIStatusError as exc:
                return str(exc.status_code)
            return batch.id

        async def storm() -> tuple[list[str], dict[str, str]]:
            creates = asyncio.gather(*(asyncio.to_thread(create_batch, i) for i in range(10)))
            images = asyncio.gather(
                *(spend(r.url, f"img{i}", 20, SEED + i) for i, r in enumerate(replicas))
            )
            made, spent = await asyncio.gather(creates, images)
            return list(made), {**spent[0], **spent[1]}

        made, outcomes = asyncio.run(storm())
        simulator.configure(latency_ms=0)
        batches = [b for b in made if b.startswith("batch")]
        assert batches and "429" in made, made
        print(f"\nbatches: {made}\nimages: {sorted(outcomes.values())}")
        for batch_id in batches:
            batch = ended(clients[0], batch_id)
            check_settled(replicas[0], simulator, batch, "gpt-image-1.5", "oracle", clients[0])
        wait_for_no_reservation(replicas[0])
        rows = replicas[0].query("SELECT * FROM requests WHERE team = 'oracle'")
        [usage] = replicas[0].query(
            "SELECT spent_nanos, reserved_nanos FROM budget_usage "
            "WHERE scope = 'team' AND team = 'oracle' AND period = 'month'"
        )
        assert usage["reserved_nanos"] == 0
        assert usage["spent_nanos"] == sum(r["cost_nanos"] for r in rows)
        over = sum(
            r["cost_nanos"] - r["estimated_nanos"]
            for r in rows
            if r["flagged"] and r["cost_nanos"] > r["estimated_nanos"]
        )  # what the upstream reported beyond a bound, flagged
        assert Decimal(usage["spent_nanos"] - over) / 10**9 <= LIMIT
    finally:
        simulator.configure(latency_ms=0)
        for replica in replicas:
            replica.stop()
