"""Input items other than messages, end to end through the official SDK: a team's own
output sent back (`input += response.output`, its image calls with their `result`), a
function call's output holding an image, and reasoning carried in its
`encrypted_content`. Each is answered, billed by the simulator as OpenAI bills it (the
arguments' and outputs' text, the images fed back at the image rule, the reasoning tokens
read again) and settled at exactly that, within the reservation; what OpenAI refuses is
refused, in its error shape, and bills nothing."""

from __future__ import annotations

import base64
import io
import json
from decimal import Decimal
from typing import Any

import openai
import pytest
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseFunctionToolCallOutputItem,
)
from PIL import Image

from proxy.simulator.response_tokens import MAINLINE_IMAGE_TOKENS
from proxy.simulator.responses import encrypted_reasoning
from tests.conftest import Simulator, Tollgate
from tests.responses_e2e import arrivals, billed, calm, check_charge, proxy, tool

__all__ = ["calm", "proxy"]  # the shared fixtures

FUNCTION = {
    "type": "function",
    "name": "take_photo",
    "description": "Take a photo of the room.",
    "parameters": {"type": "object", "properties": {"room": {"type": "string"}}},
}


def data_url(width: int = 64, height: int = 48) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def within_reservation(raw: Any, row: dict[str, Any]) -> None:
    """The cost the answer reported is the ledger's, and within its reservation."""
    cost = Decimal(raw.headers["x-tollgate-cost-usd"])
    assert abs(cost * 10**9 - row["cost_nanos"]) < 10**3
    assert row["estimated_nanos"] >= row["cost_nanos"] > 0


def test_a_teams_output_with_its_images_sent_back_is_billed_as_images(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """`input += response.output`: the image call comes back with its `result`, which the
    mainline model reads as an image and the image tool is given to edit."""
    client = proxy.client()
    history: list[Any] = [{"role": "user", "content": "Draw a red boat"}]
    first = client.responses.create(
        model="gpt-5.5", input=history, tools=[tool()], max_output_tokens=400, max_tool_calls=1
    )
    assert [item.type for item in first.output] == ["image_generation_call", "message"]
    history += first.output
    history.append({"role": "user", "content": "Now make the boat blue"})
    raw = client.responses.with_raw_response.create(
        model="gpt-5.5", input=history, tools=[tool()], max_output_tokens=400, max_tool_calls=1
    )
    assert raw.http_response.status_code == 200
    body = json.loads(raw.content)
    row = check_charge(proxy, simulator, body["id"], "gpt-5.5", "gpt-image-2")
    within_reservation(raw, row)
    record = billed(simulator, body["id"])
    before = billed(simulator, first.id)
    # The image fed back is one more image in the context, and one more given the tool.
    assert record["image_count"] == 1
    assert record["usage"]["image_input"] > before["usage"]["image_input"]
    # Read at each of its two samplings (one image call).
    assert record["mainline"]["input"] > before["mainline"]["input"] + 2 * MAINLINE_IMAGE_TOKENS
    assert body["output"][0]["action"] == "edit"


def test_a_function_output_holding_an_image_is_billed_as_an_image(
    proxy: Tollgate, simulator: Simulator
) -> None:
    client = proxy.client()

    def send(output: Any) -> tuple[Any, dict[str, Any]]:
        raw = client.responses.with_raw_response.create(
            model="gpt-5.5",
            input=[
                {"role": "user", "content": "Photograph the kitchen, then paint it"},
                {
                    "type": "function_call",
                    "call_id": "call_kitchen",
                    "name": "take_photo",
                    "arguments": '{"room": "kitchen"}',
                },
                {"type": "function_call_output", "call_id": "call_kitchen", "output": output},
            ],
            tools=[FUNCTION, tool()],
            max_output_tokens=400,
            max_tool_calls=1,
        )
        assert raw.http_response.status_code == 200
        body = json.loads(raw.content)
        row = check_charge(proxy, simulator, body["id"], "gpt-5.5", "gpt-image-2")
        within_reservation(raw, row)
        return body, billed(simulator, body["id"])

    _, text = send("The photo is taken.")
    body, image = send(
        [
            {"type": "input_text", "text": "The photo is taken."},
            {"type": "input_image", "image_url": data_url()},
        ]
    )
    assert (text["image_count"], image["image_count"]) == (0, 1)
    assert image["mainline"]["input"] == text["mainline"]["input"] + 2 * MAINLINE_IMAGE_TOKENS
    assert body["output"][0]["action"] == "edit"


def test_reasoning_sent_back_in_its_encrypted_content_is_billed_again_as_input(
    proxy: Tollgate, simulator: Simulator
) -> None:
    client = proxy.client()
    history: list[Any] = [{"role": "user", "content": "Draw a lighthouse"}]
    first = client.responses.create(
        model="gpt-5",
        input=history,
        tools=[tool()],
        include=["reasoning.encrypted_content"],
        store=False,
        max_output_tokens=400,
        max_tool_calls=1,
    )
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "image_generation_call", "message"]
    reasoning = first.output[0].model_dump(exclude_none=True)
    assert reasoning["encrypted_content"]

    def send(items: list[Any]) -> dict[str, Any]:
        raw = client.responses.with_raw_response.create(
            model="gpt-5",
            input=[*history, *items, {"role": "user", "content": "Add a storm"}],
            tools=[tool()],
            store=False,
            max_output_tokens=400,
            max_tool_calls=1,
        )
        assert raw.http_response.status_code == 200
        body = json.loads(raw.content)
        row = check_charge(proxy, simulator, body["id"], "gpt-5", "gpt-image-2")
        within_reservation(raw, row)
        return billed(simulator, body["id"])

    without = send(first.output[1:])
    carried = send(first.output)
    reasoned = first.usage.output_tokens_details.reasoning_tokens
    assert reasoned > 0
    # Every sampling reads the context again: the response's two (one image call).
    assert carried["mainline"]["input"] - without["mainline"]["input"] == 2 * reasoned


