"""Retries never pay twice, end to end: the official SDKs (Python and Node) with a timeout
shorter than the upstream's rendering → Tollgate → the simulator.

The oracle is the simulator's billing record (what OpenAI would have charged), priced
from the price book's rates without Tollgate's meter; the ledger must show one charge
(`ok`, that cost) and every other attempt `replayed` at no cost.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)
from tests.test_proxy_e2e import expected_cost
from tests.test_responses_e2e import record_cost

T = TypeVar("T")
DEADLINE_S = 60.0
LATENCY_MS = 2500
"""The simulator's rendering time: longer than the clients' timeout."""
TIMEOUT_S = 1.0
IMAGE = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}
TOOL = {"type": "image_generation", **IMAGE}


# -- waiting and the oracle ----------------------------------------------------------


def wait_for(what: str, found: Callable[[], T | None], timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


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


def nanos(usd: Decimal | str) -> int:
    return int(Decimal(usd) * 10**9)


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


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    """A simulator of this module's own: its billing record is this module's alone."""
    simulator = start_simulator()
    yield simulator
    stop(simulator.process)


def configure(root: Path, sim: Simulator, settings: str = "", timeout_s: float = 10) -> None:
    write_config(root, f"{sim.url}/v1", settings=settings)
    config = root / "tollgate.yaml"
    config.write_text(config.read_text().replace("timeout_s: 3", f"timeout_s: {timeout_s}"))


@pytest.fixture(scope="module")
def gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("retries")
    configure(root, sim)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def fresh(sim: Simulator) -> Iterator[None]:
    """Each test starts with an empty billing record and a calm simulator."""
    calm = {"latency_ms": 0, "payload_bytes": 0, "fault": None}
    sim.configure(**calm)
    httpx.post(f"{sim.url}/_sim/reset").raise_for_status()
    yield
    sim.configure(**calm)


@pytest.fixture
def clean(gate: Tollgate) -> Tollgate:
    """The module's Tollgate with an empty ledger of requests (rows are counted per test)."""
    wait_for("nothing in flight", lambda: all(r["state"] == "settled" for r in gate.rows()) or None)
    gate.query("DELETE FROM requests")
    gate.query("DELETE FROM kept_answers")
    return gate


# -- 1. the Python SDK: one image, one charge ------------------------------------------


def test_python_sdk_generation_retried_after_timeout_pays_once(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).images.with_raw_response.generate(prompt="A lighthouse, retried", **IMAGE)
    image = raw.parse()
    assert image.data is not None
    assert decodable(image.data[0].b64_json) == (1024, 1024)
    assert raw.headers["x-tollgate-cost-usd"] == "0"
    rows = settled(clean, 2)
    one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip


def test_python_sdk_edit_retried_with_a_new_boundary_pays_once(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).images.with_raw_response.edit(
        image=("in.png", png(), "image/png"), prompt="Paint it blue, retried", **IMAGE
    )
    image = raw.parse()
    assert image.data is not None
    decodable(image.data[0].b64_json)
    rows = settled(clean, 2)
    one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip


def test_python_sdk_responses_request_retried_pays_once(clean: Tollgate, sim: Simulator) -> None:
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).responses.with_raw_response.create(
        model="gpt-5.5",
        input="A harbour at dawn, retried",
        tools=[TOOL],  # type: ignore[list-item]
        max_output_tokens=300,
        max_tool_calls=1,
    )
    response = raw.parse()
    calls = [o for o in response.output if o.type == "image_generation_call"]
    assert calls and decodable(calls[0].result)  # type: ignore[union-attr]
    rows = settled(clean, 2)
    first = one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip
    assert first["response_id"] == response.id


def stream_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def test_a_stream_whose_reader_timed_out_is_replayed_as_its_events(
    clean: Tollgate, sim: Simulator
) -> None:
    """The SDK retries a stream only until its headers arrive; a reader that times out
    mid-stream raises (not retried by the SDK). Its events are kept, and its retry (the
    same body, `x-stainless-retry-count: 1`) gets them, whole, at no cost."""
    sim.configure(latency_ms=LATENCY_MS)
    asked = {**body("A kite, streamed and retried"), "stream": True, "partial_images": 1}
    client = sdk(clean)
    got: list[str] = []
    with pytest.raises((openai.APITimeoutError, httpx.TimeoutException)):
        for event in client.images.generate(**asked):  # type: ignore[call-overload]
            got.append(event.type)
    first = wait_for("the first stream settled", lambda: settled(clean, 1)[0])
    assert first["outcome"] == "ok"
    replay = post(clean, asked, retry=1)
    assert replay is not None and replay.status_code == 200
    assert replay.headers["x-tollgate-replay-of"] == first["id"]
    events = stream_events(replay.text)
    kinds = [json.loads(e.split("data: ", 1)[1])["type"] for e in events]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    done = json.loads(events[-1].split("data: ", 1)[1])
    decodable(done["b64_json"])
    one_charge(clean, sim, replay.headers["x-tollgate-request-id"], first["id"], 2)
