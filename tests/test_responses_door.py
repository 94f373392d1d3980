"""The Responses door (`proxy.doors.responses`) and its meters, pure: what a body becomes,
what it is bounded at, what is refused, and what an answer bills."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseReasoningItem,
)
from openai.types.responses.response_output_item import ImageGenerationCall

from proxy.config import load_config
from proxy.core.budgets import decide
from proxy.core.errors import InvalidRequest, PolicyViolation, UnpricedModel
from proxy.core.models import Counter, Totals, Usage
from proxy.core.periods import Applied, Window
from proxy.core.pricing import estimate
from proxy.core.settings import Budget, Config, ResponsesPolicy
from proxy.doors import ResponsesDoor
from proxy.doors.batch_responses import response_line
from proxy.doors.responses import HIDDEN_INPUT_TOKENS, MAINLINE_IMAGE_TOKENS, read_count
from tests.conftest import team_named, two_teams, write_config

JSON = "application/json"
DOOR = ResponsesDoor()
TOOL = {"type": "image_generation", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return two_teams(
        tmp_path_factory.mktemp("responses"),
        "allow:\n  models: [gpt-image-2, gpt-5-mini]\n  max_n: 2\n"
        "responses:\n  unbounded: refuse\n",
    )


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-5.5", "input": "a lighthouse at dusk", "tools": [TOOL], **fields}


def parse(config: Config, fields: dict[str, Any], who: str = "design") -> Any:
    return DOOR.parse(JSON, json.dumps(fields).encode(), config, team_named(config, who))


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


@pytest.mark.parametrize("name", ["user", "safety_identifier"])
def test_an_end_user_id_past_its_length_is_refused_even_when_the_other_is_counted(
    config: Config, name: str
) -> None:
    other = "safety_identifier" if name == "user" else "user"
    with pytest.raises(InvalidRequest) as caught:
        parse(config, body(**{name: "u" * 257, other: "ana"}))
    assert caught.value.param == name


def test_a_tool_without_model_gets_the_default_model(config: Config) -> None:
    parsed = parse(config, body(tools=[{"type": "image_generation"}]))
    assert not DOOR.names_model(parsed)
    assert parsed.request.model == config.default_model
    variant = DOOR.admit(team_named(config), parsed, config)
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
        # Empty, it carries no reasoning: only the id is left, which the upstream would read.
        (
            {
                "input": [
                    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": ""}
                ]
            },
            "input[0].encrypted_content",
        ),
        ({"input": [{"role": "tool", "content": "hi"}]}, "input[0].role"),
        # OpenAI's guide continues an image by its call's id alone: the upstream then reads
        # the stored image, whichever team's it is.
        ({"input": [{"type": "image_generation_call", "id": "ig_1"}]}, "input[0].result"),
        (
            {"input": [{"type": "image_generation_call", "id": "ig_1", "result": None}]},
            "input[0].result",
        ),
        ({"input": [{"type": "function_call", "id": "fc_1"}]}, "input[0].call_id"),
        (
            {"input": [{"type": "function_call", "id": "fc_1", "call_id": "c", "name": "f"}]},
            "input[0].arguments",
        ),
        # Pro mode bills the aggregated work of its runs, not one run's input and output.
        ({"reasoning": {"mode": "pro", "effort": "high"}}, "reasoning.mode"),
        ({"reasoning": {"mode": "deep"}}, "reasoning.mode"),
        ({"reasoning": "high"}, "reasoning"),
        # Every earlier turn's reasoning rendered again as input: the response continued
        # holds only its own (earlier turns' reasoning was dropped from its context).
        (
            {"previous_response_id": "resp_1", "reasoning": {"context": "all_turns"}},
            "reasoning.context",
        ),
        # An explicit prompt-cache breakpoint writes the cache (for up to 12 hours), as
        # `prompt_cache_options` asks for, whose cost the price book has no rate for.
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_text",
                                "text": "a long shared prefix",
                                "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "12h"},
                            }
                        ],
                    }
                ]
            },
            "input[0].content[0].prompt_cache_breakpoint",
        ),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "the reference"},
                            {
                                "type": "input_image",
                                "image_url": "https://x.test/a.png",
                                "prompt_cache_breakpoint": {"mode": "explicit"},
                            },
                        ],
                    }
                ]
            },
            "input[0].content[1].prompt_cache_breakpoint",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [
                            {
                                "type": "input_text",
                                "text": "the chart",
                                "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"},
                            }
                        ],
                    }
                ]
            },
            "input[0].output[0].prompt_cache_breakpoint",
        ),
        # A field Tollgate has no rule for may be one OpenAI bills for: refused, not
        # forwarded unread.
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "a", "cache": 1}]}
                ]
            },
            "input[0].content[0].cache",
        ),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_image", "file_id": "file_1", "file_data": "QUJD"}
                        ],
                    }
                ]
            },
            "input[0].content[0].file_data",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "refusal", "refusal": "no", "text": "x"}],
                    }
                ]
            },
            "input[0].output[0].text",
        ),
        ({"max_tool_calls": 11}, "max_tool_calls"),
        ({"max_output_tokens": "9"}, "max_output_tokens"),
        ({"max_output_tokens": 2**62}, "max_output_tokens"),
        ({"max_output_tokens": 10**22}, "max_output_tokens"),
        ({"model": None}, "model"),
        # Not an id: it was forwarded as given, without the continued response's bound.
        ({"previous_response_id": 0}, "previous_response_id"),
        ({"previous_response_id": {"id": "resp_1"}}, "previous_response_id"),
        ({"previous_response_id": ["resp_1"]}, "previous_response_id"),
    ],
)
def test_what_tollgate_cannot_bound_is_refused_with_a_400(
    config: Config, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse(config, body(**fields))
    assert caught.value.status == 400
    assert caught.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"reasoning": {"mode": "standard", "effort": "max", "summary": "auto"}},
        {"reasoning": {"context": "all_turns"}},
        {"previous_response_id": "resp_1", "reasoning": {"context": "current_turn"}},
        {"previous_response_id": "resp_1", "reasoning": {"context": "auto"}},
    ],
)
def test_reasoning_that_stays_within_the_bound_is_forwarded(
    config: Config, fields: dict[str, Any]
) -> None:
    """Standard mode's reasoning is output, within `max_output_tokens`; without an earlier
    turn stored upstream, `all_turns` renders only the reasoning items sent, whose bytes
    are in the bound."""
    parsed = parse(config, body(**fields))
    assert parsed.fields["reasoning"] == fields["reasoning"]


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        ({"type": "web_search_preview"}, "tool_choice.type"),
        ({"type": "programmatic_tool_calling"}, "tool_choice.type"),
        ({"type": "shell"}, "tool_choice.type"),
        ({"type": "mcp", "server_label": "deepwiki"}, "tool_choice.type"),
        ({"type": "image_generation", "quality": "high"}, "tool_choice.quality"),
        ({"type": "function"}, "tool_choice.name"),
        ({"name": "draw"}, "tool_choice.type"),
        ("sometimes", "tool_choice"),
        (
            {"type": "allowed_tools", "mode": "required", "tools": [{"type": "file_search"}]},
            "tool_choice.tools[0].type",
        ),
        (
            {
                "type": "allowed_tools",
                "mode": "auto",
                "tools": [{"type": "image_generation", "model": "gpt-image-2.6"}],
            },
            "tool_choice.tools[0].model",
        ),
        ({"type": "allowed_tools", "mode": "none", "tools": []}, "tool_choice.mode"),
        ({"type": "allowed_tools", "mode": "auto", "tools": {}}, "tool_choice.tools"),
    ],
)
def test_a_tool_choice_naming_a_tool_tollgate_does_not_forward_is_refused(
    config: Config, choice: Any, param: str
) -> None:
    """`tool_choice` names tools too: a hosted tool, a program OpenAI runs, or a tool with
    fields beyond its name (`allowed_tools` takes "tool definitions") is refused, as in
    `tools`, and so is an input-token count of it."""
    with pytest.raises(InvalidRequest) as caught:
        parse(config, body(tool_choice=choice, max_output_tokens=300, max_tool_calls=1))
    assert caught.value.param == param
    with pytest.raises(InvalidRequest) as counted:
        read_count({"model": "gpt-5.5", "input": "x", "tool_choice": choice})
    assert counted.value.param == param
    assert "None" not in str(caught.value)


@pytest.mark.parametrize(
    "choice",
    [
        "none",
        "auto",
        "required",
        {"type": "image_generation"},
        {"type": "function", "name": "lookup"},
        {
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "image_generation"}, {"type": "function", "name": "lookup"}],
        },
    ],
)
def test_a_tool_choice_naming_the_tools_tollgate_forwards_is_forwarded(
    config: Config, choice: Any
) -> None:
    parsed = parse(config, body(tool_choice=choice, max_output_tokens=300, max_tool_calls=1))
    assert parsed.fields["tool_choice"] == choice


ALL_TURNS_BOOK = """
mainline:
  gpt-5.6:
    source: a deployment's entry (the gpt-5.6 family reasons over all turns by default)
    effective_from: 2026-12-01
    aliases: [gpt-5.6-2026-12-01]
    rates: {text_input: "5.00", cached_text_input: "0.50", text_output: "30.00"}
    batch: {text_input: "2.50", cached_text_input: "0.25", text_output: "15.00"}
    reasoning_context: all_turns