@pytest.mark.parametrize(
    ("model", "items", "message"),
    [
        pytest.param(
            "gpt-4.1-mini",
            [
                {
                    "type": "reasoning",
                    "summary": [],
                    "encrypted_content": encrypted_reasoning(64, "resp_earlier"),
                }
            ],
            "Reasoning input items can only be provided to a reasoning",
            id="reasoning-to-a-model-that-does-not-reason",
        ),
        pytest.param(
            "gpt-5",
            [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAAABforged"}],
            "could not be verified",
            id="forged-encrypted-content",
        ),
        pytest.param(
            "gpt-5.5",
            [{"type": "function_call_output", "call_id": "call_none", "output": "done"}],
            "No tool call found for function call output with call_id call_none",
            id="output-without-its-call",
        ),
        pytest.param(
            "gpt-5.5",
            [{"type": "function_call", "call_id": "call_x", "name": "f", "arguments": "{}"}],
            "No tool output found for function call call_x",
            id="call-without-its-output",
        ),
    ],
)
def test_items_openai_refuses_are_refused_in_its_shape_and_bill_nothing(
    proxy: Tollgate, simulator: Simulator, model: str, items: list[Any], message: str
) -> None:
    client = proxy.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=model,
            input=[{"role": "user", "content": "Go on"}, *items],
            tools=[FUNCTION],
            max_output_tokens=400,
        )
    error = caught.value.body
    assert isinstance(error, dict) and message in error["message"]
    assert error["type"] == "invalid_request_error"
    found = caught.value.response.headers["x-request-id"]
    rows = proxy.query(
        f"SELECT * FROM requests WHERE id = '{found}' OR upstream_request_id = '{found}'"
    )
    assert len(rows) == 1 and rows[0]["cost_nanos"] == 0


