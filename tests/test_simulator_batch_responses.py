"""The simulated Batch API for `/v1/responses`: each line answered with the Responses object
a direct request gets (its usage included), billed at the batch rate in the cost export;
driven by the official openai SDK over loopback."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import httpx
import openai

from proxy.simulator.batch_lines import InputLine
from proxy.simulator.batch_responses import run_response_line
from proxy.simulator.forms import RawRequest
from proxy.simulator.response_tokens import tokens_of
from proxy.simulator.responses import read_order
from tests.test_simulator_batches import API_KEY, DAY, Sim, line, server, sim

__all__ = ["server", "sim"]  # fixtures shared with the image batches' tests

RESPONSES = "/v1/responses"
TOOL = {"type": "image_generation", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


def body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5.5",
        "input": prompt,
        "tools": [TOOL],
        "max_output_tokens": 2000,
        "max_tool_calls": 2,
        **extra,
    }


def test_a_responses_batch_answers_each_line_with_the_direct_responses_object(
    sim: Sim,
) -> None:
    bodies = [body("a lighthouse"), body("two cats [[images:2]]")]
    lines = [line(f"r-{i}", b, RESPONSES) for i, b in enumerate(bodies)]
    batch = sim.wait(sim.batch(lines, endpoint=RESPONSES).id)
    assert (batch.status, batch.endpoint, batch.model) == ("completed", RESPONSES, "gpt-5.5")
    out = sim.lines(batch.output_file_id)
    assert [o["custom_id"] for o in out] == ["r-0", "r-1"]
    for output, sent in zip(out, bodies, strict=True):
        tokens = tokens_of(read_order(sent))
        response = output["response"]
        assert response["status_code"] == 200
        found = response["body"]
        assert found["object"] == "response" and found["status"] == "completed"
        calls = [i for i in found["output"] if i["type"] == "image_generation_call"]
        assert len(calls) == read_order(sent).image_calls
        assert found["usage"]["input_tokens"] == tokens.mainline.input
        assert found["usage"]["output_tokens"] == tokens.mainline.output
        image_gen = found["tool_usage"]["image_gen"]
        assert image_gen["output_tokens"] == tokens.image_gen.image_output
    [first, second] = sim.billing()
    assert (first["endpoint"], first["batch_id"], first["custom_id"]) == (
        "responses",
        batch.id,
        "r-0",
    )
    assert first["mainline_model"] == "gpt-5.5" and second["images"] == 2


def test_a_responses_line_that_cannot_run_in_a_batch_is_an_error_line(sim: Sim) -> None:
    lines = [
        line("stream", body("x", stream=True), RESPONSES),
        line("bg", body("x", background=True), RESPONSES),
        line("ok", body("a fox"), RESPONSES),
        line("tool", body("x", tools=[{**TOOL, "model": "gpt-image-2.6-flare"}]), RESPONSES),
    ]
    batch = sim.wait(sim.batch(lines, endpoint=RESPONSES).id)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    errors = {e["custom_id"]: e["response"] for e in sim.lines(batch.error_file_id)}
    statuses = {k: v["status_code"] for k, v in errors.items()}
    assert statuses == {"stream": 400, "bg": 400, "tool": 400}
    assert "Streaming" in errors["stream"]["body"]["error"]["message"]
    assert [b["billed"] for b in sim.billing()] == [False, False, True, False]


def test_a_nousage_marker_drops_the_lines_usage_but_it_is_billed() -> None:
    raw = RawRequest("responses", "json", body("a fox [[fault:nousage]]"))
    result = run_response_line(InputLine("a", raw))
    found = result.body(created=0, padding=0, request_id="req_1")
    assert result.billed and found["usage"] is None and found["tool_usage"] is None


def test_responses_batch_lines_are_billed_at_half_the_rates(server: str) -> None:
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/reset").raise_for_status()
        knobs = {"fault": None, "batch_delay_ms": 50, "batch_window_ms": DAY * 1000}
        http.post("/_sim/config", json=knobs).raise_for_status()
    client = openai.OpenAI(
        base_url=f"{server}/v1", api_key=API_KEY, admin_api_key=API_KEY, max_retries=0
    )
    with client, httpx.Client(base_url=server) as http:
        sim = Sim(http, client)
        sent = body("a sunburst over the sea")
        sim.wait(sim.batch([line("a", sent, RESPONSES)], endpoint=RESPONSES).id)
        page = client.admin.organization.usage.costs(
            start_time=int(time.time()) - 3600, group_by=["line_item"], limit=1
        )
        found = {}
        for result in page.data[0].results:
            assert result.amount is not None
            found[result.line_item] = (Decimal(str(result.amount.value)), result.quantity)
    tokens = tokens_of(read_order(sent))
    main, tool = tokens.mainline, tokens.image_gen
    assert found["batch api | gpt-5.5, input"][1] == main.input
    assert found["batch api | gpt-5.5, output"] == (
        Decimal(str(float(Decimal("15.00") * main.output / 1_000_000))),
        main.output,
    )
    assert found["batch api | gpt-image-2 image"] == (
        Decimal(str(float(Decimal("15.00") * tool.image_output / 1_000_000))),
        tool.image_output + tool.image_input,
    )
