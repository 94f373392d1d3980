"""The Responses API door end to end through the official openai client: exact cost of
every way a response is asked for, the caps a request leaves open, and a response
belonging to the team that created it.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DESIGN_KEY, RESEARCH_KEY, Simulator, Tollgate, nanos, wait_for
from tests.responses_e2e import (
    KEYS,
    PAIRS,
    arrivals,
    billed,
    calm,
    check_charge,
    json_cost,
    proxy,
    record_cost,
    rows_of,
    settled_row,
    tool,
)

__all__ = ["calm", "proxy"]  # the shared fixtures


# -- 1. exact cost, every way a response is asked for ------------------------------------


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_plain_response_costs_its_usage_plus_its_tool_usage(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model=mainline,
        input="A lighthouse at dawn [[images:2]]",
        tools=[tool(image_model)],
        max_output_tokens=400,
        max_tool_calls=2,
    )
    body = json.loads(raw.content)
    assert len([o for o in body["output"] if o["type"] == "image_generation_call"]) == 2
    assert raw.headers["x-tollgate-team"] == "design"
    assert "x-tollgate-downgraded" not in raw.headers
    row = check_charge(proxy, simulator, body["id"], mainline, image_model)
    assert json_cost(body, image_model) == row["cost_nanos"]
    assert nanos(raw.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    assert row["id"] == raw.headers["x-tollgate-request-id"]


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_stream_created_with_stream_true_is_settled_from_its_completed_event(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model=mainline,
        input="A harbour at night",
        tools=[tool(image_model, partial_images=2)],
        max_output_tokens=300,
        max_tool_calls=1,
        stream=True,
    )
    events = list(raw.parse())
    kinds = collections.Counter(e.type for e in events)
    assert kinds["response.image_generation_call.partial_image"] == 2
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    response = completed[0].response  # type: ignore[union-attr]
    row = check_charge(proxy, simulator, response.id, mainline, image_model)
    assert json_cost(response.model_dump(mode="json"), image_model) == row["cost_nanos"]
    assert nanos(raw.headers["x-tollgate-reserved-usd"]) == row["estimated_nanos"]
    assert billed(simulator, response.id)["usage"]["image_output"] >= 200  # the partials


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_stream_through_the_sdk_stream_helper_is_settled_exactly(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    with proxy.client().responses.stream(
        model=mainline,
        input="A kite over the dunes",
        tools=[tool(image_model, partial_images=1)],
        max_output_tokens=300,
        max_tool_calls=1,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.status == "completed"
    check_charge(proxy, simulator, final.id, mainline, image_model)


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_background_response_is_held_then_settled_when_it_ends(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    simulator.configure(latency_ms=1500)
    sdk = proxy.client()
    raw = sdk.responses.with_raw_response.create(
        model=mainline,
        input="A glacier at noon",
        tools=[tool(image_model)],
        max_output_tokens=300,
        max_tool_calls=1,
        background=True,
    )
    queued = raw.parse()
    assert queued.status in ("queued", "in_progress")
    [held] = rows_of(proxy, queued.id)
    assert (held["state"], held["held"]) == ("reserved", 1)
    assert nanos(raw.headers["x-tollgate-reserved-usd"]) == held["estimated_nanos"]

    def ended() -> Any:
        found = sdk.responses.retrieve(queued.id)
        return found if found.status not in ("queued", "in_progress") else None

    assert wait_for("the response ended", ended).status == "completed"
    check_charge(proxy, simulator, queued.id, mainline, image_model)


def test_a_background_response_on_the_simulators_own_knobs_is_held_and_cancellable(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Without latency, as `serve --simulate` runs it, a background response is queued when
    created (OpenAI answers every background create so): held, then cancelled, charged
    what it billed."""
    sdk = proxy.client()
    raw = sdk.responses.with_raw_response.create(
        model="gpt-5.5",
        input="A lantern at dusk",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
        background=True,
    )
    queued = raw.parse()
    assert queued.status == "queued"
    assert "x-tollgate-reserved-usd" in raw.headers and "x-tollgate-cost-usd" not in raw.headers
    assert sdk.responses.cancel(queued.id).status == "cancelled"
    row = settled_row(proxy, queued.id)  # a cancelled response: charged what it billed
    assert row["cost_nanos"] == record_cost(billed(simulator, queued.id)) > 0
    assert (row["outcome"], row["flagged"], row["held"]) == ("upstream_error", 0, 0)
    assert row["cost_nanos"] < nanos(raw.headers["x-tollgate-reserved-usd"])


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_continued_response_pays_for_the_context_it_carries(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    sdk = proxy.client()
    first = sdk.responses.create(
        model=mainline,
        input="A red bicycle",
        tools=[tool(image_model)],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    raw = sdk.responses.with_raw_response.create(
        model=mainline,
        input="Now make it blue",
        previous_response_id=first.id,
        tools=[tool(image_model)],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    body = json.loads(raw.content)
    assert body["previous_response_id"] == first.id
    check_charge(proxy, simulator, first.id, mainline, image_model)
    row = check_charge(proxy, simulator, body["id"], mainline, image_model)
    assert json_cost(body, image_model) == row["cost_nanos"]
    assert nanos(raw.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]
    # The first response's tokens are billed again as the second's input.
    assert first.usage is not None
    carried = first.usage.input_tokens + first.usage.output_tokens
    assert billed(simulator, body["id"])["mainline"]["input"] > carried


@pytest.mark.parametrize(("mainline", "image_model"), PAIRS)
def test_a_long_conversation_pays_its_cached_context_at_the_cached_rate(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str
) -> None:
    sdk = proxy.client()
    previous: str | None = None
    for turn in range(4):
        raw = sdk.responses.with_raw_response.create(
            model=mainline,
            input=f"Turn {turn}: " + "a long description of a harbour town. " * 120,
            tools=[tool(image_model)],
            max_output_tokens=300,
            max_tool_calls=1,
            **({"previous_response_id": previous} if previous else {}),
        )
        body = json.loads(raw.content)
        row = check_charge(proxy, simulator, body["id"], mainline, image_model)
        assert json_cost(body, image_model) == row["cost_nanos"]
        cached = body["usage"]["input_tokens_details"]["cached_tokens"]
        assert row["mainline_cached_input_tokens"] == cached
        assert (cached > 0) == (turn > 0)  # the carried context is cached from turn 1
        previous = body["id"]


def test_the_beta_path_is_the_same_door(proxy: Tollgate, simulator: Simulator) -> None:
    answer = httpx.post(
        f"{proxy.url}/v1/responses?beta=true",
        headers={"authorization": f"Bearer {DESIGN_KEY}", "openai-beta": "responses=v1"},
        json={
            "model": "gpt-5.5",
            "input": "A lighthouse, in beta",
            "tools": [tool()],
            "max_output_tokens": 300,
            "max_tool_calls": 1,
        },
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    row = check_charge(proxy, simulator, answer.json()["id"], "gpt-5.5", "gpt-image-2")
    assert nanos(answer.headers["x-tollgate-cost-usd"]) == row["cost_nanos"]


# -- 2. the caps a request leaves open ---------------------------------------------------


def test_open_caps_are_injected_named_and_sent_upstream(
    proxy: Tollgate, simulator: Simulator
) -> None:
    for key, output, calls in ((DESIGN_KEY, 8192, 1), (KEYS["capped"], 600, 2)):
        raw = proxy.client(key).responses.with_raw_response.create(
            model="gpt-4.1-mini", input="A lantern", tools=[tool()]
        )
        assert raw.headers["x-tollgate-downgraded"] == (
            f"max_output_tokens=unset->{output}; max_tool_calls=unset->{calls}"
        )
        body = json.loads(raw.content)
        assert (body["max_output_tokens"], body["max_tool_calls"]) == (output, calls)
        params = billed(simulator, body["id"])["params"]
        assert (params["max_output_tokens"], params["max_tool_calls"]) == (output, calls)
        assert params["service_tier"] == "default"  # never the project's own setting
        row = check_charge(proxy, simulator, body["id"], "gpt-4.1-mini", "gpt-image-2")
        assert row["n"] == calls


def test_a_team_that_refuses_unbounded_requests_gets_400_naming_the_bound(
    proxy: Tollgate, simulator: Simulator
) -> None:
    sdk = proxy.client(KEYS["strict"])
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(
            model="gpt-4.1-mini", input="A lantern", tools=[tool()], max_tool_calls=1
        )
    assert caught.value.code == "invalid_request"
    assert caught.value.param == "max_output_tokens"  # type: ignore[attr-defined]
    assert "max_output_tokens" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(
            model="gpt-4.1-mini", input="A lantern", tools=[tool()], max_output_tokens=300
        )
    assert "max_tool_calls" in caught.value.message
    assert len(arrivals(simulator)) == before  # nothing was forwarded
    fine = sdk.responses.create(
        model="gpt-4.1-mini",
        input="A lantern",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    check_charge(proxy, simulator, fine.id, "gpt-4.1-mini", "gpt-image-2")


def test_a_tool_without_a_model_gets_the_default_model(
    proxy: Tollgate, simulator: Simulator
) -> None:
    raw = proxy.client().responses.with_raw_response.create(
        model="gpt-5.5",
        input="A windmill",
        tools=[tool(None)],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    assert raw.headers["x-tollgate-model"] == "gpt-image-2"  # the configured default_model
    # Written into the forwarded tool, and so named as every injected value (SPEC 11.1).
    assert raw.headers["x-tollgate-downgraded"] == "tools[0].model=unset->gpt-image-2"
    response_id = json.loads(raw.content)["id"]
    assert billed(simulator, response_id)["model"] == "gpt-image-2"
    check_charge(proxy, simulator, response_id, "gpt-5.5", "gpt-image-2")


NO_IMAGE = {
    "no tool": {},
    "streamed": {"stream": True},
    "tool_choice none": {"tools": [tool("gpt-image-1.5")], "tool_choice": "none"},
    "no tool, background": {"background": True},
}


@pytest.mark.parametrize("options", NO_IMAGE.values(), ids=NO_IMAGE.keys())
def test_a_response_that_makes_no_image_is_recorded_and_counted_under_no_image_model(
    proxy: Tollgate, simulator: Simulator, options: dict[str, Any]
) -> None:
    """Without the image tool, or with `tool_choice: none`, only the mainline model runs:
    the row names no image model, quality or size (it named the default image model,
    gpt-image-2, and the metrics counted a request of it), and the metrics labelled by
    model count it under its mainline model."""
    mainline = "gpt-4.1-mini"

    def counted(model: str) -> tuple[float, float]:
        return (
            proxy.metric(
                "tollgate_requests_total",
                team="design", model=model, endpoint="responses", outcome="ok",
            ),
            proxy.metric(
                "tollgate_upstream_request_duration_seconds_count",
                model=model, endpoint="responses",
            ),
        )  # fmt: skip

    before = {m: counted(m) for m in ("gpt-image-2", "gpt-image-1.5", mainline)}
    raw = proxy.client().responses.with_raw_response.create(
        model=mainline, input="A haiku about a bicycle", max_output_tokens=300, **options
    )
    assert "x-tollgate-model" not in raw.headers  # no default written into the request
    if options.get("stream"):
        [done] = [e for e in raw.parse() if e.type == "response.completed"]
        response_id = done.response.id  # type: ignore[union-attr]
    else:
        response_id = json.loads(raw.content)["id"]
    record = billed(simulator, response_id)
    assert record["images"] == 0
    row = settled_row(proxy, response_id)
    assert row["cost_nanos"] == row["mainline_cost_nanos"] == record_cost(record) > 0
    assert (row["flagged"], row["outcome"], row["mainline_model"]) == (0, "ok", mainline)
    image_columns = ("model_requested", "model", "quality_requested", "quality", "size")
    assert [row[c] for c in image_columns] == [None] * 5
    assert row["n"] == 0

    def moved() -> dict[str, tuple[float, float]] | None:
        now = {m: counted(m) for m in before}
        return now if now[mainline] == (before[mainline][0] + 1, before[mainline][1] + 1) else None

    now = wait_for("the request counted", moved)
    assert now["gpt-image-2"] == before["gpt-image-2"]
    assert now["gpt-image-1.5"] == before["gpt-image-1.5"]


@pytest.mark.parametrize(
    ("options", "param"),
    [({"quality": "xhigh"}, "tools[0].quality"), ({"size": "1000x1000"}, "tools[0].size")],
)
def test_a_tool_value_its_model_does_not_take_is_400_naming_the_tools_field(
    proxy: Tollgate, simulator: Simulator, options: dict[str, str], param: str
) -> None:
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        proxy.client().responses.create(
            model="gpt-5.5",
            input="A windmill",
            tools=[tool(**options)],
            max_output_tokens=300,
            max_tool_calls=1,
        )
    assert caught.value.code == "invalid_request"
    assert caught.value.param == param  # type: ignore[attr-defined]
    assert len(arrivals(simulator)) == before  # nothing was forwarded


# -- 3. a response belongs to the team that created it -----------------------------------


def test_another_team_cannot_reach_a_response_and_its_creator_can(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(latency_ms=30_000)  # the background response stays queued
    design = proxy.client()
    created = design.responses.create(
        model="gpt-5.5",
        input="A quiet street",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
        background=True,
    )
    simulator.configure(latency_ms=0)
    research = proxy.client(RESEARCH_KEY)

    def reached() -> int:
        """Arrivals but Tollgate's own polls of the response (a leaked retrieve answers
        200, not the 404 asserted below)."""
        poll = ("GET", f"/v1/responses/{created.id}")
        return sum((a["method"], a["raw_path"]) != poll for a in arrivals(simulator))

    before = reached()
    attempts: list[Callable[[], Any]] = [
        lambda: research.responses.retrieve(created.id),
        lambda: research.responses.cancel(created.id),
        lambda: research.responses.delete(created.id),
        lambda: research.responses.input_items.list(created.id),
        lambda: research.responses.create(
            model="gpt-5.5",
            input="And again",
            previous_response_id=created.id,
            max_output_tokens=300,
        ),
    ]
    for attempt in attempts:
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert created.id in caught.value.message
    assert reached() == before  # nothing reached the upstream
    # The creating team can.
    assert design.responses.retrieve(created.id).status in ("queued", "in_progress")
    items = design.responses.input_items.list(created.id)
    assert [i.type for i in items.data] == ["message"]
    with pytest.raises(openai.BadRequestError) as refused:  # not ended: cancel it first
        design.responses.delete(created.id)
    assert "cancel it first" in refused.value.message
    cancelled = design.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    # Cancelled before it ended: settled from the usage it reports (its input, read).
    record = billed(simulator, created.id)
    assert record["usage"]["image_output"] == 0 and record["mainline"]["output"] == 0
    row = settled_row(proxy, created.id)
    assert row["cost_nanos"] == record_cost(record) > 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
    assert (row["flagged"], row["held"]) == (0, 0)
    continued = design.responses.create(
        model="gpt-5.5",
        input="Start again",
        previous_response_id=created.id,
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
    )
    check_charge(proxy, simulator, continued.id, "gpt-5.5", "gpt-image-2")
    assert design.responses.delete(created.id) is None
    with pytest.raises(openai.NotFoundError):
        research.responses.retrieve(continued.id)


def test_a_streamed_background_response_is_its_teams_while_it_runs(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A background response asked for as a stream is named by its first event: from
    then on its team may retrieve and cancel it (OpenAI's way to stop, or resume, a
    stream that runs on), another team still may not, and it is settled once."""
    simulator.configure(latency_ms=3000)  # the stream's events spread over 3 s
    design, research = proxy.client(), proxy.client(RESEARCH_KEY)
    stream = design.responses.create(
        model="gpt-5.5",
        input="A lantern in fog",
        tools=[tool()],
        max_output_tokens=300,
        max_tool_calls=1,
        stream=True,
        background=True,
    )
    events = iter(stream)
    created = next(e for e in events if e.type == "response.created")
    response_id = created.response.id
    assert design.responses.retrieve(response_id).id == response_id
    with pytest.raises(openai.BadRequestError) as refused:  # its stream is still read
        design.responses.delete(response_id)
    assert "still streaming" in refused.value.message
    assert design.responses.cancel(response_id).id == response_id
    with pytest.raises(openai.NotFoundError):
        research.responses.retrieve(response_id)
    kinds = [e.type for e in events]
    assert kinds[-1] == "response.completed"  # the simulator's stream ran to its end
    check_charge(proxy, simulator, response_id, "gpt-5.5", "gpt-image-2")
    assert design.responses.delete(response_id) is None  # settled: now it may go


def test_gpt_4o_minis_dearer_input_images_stay_within_the_bound(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """gpt-4o-mini bills an input image as many tokens as gpt-4o's dollars buy (25,501 for
    a 1024x1024 image, above the bound other models' images get): without the image tool
    its images are all the bound has to cover them."""
    picture = "https://images.example.test/harbour.png"
    raw = proxy.client().responses.with_raw_response.create(
        model="gpt-4o-mini",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Describe these."},
                    *({"type": "input_image", "image_url": picture} for _ in range(3)),
                ],
            }
        ],
        max_output_tokens=100,
    )
    response = raw.parse()
    record = billed(simulator, response.id)
    assert record["mainline"]["input"] > 3 * 25_000
    row = settled_row(proxy, response.id)
    assert row["cost_nanos"] == record_cost(record) > 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
