"""The simulated Responses API (image_generation tool), driven by the official openai SDK
over loopback."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response
from PIL import Image

from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.simulator.options import DEFAULT_BACKGROUND_MS
from proxy.simulator.response_tokens import (
    MAINLINE_IMAGE_TOKENS,
    REASONING_TOKENS,
    answer_text,
    cached_tokens,
)
from proxy.simulator.responses import MAX_IMAGE_CALLS, encrypted_reasoning, read_order
from proxy.simulator.tokens import (
    PARTIAL_IMAGE_TOKENS,
    formula_tokens,
    image_input_tokens,
    text_tokens,
)
from tests.conftest import serving

API_KEY = "sk-sim-test-key-0002"
AUTH = {"authorization": f"Bearer {API_KEY}"}
TOOL: Any = {
    "type": "image_generation",
    "model": "gpt-image-2",
    "quality": "low",
    "size": "1024x1024",
}
LOW_1024 = formula_tokens(16, 1024, 1024)


@dataclass
class Sim:
    """A running simulator: the SDK client and a plain HTTP client for the /_sim endpoints."""

    http: httpx.Client
    client: openai.OpenAI

    def billing(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self.http.get("/_sim/billing").json()["requests"]
        return requests

    def last(self) -> dict[str, Any]:
        return self.billing()[-1]

    def configure(self, **knobs: Any) -> None:
        self.http.post("/_sim/config", json=knobs).raise_for_status()

    def post(self, body: dict[str, Any], path: str = "/v1/responses") -> httpx.Response:
        return self.http.post(path, headers=AUTH, json=body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(create_simulator_app(SimulatorSettings(api_key=API_KEY))) as url:
        yield url


@pytest.fixture
def sim(server: str) -> Iterator[Sim]:
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/reset").raise_for_status()
        http.post("/_sim/config", json={"latency_ms": 0, "payload_bytes": 0, "fault": None})
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        with client:
            yield Sim(http, client)


def decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def images_of(response: Response) -> list[Any]:
    return [item for item in response.output if item.type == "image_generation_call"]


def test_a_response_with_the_image_tool_returns_a_decodable_image_and_a_message(
    sim: Sim,
) -> None:
    tool = {**TOOL, "model": "gpt-image-1.5", "size": "1536x1024", "output_format": "webp"}
    response = sim.client.responses.create(model="gpt-4.1", input="Draw a cat", tools=[tool])
    assert response.status == "completed"
    assert response.output_text == answer_text(1)
    [call] = images_of(response)
    assert call.status == "completed" and call.id.startswith("ig_")
    assert call.revised_prompt == "Draw a cat"
    assert (call.size, call.quality, call.output_format) == ("1536x1024", "low", "webp")
    image = decoded(call.result)
    assert (image.format, image.size) == ("WEBP", (1536, 1024))
    assert [item.type for item in response.output] == ["image_generation_call", "message"]


def test_usage_is_the_mainline_models_and_tool_usage_the_image_token_rules(sim: Sim) -> None:
    prompt = "Draw a lighthouse at dusk"
    response = sim.client.responses.create(
        model="gpt-5",
        instructions="Be brief.",
        input=prompt,
        tools=[TOOL],
    )
    usage, image_gen = response.usage, response.tool_usage
    assert usage is not None and image_gen is not None
    context = text_tokens("Be brief.") + text_tokens(prompt)
    expected_output = REASONING_TOKENS + text_tokens(prompt) + text_tokens(answer_text(1))
    # Sampled twice (the call, then the answer): the second sampling reads the context
    # again, with the call's prompt and the reasoning it wrote, and the image it made.
    again = context + text_tokens(prompt) + REASONING_TOKENS + MAINLINE_IMAGE_TOKENS
    expected_input = context + again
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens) == (expected_input, 0)
    assert usage.output_tokens == expected_output
    assert usage.output_tokens_details.reasoning_tokens == REASONING_TOKENS
    assert usage.total_tokens == expected_input + expected_output
    gen = image_gen.image_gen
    assert gen.input_tokens_details.text_tokens == text_tokens(prompt)
    assert gen.input_tokens_details.image_tokens == 0
    assert gen.output_tokens == LOW_1024
    assert gen.total_tokens == text_tokens(prompt) + LOW_1024
    entry = sim.last()
    assert (entry["endpoint"], entry["model"], entry["mainline_model"]) == (
        "responses",
        "gpt-image-2",
        "gpt-5",
    )
    assert entry["billed"] and entry["images"] == 1
    assert entry["mainline"] == {
        "input": expected_input,
        "cached_input": 0,
        "output": expected_output,
        "reasoning": REASONING_TOKENS,
        "cache_write": 0,
    }
    assert entry["usage"] == {
        "text_input": text_tokens(prompt),
        "image_input": 0,
        "image_output": LOW_1024,
        "text_output": 0,
    }


def test_a_model_that_bills_its_cache_writes_reports_every_uncached_token_written(
    sim: Sim,
) -> None:
    """gpt-5.6-sol writes its input to the prompt cache (OpenAI's implicit breakpoint) and
    reports it as `cache_write_tokens`; an earlier model writes none it bills."""
    for model, writes in (("gpt-5.6-sol", True), ("gpt-5.5", False)):
        response = sim.client.responses.create(model=model, input="Draw a fox", tools=[TOOL])
        usage = response.usage
        assert usage is not None
        written = usage.input_tokens_details.cache_write_tokens
        assert written == (usage.input_tokens if writes else 0)
        [entry] = [e for e in sim.http.get("/_sim/billing").json()["requests"]
                   if e["id"] == response.id]  # fmt: skip
        assert entry["mainline"]["cache_write"] == written


@pytest.mark.parametrize(
    "options",
    [{"tools": []}, {"tools": [TOOL], "tool_choice": "none"}],
    ids=["no tool", "tool_choice none"],
)
def test_no_image_is_made_without_the_tool_or_with_tool_choice_none(
    sim: Sim, options: dict[str, Any]
) -> None:
    response = sim.client.responses.create(model="gpt-4.1-mini", input="Draw a cat", **options)
    assert images_of(response) == []
    assert response.output_text == answer_text(0)
    assert response.tool_usage is not None
    assert response.tool_usage.image_gen.total_tokens == 0
    assert sim.last()["images"] == 0


def test_an_images_marker_asks_for_several_images_and_max_tool_calls_caps_them(
    sim: Sim,
) -> None:
    prompt = "Three cats [[images:3]]"
    three = sim.client.responses.create(model="gpt-4.1", input=prompt, tools=[TOOL])
    assert len(images_of(three)) == 3
    assert three.tool_usage is not None
    assert three.tool_usage.image_gen.output_tokens == 3 * LOW_1024
    assert images_of(three)[0].revised_prompt == "Three cats"
    two = sim.client.responses.create(
        model="gpt-4.1",
        input=prompt,
        tools=[TOOL],
        max_tool_calls=2,
    )
    assert len(images_of(two)) == 2
    assert [e["images"] for e in sim.billing()] == [3, 2]


def test_input_images_make_an_edit_billed_as_image_input_to_both_models(sim: Sim) -> None:
    content = [
        {"type": "input_text", "text": "Make it blue"},
        {"type": "input_image", "image_url": "https://example.com/cat.png"},
    ]
    response = sim.client.responses.create(
        model="gpt-4.1",
        input=[{"role": "user", "content": content}],
        tools=[TOOL],
    )
    [call] = images_of(response)
    assert call.action == "edit"
    assert response.usage is not None and response.tool_usage is not None
    context = text_tokens("Make it blue") + MAINLINE_IMAGE_TOKENS
    again = context + text_tokens("Make it blue") + MAINLINE_IMAGE_TOKENS  # and the image made
    assert response.usage.input_tokens == context + again
    reference = image_input_tokens(1024, 1024, high_fidelity=True)  # gpt-image-2: always high
    assert response.tool_usage.image_gen.input_tokens_details.image_tokens == reference
    assert sim.last()["image_count"] == 1


def test_a_stream_sends_every_event_in_order_and_completed_carries_the_usage(
    sim: Sim,
) -> None:
    tool = {**TOOL, "partial_images": 2}
    stream = sim.client.responses.create(
        model="gpt-4.1",
        input="Draw a cat",
        tools=[tool],
        stream=True,
    )
    events = list(stream)
    types = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    image_events = [
        "response.output_item.added",
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.completed",
        "response.output_item.done",
    ]
    assert types[:9] == ["response.created", "response.in_progress", *image_events]
    assert types[9:11] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == answer_text(1)
    partials = [e for e in events if e.type == "response.image_generation_call.partial_image"]
    assert [p.partial_image_index for p in partials] == [0, 1]
    assert decoded(partials[0].partial_image_b64).size == (1024, 1024)
    completed = events[-1]
    assert completed.type == "response.completed"
    final = completed.response
    assert final.tool_usage is not None and final.usage is not None
    expected = LOW_1024 + 2 * PARTIAL_IMAGE_TOKENS
    assert final.tool_usage.image_gen.output_tokens == expected
    assert decoded(images_of(final)[0].result).size == (1024, 1024)
    entry = sim.last()
    assert entry["stream"] and entry["usage"]["image_output"] == expected
    assert entry["mainline"]["output"] == final.usage.output_tokens


def test_the_beta_query_path_is_served_like_the_plain_path(sim: Sim) -> None:
    answer = sim.post(
        {"model": "gpt-4.1", "input": "Draw", "tools": [TOOL]}, "/v1/responses?beta=true"
    )
    assert answer.status_code == 200
    assert answer.json()["output"][0]["type"] == "image_generation_call"
    assert sim.last()["endpoint"] == "responses"


def test_max_output_tokens_below_the_answer_makes_an_incomplete_response(sim: Sim) -> None:
    response = sim.client.responses.create(
        model="gpt-5",
        input="Draw a cat",
        tools=[TOOL],
        max_output_tokens=70,
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 70
    assert len(images_of(response)) == 1
    assert len(response.output_text) < len(answer_text(1))
    stream = sim.client.responses.create(
        model="gpt-5",
        input="Draw a cat",
        tools=[TOOL],
        max_output_tokens=70,
        stream=True,
    )
    last = list(stream)[-1]
    assert last.type == "response.incomplete"
    assert last.response.usage is not None and last.response.usage.output_tokens == 70


def test_the_failed_fault_ends_a_stream_with_response_failed_billed_for_its_image(
    sim: Sim,
) -> None:
    stream = sim.client.responses.create(
        model="gpt-4.1",
        input="Draw [[fault:failed]]",
        tools=[TOOL],
        stream=True,
    )
    events = list(stream)
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"
    assert [item.type for item in failed.output] == ["image_generation_call"]
    assert "response.output_text.delta" not in [e.type for e in events]
    assert failed.usage is not None and failed.tool_usage is not None
    assert failed.usage.output_tokens == text_tokens("Draw")
    assert failed.tool_usage.image_gen.output_tokens == LOW_1024
    assert sim.last()["billed"]


def test_the_truncate_fault_cuts_a_stream_before_its_terminal_event_and_still_bills(
    sim: Sim,
) -> None:
    seen: list[str] = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        stream = sim.client.responses.create(
            model="gpt-4.1",
            input="Draw [[fault:truncate]]",
            tools=[TOOL],
            stream=True,
        )
        seen.extend(event.type for event in stream)
    assert seen[0] == "response.created" and seen[-1] == "response.output_item.done"
    assert sim.last()["billed"]


def test_the_failed_fault_answers_a_non_stream_request_with_a_failed_response(
    sim: Sim,
) -> None:
    response = sim.client.responses.create(
        model="gpt-4.1", input="Draw [[fault:failed]]", tools=[TOOL]
    )
    assert response.status == "failed" and response.output_text == ""
    assert len(images_of(response)) == 1
    assert sim.last()["usage"]["image_output"] == LOW_1024


def test_the_garbage_fault_answers_a_body_that_is_not_json_and_bills(sim: Sim) -> None:
    answer = sim.post({"model": "gpt-4.1", "input": "Draw [[fault:garbage]]", "tools": [TOOL]})
    assert answer.status_code == 200
    with pytest.raises(ValueError):
        answer.json()
    assert sim.last()["billed"]


def test_nousage_fault_answers_without_usage_or_tool_usage_but_bills(sim: Sim) -> None:
    response = sim.client.responses.create(
        model="gpt-4.1",
        input="Draw [[fault:nousage]]",
        tools=[TOOL],
    )
    assert response.usage is None and response.tool_usage is None
    assert sim.last()["billed"]


@pytest.mark.parametrize(
    ("marker", "error", "status"),
    [
        ("[[fault:429]]", openai.RateLimitError, 429),
        ("[[fault:500]]", openai.InternalServerError, 500),
        ("a forbidden picture", openai.BadRequestError, 400),
    ],
)
def test_error_faults_and_moderation_answer_in_openais_shape_and_bill_nothing(
    sim: Sim, marker: str, error: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(error) as caught:
        sim.client.responses.create(model="gpt-4.1", input=marker, tools=[TOOL])
    assert caught.value.status_code == status
    entry = sim.last()
    assert (entry["status"], entry["billed"]) == (status, False)


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"model": "gpt-unknown"}, "model", "model_not_found"),
        ({"tools": [{**TOOL, "colour": "red"}]}, "tools[0].colour", "unknown_parameter"),
        (
            {"tools": [{**TOOL, "partial_images": 4}]},
            "tools[0].partial_images",
            "integer_above_max_value",
        ),
        (
            {"tools": [{**TOOL, "model": "gpt-image-1.5", "size": "2048x2048"}]},
            "tools[0].size",
            "invalid_value",
        ),
        ({"tools": [{**TOOL, "size": "1000x1000"}]}, "tools[0].size", "invalid_value"),
        ({"tools": [{**TOOL, "model": "dall-e-3"}]}, "tools[0].model", "invalid_value"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type", "invalid_value"),
        ({"max_output_tokens": 8}, "max_output_tokens", "integer_below_min_value"),
        ({"max_tool_calls": "two"}, "max_tool_calls", "invalid_type"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ({"background": True, "store": False}, "background", "invalid_value"),
        ({"input": []}, "input", "missing_required_parameter"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "input[0].content[0].type",
            "invalid_value",
        ),
        ({"temperatur": 1}, "temperatur", "unknown_parameter"),
    ],
)
def test_invalid_requests_are_400s_in_openais_shape_naming_the_parameter(
    sim: Sim, change: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        # Sent over the SDK's own body, as a caller's raw extra_body would be.
        sim.client.responses.create(
            model="gpt-4.1",
            input="Draw a cat",
            tools=[TOOL],
            extra_body=change,
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert sim.last()["status"] == 400 and not sim.last()["billed"]


def test_a_background_response_is_queued_then_completed_after_the_latency_and_billed_then(
    sim: Sim,
) -> None:
    sim.configure(latency_ms=1500)
    queued = sim.client.responses.create(
        model="gpt-4.1",
        input="Draw a cat",
        tools=[TOOL],
        background=True,
    )
    assert queued.status == "queued" and queued.background
    assert queued.usage is None and queued.output == []
    assert sim.client.responses.retrieve(queued.id).status == "in_progress"
    assert sim.billing() == []
    deadline = time.monotonic() + 60
    while (done := sim.client.responses.retrieve(queued.id)).status == "in_progress":
        assert time.monotonic() < deadline, "the background response never ended"
        time.sleep(0.05)
    assert done.status == "completed"
    assert done.tool_usage is not None and done.tool_usage.image_gen.output_tokens == LOW_1024
    assert decoded(images_of(done)[0].result).size == (1024, 1024)
    [entry] = sim.billing()
    assert entry["id"] == queued.id and entry["billed"] and entry["images"] == 1


def test_a_background_response_is_queued_at_its_create_and_runs_on_without_latency(
    sim: Sim,
) -> None:
    # OpenAI answers every background create `queued` and runs the response afterwards.
    # Without latency (the knobs `serve --simulate` starts with) it still runs for
    # `background_ms`, so a client sees it queued, and can cancel it, as with OpenAI.
    assert sim.http.get("/_sim/config").json()["background_ms"] == DEFAULT_BACKGROUND_MS > 0
    queued = sim.client.responses.create(
        model="gpt-4.1", input="Draw a cat", tools=[TOOL], background=True
    )
    assert queued.status == "queued" and queued.usage is None and queued.output == []
    cancelled = sim.client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.output == []
    sim.configure(background_ms=0)  # a run of no time: ended when next looked at
    ended = sim.client.responses.create(
        model="gpt-4.1", input="Draw a dog", tools=[TOOL], background=True
    )
    assert ended.status == "queued"
    assert sim.client.responses.retrieve(ended.id).status == "completed"
    sim.configure(background_ms=DEFAULT_BACKGROUND_MS)


def test_a_background_stream_is_streamed_at_once_and_retrievable_as_completed(
    sim: Sim,
) -> None:
    sim.configure(latency_ms=60)
    stream = sim.client.responses.create(
        model="gpt-4.1", input="Draw a cat", tools=[TOOL], background=True, stream=True
    )
    last = list(stream)[-1]
    assert last.type == "response.completed" and last.response.background
    assert sim.client.responses.retrieve(last.response.id).status == "completed"
    assert sim.last()["billed"]


def test_a_background_stream_is_streamed_again_by_retrieve_after_starting_after(
    sim: Sim,
) -> None:
    # OpenAI lets a client reconnect to a background stream: `retrieve(id, stream=True,
    # starting_after=N)` replays the events after sequence number N. It bills nothing.
    first = list(
        sim.client.responses.create(
            model="gpt-4.1", input="Draw a cat", tools=[TOOL], background=True, stream=True
        )
    )
    response_id = first[-1].response.id
    billed = len(sim.billing())
    again = list(sim.client.responses.retrieve(response_id, stream=True, starting_after=3))
    assert [e.sequence_number for e in again] == [e.sequence_number for e in first[4:]]
    assert [e.type for e in again] == [e.type for e in first[4:]]
    assert again[-1].type == "response.completed"
    assert again[-1].response.usage == first[-1].response.usage
    whole = list(sim.client.responses.retrieve(response_id, stream=True))
    assert [e.type for e in whole] == [e.type for e in first]
    assert len(sim.billing()) == billed
    with pytest.raises(openai.BadRequestError):
        list(sim.client.responses.retrieve(response_id, stream=True, starting_after="x"))  # type: ignore[arg-type]
    # Neither a response that was not a background stream.
    plain = sim.client.responses.create(model="gpt-4.1", input="Draw", background=True)
    with pytest.raises(openai.NotFoundError):
        list(sim.client.responses.retrieve(plain.id, stream=True))


def test_cancelling_a_background_response_bills_only_the_mainline_input(sim: Sim) -> None:
    sim.configure(latency_ms=60_000)
    queued = sim.client.responses.create(
        model="gpt-4.1",
        input="Draw a cat",
        tools=[TOOL],
        background=True,
    )
    cancelled = sim.client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.output == []
    assert cancelled.usage is not None and cancelled.tool_usage is not None
    assert cancelled.usage.input_tokens == text_tokens("Draw a cat")
    assert cancelled.usage.output_tokens == 0
    assert cancelled.tool_usage.image_gen.total_tokens == 0
    assert sim.client.responses.retrieve(queued.id).status == "cancelled"
    [entry] = sim.billing()
    assert entry["images"] == 0 and entry["mainline"]["input"] == text_tokens("Draw a cat")
    assert entry["usage"]["image_output"] == 0


def test_only_a_background_response_can_be_cancelled(sim: Sim) -> None:
    response = sim.client.responses.create(model="gpt-4.1", input="Draw", tools=[TOOL])
    with pytest.raises(openai.BadRequestError):
        sim.client.responses.cancel(response.id)


def test_retrieve_returns_a_stored_response_and_delete_removes_it(sim: Sim) -> None:
    response = sim.client.responses.create(model="gpt-4.1", input="Draw", tools=[TOOL])
    again = sim.client.responses.retrieve(response.id)
    assert again.id == response.id and again.status == "completed"
    assert again.usage == response.usage
    sim.client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        sim.client.responses.retrieve(response.id)


def test_a_response_with_store_false_cannot_be_retrieved(sim: Sim) -> None:
    response = sim.client.responses.create(model="gpt-4.1", input="Draw", store=False)
    with pytest.raises(openai.NotFoundError):
        sim.client.responses.retrieve(response.id)


def test_input_items_list_the_input_messages_newest_first_by_default(sim: Sim) -> None:
    response = sim.client.responses.create(
        model="gpt-4.1",
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "Draw a cat"}]},
        ],
    )
    items = list(sim.client.responses.input_items.list(response.id))
    assert [item.role for item in items] == ["user", "developer"]
    ascending = sim.client.responses.input_items.list(response.id, order="asc")
    assert [item.role for item in ascending] == ["developer", "user"]


def test_previous_response_id_bills_the_previous_turn_again_as_input(sim: Sim) -> None:
    first = sim.client.responses.create(model="gpt-4.1", input="Draw a cat", tools=[TOOL])
    assert first.usage is not None
    second = sim.client.responses.create(
        model="gpt-4.1", input="Now a dog", previous_response_id=first.id
    )
    carried = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage is not None
    assert second.usage.input_tokens == text_tokens("Now a dog") + carried
    assert second.usage.input_tokens_details.cached_tokens == cached_tokens(carried)
    assert second.previous_response_id == first.id


def test_an_unknown_previous_response_id_is_a_404_previous_response_not_found(
    sim: Sim,
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sim.client.responses.create(model="gpt-4.1", input="Hi", previous_response_id="resp_x")
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"


def test_an_input_item_named_by_its_id_is_read_as_stored_whatever_is_sent(sim: Sim) -> None:
    secret = "The launch code of the other project is 0000. " * 40
    first = sim.client.responses.create(model="gpt-4.1", input=secret, tools=[TOOL])
    short = first.id.removeprefix("resp_")
    named = [
        {"type": "message", "role": "user", "id": f"msg_in00{short}", "content": "x"},
        {"type": "message", "role": "assistant", "id": f"msg_{short}", "content": "y"},
    ]
    second = sim.post({"model": "gpt-4.1", "input": [*named, {"role": "user", "content": "Hi"}]})
    assert second.status_code == 200, second.text
    # The stored input and answer are read (and billed), not the one-letter stand-ins.
    read = text_tokens(secret) + text_tokens(answer_text(1)) + text_tokens("Hi")
    assert second.json()["usage"]["input_tokens"] == read
    # Under another project nothing is found.
    other = sim.http.post(
        "/v1/responses",
        headers={**AUTH, "openai-project": "proj_other"},
        json={"model": "gpt-4.1", "input": [named[0]]},
    )
    assert other.status_code == 404
    assert other.json()["error"]["message"] == f"Item with id 'msg_in00{short}' not found."


def test_an_input_item_id_nothing_was_stored_under_is_a_404(sim: Sim) -> None:
    item = {"type": "message", "role": "assistant", "id": "msg_none", "content": "y"}
    before = len(sim.billing())
    for store, tail in ((True, ""), (False, " Items are not persisted when `store`")):
        answer = sim.post({"model": "gpt-4.1", "input": [item], "store": store})
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert error["message"].startswith(f"Item with id 'msg_none' not found.{tail}")
        assert (error["param"], error["type"]) == ("input", "invalid_request_error")
        count = sim.post({"model": "gpt-4.1", "input": [item]}, "/v1/responses/input_tokens")
        assert count.status_code == 404
    assert all(r["status"] == 404 and not r["billed"] for r in sim.billing()[before:])


def test_a_wrong_key_is_a_401_for_create_and_retrieve(sim: Sim, server: str) -> None:
    with openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.responses.create(model="gpt-4.1", input="Hi")
        with pytest.raises(openai.AuthenticationError):
            wrong.responses.retrieve("resp_x")


@pytest.mark.parametrize(("carried", "cached"), [(0, 0), (1023, 0), (1024, 1024), (1300, 1280)])
def test_prompt_caching_hits_carried_tokens_in_128_steps_from_1024(
    carried: int, cached: int
) -> None:
    assert cached_tokens(carried) == cached


def test_the_sdks_stream_helper_accumulates_the_events_into_the_final_response(
    sim: Sim,
) -> None:
    with sim.client.responses.stream(
        model="gpt-5", input="Two cats [[images:2]]", tools=[{**TOOL, "partial_images": 1}]
    ) as stream:
        final = stream.get_final_response()
    assert final.output_text == answer_text(2)
    assert [item.type for item in final.output] == [
        "image_generation_call",
        "image_generation_call",
        "message",
    ]
    assert final.tool_usage is not None
    assert final.tool_usage.image_gen.output_tokens == 2 * (LOW_1024 + PARTIAL_IMAGE_TOKENS)


@pytest.mark.parametrize(
    ("prompt", "options", "calls"),
    [
        ("a cat", {}, 1),
        ("cats [[images:3]]", {}, 3),
        ("cats [[images:9]]", {}, MAX_IMAGE_CALLS),
        ("cats [[images:0]]", {}, 0),
        ("cats [[images:0]]", {"tool_choice": "required"}, 1),
        ("cats [[images:0]]", {"tool_choice": {"type": "image_generation"}}, 1),
        ("cats [[images:3]]", {"max_tool_calls": 2}, 2),
        ("cats [[images:3]]", {"tool_choice": "none"}, 0),
    ],
)
def test_the_image_call_count_follows_the_marker_tool_choice_and_max_tool_calls(
    prompt: str, options: dict[str, Any], calls: int
) -> None:
    order = read_order({"model": "gpt-4.1", "input": prompt, "tools": [TOOL], **options})
    assert order.image_calls == calls
    assert order.revised_prompt == prompt.split(" [[")[0]


def test_input_tokens_are_counted_as_a_response_would_bill_them_and_bill_nothing(
    sim: Sim,
) -> None:
    first = sim.client.responses.create(model="gpt-4.1", input="Draw a cat", tools=[TOOL])
    assert first.usage is not None
    counted = sim.client.responses.input_tokens.count(model="gpt-4.1", input="Draw a cat")
    # One sampling's input: the response itself, sampled again after its image call,
    # billed that context twice (and what it wrote, and the image it made).
    assert counted.input_tokens == text_tokens("Draw a cat")
    assert first.usage.input_tokens > 2 * counted.input_tokens
    again = sim.client.responses.input_tokens.count(
        model="gpt-4.1", input="Again", previous_response_id=first.id
    )
    carried = first.usage.input_tokens + first.usage.output_tokens
    assert again.input_tokens == text_tokens("Again") + carried
    assert len(sim.billing()) == 1
    with pytest.raises(openai.NotFoundError):
        sim.client.responses.input_tokens.count(
            model="gpt-4.1", input="x", previous_response_id="resp_none"
        )
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        sim.client.responses.input_tokens.count(
            model="gpt-4.1", input="x", extra_body={"max_output_tokens": 100}
        )


def test_input_items_other_than_messages_are_read_into_the_context_as_openai_reads_them(
    sim: Sim,
) -> None:
    """Function calls and their outputs (text and images), reasoning carried in its
    encrypted content and image calls fed back with their result: each billed as input."""
    first = sim.client.responses.create(
        model="gpt-5",
        input="Draw a cat",
        tools=[TOOL],
        include=["reasoning.encrypted_content"],
        store=False,
    )
    assert [item.type for item in first.output] == ["reasoning", "image_generation_call", "message"]
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    image = images_of(first)[0].result
    assert image is not None
    function = {"type": "function", "name": "look", "parameters": {"type": "object"}}
    base = [{"role": "user", "content": "Go on"}]
    items = [
        {"type": "function_call", "call_id": "c1", "name": "look", "arguments": '{"at": 1}'},
        {
            "type": "function_call_output",
            "call_id": "c1",
            "output": [
                {"type": "input_text", "text": "seen"},
                {"type": "input_image", "image_url": f"data:image/png;base64,{image}"},
            ],
        },
        reasoning.model_dump(exclude_none=True),
        {"type": "image_generation_call", "id": "ig_x", "status": "completed", "result": image},
    ]
    order = read_order({"model": "gpt-5", "input": [*base, *items], "tools": [function]})
    assert order.reasoning_input == REASONING_TOKENS
    assert order.texts == ("Go on", "look", '{"at": 1}', "seen")
    assert [(i.width, i.height) for i in order.images] == [(1024, 1024), (1024, 1024)]
    bare = sim.client.responses.create(model="gpt-5", input=base, tools=[function])
    full = sim.client.responses.create(model="gpt-5", input=[*base, *items], tools=[function])
    assert bare.usage is not None and full.usage is not None
    extra = text_tokens("look") + text_tokens('{"at": 1}') + text_tokens("seen") + REASONING_TOKENS
    assert full.usage.input_tokens == bare.usage.input_tokens + extra + 2 * MAINLINE_IMAGE_TOKENS


@pytest.mark.parametrize(
    ("model", "item", "message"),
    [
        (
            "gpt-4.1",
            {"type": "reasoning", "summary": [], "encrypted_content": encrypted_reasoning(9, "r")},
            "can only be provided to a reasoning",
        ),
        ("gpt-5", {"type": "reasoning", "summary": [], "encrypted_content": "x"}, "verified"),
        ("gpt-5", {"type": "reasoning", "summary": []}, "input[1].id"),
        ("gpt-5", {"type": "function_call_output", "call_id": "c", "output": "x"}, "No tool call"),
        (
            "gpt-5",
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            "No tool output",
        ),
        ("gpt-5", {"type": "image_generation_call", "status": "completed"}, "input[1].id"),
        ("gpt-5", {"type": "file_search_call", "id": "fs_1"}, "file_search_call"),
        (
            "gpt-5",
            {"role": "user", "content": "x", "created_by": "user_1"},
            "Unknown parameter: 'input[1].created_by'.",
        ),
        (
            "gpt-5",
            {"role": "assistant", "content": "x", "phase": "draft"},
            "Invalid value: 'draft'",
        ),
        (
            "gpt-5",
            {"type": "image_generation_call", "result": "iVBOR", "model": "gpt-image-2"},
            "Unknown parameter: 'input[1].model'.",
        ),
        (
            "gpt-5",
            {"type": "reasoning", "summary": [], "encrypted_content": "x", "async_": None},
            "Unknown parameter: 'input[1].async_'.",
        ),
    ],
)
def test_input_items_openai_refuses_are_400s(
    sim: Sim, model: str, item: dict[str, Any], message: str
) -> None:
    answer = sim.post({"model": model, "input": [{"role": "user", "content": "x"}, item]})
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]
    assert not any(entry["billed"] for entry in sim.billing())


def test_an_item_named_by_its_id_alone_is_a_404_when_nothing_was_stored_under_it(
    sim: Sim,
) -> None:
    for item in (
        {"type": "reasoning", "id": "rs_none", "summary": []},
        {"type": "image_generation_call", "id": "ig_none", "status": "completed", "result": None},
    ):
        answer = sim.post({"model": "gpt-5", "input": [{"role": "user", "content": "x"}, item]})
        assert answer.status_code == 404, answer.text


def test_output_items_carry_the_fields_openai_sends_and_go_back_as_input(sim: Sim) -> None:
    """A reasoning model's message is labelled its final answer; its reasoning carries the
    summary asked for; each item, sent back whole, is taken as OpenAI takes it."""
    first = sim.client.responses.create(
        model="gpt-5",
        input="Draw a kite",
        tools=[TOOL],
        include=["reasoning.encrypted_content"],
        reasoning={"summary": "auto"},
        store=False,
    )
    reasoning, image, message = first.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].type == "summary_text"
    assert "Draw a kite" in reasoning.summary[0].text
    assert image.type == "image_generation_call" and image.revised_prompt == "Draw a kite"
    assert message.type == "message" and message.phase == "final_answer"
    again = sim.client.responses.create(
        model="gpt-5",
        input=[
            {"role": "user", "content": "Draw a kite"},
            *[item.model_dump(exclude={"id"}) for item in first.output],  # not stored
            {"role": "user", "content": "Now a red one"},
        ],
        tools=[TOOL],
        store=False,
    )
    assert again.status == "completed"
    plain = sim.client.responses.create(model="gpt-4.1", input="Draw a kite", tools=[TOOL])
    assert plain.output[-1].type == "message" and plain.output[-1].phase is None


def test_a_function_named_by_a_call_marker_is_called_and_ends_the_response(sim: Sim) -> None:
    """The model calls the function instead of the image tool and writes no message: its
    output tokens are the call's name and arguments (and its reasoning), and the call,
    sent back with its output, is read as OpenAI reads it."""
    function = {"type": "function", "name": "take_photo", "parameters": {"type": "object"}}
    prompt = "Photograph the kitchen [[call:take_photo]]"
    answer = sim.client.responses.create(
        model="gpt-5", input=prompt, tools=[function, TOOL], store=False
    )
    (call,) = [item for item in answer.output if item.type != "reasoning"]
    assert call.type == "function_call" and call.name == "take_photo"
    assert (call.status, call.arguments) == ("completed", '{"request": "Photograph the kitchen"}')
    written = text_tokens("take_photo") + text_tokens(call.arguments) + REASONING_TOKENS
    assert answer.usage is not None and answer.usage.output_tokens == written
    assert not sim.last()["n"] and not sim.last()["usage"]["image_output"]
    events = list(
        sim.client.responses.create(
            model="gpt-5", input=prompt, tools=[function, TOOL], stream=True, store=False
        )
    )
    assert [event.type for event in events][2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    again = sim.client.responses.create(
        model="gpt-5",
        input=[
            {"role": "user", "content": prompt},
            call.model_dump(exclude={"id"}, by_alias=True),  # `async`, not `async_`
            {"type": "function_call_output", "call_id": call.call_id, "output": "Taken."},
            {"role": "user", "content": "Now paint it"},
        ],
        tools=[function, TOOL],
        store=False,
    )
    assert again.output[-1].type == "message"
