"""The Responses door (`proxy.doors.responses`) and its meters, pure: what a body becomes,
what it is bounded at, what is refused, and what an answer bills."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from proxy.config import load_config
from proxy.core import settlement
from proxy.core.auth import key_hash
from proxy.core.budgets import decide
from proxy.core.errors import (
    InvalidRequest,
    MalformedAnswer,
    PolicyViolation,
    UnpricedModel,
    UpstreamTimeout,
)
from proxy.core.models import Counter, Totals, Usage
from proxy.core.periods import Applied, Window
from proxy.core.pricing import estimate
from proxy.core.settings import Budget, Config, ResponsesPolicy, Team
from proxy.doors import ResponsesDoor
from proxy.doors.response_meters import ResponseAnswer, ResponseEvents, read_response
from proxy.doors.responses import HIDDEN_INPUT_TOKENS, MAINLINE_IMAGE_TOKENS
from tests.conftest import write_config

JSON = "application/json"
DOOR = ResponsesDoor()
TOOL = {"type": "image_generation", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("responses")
    write_config(
        root,
        "http://upstream.invalid/v1",
        teams={
            "design": f"name: design\nkeys:\n  - {{id: a, sha256: {key_hash('tg_a')}}}\n",
            "strict": (
                f"name: strict\nkeys:\n  - {{id: b, sha256: {key_hash('tg_b')}}}\n"
                "allow:\n  models: [gpt-image-2, gpt-5-mini]\n  max_n: 2\n"
                "responses:\n  unbounded: refuse\n"
            ),
        },
    )
    return load_config(root)


def team(config: Config, name: str = "design") -> Team:
    return next(t for t in config.teams if t.name == name)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-5.5", "input": "a lighthouse at dusk", "tools": [TOOL], **fields}


def parse(config: Config, fields: dict[str, Any], who: str = "design") -> Any:
    return DOOR.parse(JSON, json.dumps(fields).encode(), config, team(config, who))


def test_unbounded_requests_get_the_teams_caps_and_say_so(config: Config) -> None:
    parsed = parse(config, body())
    assert parsed.fields["max_output_tokens"] == ResponsesPolicy().max_output_tokens
    assert parsed.fields["max_tool_calls"] == ResponsesPolicy().max_tool_calls
    assert DOOR.injected(parsed) == "max_output_tokens=unset->8192; max_tool_calls=unset->1"
    given = parse(config, body(max_output_tokens=500, max_tool_calls=2))
    assert DOOR.injected(given) == ""
    assert given.request.n == 2


@pytest.mark.parametrize(
    ("given", "sent", "named"),
    [
        (None, "default", ""),
        ("auto", "default", "service_tier=auto->default"),
        ("default", "default", ""),
        ("flex", "flex", ""),
    ],
)
def test_the_tier_is_sent_explicit_never_left_to_the_projects_setting(
    config: Config, given: str | None, sent: str, named: str
) -> None:
    """`auto` (and an unset tier, which OpenAI reads as `auto`) runs at the tier the OpenAI
    project is set to, which may be priority, dearer than the price book's rates: it is sent
    as `default`; an `auto` the client asked for is named as changed."""
    fields = body(max_output_tokens=500, max_tool_calls=1)
    if given is not None:
        fields["service_tier"] = given
    parsed = parse(config, fields)
    assert parsed.fields["service_tier"] == sent
    assert DOOR.injected(parsed) == named


def test_a_team_that_refuses_unbounded_requests_gets_a_400_naming_the_bound(
    config: Config,
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(config, body(model="gpt-5-mini"), "strict")
    assert caught.value.param == "max_output_tokens"
    parse(config, body(model="gpt-5-mini", max_output_tokens=64, max_tool_calls=1), "strict")


def test_per_user_budgets_count_the_safety_identifier_else_the_user(config: Config) -> None:
    assert parse(config, body(user="ana")).request.user == "ana"
    assert parse(config, body(user="ana", safety_identifier="s-1")).request.user == "s-1"
    assert parse(config, body()).request.user is None


def test_a_tool_without_model_gets_the_default_model(config: Config) -> None:
    parsed = parse(config, body(tools=[{"type": "image_generation"}]))
    assert not DOOR.names_model(parsed)
    assert parsed.request.model == config.default_model
    variant = DOOR.admit(team(config), parsed, config)
    sent, _ = DOOR.encode(parsed, variant)
    assert json.loads(sent)["tools"][0]["model"] == config.default_model


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"made_up": 1}, "made_up"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [TOOL, TOOL]}, "tools[1]"),
        ({"tools": [{**TOOL, "svg": {"model": "x"}}]}, "tools[0].svg"),
        ({"tools": [{**TOOL, "moderation": "none"}]}, "tools[0].moderation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_file", "file_url": "https://x.test/a.pdf"}],
                    }
                ]
            },
            "input[0].output[0].type",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0]"),
        ({"input": [{"id": "msg_1", "content": "hi"}]}, "input[0].role"),
        (
            {"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]},
            "input[0].encrypted_content",
        ),
        ({"input": [{"role": "tool", "content": "hi"}]}, "input[0].role"),
        ({"max_tool_calls": 11}, "max_tool_calls"),
        ({"max_output_tokens": "9"}, "max_output_tokens"),
        ({"max_output_tokens": 2**62}, "max_output_tokens"),
        ({"max_output_tokens": 10**22}, "max_output_tokens"),
        ({"model": None}, "model"),
    ],
)
def test_what_tollgate_cannot_bound_is_refused_with_a_400(
    config: Config, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(config, body(**fields))
    assert caught.value.status == 400
    assert caught.value.param == param


def test_images_in_a_function_call_output_are_in_the_bound(config: Config) -> None:
    """A function's output may hold images, which the mainline model and the image tool
    read like a message's: each is bounded, its inline data not counted as text."""
    image = "data:image/png;base64," + "A" * 4000
    output = [
        {"type": "input_text", "text": "the chart"},
        {"type": "input_image", "image_url": image},
        {"type": "input_image", "image_url": "https://x.test/b.png"},
    ]
    fields = body(
        max_output_tokens=100,
        max_tool_calls=1,
        input=[
            {"type": "function_call", "call_id": "c", "name": "chart", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": output},
            {"type": "function_call_output", "call_id": "d", "output": "plain text"},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        ],
    )
    raw = json.dumps(fields).encode()
    parsed = DOOR.parse(JSON, raw, config, team(config))
    assert parsed.images == 2
    assert len(parsed.request.images) == 2
    assert parsed.text_bytes == len(raw) - len(image)
    variant = DOOR.admit(team(config), parsed, config)
    assert variant.base.usage.mainline_input == (
        len(raw) - len(image) + HIDDEN_INPUT_TOKENS + 2 * MAINLINE_IMAGE_TOKENS
    )


def test_a_json_body_is_required(config: Config) -> None:
    with pytest.raises(InvalidRequest):
        DOOR.parse("multipart/form-data; boundary=x", b"--x--", config, team(config))
    with pytest.raises(InvalidRequest):
        DOOR.parse(JSON, b'{"model": "gpt-5.5", "model": "o3"}', config, team(config))


def test_unpriced_mainline_and_image_models_are_refused(config: Config) -> None:
    with pytest.raises(UnpricedModel) as mainline:
        DOOR.admit(team(config), parse(config, body(model="gpt-9")), config)
    assert mainline.value.param == "model"
    unpriced_tool = body(tools=[{**TOOL, "model": "gpt-image-9"}])
    with pytest.raises(UnpricedModel) as tool:
        DOOR.admit(team(config), parse(config, unpriced_tool), config)
    assert tool.value.param == "tools[0].model"


def test_allow_models_applies_to_the_mainline_model_and_max_n_to_the_calls(
    config: Config,
) -> None:
    strict = team(config, "strict")
    bounded = {"max_output_tokens": 64, "max_tool_calls": 1}
    with pytest.raises(PolicyViolation) as mainline:
        DOOR.admit(strict, parse(config, body(**bounded), "strict"), config)
    assert mainline.value.param == "model"
    other_tool = body(model="gpt-5-mini", tools=[{**TOOL, "model": "gpt-image-1.5"}], **bounded)
    with pytest.raises(PolicyViolation) as tool:
        DOOR.admit(strict, parse(config, other_tool, "strict"), config)
    assert tool.value.param == "tools[0].model"
    calls = body(model="gpt-5-mini", max_output_tokens=64, max_tool_calls=3)
    with pytest.raises(PolicyViolation) as many:
        DOOR.admit(strict, parse(config, calls, "strict"), config)
    assert many.value.param == "max_tool_calls"


def test_the_bound_covers_the_mainline_model_and_every_tool_call(config: Config) -> None:
    image = "data:image/png;base64," + "A" * 4000
    fields = body(
        max_output_tokens=1000,
        max_tool_calls=2,
        stream=True,
        tools=[{**TOOL, "partial_images": 2}],
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "make it blue"},
                    {"type": "input_image", "image_url": image},
                    {"type": "input_image", "file_id": "file_1"},
                ],
            }
        ],
    )
    raw = json.dumps(fields).encode()
    parsed = DOOR.parse(JSON, raw, config, team(config))
    parsed = DOOR.carry(parsed, tokens=700, images=1)
    variant = DOOR.admit(team(config), parsed, config)
    text_bytes = len(raw) - len(image)
    assert parsed.text_bytes == text_bytes
    mainline = config.prices.find_mainline("gpt-5.5")
    assert mainline is not None
    base = Usage(
        mainline_input=text_bytes + HIDDEN_INPUT_TOKENS + 3 * MAINLINE_IMAGE_TOKENS + 700,
        mainline_output=1000,
    )
    assert variant.base.usage == base
    model = config.prices.find("gpt-image-2")
    assert model is not None
    per_call = replace(variant.request, n=1, mainline=None, prompt_bytes=text_bytes + 1000)
    one = estimate(model, per_call)
    assert one.usage.image_input == 3 * model.input_image_tokens(None, None, None)
    assert variant.estimate.cost_nanos == 2 * one.cost_nanos + mainline.cost(base)
    bound = DOOR.bound(parsed, variant)
    assert bound.mainline is mainline
    assert bound.mainline_nanos == mainline.cost(base)