"""


@pytest.fixture(scope="module")
def all_turns(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A configuration whose price book adds gpt-5.6, a mainline model that reasons over
    all turns when a request leaves `reasoning.context` to it."""
    root = tmp_path_factory.mktemp("all-turns")
    (root / "prices.yaml").write_text(ALL_TURNS_BOOK)
    write_config(root, "http://upstream.invalid/v1", "prices: prices.yaml\n")
    return load_config(root)


@pytest.mark.parametrize("model", ["gpt-5.6", "gpt-5.6-2026-12-01"])
@pytest.mark.parametrize(
    "reasoning",
    [None, {"effort": "high"}, {"context": None}, {"context": "auto"}, {"context": "all_turns"}],
)
def test_a_continued_response_of_a_model_that_reasons_over_all_turns_is_refused(
    all_turns: Config, model: str, reasoning: dict[str, Any] | None
) -> None:
    """Left to the model (left out, or `auto`), its context is the price book's
    `reasoning_context`: `all_turns` renders every earlier turn's reasoning again, which
    the response continued (whose tokens the bound carries) no longer held."""
    fields = body(model=model, previous_response_id="resp_1")
    if reasoning is not None:
        fields["reasoning"] = reasoning
    with pytest.raises(InvalidRequest) as caught:
        parse(all_turns, fields)
    assert caught.value.status == 400
    assert caught.value.param == "reasoning.context"
    assert "current_turn" in caught.value.message


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        ("gpt-5.6", {"previous_response_id": "resp_1", "reasoning": {"context": "current_turn"}}),
        ("gpt-5.6", {}),
        ("gpt-5.6", {"reasoning": {"context": "auto"}}),
        ("gpt-5.6", {"reasoning": {"context": "all_turns"}}),
        ("gpt-5.5", {"previous_response_id": "resp_1"}),
        ("gpt-5.5", {"previous_response_id": "resp_1", "reasoning": {"context": "auto"}}),
    ],
)
def test_reasoning_over_only_what_the_bound_holds_is_forwarded(
    all_turns: Config, model: str, fields: dict[str, Any]
) -> None:
    """`current_turn` continues only the response continued; without an earlier turn
    stored upstream, `all_turns` renders the reasoning items sent; a model of the built-in
    book reasons over the current turn by default. The image tool's model has no say."""
    parsed = parse(all_turns, body(model=model, max_output_tokens=500, **fields))
    assert parsed.fields.get("reasoning") == fields.get("reasoning")
    DOOR.admit(team_named(all_turns), parsed, all_turns)