@pytest.mark.parametrize(
    ("mainline", "image_model", "stream"),
    [
        ("gpt-5.5", "gpt-image-2", False),
        ("gpt-5.5", "gpt-image-2", True),
        ("gpt-4o-mini", "gpt-image-1.5", False),
        ("gpt-4o-mini", "gpt-image-1", True),
    ],
)
def test_large_images_fed_back_to_every_call_stay_within_the_reservation(
    proxy: Tollgate, simulator: Simulator, mainline: str, image_model: str, stream: bool
) -> None:
    """Images at their largest, fed back as image calls' results and a function's output,
    are given to each of four calls (each call also edits the ones before
    it): the bill is still within what was reserved."""
    big = data_url(3840, 2160).removeprefix("data:image/png;base64,")
    items: list[Any] = [{"role": "user", "content": "Draw the harbour [[images:4]]"}]
    items += [
        {"type": "image_generation_call", "id": f"ig_{n}", "status": "completed", "result": big}
        for n in range(3)
    ]
    items += [
        {"type": "function_call", "call_id": "call_1", "name": "take_photo", "arguments": "{}"},
        {
            "type": "function_call_output",
            "call_id": "call_1",
            "output": [{"type": "input_image", "image_url": data_url(4096, 4096)}],
        },
    ]
    options: dict[str, Any] = {"quality": "high", "size": "3840x2160"}
    if image_model != "gpt-image-2":
        options.update(size="1536x1024", input_fidelity="high")
    if stream:
        options["partial_images"] = 3
    sent = proxy.client().responses.with_raw_response.create(
        model=mainline,
        input=items,
        tools=[FUNCTION, tool(image_model, **options)],
        max_output_tokens=2000,
        max_tool_calls=4,
        stream=stream,
    )
    assert sent.http_response.status_code == 200
    text = sent.http_response.read().decode()
    if stream:
        final = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        response_id = final[-1]["response"]["id"]
    else:
        response_id = json.loads(text)["id"]
    check_charge(proxy, simulator, response_id, mainline, image_model)
    record = billed(simulator, response_id)
    assert (record["n"], record["image_count"]) == (4, 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("allowed_callers", ["programmatic"]),
        ("allowed_callers", ["direct", "programmatic"]),
        ("async", True),
        ("defer_loading", True),
        ("cache_control", {"type": "ephemeral"}),
    ],
)
def test_a_function_tool_whose_calls_are_not_the_clients_alone_is_refused(
    proxy: Tollgate, simulator: Simulator, field: str, value: Any
) -> None:
    """A function called by a program OpenAI runs, one whose call lets the model sample on
    (`async`), one loaded by tool search, or a field Tollgate does not know: the bound
    (a function call ends the response, the client makes it) does not cover them. They used
    to be forwarded as given, the function tool's fields never read."""
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        proxy.client().responses.create(
            model="gpt-5.5",
            input="Photograph the kitchen",
            tools=[{**FUNCTION, field: value}],
            max_output_tokens=400,
        )
    assert caught.value.code == "invalid_request"
    assert caught.value.param == f"tools[0].{field}"  # type: ignore[attr-defined]
    assert len(arrivals(simulator)) == before  # nothing was forwarded


def test_a_function_tool_at_its_defaults_is_forwarded(proxy: Tollgate) -> None:
    plain = {**FUNCTION, "strict": False, "allowed_callers": ["direct"], "async": False}
    answer = proxy.client().responses.create(
        model="gpt-5.5",
        input="Photograph the kitchen",
        tools=[{**plain, "defer_loading": False, "output_schema": {"type": "string"}}],
        max_output_tokens=400,
    )
    assert answer.status == "completed"