def test_the_quality_ladder_applies_to_the_image_tool_and_is_forwarded(config: Config) -> None:
    parsed = parse(config, body(tools=[{**TOOL, "quality": "high"}], max_output_tokens=64))
    variant = DOOR.admit(team(config), parsed, config)
    need = variant.estimate.cost_nanos
    limit = need - 1
    budget = Budget(period="day", metric="usd", limit=limit)
    applied = Applied(budget, Counter("team", "design", "", "day", 0.0), Window("day", 0.0, 1.0))
    decision = decide(team(config), variant, (applied,), {applied.counter: Totals()}, config.prices)
    sent = decision.variant
    assert sent.request.quality != "high"
    assert sent.estimate.cost_nanos <= limit
    assert sent.base == variant.base  # the mainline part is not downgraded
    forwarded = json.loads(DOOR.encode(parsed, sent)[0])
    assert forwarded["tools"][0]["quality"] == sent.request.quality
    assert forwarded["max_output_tokens"] == 64


def test_a_request_without_the_image_tool_is_bounded_by_its_mainline_model_alone(
    config: Config,
) -> None:
    parsed = parse(config, body(tools=[], max_output_tokens=100))
    assert parsed.request.n == 0
    assert DOOR.injected(parsed) == ""
    variant = DOOR.admit(team(config), parsed, config)
    assert variant.estimate == variant.base