def test_a_gpt_5_6_model_the_book_lacks_is_refused_as_unpriced(config: Config) -> None:
    """Its default context is unknown to Tollgate, but it is never forwarded: unpriced."""
    parsed = parse(config, body(model="gpt-5.6", previous_response_id="resp_1"))
    with pytest.raises(UnpricedModel):
        DOOR.admit(team_named(config), parsed, config)


def test_a_batch_line_of_a_model_that_reasons_over_all_turns_continues_no_response(
    all_turns: Config,
) -> None:
    """A batch line never continues a response, so leaving the context to the model renders
    only the reasoning items the line sends."""
    fields = body(model="gpt-5.6", max_output_tokens=500, max_tool_calls=1)
    response_line(team_named(all_turns), all_turns, fields)
    with pytest.raises(InvalidRequest) as caught:
        response_line(team_named(all_turns), all_turns, {**fields, "previous_response_id": "r"})
    assert caught.value.param == "previous_response_id"


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
    parsed = DOOR.parse(JSON, raw, config, team_named(config))
    assert parsed.images == 2
    assert len(parsed.request.images) == 2
    assert parsed.text_bytes == len(raw) - len(image)
    variant = DOOR.admit(team_named(config), parsed, config)
    context = len(raw) - len(image) + HIDDEN_INPUT_TOKENS + 2 * MAINLINE_IMAGE_TOKENS
    # One call: sampled twice, the second time with what it wrote and the image made.
    assert variant.base.usage.mainline_input == 2 * context + 100 + MAINLINE_IMAGE_TOKENS