def test_a_whole_output_sent_back_is_forwarded_with_the_fields_openai_documents(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Responses' outputs sent back whole, as the SDK sends them (`input += response.output`:
    its own field names, `async_` among them) and as `model_dump()` writes them (null for
    every field left unset), with function calls and their outputs as the input-items list
    gives them back (`created_by`): the reasoning with its summary and encrypted content,
    the image call with its record of how it was made, the message with its phase, the
    model's function call. Each goes upstream with only what OpenAI's input takes (the
    simulator answers any other field with OpenAI's "Unknown parameter" 400), and is billed
    and settled."""
    client = proxy.client()
    options: dict[str, Any] = {
        "model": "gpt-5",
        "tools": [FUNCTION, tool()],
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"summary": "auto"},
        "store": False,
        "max_output_tokens": 400,
        "max_tool_calls": 1,
    }
    history: list[Any] = [{"role": "user", "content": "Draw a lighthouse"}]
    first = client.responses.create(input=history, **options)
    reasoning, image, message = first.output
    assert reasoning.type == "reasoning" and reasoning.summary and reasoning.encrypted_content
    assert image.type == "image_generation_call" and image.result
    assert (image.action, image.output_format, image.quality, image.size) == (
        "generate",
        "png",
        "low",
        "1024x1024",
    )
    assert message.type == "message" and message.phase == "final_answer"
    history += [*first.output, {"role": "user", "content": "Photograph it [[call:take_photo]]"}]
    second = client.responses.create(input=history, **options)
    called = second.output[-1]
    assert called.type == "function_call" and called.name == "take_photo"
    history += second.output
    listed = ResponseFunctionToolCallOutputItem.model_validate(
        {
            "id": "fco_1",
            "type": "function_call_output",
            "call_id": called.call_id,
            "output": "The photo is taken.",
            "status": "completed",
            "caller": {"type": "direct"},
            "created_by": "user_1",
        }
    )
    # A call as the input-items list gives it back, with every field documented for it.
    call = ResponseFunctionToolCall.model_validate(
        {
            "id": "fc_1",
            "type": "function_call",
            "call_id": "call_photo",
            "name": "take_photo",
            "arguments": '{"room": "kitchen"}',
            "status": "completed",
            "caller": {"type": "direct"},
            "async": False,
        }
    )
    answer = {"type": "function_call_output", "call_id": "call_photo", "output": "Done."}
    items: list[Any] = [*history, listed, call, answer]
    dumped = [item if isinstance(item, dict) else item.model_dump() for item in items]
    for sent in (items, dumped):
        raw = client.responses.with_raw_response.create(
            input=[*sent, {"role": "user", "content": "Add a storm"}], **options
        )
        assert raw.http_response.status_code == 200
        body = json.loads(raw.content)
        within_reservation(raw, check_charge(proxy, simulator, body["id"], "gpt-5", "gpt-image-2"))
        record = billed(simulator, body["id"])
        assert record["image_count"] == 1  # the image sent back, given the tool to edit
        assert body["output"][-1]["phase"] == "final_answer"


@pytest.mark.parametrize(
    ("item", "field"),
    [
        (
            {"role": "user", "content": "Go on", "cache_control": {"type": "ephemeral"}},
            "cache_control",
        ),
        (
            {
                "type": "function_call",
                "call_id": "call_x",
                "name": "take_photo",
                "arguments": "{}",
                "prompt_cache_breakpoint": {"ttl": "12h"},
            },
            "prompt_cache_breakpoint",
        ),
        (
            {
                "type": "reasoning",
                "summary": [],
                "encrypted_content": encrypted_reasoning(64, "resp_earlier"),
                "reasoning_tokens": 64,
            },
            "reasoning_tokens",
        ),
        (
            {
                "type": "image_generation_call",
                "status": "completed",
                "result": data_url().removeprefix("data:image/png;base64,"),
                "model": "gpt-image-2",
            },
            "model",
        ),
    ],
    ids=["message", "function_call", "reasoning", "image_generation_call"],
)
def test_an_input_item_field_tollgate_has_no_rule_for_is_refused_and_not_forwarded(
    proxy: Tollgate, simulator: Simulator, item: dict[str, Any], field: str
) -> None:
    """A field OpenAI does not document for the item may be one it bills for (as a
    breakpoint bills cache writes): it used to be forwarded unread. It is refused in
    OpenAI's error shape, naming the field, and nothing reaches the upstream."""
    answers: list[Any] = []
    if item.get("type") == "function_call":  # with its output: else OpenAI refuses it anyway
        answers.append({"type": "function_call_output", "call_id": item["call_id"], "output": "ok"})
    before = len(arrivals(simulator))
    with pytest.raises(openai.BadRequestError) as caught:
        proxy.client().responses.create(
            model="gpt-5",
            input=[{"role": "user", "content": "Draw a harbour"}, item, *answers],
            tools=[FUNCTION, tool()],
            max_output_tokens=400,
            max_tool_calls=1,
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert caught.value.param == f"input[1].{field}"  # type: ignore[attr-defined]
    assert f"Tollgate does not forward 'input[1].{field}'" in error["message"]
    assert "with only its" in error["message"]
    assert len(arrivals(simulator)) == before  # nothing was forwarded