# -- what answers bill ------------------------------------------------------------------


def response(**fields: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "Here."}]},
            {"type": "image_generation_call", "status": "completed", "result": "A" * 5000},
        ],
        "usage": {
            "input_tokens": 1820,
            "input_tokens_details": {"cached_tokens": 1280},
            "output_tokens": 210,
            "output_tokens_details": {"reasoning_tokens": 64},
        },
        "tool_usage": {
            "image_gen": {
                "input_tokens": 30,
                "input_tokens_details": {"text_tokens": 30, "image_tokens": 0},
                "output_tokens": 196,
                "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
                "total_tokens": 226,
            }
        },
        **fields,
    }


def metered(answer: dict[str, Any]) -> Any:
    meter = ResponseAnswer()
    raw = json.dumps(answer).encode()
    for start in range(0, len(raw), 700):
        meter.feed(raw[start : start + 700])
    return meter.finish()


def test_an_answer_bills_its_mainline_usage_and_its_image_tools() -> None:
    found = metered(response())
    assert found.response_id == "resp_1"
    assert found.images == 1
    assert not found.pending
    assert found.usage == Usage(
        text_input=30,
        image_output=196,
        mainline_input=540,
        mainline_cached_input=1280,
        mainline_output=210,
    )


def test_image_calls_without_tool_usage_are_unknown_usage() -> None:
    assert metered(response(tool_usage=None)).usage is None
    no_images = response(tool_usage=None, output=[])
    assert metered(no_images).usage == Usage(
        mainline_input=540, mainline_cached_input=1280, mainline_output=210
    )