def test_no_input_item_is_forwarded_with_its_id(config: Config) -> None:
    """OpenAI reads the item it stored under an item's id (any team's, under the company
    key) rather than what is sent: each item goes upstream as sent, without its id, from
    a response, an input-token count and a batch line alike."""
    sent = [
        {"type": "message", "role": "assistant", "id": "msg_1", "content": "earlier"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
        {"type": "function_call", "id": "fc_1", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "id": "fco_1", "call_id": "c", "output": "done"},
        {"type": "image_generation_call", "id": "ig_1", "result": "iVBOR", "status": "completed"},
        {"role": "user", "content": "again"},
    ]
    expected = [{k: v for k, v in item.items() if k != "id"} for item in sent]
    fields = body(input=sent, max_output_tokens=100, max_tool_calls=1)
    parsed = parse(config, fields)
    forwarded, _ = DOOR.encode(parsed, DOOR.admit(team_named(config), parsed, config))
    assert json.loads(forwarded)["input"] == expected
    assert json.loads(read_count({"model": "gpt-5.5", "input": sent}).encode())["input"] == expected
    _, _, line = response_line(team_named(config), config, fields)
    assert json.loads(line)["input"] == expected


def test_a_json_body_is_required(config: Config) -> None:
    with pytest.raises(InvalidRequest):
        DOOR.parse("multipart/form-data; boundary=x", b"--x--", config, team_named(config))
    with pytest.raises(InvalidRequest):
        DOOR.parse(JSON, b'{"model": "gpt-5.5", "model": "o3"}', config, team_named(config))


def test_unpriced_mainline_and_image_models_are_refused(config: Config) -> None:
    with pytest.raises(UnpricedModel) as mainline:
        DOOR.admit(team_named(config), parse(config, body(model="gpt-9")), config)
    assert mainline.value.param == "model"
    unpriced_tool = body(tools=[{**TOOL, "model": "gpt-image-9"}])
    with pytest.raises(UnpricedModel) as tool:
        DOOR.admit(team_named(config), parse(config, unpriced_tool), config)
    assert tool.value.param == "tools[0].model"


def test_allow_models_applies_to_the_mainline_model_and_max_n_to_the_calls(
    config: Config,
) -> None:
    strict = team_named(config, "strict")
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


@pytest.mark.parametrize(
    ("rule", "fields", "param"),
    [
        # A value sent in the tool, or the request's own field, used not to be read at all.
        ("output_compression: [50]", {"tools": [{**TOOL, "output_format": "jpeg",
                                                  "output_compression": 80}]},
         "tools[0].output_compression"),
        ("user: [alice]", {"user": "bob"}, "user"),
        ("stream: [false]", {"stream": True}, "stream"),
        # Left out: OpenAI's default, or no default at all.
        ("background: [opaque]", {}, "tools[0].background"),
        ("user: [alice]", {}, "user"),
        ("input_fidelity: [low]", {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
         "tools[0].input_fidelity"),
    ],
)  # fmt: skip
def test_allow_params_reads_the_image_tool_and_the_requests_own_fields(
    tmp_path: Path, rule: str, fields: dict[str, Any], param: str
) -> None:
    config = two_teams(tmp_path, f"allow:\n  params:\n    {rule}\n")
    strict = team_named(config, "strict")
    parsed = parse(config, body(max_output_tokens=64, max_tool_calls=1, **fields), "strict")
    with pytest.raises(PolicyViolation) as caught:
        DOOR.admit(strict, parsed, config)
    assert caught.value.param == param


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
    parsed = DOOR.parse(JSON, raw, config, team_named(config))
    parsed = DOOR.carry(parsed, tokens=700, images=1)
    variant = DOOR.admit(team_named(config), parsed, config)
    text_bytes = len(raw) - len(image)
    assert parsed.text_bytes == text_bytes
    mainline = config.prices.find_mainline("gpt-5.5")
    assert mainline is not None
    context = text_bytes + HIDDEN_INPUT_TOKENS + 3 * MAINLINE_IMAGE_TOKENS + 700
    # Two calls: three samplings, each reading the context; the second and third also
    # what was written before (at most max_output_tokens) and the 1, then 2, images made.
    # Any of it may be written to the prompt cache (billed so where the book says).
    read = 3 * context + 2 * 1000 + (1 + 2) * MAINLINE_IMAGE_TOKENS
    base = Usage(mainline_input=read, mainline_output=1000, mainline_cache_write=read)
    assert variant.base.usage == base
    model = config.prices.find("gpt-image-2")
    assert model is not None
    per_call = replace(variant.request, n=1, mainline=None, prompt_bytes=text_bytes + 1000)
    one = estimate(model, per_call)
    assert one.usage.image_input == 3 * model.input_image_tokens(None, None, None)
    # The second call may also be given the image the first one made.
    made = Usage(image_input=model.input_image_tokens(None, None, None))
    assert variant.estimate.usage.image_input == 2 * one.usage.image_input + made.image_input
    assert variant.estimate.cost_nanos == (
        2 * one.cost_nanos + model.cost(made) + mainline.cost(base)
    )
    bound = DOOR.bound(parsed, variant)
    assert bound.mainline is mainline
    assert bound.mainline_nanos == mainline.cost(base)


def test_the_quality_ladder_applies_to_the_image_tool_and_is_forwarded(config: Config) -> None:
    parsed = parse(config, body(tools=[{**TOOL, "quality": "high"}], max_output_tokens=64))
    variant = DOOR.admit(team_named(config), parsed, config)
    need = variant.estimate.cost_nanos
    limit = need - 1
    budget = Budget(period="day", metric="usd", limit=limit)
    applied = Applied(budget, Counter("team", "design", "", "day", 0.0), Window("day", 0.0, 1.0))
    decision = decide(
        team_named(config), variant, (applied,), {applied.counter: Totals()}, config.prices
    )
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
    variant = DOOR.admit(team_named(config), parsed, config)
    assert variant.estimate == variant.base


# -- the fields of input items -------------------------------------------------------

PNG_B64 = "iVBORw0KGgo="
DOCUMENTED_ITEMS: list[dict[str, Any]] = [
    {"type": "message", "role": "user", "content": "draw", "status": "completed"},
    {"type": "message", "role": "assistant", "content": "earlier", "phase": "commentary"},
    ResponseOutputMessage.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "incomplete",
            "phase": "final_answer",
            "content": [{"type": "output_text", "text": "done", "annotations": []}],
        }
    ).model_dump(),
    ResponseReasoningItem.model_validate(
        {
            "id": "rs_1",
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": "**Planning**"}],
            "content": [{"type": "reasoning_text", "text": "Think of boats."}],
            "encrypted_content": "gAAAA",
            "status": "completed",
        }
    ).model_dump(),
    ResponseFunctionToolCall.model_validate(
        {
            "id": "fc_1",
            "type": "function_call",
            "call_id": "c",
            "name": "take_photo",
            "arguments": "{}",
            "namespace": "camera",
            "status": "completed",
            "caller": {"type": "direct"},
            "async": False,
        }
    ).model_dump(),  # `async_`, as the Python SDK spells it
    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "async": False},
    {
        "type": "function_call_output",
        "id": "fco_1",
        "call_id": "c",
        "output": "done",
        "name": "take_photo",
        "namespace": "camera",
        "status": "completed",
        "caller": {"type": "direct"},
        "created_by": "user_1",
    },
    ImageGenerationCall.model_validate(
        {
            "id": "ig_1",
            "type": "image_generation_call",
            "status": "completed",
            "result": PNG_B64,
            "action": "generate",
            "background": "opaque",
            "output_format": "png",
            "quality": "low",
            "size": "1024x1024",
            "revised_prompt": "A red boat.",
        }
    ).model_dump(),
]
"""Each input item with every field OpenAI documents for it, as sent by hand and as the SDK
dumps a response's output (null for what it left unset)."""


