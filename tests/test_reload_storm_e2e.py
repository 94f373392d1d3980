"""Reloads and stops under load: a worker replaced at a reload, or a server stopped by
SIGTERM, breaks no client's request or connection, and every request is settled once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx

from tests.conftest import Simulator, Tollgate, output, start_tollgate, workers_of, write_config

ADMIN = "admin-reload-token"


def reload(gate: Tollgate) -> None:
    answer = httpx.post(
        f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}, timeout=60
    )
    assert answer.status_code == 200, answer.text


def test_a_reload_waits_for_a_worker_slow_to_start(simulator: Simulator, tmp_path: Path) -> None:
    """A new worker registers in the ledger before it serves: with the ledger's write lock
    held for longer than uvicorn's 5 s health check, the supervisor used to kill it as
    hung and keep the old worker, under the old configuration."""
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n")
    gate = start_tollgate(tmp_path, "--workers", "2")
    try:
        before = set(workers_of(gate.process.pid))
        with sqlite3.connect(tmp_path / "tollgate.db", isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")  # the write lock every worker's writes wait for
            reload(gate)
            time.sleep(8)
            db.execute("ROLLBACK")
        deadline = time.monotonic() + 90
        while (now := set(workers_of(gate.process.pid))) & before or len(now) != 2:
            assert time.monotonic() < deadline, output(gate.process)
            time.sleep(0.2)
    finally:
        log = gate.stop()
    assert "not ready in time" not in log and "died" not in log