def test_a_queued_background_response_is_pending() -> None:
    found = metered(response(status="queued", usage=None, tool_usage=None, output=[]))
    assert found.pending and found.response_id == "resp_1"


def test_an_answer_that_is_not_a_response_is_malformed() -> None:
    with pytest.raises(MalformedAnswer):
        metered({"data": []})
    with pytest.raises(MalformedAnswer):
        read_response([])


def events(*items: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in items)


def test_a_stream_is_read_for_its_id_and_its_terminal_event() -> None:
    meter = ResponseEvents()
    created = {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}
    partial = {"type": "response.image_generation_call.partial_image", "partial_image_b64": "!"}
    done = {"type": "response.completed", "response": response()}
    raw = events(
        ("response.created", created),
        ("response.image_generation_call.partial_image", partial),
        ("response.completed", done),
    )
    for start in range(0, len(raw), 97):
        meter.feed(raw[start : start + 97])
    end = meter.end(None)
    assert end.terminal and end.response_id == "resp_1" and end.completed == 1
    assert end.usage == metered(response()).usage
    assert meter.partials == 1


def test_a_stream_cut_before_its_terminal_event_is_not_terminal() -> None:
    meter = ResponseEvents()
    meter.feed(events(("response.created", {"type": "response.created", "response": {}})))
    end = meter.end("stream_truncated")
    assert not end.terminal and end.usage is None


@pytest.mark.parametrize(
    "fields",
    [
        {"usage": {"input_tokens": "1820", "output_tokens": 210}},
        {"usage": {"input_tokens": 1820, "output_tokens": -210}},
        {"usage": {}},
        {"usage": {**response()["usage"], "input_tokens_details": {"cached_tokens": "1280"}}},
        {"tool_usage": {"image_gen": {"input_tokens": 30, "output_tokens": "196"}}},
        {"tool_usage": {"image_gen": {}}, "output": []},
    ],
    ids=["string", "negative", "empty", "cached-string", "tool-string", "tool-empty"],
)
def test_an_answer_with_counts_that_are_no_token_counts_is_unknown_usage(
    fields: dict[str, Any],
) -> None:
    """Charged its bound, flagged, never the $0 such counts would read as."""
    assert metered(response(**fields)).usage is None


def test_a_stream_with_two_terminal_events_is_unreadable_and_keeps_both() -> None:
    """A stream ends once: which of two ends was billed is unknown, so the settlement
    charges the bound, or both ends' usage when that costs more (flagged)."""
    meter = ResponseEvents()
    big = response(tool_usage={"image_gen": {"input_tokens": 30, "output_tokens": 90_000}})
    meter.feed(
        events(
            ("response.completed", {"type": "response.completed", "response": big}),
            ("response.completed", {"type": "response.completed", "response": response()}),
        )
    )
    end = meter.end(None)
    assert end.terminal and end.unreadable == 1 and end.completed == 2
    first, second = metered(big).usage, metered(response()).usage
    assert end.usage == first + second


