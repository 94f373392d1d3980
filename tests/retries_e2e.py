"""What the end-to-end tests of "Retries never pay twice" share: the official SDKs (Python
and Node) or raw POSTs as they send them, with a timeout shorter than the upstream's
rendering → Tollgate → the simulator; the oracle; the waits with deadlines; a simulator and
a Tollgate per test module.

The oracle is the simulator's billing record (what OpenAI would have charged), priced
from the price book's rates without Tollgate's meter; the ledger must show one charge
(`ok`, that cost) and every other attempt `replayed` at no cost.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import (
    DEADLINE_S,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    nanos,
    run_simulator,
    run_tollgate,
    wait_for,
    write_config,
)
from tests.responses_e2e import record_cost
from tests.test_proxy_e2e import expected_cost

T = TypeVar("T")
LATENCY_MS = 2500
"""The simulator's rendering time: longer than the clients' timeout."""
TIMEOUT_S = 1.0
IMAGE = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}
TOOL = {"type": "image_generation", **IMAGE}


# -- waiting and the oracle ----------------------------------------------------------


def charges(sim: Simulator) -> list[dict[str, Any]]:
    """What the simulator billed since it was last reset."""
    return [r for r in sim.billing() if r["billed"]]


def arrivals(sim: Simulator) -> list[dict[str, Any]]:
    return sim.billing()


def settled(gate: Tollgate, count: int, timeout: float = DEADLINE_S) -> list[dict[str, Any]]:
    """The ledger's rows, once there are `count` and every one is settled (and no more
    arrive for a moment)."""

    def done() -> list[dict[str, Any]] | None:
        rows = gate.rows()
        if len(rows) >= count and all(r["state"] == "settled" for r in rows):
            return rows
        return None

    wait_for(f"{count} settled rows", done, timeout)
    time.sleep(0.3)
    return wait_for(f"{count} settled rows", done, timeout)


def one_charge(
    gate: Tollgate, sim: Simulator, answer_id: str, replay_of: str | None, attempts: int
) -> dict[str, Any]:
    """The ledger of one request its client retried: one `ok` row that costs what the
    simulator billed once, every other attempt `replayed` at 0 (the answer's among them,
    naming the first); returns the `ok` row."""
    rows = settled(gate, attempts)
    billed = charges(sim)
    assert len(billed) == 1, billed
    record = billed[0]
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert len(ok) == 1, rows
    first = ok[0]
    assert first["upstream_request_id"] == record["id"]
    cost = record_cost(record) if record["endpoint"] == "responses" else None
    assert first["cost_nanos"] == (cost if cost is not None else nanos(expected_cost(record)))
    assert first["cost_nanos"] > 0
    others = [r for r in rows if r is not first]
    assert others, "no retry reached Tollgate"
    for row in others:
        assert (row["outcome"], row["cost_nanos"], row["flagged"]) == ("replayed", 0, 0), row
        assert row["upstream_request_id"] == first["id"]
    assert replay_of == first["id"]
    assert answer_id in {r["id"] for r in others}
    return first


def decodable(b64: str | None) -> tuple[int, int]:
    assert b64, "no image"
    with Image.open(io.BytesIO(base64.b64decode(b64))) as picture:
        size: tuple[int, int] = picture.size
        return size


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def mask_png() -> bytes:
    """A mask for `png`: its size, transparent where the edit goes."""
    out = io.BytesIO()
    Image.new("RGBA", (64, 48), (0, 0, 0, 0)).save(out, "PNG")
    return out.getvalue()


def body(prompt: str) -> dict[str, Any]:
    return {**IMAGE, "prompt": prompt}


def post(
    gate: Tollgate,
    json_body: dict[str, Any],
    *,
    key: str = DESIGN_KEY,
    retry: int | None = None,
    idempotency: str | None = None,
    timeout: float = DEADLINE_S,
    path: str = "/v1/images/generations",
) -> httpx.Response | None:
    """A raw POST as an SDK sends it (`retry`: its x-stainless-retry-count); None when the
    client gave up waiting (its connection is then closed: the client is gone)."""
    headers = {"authorization": f"Bearer {key}"}
    if retry is not None:
        headers["x-stainless-retry-count"] = str(retry)
    if idempotency is not None:
        headers["idempotency-key"] = idempotency
    try:
        return httpx.post(f"{gate.url}{path}", json=json_body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return None


def sdk(gate: Tollgate, key: str = DESIGN_KEY, **options: Any) -> openai.OpenAI:
    """The official Python client as an application builds it: its default retries."""
    options.setdefault("timeout", TIMEOUT_S)
    return openai.OpenAI(base_url=f"{gate.url}/v1", api_key=key, **options)


def stream_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def in_background(work: Callable[[], T]) -> concurrent.futures.Future[T]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


# -- fixtures ------------------------------------------------------------------------


def configure(
    root: Path,
    sim: Simulator,
    settings: str = "",
    timeout_s: float = 10,
    teams: dict[str, str] | None = None,
) -> None:
    write_config(root, f"{sim.url}/v1", settings=settings, teams=teams)
    config = root / "tollgate.yaml"
    config.write_text(config.read_text().replace("timeout_s: 3", f"timeout_s: {timeout_s}"))


def serve_gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """A Tollgate of the test module's own, in front of `sim`."""
    root = tmp_path_factory.mktemp("retries")
    configure(root, sim)
    yield from run_tollgate(root)


def calm(sim: Simulator) -> Iterator[None]:
    """Each test starts with an empty billing record and a calm simulator."""
    knobs = {"latency_ms": 0, "payload_bytes": 0, "fault": None, "queue_ms": 0}
    sim.configure(**knobs)
    httpx.post(f"{sim.url}/_sim/reset").raise_for_status()
    yield
    sim.configure(**knobs)


def emptied(gate: Tollgate) -> Tollgate:
    """`gate` with an empty ledger of requests (rows are counted per test)."""
    wait_for("nothing in flight", lambda: all(r["state"] == "settled" for r in gate.rows()) or None)
    gate.query("DELETE FROM requests")
    gate.query("DELETE FROM kept_answers")
    gate.query("DELETE FROM kept_chunks")
    return gate


# -- the fixtures of the modules that share one simulator and one Tollgate -----------------
# A module imports them (and lists them in `__all__`): each gets its own of each.


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    yield from run_simulator()


@pytest.fixture(scope="module")
def gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    yield from serve_gate(sim, tmp_path_factory)


@pytest.fixture(autouse=True)
def fresh(sim: Simulator) -> Iterator[None]:
    yield from calm(sim)


@pytest.fixture
def clean(gate: Tollgate) -> Tollgate:
    return emptied(gate)
