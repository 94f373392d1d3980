"""Retries never pay twice, end to end, as the official SDKs retry: the Python SDK
(generation, edit, Responses) and the Node SDK, each with a timeout shorter than the
upstream's rendering, pay for one image.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
)
from tests.responses_e2e import NODE_PROJECT, node_sdk
from tests.retries_e2e import (
    IMAGE,
    LATENCY_MS,
    TIMEOUT_S,
    TOOL,
    body,
    calm,
    decodable,
    emptied,
    one_charge,
    own_simulator,
    png,
    post,
    sdk,
    serve_gate,
    settled,
    stream_events,
    wait_for,
)


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    yield from own_simulator()


@pytest.fixture(scope="module")
def gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    yield from serve_gate(sim, tmp_path_factory)


@pytest.fixture(autouse=True)
def fresh(sim: Simulator) -> Iterator[None]:
    yield from calm(sim)


@pytest.fixture
def clean(gate: Tollgate) -> Tollgate:
    return emptied(gate)


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


# -- 2. the Node SDK -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["generate", "edit", "responses"])
def test_node_sdk_retried_after_timeout_pays_once(
    clean: Tollgate, sim: Simulator, kind: str
) -> None:
    node = node_sdk()
    sim.configure(latency_ms=LATENCY_MS)
    ran = subprocess.run(
        [node, str(NODE_PROJECT / "retries.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{clean.url}/v1",
            "TOLLGATE_API_KEY": DESIGN_KEY,
            "RETRY_KIND": kind,
            "PROMPT": f"A lighthouse, retried from Node ({kind})",
            "TIMEOUT_MS": str(int(TIMEOUT_S * 1000)),
        },
    )
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout)
    decodable(got["b64"])
    assert got["cost_usd"] == "0"
    rows = settled(clean, 2)
    first = one_charge(clean, sim, got["request_id"], got["replay_of"], len(rows))
    retried = [a["headers"].get("x-stainless-retry-count") for a in sim.billing()]
    assert retried == ["0"], "only the first attempt reaches the upstream"
    if kind == "responses":
        assert first["response_id"] == got["id"]