def items_body(*items: dict[str, Any]) -> dict[str, Any]:
    return body(input=list(items), max_output_tokens=100, max_tool_calls=1)


@pytest.mark.parametrize(
    "item", DOCUMENTED_ITEMS, ids=lambda item: f"{item['type']}-{len(item)}-fields"
)
def test_an_input_item_with_the_fields_openai_documents_is_forwarded(
    config: Config, item: dict[str, Any]
) -> None:
    """Its fields as sent, but for the ones OpenAI's input does not take (the id, a listed
    item's `created_by`, the SDK's `async_`); the text ones are in the bound's bytes."""
    fields = items_body(item, {"role": "user", "content": "again"})
    parsed = parse(config, fields)
    image = len(PNG_B64) if item["type"] == "image_generation_call" else 0
    assert parsed.text_bytes == len(json.dumps(fields).encode()) - image  # summaries included
    forwarded, _ = DOOR.encode(parsed, DOOR.admit(team_named(config), parsed, config))
    dropped = {"id", "created_by", "async_"}
    expected = {k: v for k, v in item.items() if k not in dropped}
    assert json.loads(forwarded)["input"][0] == expected
    assert json.loads(read_count({"model": "gpt-5.5", "input": [item]}).encode())["input"] == [
        expected
    ]


