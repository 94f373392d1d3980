"""Retries never pay twice when the upstream never answered: the official Node SDK retries
a 504 (and its own timeouts), but a request that reached OpenAI and went silent may have
been billed there, and is charged its bound. Its retries must not reach OpenAI again:
Tollgate tells the SDK not to retry (`x-should-retry: false`) and answers a retry that
comes anyway with the first attempt's failure, at no cost.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import DESIGN_KEY, Simulator, Tollgate, run_tollgate
from tests.responses_e2e import NODE_PROJECT, node_sdk
from tests.retries_e2e import configure, emptied, fresh, settled, sim

__all__ = ["fresh", "sim"]  # the shared fixtures

UPSTREAM_TIMEOUT_S = 2
LATENCY_MS = 4000
"""The simulator's rendering time: longer than Tollgate's `upstream.timeout_s`."""


@pytest.fixture(scope="module")
def gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("unanswered")
    configure(root, sim, timeout_s=UPSTREAM_TIMEOUT_S)
    yield from run_tollgate(root)


def node_retrying(gate: Tollgate, kind: str, timeout_ms: int) -> dict[str, Any]:
    """retries.mjs: one request of `kind` from a Node client with its two retries."""
    ran = subprocess.run(
        [node_sdk(), str(NODE_PROJECT / "retries.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{gate.url}/v1",
            "TOLLGATE_API_KEY": DESIGN_KEY,
            "RETRY_KIND": kind,
            "PROMPT": f"A lighthouse the upstream never answers ({kind}, {timeout_ms} ms)",
            "TIMEOUT_MS": str(timeout_ms),
        },
    )
    assert ran.returncode == 0, ran.stderr
    got: dict[str, Any] = json.loads(ran.stdout)
    return got


def upstream_posts(sim: Simulator) -> list[dict[str, Any]]:
    found = httpx.get(f"{sim.url}/_sim/arrivals").json()["requests"]
    return [a for a in found if a["method"] == "POST" and a["raw_path"].startswith("/v1/")]


def charged_once(gate: Tollgate, sim: Simulator, attempts: int) -> dict[str, Any]:
    """The ledger of one request the upstream never answered: one attempt sent upstream,
    charged its bound and flagged; every other attempt `replayed` from it at no cost."""
    rows = settled(gate, attempts)
    assert len(upstream_posts(sim)) == 1, "only the first attempt reaches the upstream"
    charged = [r for r in rows if r["cost_nanos"] > 0]
    assert len(charged) == 1, rows
    [first] = charged
    assert (first["outcome"], first["status"], first["error_code"]) == (
        "upstream_error",
        504,
        "upstream_timeout",
    )
    assert first["flagged"] == 1 and first["cost_nanos"] == first["estimated_nanos"]
    for row in rows:
        if row is not first:
            assert (row["outcome"], row["status"], row["cost_nanos"]) == ("replayed", 504, 0)
            assert row["upstream_request_id"] == first["id"]
    return first


@pytest.mark.parametrize("kind", ["generate", "edit", "responses"])
def test_node_sdk_does_not_retry_a_504_the_upstream_may_have_billed(
    gate: Tollgate, sim: Simulator, kind: str
) -> None:
    """The SDK waits longer than Tollgate waits for the upstream: it gets the 504, which
    would be retried twice (each retry billed again by OpenAI) without `x-should-retry`."""
    emptied(gate)
    sim.configure(latency_ms=LATENCY_MS)
    got = node_retrying(gate, kind, timeout_ms=30_000)
    assert got["error"]["name"] == "InternalServerError"
    assert (got["error"]["status"], got["error"]["type"], got["error"]["code"]) == (
        504,
        "api_error",
        "upstream_timeout",
    )
    assert got["error"]["should_retry"] == "false"
    assert got["attempts"] == [{"retry_count": "0", "status": 504}]
    first = charged_once(gate, sim, 1)
    assert got["error"]["request_id"] == first["id"]


def test_node_sdk_retries_after_its_own_timeout_never_resend_an_unanswered_request(
    gate: Tollgate, sim: Simulator
) -> None:
    """The SDK gives up before Tollgate does, and retries while the first still waits on
    the upstream: when the first fails with a charge, its retries get that failure (no
    cost, `x-tollgate-replay-of`), not a new generation each."""
    emptied(gate)
    sim.configure(latency_ms=LATENCY_MS)
    got = node_retrying(gate, "generate", timeout_ms=1000)
    attempts = got["attempts"]
    assert [a["retry_count"] for a in attempts] == ["0", "1", "2"][: len(attempts)]
    assert len(attempts) >= 2, "the SDK retried"
    first = charged_once(gate, sim, len(attempts))
    if got["error"]["status"] is not None:  # a retry got the first's failure in time
        assert (got["error"]["status"], got["error"]["code"]) == (504, "upstream_timeout")
        assert got["error"]["replay_of"] == first["id"]
        assert got["error"]["should_retry"] == "false"


@pytest.mark.parametrize("timeout_ms", [30_000, 1000])
def test_node_sdk_retries_never_make_a_second_batch_after_a_create_that_timed_out(
    gate: Tollgate, sim: Simulator, timeout_ms: int
) -> None:
    """The upstream reads the input file for longer than Tollgate waits: the create times
    out, and the batch may still be made (and billed) upstream. A retried create, whether
    the SDK got the 504 or gave up first, would make a second batch, billed again."""
    emptied(gate)
    sim.configure(batch_read_ms=LATENCY_MS)
    try:
        got = node_retrying(gate, "batch", timeout_ms=timeout_ms)
    finally:
        sim.configure(batch_read_ms=0)
    uploaded, *creates = got["attempts"]
    assert uploaded == {"retry_count": "0", "status": 200}
    assert [a["retry_count"] for a in creates] == ["0", "1", "2"][: len(creates)]
    if timeout_ms > UPSTREAM_TIMEOUT_S * 1000:
        assert creates == [{"retry_count": "0", "status": 504}]
    if got["error"]["status"] is not None:
        assert (got["error"]["status"], got["error"]["code"]) == (504, "upstream_timeout")
        assert got["error"]["should_retry"] == "false"
    rows = settled(gate, len(creates))
    assert [a["raw_path"] for a in upstream_posts(sim)] == ["/v1/files", "/v1/batches"]
    [first] = [r for r in rows if r["outcome"] != "replayed"]
    assert (first["endpoint"], first["status"]) == ("batches", 504)
    assert first["outcome"] == "upstream_error" and first["flagged"] == 1
    assert first["cost_nanos"] == first["estimated_nanos"] > 0
    for row in rows:
        if row is not first:
            assert (row["status"], row["cost_nanos"]) == (504, 0)
            assert row["upstream_request_id"] == first["id"]
