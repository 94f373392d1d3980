"""Retries never pay twice, end to end, as the official SDKs retry: the Python SDK
(generation, edit, Responses) and the Node SDK, each with a timeout shorter than the
upstream's rendering, pay for one image; a background Responses request is created once.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    wait_for,
)
from tests.responses_e2e import (
    NODE_PROJECT,
    node_sdk,
)
from tests.retries_e2e import (
    IMAGE,
    LATENCY_MS,
    TIMEOUT_S,
    TOOL,
    clean,
    decodable,
    fresh,
    gate,
    one_charge,
    png,
    sdk,
    settled,
    sim,
)

__all__ = ["clean", "fresh", "gate", "sim"]  # the shared fixtures


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


def test_a_retried_response_that_makes_no_image_is_recorded_under_no_image_model(
    clean: Tollgate, sim: Simulator
) -> None:
    """Without the image tool, the first attempt and its replays alike name no image
    model, quality or size (each named the default image model, gpt-image-2)."""
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).responses.with_raw_response.create(
        model="gpt-5.5", input="A haiku about the sea, retried", max_output_tokens=300
    )
    assert raw.parse().status == "completed"
    rows = settled(clean, 2)
    first = one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip
    assert first["cost_nanos"] == first["mainline_cost_nanos"]
    for row in rows:
        assert (row["model"], row["model_requested"], row["quality"], row["size"]) == (
            (None,) * 4
        ), row["outcome"]
        assert row["mainline_model"] == "gpt-5.5"


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


# -- 3. a background response is created once -------------------------------------------------


def create_background(client: openai.OpenAI, prompt: str, **options: Any) -> Any:
    """A background Responses request with the image tool, raw (its headers readable)."""
    return client.responses.with_raw_response.create(
        model="gpt-5.5",
        input=prompt,
        tools=[TOOL],  # type: ignore[list-item]
        max_output_tokens=300,
        max_tool_calls=1,
        background=True,
        **options,
    )


def polled_to_its_end(client: openai.OpenAI, response_id: str) -> Any:
    def ended() -> Any:
        found = client.responses.retrieve(response_id)
        return found if found.status not in ("queued", "in_progress") else None

    return wait_for("the background response ended", ended)


def test_a_background_create_retried_after_timeout_is_one_response_paid_once(
    clean: Tollgate, sim: Simulator
) -> None:
    """The create itself is slow (OpenAI queues it first): the SDK times out and retries.
    The retry gets the response the first created, not a second one, and polling it works."""
    sim.configure(queue_ms=2000, latency_ms=1000)
    client = sdk(clean)
    raw = create_background(client, "A harbour at dawn, created in the background")
    queued = raw.parse()
    assert queued.status in ("queued", "in_progress")
    first_id = raw.headers["x-tollgate-replay-of"]
    assert raw.headers["x-tollgate-cost-usd"] == "0"
    assert clean.row(first_id)["response_id"] == queued.id
    done = polled_to_its_end(sdk(clean, timeout=30), queued.id)
    assert done.status == "completed" and done.id == queued.id
    calls = [o for o in done.output if o.type == "image_generation_call"]
    assert calls and decodable(calls[0].result)  # type: ignore[union-attr]
    rows = settled(clean, 2)
    first = one_charge(clean, sim, raw.headers["x-tollgate-request-id"], first_id, len(rows))
    assert first["response_id"] == queued.id
    assert [a["raw_path"] for a in arrivals_of(sim, "POST")] == ["/v1/responses"]


def test_a_background_create_sent_twice_with_one_key_is_answered_at_once_with_the_first(
    clean: Tollgate, sim: Simulator
) -> None:
    """The first's create was answered (queued) and its reservation is held until the
    response ends: the repeat does not wait for that end, it gets the create's answer."""
    sim.configure(latency_ms=60_000)  # the response runs for a minute
    client = sdk(clean, timeout=30)
    key = {"Idempotency-Key": "background-1"}
    prompt = "A glacier at noon, created twice"
    first = create_background(client, prompt, extra_headers=key)
    again = create_background(client, prompt, extra_headers=key)
    assert again.parse().id == first.parse().id
    assert again.parse().model_dump() == first.parse().model_dump()
    assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
    held = clean.row(first.headers["x-tollgate-request-id"])
    assert (held["state"], held["held"]) == ("reserved", 1), "the first still runs"
    retrieved = client.responses.retrieve(first.parse().id)
    assert retrieved.status in ("queued", "in_progress")
    client.responses.cancel(first.parse().id)
    assert len(arrivals_of(sim, "POST", "/v1/responses")) == 1


def arrivals_of(sim: Simulator, method: str, path: str | None = None) -> list[dict[str, Any]]:
    """The requests that reached the simulated API with that method (and path)."""
    found = httpx.get(f"{sim.url}/_sim/arrivals").json()["requests"]
    return [
        a for a in found
        if a["method"] == method and a["raw_path"].startswith("/v1/")
        and (path is None or a["raw_path"] == path)
    ]  # fmt: skip
