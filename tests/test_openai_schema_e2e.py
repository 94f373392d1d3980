"""Tollgate against OpenAI's own API schema, through the official openai client: what a
drop-in client may send, and what it is answered."""

from __future__ import annotations

import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import RESEARCH_KEY, Simulator, Tollgate


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def api_arrivals(simulator: Simulator) -> int:
    """How many requests have reached the simulated API (not its `/_sim/` pages)."""
    found = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"]
    return sum(1 for a in found if a["raw_path"].startswith("/v1/"))


@pytest.mark.parametrize("fmt", ["gif", "svg"])
@pytest.mark.parametrize("door", ["generations", "edits", "responses"])
def test_an_output_format_openai_takes_but_tollgate_cannot_price_is_refused_as_unpriced(
    tollgate: Tollgate, simulator: Simulator, door: str, fmt: str
) -> None:
    # The openai client types `output_format` as png, webp, jpeg, gif or svg: a gif or svg
    # is no unknown value, but its cost (the frames, the SVG's authoring model) is not in
    # the price book. The refusal says that, not that only png, jpeg and webp exist.
    client = tollgate.client()
    before = len(simulator.billing())
    with pytest.raises(openai.BadRequestError) as caught:
        if door == "generations":
            client.images.generate(model="gpt-image-2", prompt="a fox", output_format=fmt)  # type: ignore[arg-type]
        elif door == "edits":
            client.images.edit(
                model="gpt-image-2",
                image=("a.png", png(), "image/png"),
                prompt="a fox",
                output_format=fmt,  # type: ignore[arg-type]
            )
        else:
            tool: Any = {"type": "image_generation", "model": "gpt-image-2", "output_format": fmt}
            client.responses.create(
                model="gpt-5.5",
                input="a fox",
                tools=[tool],
                max_output_tokens=1000,
                max_tool_calls=1,
            )
    error = caught.value.body
    assert isinstance(error, dict)
    assert "cannot price" in error["message"] and repr(fmt) in error["message"]
    assert "Supported values" not in error["message"]
    assert error["param"] == ("tools[0].output_format" if door == "responses" else "output_format")
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert len(simulator.billing()) == before


def test_a_background_stream_is_reconnected_to_through_tollgate_for_its_team_only(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    # The SDK's `retrieve(id, stream=True, starting_after=N)` resumes a background stream
    # the client lost: Tollgate passes the events through to the team that made it, and
    # the reconnection bills nothing.
    client = tollgate.client()
    tool: Any = {"type": "image_generation", "model": "gpt-image-2", "quality": "low"}
    response_id = None
    with client.responses.create(
        model="gpt-5.5",
        input="a fox",
        tools=[tool],
        max_output_tokens=1000,
        max_tool_calls=1,
        background=True,
        stream=True,
    ) as stream:
        for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            if event.sequence_number == 2:
                break  # the connection lost
    assert response_id is not None
    billed = len(simulator.billing())
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert rest[0].sequence_number == 3
    assert rest[-1].type == "response.completed" and rest[-1].response.id == response_id
    assert any(e.type == "response.image_generation_call.completed" for e in rest)
    assert len(simulator.billing()) == billed
    with pytest.raises(openai.NotFoundError):
        list(tollgate.client(RESEARCH_KEY).responses.retrieve(response_id, stream=True))


def test_a_responses_path_tollgate_does_not_serve_is_a_404_that_says_so(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    # `client.responses.compact` is an OpenAI path (it runs a model on the context): the
    # 404 says Tollgate does not forward it, not that only image endpoints exist.
    arrived = api_arrivals(simulator)
    with pytest.raises(openai.NotFoundError) as caught:
        tollgate.client().responses.compact(model="gpt-5.5", input="a fox")
    message = caught.value.message
    assert "POST /v1/responses/compact" in message
    assert "Tollgate does not forward" in message and "only the image" not in message
    assert api_arrivals(simulator) == arrived


def test_input_tokens_are_counted_for_the_teams_own_context_and_bill_nothing(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    # `client.responses.input_tokens.count` is free: it is forwarded, re-encoded, for a
    # context that is the team's own. Another team's response or file is not found, as
    # for a new response; what Tollgate cannot bound in a response is not counted either.
    client, other = tollgate.client(), tollgate.client(RESEARCH_KEY)
    first = client.responses.create(model="gpt-5.5", input="a fox", max_output_tokens=100)
    assert first.usage is not None
    counted = client.responses.input_tokens.count(model="gpt-5.5", input="a fox")
    assert counted.object == "response.input_tokens"
    assert counted.input_tokens == first.usage.input_tokens
    again = client.responses.input_tokens.count(
        model="gpt-5.5", input="and a hen", previous_response_id=first.id
    )
    assert again.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    billed, arrived = len(simulator.billing()), api_arrivals(simulator)
    with pytest.raises(openai.NotFoundError) as foreign:
        other.responses.input_tokens.count(
            model="gpt-5.5", input="x", previous_response_id=first.id
        )
    assert isinstance(foreign.value.body, dict)
    assert foreign.value.body["param"] == "previous_response_id"
    theirs = other.files.create(file=("a.png", png(), "image/png"), purpose="vision")
    arrived += 1
    image: Any = {"role": "user", "content": [{"type": "input_image", "file_id": theirs.id}]}
    with pytest.raises(openai.NotFoundError):
        client.responses.input_tokens.count(model="gpt-5.5", input=[image])
    with pytest.raises(openai.BadRequestError, match="conversation"):
        client.responses.input_tokens.count(model="gpt-5.5", input="x", conversation="conv_1")
    assert api_arrivals(simulator) == arrived
    assert len(simulator.billing()) == billed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("access_programs", {"cyber": "standard"}),
        ("background_options", {"completion_window": "2h"}),
        ("context_management", [{"type": "compaction"}]),
        ("image", {"context_compression": "disabled"}),
        ("moderation", {"model": "omni-moderation-latest"}),
        ("prompt_cache_options", {"ttl": "12h"}),
    ],
)
def test_a_responses_parameter_openai_defines_but_tollgate_cannot_bound_is_not_called_unknown(
    tollgate: Tollgate, simulator: Simulator, name: str, value: Any
) -> None:
    # Parameters of the openai client's `responses.create`: refused, since their cost has
    # no rule in Tollgate, but not as if OpenAI had no such parameter.
    arrived = api_arrivals(simulator)
    with pytest.raises(openai.BadRequestError) as caught:
        tollgate.client().responses.create(
            model="gpt-5.5", input="a fox", max_output_tokens=100, **{name: value}
        )
    message = caught.value.message
    assert f"Tollgate does not forward '{name}'" in message and "Unknown" not in message
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == name
    assert api_arrivals(simulator) == arrived


def test_a_prompt_cache_breakpoint_on_a_content_part_is_refused_as_prompt_cache_options_is(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    # The part-level spelling of the cache writes `prompt_cache_options` asks for: it was
    # forwarded (a 12-hour cache write the price book has no rate for).
    arrived = api_arrivals(simulator)
    part: Any = {
        "type": "input_text",
        "text": "a long shared prefix",
        "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "12h"},
    }
    with pytest.raises(openai.BadRequestError) as caught:
        tollgate.client().responses.create(
            model="gpt-5.5",
            input=[{"role": "user", "content": [part]}],
            max_output_tokens=100,
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "input[0].content[0].prompt_cache_breakpoint"
    assert api_arrivals(simulator) == arrived
