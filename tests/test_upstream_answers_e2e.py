"""What OpenAI's answers carry besides the image, through Tollgate to the official client:
the rate-limit headers of every model answer, the effective end-user id, and the
refusals of an organization out of credit or of a region OpenAI does not serve."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.conftest import Simulator, Tollgate
from tests.test_proxy_e2e import wait_settled

LIMITS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "openai-processing-ms",
)
IMAGE = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


def assert_limits(headers: Any) -> None:
    for name in LIMITS:
        assert headers.get(name), name
    assert int(headers["x-ratelimit-remaining-tokens"]) < int(headers["x-ratelimit-limit-tokens"])


def test_the_rate_limit_headers_of_a_generation_reach_the_team(tollgate: Tollgate) -> None:
    raw = tollgate.client().images.with_raw_response.generate(prompt="a lighthouse", **IMAGE)
    assert_limits(raw.headers)


def test_the_rate_limit_headers_of_a_stream_reach_the_team(tollgate: Tollgate) -> None:
    with tollgate.client().images.with_streaming_response.generate(
        prompt="a lighthouse", stream=True, partial_images=1, **IMAGE
    ) as answer:
        assert_limits(answer.headers)
        events = [event.type for event in answer.parse()]
    assert events == ["image_generation.partial_image", "image_generation.completed"]


def test_the_rate_limit_headers_of_a_response_reach_the_team(tollgate: Tollgate) -> None:
    raw = tollgate.client().responses.with_raw_response.create(
        model="gpt-5.5",
        input="a lighthouse",
        tools=[{"type": "image_generation", "model": "gpt-image-2", "quality": "low"}],
        max_output_tokens=400,
        max_tool_calls=1,
    )
    assert_limits(raw.headers)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_the_answer_names_the_end_user_the_request_named(tollgate: Tollgate, stream: bool) -> None:
    """`safety_identifier`, else `user`: OpenAI's answer names the one it went by."""
    client = tollgate.client()
    if stream:
        events = client.images.generate(
            prompt="a lighthouse", stream=True, user="bob", safety_identifier="h-alice", **IMAGE
        )
        completed = [e for e in events if e.type == "image_generation.completed"]
        assert [e.safety_identifier for e in completed] == ["h-alice"]
    else:
        answer = client.images.generate(prompt="a lighthouse", user="bob", **IMAGE)
        assert answer.safety_identifier == "bob"


@pytest.mark.parametrize(
    ("fault", "error", "status", "kind", "code"),
    [
        ("quota", openai.RateLimitError, 429, "insufficient_quota", "credit_balance_exhausted"),
        (
            "403",
            openai.PermissionDeniedError,
            403,
            "request_forbidden",
            "unsupported_country_region_territory",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("door", ["images", "responses"])
def test_an_upstream_refusal_reaches_the_team_as_sent_and_costs_nothing(
    tollgate: Tollgate,
    simulator: Simulator,
    fault: str,
    error: type[openai.APIStatusError],
    status: int,
    kind: str,
    code: str,
    stream: bool,
    door: str,
) -> None:
    before = len(simulator.billing())
    prompt = f"[[fault:{fault}]] a lighthouse"
    with pytest.raises(error) as caught:
        if door == "images":
            tollgate.client().images.generate(prompt=prompt, stream=stream, **IMAGE)
        else:
            tollgate.client().responses.create(
                model="gpt-5.5",
                input=prompt,
                tools=[{"type": "image_generation", "model": "gpt-image-2", "quality": "low"}],
                max_output_tokens=400,
                max_tool_calls=1,
                stream=stream,
            )
    assert (caught.value.status_code, caught.value.type, caught.value.code) == (status, kind, code)
    headers = caught.value.response.headers
    assert headers["x-request-id"] == simulator.billing()[-1]["id"]
    assert len(simulator.billing()) == before + 1 and not simulator.billing()[-1]["billed"]
    row = wait_settled(tollgate, headers["x-tollgate-request-id"])
    assert (row["outcome"], row["status"], row["cost_nanos"]) == ("upstream_error", status, 0)
    assert row["reserved_nanos"] == 0 and not row["flagged"]


def test_an_upstream_rate_limit_says_its_room_to_the_team(tollgate: Tollgate) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        tollgate.client().images.generate(prompt="[[fault:429]] a lighthouse", **IMAGE)
    headers = caught.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