def test_a_stream_with_two_terminal_events_is_charged_no_less_than_the_dearer(
    config: Config,
) -> None:
    parsed = parse(config, body(max_output_tokens=1000))
    bound = DOOR.bound(parsed, DOOR.admit(team(config), parsed, config))
    big = response(tool_usage={"image_gen": {"input_tokens": 30, "output_tokens": 90_000}})
    meter = ResponseEvents()
    meter.feed(
        events(
            ("response.completed", {"type": "response.completed", "response": big}),
            ("response.completed", {"type": "response.completed", "response": response()}),
        )
    )
    verdict = settlement.stream_ended(bound, meter.end(None))
    dearest = settlement.metered(bound, metered(big))
    assert dearest.cost_nanos > bound.cost_nanos
    assert verdict.cost_nanos >= dearest.cost_nanos and verdict.charge.flagged
    assert verdict.error_code == "malformed_answer"


# -- what each ending costs -------------------------------------------------------------


def test_a_response_is_charged_at_both_models_rates(config: Config) -> None:
    parsed = parse(config, body(max_output_tokens=1000))
    variant = DOOR.admit(team(config), parsed, config)
    bound = DOOR.bound(parsed, variant)
    found = metered(response())
    verdict = settlement.metered(bound, found)
    image = bound.model.cost(Usage(text_input=30, image_output=196))
    mainline = bound.mainline
    assert mainline is not None
    text = mainline.cost(found.usage)
    assert text == 540 * 5000 + 1280 * 500 + 210 * 30000  # nanos: tokens × USD/M × 1000
    assert verdict.cost_nanos == image + text
    assert verdict.charge.mainline_nanos == text
    assert not verdict.charge.flagged
    assert verdict.cost_nanos <= bound.cost_nanos


def test_a_response_without_usage_is_charged_its_bound_flagged(config: Config) -> None:
    parsed = parse(config, body())
    bound = DOOR.bound(parsed, DOOR.admit(team(config), parsed, config))
    verdict = settlement.metered(bound, metered(response(tool_usage=None)))
    assert verdict.cost_nanos == bound.cost_nanos and verdict.charge.flagged
    assert verdict.charge.mainline_nanos == bound.mainline_nanos


def test_a_cancelled_response_without_usage_costs_nothing(config: Config) -> None:
    parsed = parse(config, body())
    bound = DOOR.bound(parsed, DOOR.admit(team(config), parsed, config))
    cancelled = metered(response(status="cancelled", usage=None, tool_usage=None, output=[]))
    verdict = settlement.metered(bound, cancelled)
    assert verdict.cost_nanos == 0 and verdict.outcome == "upstream_error"
    failed = settlement.metered(bound, metered(response(status="failed")))
    assert failed.outcome == "upstream_error" and failed.cost_nanos > 0


def test_a_stream_cut_short_ends_with_an_error_event_naming_its_response() -> None:
    meter = ResponseEvents()
    created = {"type": "response.created", "response": {"id": "resp_9", "status": "queued"}}
    meter.feed(f"event: response.created\ndata: {json.dumps(created)}\n\n".encode())
    tail = meter.cut_short(UpstreamTimeout("The upstream did not answer in time."))
    assert tail.startswith(b"event: error\ndata: ") and tail.endswith(b"\n\n")
    event = json.loads(tail.split(b"data: ", 1)[1])
    assert event["type"] == "error"
    assert (event["code"], event["param"]) == ("upstream_timeout", None)
    assert event["error"]["code"] == "upstream_timeout"  # what the SDKs raise
    assert event["message"] == event["error"]["message"]
    assert "resp_9" in event["message"] and "did not answer in time" in event["message"]
