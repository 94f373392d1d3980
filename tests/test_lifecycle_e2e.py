"""A running Tollgate's life: readiness, passthrough paths, metrics, graceful shutdown."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    output,
    start_tollgate,
    write_config,
)
from tests.test_proxy_e2e import expected_cost


@pytest.fixture
def proxy(simulator: Simulator, tmp_path: Path) -> Iterator[Tollgate]:
    write_config(tmp_path, f"{simulator.url}/v1", settings="""
passthrough:
  - /v1/organization/costs
""")  # fmt: skip
    tollgate = start_tollgate(tmp_path)
    yield tollgate
    tollgate.stop()


def test_readyz_and_healthz(proxy: Tollgate) -> None:
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{proxy.url}/readyz").json() == {"status": "ready"}


def test_passthrough_paths_are_forwarded_for_teams_with_the_upstream_key(proxy: Tollgate) -> None:
    answer = httpx.get(
        f"{proxy.url}/v1/organization/costs",
        params={"start_time": 0, "bucket_width": "1d", "limit": 1},
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["object"] == "page"
    assert answer.headers["x-tollgate-team"] == "design"
    anonymous = httpx.get(f"{proxy.url}/v1/organization/costs", params={"start_time": 0})
    assert anonymous.status_code == 401
    assert httpx.get(f"{proxy.url}/v1/organization/usage/images").status_code == 404


def test_metrics_count_what_the_ledger_records(proxy: Tollgate, simulator: Simulator) -> None:
    raw = proxy.client().images.with_raw_response.generate(
        model="gpt-image-2", prompt="m", quality="low", size="1024x1024"
    )
    cost = expected_cost(simulator.record(raw.headers["x-request-id"]))
    text = httpx.get(f"{proxy.url}/metrics").text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("tollgate_cost_usd_total{") and 'team="design"' in line
    )
    assert Decimal(line.rsplit(" ", 1)[1]).quantize(Decimal("1e-9")) == cost


def stopped_mid_request(proxy: Tollgate, simulator: Simulator) -> list[object]:
    """SIGTERM sent while a slow generation is in flight (reserved in the ledger), the
    process waited for: what the client got (its answer, or the error it raised)."""
    simulator.configure(latency_ms=1500)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(
                proxy.client().images.generate(
                    model="gpt-image-2", prompt="slow", quality="low", size="1024x1024"
                )
            )
        except openai.APIError as exc:
            results.append(exc)

    try:
        caller = threading.Thread(target=call)
        caller.start()
        # Wait until the request is reserved in the ledger, then ask Tollgate to stop.
        deadline = time.monotonic() + 60
        while not proxy.rows():
            assert time.monotonic() < deadline, "the request was never reserved"
            threading.Event().wait(0.02)
        proxy.process.send_signal(signal.SIGTERM)
        caller.join(timeout=60)
        proxy.process.wait(timeout=60)
    finally:
        simulator.configure(latency_ms=0)
    return results


def test_sigterm_lets_in_flight_requests_finish_and_settle(
    proxy: Tollgate, simulator: Simulator
) -> None:
    results = stopped_mid_request(proxy, simulator)
    assert results and not isinstance(results[0], Exception), results
    row = proxy.rows()[-1]
    assert row["state"] == "settled" and row["outcome"] == "ok" and row["cost_nanos"] > 0


def test_a_process_stopped_by_sigterm_writes_its_last_log_lines(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """uvicorn ends by raising SIGTERM again, which skips `atexit`: the lines logged in the
    last moments (the request settled while stopping, uvicorn's own) went with it."""
    stopped_mid_request(proxy, simulator)
    request_id = proxy.rows()[-1]["id"]
    lines = [json.loads(line) for line in output(proxy.process).splitlines() if line[:1] == "{"]
    assert any(line.get("request_id") == request_id for line in lines)
    messages = [line.get("message") for line in lines]
    assert "Waiting for application shutdown." in messages  # just before the lifespan ends


def test_a_process_stopped_by_sigterm_writes_uvicorns_last_lines(proxy: Tollgate) -> None:
    """uvicorn says it has shut down after the lifespan ends, just before it raises SIGTERM
    again: those lines are written too, the last a stopped server writes."""
    client = proxy.client()
    assert client.images.generate(model="gpt-image-2", prompt="one", size="1024x1024").data
    proxy.process.send_signal(signal.SIGTERM)
    proxy.process.wait(timeout=60)
    lines = [json.loads(line) for line in output(proxy.process).splitlines() if line[:1] == "{"]
    messages = [line.get("message") for line in lines]
    assert "Application shutdown complete." in messages
    assert f"Finished server process [{proxy.process.pid}]" in messages
