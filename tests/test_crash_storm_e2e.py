"""A process killed (SIGKILL) in the middle of a storm against a team near its hard limit:
two replicas on PostgreSQL, or a worker of a two-worker server on SQLite. After a restart
and housekeeping, settled spend is within the limit, no reservation is left held, and every
request the upstream billed is charged in the ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from decimal import Decimal
from pathlib import Path

from tests import pg
from tests.conftest import (
    Simulator,
    Tollgate,
    start_tollgate,
    workers_of,
)
from tests.test_budgets_e2e import ONE, fire, storm_config

FITS = 40


def wait_for_no_reservation(gate: Tollgate) -> None:
    deadline = time.monotonic() + 120  # a start-up reclaim, or the next periodic one
    while gate.query("SELECT id FROM requests WHERE state = 'reserved'"):
        assert time.monotonic() < deadline, "reservations still held"
        time.sleep(0.2)


def check_ledger(gate: Tollgate, simulator: Simulator, limit: Decimal, billed_before: int) -> None:
    rows = gate.query("SELECT * FROM requests")
    assert all(r["state"] == "settled" for r in rows)
    spent = sum(Decimal(r["cost_nanos"] or 0) for r in rows)
    assert spent / 10**9 <= limit
    [usage] = gate.query(
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'team' AND period = 'month'"
    )
    assert Decimal(usage["spent_nanos"]) == spent
    assert Decimal(usage["reserved_nanos"]) == 0
    # Whatever the upstream billed is charged: answered ones by their usage, those of the
    # killed process at their bound (flagged outcome_unknown).
    billed = len(simulator.billing())
    charged = [r for r in rows if Decimal(r["cost_nanos"] or 0) > 0]
    assert len(charged) >= billed - billed_before


async def storm_then_kill(gate: Tollgate, url: str, victims: list[int], count: int) -> list[int]:
    """`count` requests to `url`; `victims` killed once reservations are in flight."""

    async def kill() -> None:
        reserved = "SELECT count(*) AS n FROM requests WHERE state = 'reserved'"
        while (await asyncio.to_thread(gate.query, reserved))[0]["n"] < 5:
            await asyncio.sleep(0.02)
        for victim in victims:
            os.kill(victim, signal.SIGKILL)

    statuses, _ = await asyncio.gather(fire(url, count), kill())
    return statuses


def test_a_replica_killed_mid_storm_leaves_spend_within_the_limit_after_restart(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    limit = ONE * FITS
    storm_config(tmp_path, simulator, limit)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=1500)
    first, second = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    try:

        async def storm() -> None:
            await asyncio.gather(
                storm_then_kill(first, first.url, [first.process.pid], 150),
                fire(second.url, 150),
            )

        asyncio.run(storm())
        first.process.wait()
        simulator.configure(latency_ms=0)
        again = start_tollgate(tmp_path, ledger_url=shared)
        try:
            wait_for_no_reservation(again)
            check_ledger(again, simulator, limit, billed_before)
        finally:
            again.stop()
    finally:
        simulator.configure(latency_ms=0)
        second.stop()
        first.stop()


def test_a_worker_killed_mid_storm_on_sqlite_leaves_spend_within_the_limit(
    simulator: Simulator, tmp_path: Path
) -> None:
    limit = ONE * FITS
    storm_config(tmp_path, simulator, limit)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=1500)
    gate = start_tollgate(tmp_path, "--workers", "2")
    try:
        victim = workers_of(gate.process.pid)[0]
        asyncio.run(storm_then_kill(gate, gate.url, [victim], 200))
        simulator.configure(latency_ms=0)
        wait_for_no_reservation(gate)
        check_ledger(gate, simulator, limit, billed_before)
    finally:
        simulator.configure(latency_ms=0)
        gate.stop()


def test_a_two_worker_server_killed_whole_mid_storm_on_sqlite_leaves_spend_within_the_limit(
    simulator: Simulator, tmp_path: Path
) -> None:
    limit = ONE * FITS
    storm_config(tmp_path, simulator, limit)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=1500)
    gate = start_tollgate(tmp_path, "--workers", "2")
    try:
        every = [gate.process.pid, *workers_of(gate.process.pid)]
        asyncio.run(storm_then_kill(gate, gate.url, every, 200))
        gate.process.wait()
        simulator.configure(latency_ms=0)
        again = start_tollgate(tmp_path, "--workers", "2")
        try:
            wait_for_no_reservation(again)
            check_ledger(again, simulator, limit, billed_before)
        finally:
            again.stop()
    finally:
        simulator.configure(latency_ms=0)
        gate.stop()


def test_a_database_outage_mid_storm_over_two_replicas_leaves_spend_within_the_limit(
    simulator: Simulator, tmp_path: Path, cluster: pg.Cluster
) -> None:
    from proxy.ledger import migrate_ledger

    pg.run(migrate_ledger(cluster.url))
    limit = ONE * FITS
    storm_config(tmp_path, simulator, limit)
    billed_before = len(simulator.billing())
    simulator.configure(latency_ms=1500)
    replicas = [start_tollgate(tmp_path, ledger_url=cluster.url) for _ in range(2)]
    try:

        async def storm() -> None:
            async def outage() -> None:
                reserved = "SELECT count(*) AS n FROM requests WHERE state = 'reserved'"
                while (await asyncio.to_thread(replicas[0].query, reserved))[0]["n"] < 5:
                    await asyncio.sleep(0.02)
                await asyncio.to_thread(cluster.stop)
                await asyncio.sleep(2)
                await asyncio.to_thread(cluster.start)

            await asyncio.gather(*(fire(r.url, 150) for r in replicas), outage())

        asyncio.run(storm())
        simulator.configure(latency_ms=0)
        wait_for_no_reservation(replicas[0])
        check_ledger(replicas[0], simulator, limit, billed_before)
    finally:
        simulator.configure(latency_ms=0)
        for replica in replicas:
            replica.stop()