@pytest.mark.parametrize(
    "item", DOCUMENTED_ITEMS, ids=lambda item: f"{item['type']}-{len(item)}-fields"
)
def test_an_input_item_with_a_field_openai_does_not_document_is_refused(
    config: Config, item: dict[str, Any]
) -> None:
    """A field Tollgate has no rule for may be one OpenAI bills for: it used to be
    forwarded unread. It is refused from a response, an input-token count and a batch line
    alike, naming the field and what Tollgate forwards."""
    fields = items_body({"role": "user", "content": "first"}, {**item, "cache_control": {}})
    for send in (
        lambda: parse(config, fields),
        lambda: read_count({"model": "gpt-5.5", "input": fields["input"]}),
        lambda: response_line(team_named(config), config, fields),
    ):
        with pytest.raises(InvalidRequest) as caught:
            send()
        assert caught.value.param == "input[1].cache_control"
        assert "Tollgate does not forward 'input[1].cache_control'" in str(caught.value)
        assert f"it forwards a {item['type']} item with only its" in str(caught.value)


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "message", "role": "assistant", "content": "x", "phase": "draft"}, "phase"),
        ({"type": "message", "role": "user", "content": "x", "status": "queued"}, "status"),
        (
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "async": 1},
            "async",
        ),
        (
            {
                "type": "function_call",
                "call_id": "c",
                "name": "f",
                "arguments": "{}",
                "async_": True,
            },
            "async_",
        ),
        (
            {
                "type": "function_call",
                "call_id": "c",
                "name": "f",
                "arguments": "{}",
                "caller": {"type": "program", "caller_id": "call_prog"},
            },
            "caller",
        ),
        (
            {
                "type": "function_call_output",
                "call_id": "c",
                "output": "done",
                "caller": {"type": "program", "caller_id": "call_prog"},
            },
            "caller",
        ),
        ({"type": "function_call_output", "call_id": "c", "output": "x", "name": 3}, "name"),
        (
            {
                "type": "image_generation_call",
                "result": PNG_B64,
                "status": "generating",
            },
            "status",
        ),
        (
            {"type": "image_generation_call", "result": PNG_B64, "output_format": "svg"},
            "output_format",
        ),
        (
            {"type": "image_generation_call", "result": PNG_B64, "svg_usage": {"model": "m"}},
            "svg_usage",
        ),
        (
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "x", "tokens": 9}],
                "encrypted_content": "gAAAA",
            },
            "summary[0].tokens",
        ),
        (
            {
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "summary_text", "text": "x"}],
                "encrypted_content": "gAAAA",
            },
            "content[0].type",
        ),
    ],
)
def test_an_input_item_field_at_a_value_tollgate_has_no_rule_for_is_refused(
    config: Config, item: dict[str, Any], param: str
) -> None:
    """An image call not done or not an image, a function call made by a program OpenAI
    runs or not waited for, a phase or status OpenAI does not document, a reasoning part
    with more than its text."""
    with pytest.raises(InvalidRequest) as caught:
        parse(config, items_body(item))
    assert caught.value.param == f"input[0].{param}"
