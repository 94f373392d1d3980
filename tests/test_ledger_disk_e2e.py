"""The SQLite ledger's disk refusing writes (full, or past the file size the process may
write) while a request is in flight: its settlement is retried, as through a database
server's restart, and the request charged its metered cost once the disk takes writes.
Its WAL file removed from under the proxy: no row is lost, nothing more is forwarded."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Simulator, start_tollgate, write_config


def test_a_settlement_waits_for_a_disk_that_refuses_writes_for_a_while(
    simulator: Simulator, tmp_path: Path
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1")
    gate = start_tollgate(tmp_path)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(
                gate.client()
                .images.with_raw_response.generate(
                    model="gpt-image-2", prompt="disk", quality="low", size="1024x1024"
                )
                .headers["x-tollgate-request-id"]
            )
        except openai.APIError as exc:
            results.append(exc)

    wal = tmp_path / "tollgate.db-wal"
    simulator.configure(latency_ms=1500)
    caller = threading.Thread(target=call)
    try:
        caller.start()
        deadline = time.monotonic() + 60
        while not gate.query("SELECT id FROM requests WHERE state = 'reserved'"):
            assert time.monotonic() < deadline, "the request was never reserved"
            time.sleep(0.02)
        # From now on the server may not write past the WAL's end: its next write fails
        # with EFBIG (Python ignores SIGXFSZ), as on a full disk.
        unlimited = resource.prlimit(gate.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(
            gate.process.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, unlimited[1])
        )
        time.sleep(2.0)  # the answer has come (1.5 s) and its settlement failed
        assert gate.query("SELECT state FROM requests")[0]["state"] == "reserved"
        ready = httpx.get(f"{gate.url}/readyz")  # every new request would get 503
        assert ready.status_code == 503 and "ledger writes failing" in ready.text
        resource.prlimit(gate.process.pid, resource.RLIMIT_FSIZE, unlimited)
        caller.join(timeout=60)
        assert httpx.get(f"{gate.url}/readyz").status_code == 200
    finally:
        simulator.configure(latency_ms=0)
        log = gate.stop()
    [request_id] = results
    assert isinstance(request_id, str), request_id
    [row] = gate.query("SELECT * FROM requests")
    assert row["id"] == request_id and row["state"] == "settled", log
    assert row["outcome"] == "ok" and not row["flagged"] and row["cost_nanos"] > 0
    assert "ledger unavailable while settling" in log
    [usage] = gate.query(
        "SELECT spent_nanos, reserved_nanos FROM budget_usage "
        "WHERE scope = 'organization' AND period = 'total'"
    )
    assert (usage["spent_nanos"], usage["reserved_nanos"]) == (row["cost_nanos"], 0)


@pytest.mark.parametrize("removed", ["-wal", "-shm"])
def test_a_wal_removed_under_the_proxy_loses_no_row_and_nothing_more_is_forwarded(
    simulator: Simulator, tmp_path: Path, removed: str
) -> None:
    """The WAL file removed while the proxy has it open (a cleanup of `-wal` files): its
    commits went on into a file no other process saw, all lost at a `kill -9` with the rows
    written before it (the database file had none yet), and the proxy went on forwarding.
    Its index (`-shm`) removed: the next process to open the database (a report) made its
    own, and reset the WAL under the proxy's commits as it closed. Now what the WAL holds is
    saved into the database file and every write is refused."""
    write_config(tmp_path, f"{simulator.url}/v1")
    gate = start_tollgate(tmp_path)
    ask = {"model": "gpt-image-2", "prompt": "wal", "quality": "low", "size": "1024x1024"}
    try:
        client = gate.client()
        answer = client.images.with_raw_response.generate(**ask)  # type: ignore[arg-type]
        first = answer.headers["x-tollgate-request-id"]
        billed = len(simulator.billing())
        (tmp_path / f"tollgate.db{removed}").unlink()
        with pytest.raises(openai.InternalServerError) as refused:
            client.images.generate(**ask)  # type: ignore[arg-type]
        assert refused.value.status_code == 503
        assert refused.value.code == "service_unavailable"
        assert len(simulator.billing()) == billed  # never forwarded
        ready = httpx.get(f"{gate.url}/readyz")
        assert ready.status_code == 503 and "ledger writes failing" in ready.text
    finally:
        gate.process.kill()  # a crash: nothing closes the connections or checkpoints
        gate.process.wait()
    [row] = gate.query("SELECT * FROM requests")
    assert row["id"] == first and row["state"] == "settled" and row["cost_nanos"] > 0
    restarted = start_tollgate(tmp_path)
    try:
        again = restarted.client().images.with_raw_response.generate(**ask)  # type: ignore[arg-type]
        assert again.http_response.status_code == 200
    finally:
        restarted.stop()
    assert [r["state"] for r in restarted.rows()] == ["settled", "settled"]
