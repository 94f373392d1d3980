"""Bad input and upstream faults: clear errors in OpenAI's shape, nothing lost, still serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    free_port,
    start_tollgate,
    write_config,
)
from tests.test_proxy_e2e import expected_cost, wait_settled


def upstream_calls(simulator: Simulator) -> int:
    return len(simulator.billing())


def wait_row(tollgate: Tollgate, index: int, timeout: float = 60.0) -> dict[str, Any]:
    """The ledger's `index`th row (by start), once it is there: for a request whose client
    gave up before its answer named it."""
    deadline = time.monotonic() + timeout
    while (rows := tollgate.rows())[index:] == []:
        assert time.monotonic() < deadline, f"no row {index}"
        time.sleep(0.05)
    return rows[index]


def post(tollgate: Tollgate, path: str, **kwargs: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {DESIGN_KEY}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    kwargs.setdefault("timeout", 30)
    return httpx.post(f"{tollgate.url}/v1/images/{path}", headers=headers, **kwargs)  # type: ignore[arg-type]


def assert_openai_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]


@pytest.mark.parametrize(
    ("path", "kwargs", "param"),
    [
        (
            "generations",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            None,
        ),
        ("generations", {"json": ["a", "list"]}, None),
        ("generations", {"data": {"prompt": "x"}}, None),  # form body where JSON is required
        ("edits", {"content": b"plain text", "headers": {"content-type": "text/plain"}}, None),
        ("generations", {"json": {"model": "gpt-image-2"}}, "prompt"),
        ("generations", {"json": {"model": "gpt-image-2", "prompt": ""}}, "prompt"),
        (
            "generations",
            {"json": {"model": "gpt-image-1.5", "prompt": "x", "size": "2048x2048"}},
            "size",
        ),
        (
            "generations",
            {"json": {"model": "gpt-image-2", "prompt": "x", "size": "1000x1000"}},
            "size",
        ),
        (
            "generations",
            {"json": {"model": "gpt-image-2", "prompt": "x", "quality": "max"}},
            "quality",
        ),
        ("generations", {"json": {"model": "gpt-image-2", "prompt": "x", "n": 11}}, "n"),
        ("generations", {"json": {"model": "gpt-image-2", "prompt": "x", "n": 0}}, "n"),
        ("generations", {"json": {"model": "dall-e-3", "prompt": "x", "n": 2}}, "n"),
        ("generations", {"json": {"model": "gpt-image-2", "prompt": "x", "n": "two"}}, "n"),
        (
            "generations",
            {"json": {"model": "gpt-image-2", "prompt": "x", "partial_images": 2}},
            "partial_images",
        ),
        (
            "edits",
            {
                "data": {"prompt": "x", "model": "gpt-image-1"},
                "files": {"image": ("a.png", b"not an image", "image/png")},
            },
            "image",
        ),
        (
            "edits",
            {
                "data": {"prompt": "x", "model": "gpt-image-1"},
                "files": {"mask": ("a.txt", b"x", "text/plain")},
            },
            "image",
        ),
    ],
)
def test_bad_requests_get_400_and_nothing_goes_upstream(
    tollgate: Tollgate,
    simulator: Simulator,
    path: str,
    kwargs: dict[str, object],
    param: str | None,
) -> None:
    before = upstream_calls(simulator)
    answer = post(tollgate, path, **kwargs)
    assert_openai_error(answer, 400, "invalid_request")
    assert answer.json()["error"]["param"] == param
    assert upstream_calls(simulator) == before
    row = tollgate.row(answer.headers["x-tollgate-request-id"])
    assert row["outcome"] == "client_error" and row["status"] == 400 and row["cost_nanos"] == 0


def test_sdk_raises_bad_request_for_an_unpriced_model(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    before = upstream_calls(simulator)
    with pytest.raises(openai.BadRequestError) as caught:
        tollgate.client().images.generate(model="gpt-image-9-turbo", prompt="x")
    assert caught.value.code == "unpriced_model"
    assert upstream_calls(simulator) == before


def test_oversized_bodies_get_413_before_being_read(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    before = upstream_calls(simulator)
    answer = post(tollgate, "generations", json={"model": "gpt-image-2", "prompt": "x" * 5000})
    assert_openai_error(answer, 413, "request_too_large")
    with pytest.raises(openai.APIStatusError) as caught:
        tollgate.client().images.edit(
            model="gpt-image-1",
            prompt="x",
            image=("big.png", b"\x89PNG" + b"0" * 2_100_000, "image/png"),
        )
    assert caught.value.status_code == 413
    assert upstream_calls(simulator) == before


@pytest.mark.parametrize("key", [None, "tg_not_a_team_key", "sk-upstream-real-key-for-tests"])
def test_unknown_or_missing_keys_get_401(
    tollgate: Tollgate, simulator: Simulator, key: str | None
) -> None:
    before = upstream_calls(simulator)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    answer = httpx.post(
        f"{tollgate.url}/v1/images/generations",
        headers=headers,
        json={"model": "gpt-image-2", "prompt": "x"},
    )
    assert_openai_error(answer, 401, "invalid_api_key")
    assert (key or "") not in answer.text or key is None
    assert upstream_calls(simulator) == before


def test_other_v1_paths_are_404_in_openai_shape(tollgate: Tollgate) -> None:
    with pytest.raises(openai.NotFoundError):
        tollgate.client().models.list()
    answer = httpx.post(f"{tollgate.url}/v1/chat/completions", json={})
    assert_openai_error(answer, 404, "not_found")


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_v1_itself_is_404_not_a_redirect_built_from_the_host_header(
    tollgate: Tollgate, method: str
) -> None:
    # A redirect to `/v1/` named whatever host the client claimed, and led only to a path
    # Tollgate refuses.
    answer = httpx.request(
        method, f"{tollgate.url}/v1", headers={"host": "elsewhere.example"}, json={}
    )
    assert "location" not in answer.headers
    assert_openai_error(answer, 404, "not_found")


def test_a_retry_count_in_non_ascii_digits_is_served_and_recorded(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    """`x-stainless-retry-count: ²` (latin-1 0xB2, a digit to `str.isdigit`) once raised
    ValueError: a 500 with no ledger row and an in-flight request left on the gauge."""
    inflight = tollgate.metric("tollgate_inflight_requests")
    answer = httpx.post(
        f"{tollgate.url}/v1/images/generations",
        json={"prompt": "a cat", "quality": "low", "size": "1024x1024"},
        headers={"authorization": f"Bearer {DESIGN_KEY}", "x-stainless-retry-count": b"\xb2"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    assert row["outcome"] == "ok" and row["cost_nanos"] > 0
    assert tollgate.metric("tollgate_inflight_requests") == inflight


def test_upstream_errors_pass_through_and_charge_nothing(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    client = tollgate.client()
    with pytest.raises(openai.InternalServerError) as server_error:
        client.images.generate(model="gpt-image-2", prompt="[[fault:500]] a cat", quality="low")
    with pytest.raises(openai.RateLimitError) as rate_limited:
        client.images.generate(model="gpt-image-2", prompt="[[fault:429]] a cat", quality="low")
    assert rate_limited.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.BadRequestError) as blocked:
        client.images.generate(model="gpt-image-2", prompt="something forbidden", quality="low")
    assert blocked.value.code == "moderation_blocked"
    for caught in (server_error, rate_limited, blocked):
        row = wait_settled(tollgate, caught.value.response.headers["x-tollgate-request-id"])
        assert row["outcome"] == "upstream_error" and row["cost_nanos"] == 0
        assert row["status"] == caught.value.status_code
        assert row["upstream_request_id"] == caught.value.response.headers["x-request-id"]
    assert_still_serving(tollgate)


def assert_still_serving(tollgate: Tollgate) -> None:
    result = tollgate.client().images.generate(
        model="gpt-image-2", prompt="ok", quality="low", size="1024x1024"
    )
    assert result.data


def assert_charged_the_bound_flagged(caught: openai.APIStatusError, row: dict[str, object]) -> None:
    """The request reached the upstream, which bills what it accepted: the reservation
    became spend at its bound, flagged for reconciliation, and the answer says so."""
    assert row["outcome"] == "upstream_error" and row["flagged"] == 1
    assert row["cost_nanos"] == row["estimated_nanos"] and row["reserved_nanos"] == 0
    assert row["image_output_tokens"] > 0  # the usage reserved with it: token budgets count it
    charged = Decimal(caught.response.headers["x-tollgate-cost-usd"]) * 10**9
    assert charged == row["cost_nanos"] > 0
    assert set(caught.response.json()["error"]) == {"message", "type", "param", "code"}


def test_upstream_timeout_after_sending_is_504_and_charges_the_bound_flagged(
    tollgate: Tollgate,
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        tollgate.client().images.generate(
            model="gpt-image-2", prompt="[[fault:timeout]]", quality="low"
        )
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    row = wait_settled(tollgate, caught.value.response.headers["x-tollgate-request-id"])
    assert_charged_the_bound_flagged(caught.value, row)
    assert row["error_code"] == "upstream_timeout" and row["status"] == 504
    assert_still_serving(tollgate)


def test_connection_reset_after_sending_is_502_and_charges_the_bound_flagged(
    tollgate: Tollgate,
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        tollgate.client().images.generate(
            model="gpt-image-2", prompt="[[fault:reset]]", quality="low"
        )
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unavailable"
    row = wait_settled(tollgate, caught.value.response.headers["x-tollgate-request-id"])
    assert_charged_the_bound_flagged(caught.value, row)
    assert row["error_code"] == "upstream_unavailable" and row["status"] == 502
    assert_still_serving(tollgate)


def test_a_streamed_request_reset_after_sending_is_charged_the_bound(tollgate: Tollgate) -> None:
    answer = post(
        tollgate,
        "generations",
        json={"model": "gpt-image-2", "prompt": "[[fault:reset]]", "quality": "low",
              "stream": True},
    )  # fmt: skip
    assert_openai_error(answer, 502, "upstream_unavailable")
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0
    assert Decimal(answer.headers["x-tollgate-cost-usd"]) * 10**9 == row["cost_nanos"]


def test_garbage_answer_is_502_and_charges_the_estimate_flagged(tollgate: Tollgate) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        tollgate.client().images.generate(
            model="gpt-image-2", prompt="[[fault:garbage]]", quality="low", size="1024x1024"
        )
    assert caught.value.status_code == 502
    row = wait_settled(tollgate, caught.value.response.headers["x-tollgate-request-id"])
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0
    assert_still_serving(tollgate)


def test_a_garbage_answer_charged_its_bound_is_not_retried_by_the_sdk(tollgate: Tollgate) -> None:
    """A 2xx whose body cannot be read was billed upstream and is charged its bound: its
    502 says `x-should-retry: false`, as every failure that may have been billed does, so
    the SDK gives up at once instead of retrying (each retry answered the failure again)."""
    with pytest.raises(openai.APIStatusError) as caught:
        tollgate.client(max_retries=2).images.generate(
            model="gpt-image-2", prompt="[[fault:garbage]] once", quality="low", size="1024x1024"
        )
    answer = caught.value.response
    assert answer.status_code == 502
    assert answer.headers["x-should-retry"] == "false"
    assert "x-tollgate-replay-of" not in answer.headers, "the SDK retried"
    request_id = answer.headers["x-tollgate-request-id"]
    row = wait_settled(tollgate, request_id)
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0
    replays = [r for r in tollgate.rows() if r["upstream_request_id"] == request_id]
    assert replays == []


def test_answer_without_usage_charges_the_estimate_flagged(tollgate: Tollgate) -> None:
    raw = tollgate.client().images.with_raw_response.generate(
        model="gpt-image-2", prompt="[[fault:nousage]]", quality="low", size="1024x1024"
    )
    assert raw.parse().data
    row = wait_settled(tollgate, raw.headers["x-tollgate-request-id"])
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0
    assert Decimal(raw.headers["x-tollgate-cost-usd"]) * 10**9 == row["cost_nanos"]


# OpenAI's published rates (USD per 1M tokens): text in, image out. None of these
# models has a text-output rate, so Tollgate prices text output at image output's.
NO_TEXT_RATE = {"gpt-image-1": (5, 40), "gpt-image-1-mini": (2, 8), "gpt-image-2": (5, 30)}


@pytest.mark.parametrize("stream", [False, True], ids=["held", "stream"])
@pytest.mark.parametrize("model", sorted(NO_TEXT_RATE))
def test_text_output_of_a_model_without_its_rate_is_charged_and_flagged(
    tollgate: Tollgate, simulator: Simulator, model: str, stream: bool
) -> None:
    """The upstream reports text output for a model the price book gives no text-output
    rate: those tokens are priced at the image-output rate, never at $0, and the row is
    flagged. The estimate reserved no text output, so the charge is above it (a settled
    overrun of the text tokens' price)."""
    params = {"model": model, "prompt": "[[fault:texttokens]]", "quality": "low"}
    answer = post(tollgate, "generations", json={**params, "size": "1024x1024", "stream": stream})
    assert answer.status_code == 200, answer.text
    if stream:
        assert b"image_generation.completed" in answer.content
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    billed = simulator.record(row["upstream_request_id"])["usage"]
    assert billed["text_output"] == row["text_output_tokens"] > 0
    text_rate, image_rate = NO_TEXT_RATE[model]
    cost = (
        billed["text_input"] * text_rate
        + (billed["image_output"] + billed["text_output"]) * image_rate
    ) * 1000
    assert row["cost_nanos"] == cost
    assert row["flagged"] == 1 and row["outcome"] == "ok"
    assert row["cost_nanos"] > row["estimated_nanos"]
    if not stream:
        assert Decimal(answer.headers["x-tollgate-cost-usd"]) * 10**9 == cost


@pytest.mark.parametrize("stream", [False, True], ids=["held", "stream"])
@pytest.mark.parametrize("n", [1, 2])
def test_text_output_told_without_details_stays_within_the_bound(
    tollgate: Tollgate, simulator: Simulator, stream: bool, n: int
) -> None:
    """gpt-image-1.5 bills text output ($10/M) below image output ($32/M), and Tollgate
    reserves up to 1,000 text tokens per image. A usage without `output_tokens_details` (a
    stream's completed events have none) is all image output to Tollgate: its text tokens
    at $32/M passed the bound by up to $0.022 an image, which settled spend could carry
    past a hard limit. The bound now holds that charge: not over it, not flagged."""
    params = {"model": "gpt-image-1.5", "prompt": "[[fault:textnodetails]]", "n": n}
    body = {**params, "quality": "low", "size": "1024x1024", "stream": stream}
    answer = post(tollgate, "generations", json=body)
    assert answer.status_code == 200, answer.text
    if stream:
        assert answer.content.count(b"image_generation.completed") == 2 * n
    else:
        assert "output_tokens_details" not in answer.json()["usage"]
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    billed = simulator.record(row["upstream_request_id"])["usage"]
    assert billed["text_output"] == 1000 * n
    # Told as a total only: counted as image output, at its rate (never under the bill).
    output = billed["image_output"] + billed["text_output"]
    assert (row["image_output_tokens"], row["text_output_tokens"]) == (output, 0)
    assert row["cost_nanos"] == (billed["text_input"] * 5 + output * 32) * 1000
    assert row["cost_nanos"] <= row["estimated_nanos"]
    assert (row["flagged"], row["error_code"], row["outcome"]) == (0, None, "ok")


def test_truncated_stream_charges_the_estimate_flagged(tollgate: Tollgate) -> None:
    with tollgate.client().images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt="[[fault:truncate]]",
        quality="low",
        size="1024x1024",
        stream=True,
        partial_images=2,
    ) as response:
        request_id = response.headers["x-tollgate-request-id"]
        try:
            events = list(response.parse())
        except (httpx.HTTPError, openai.APIError):
            events = []
    assert all(e.type != "image_generation.completed" for e in events)
    row = wait_settled(tollgate, request_id)
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0
    assert row["reserved_nanos"] == 0
    assert_still_serving(tollgate)


def test_a_stream_with_an_unreadable_completed_event_charges_the_estimate_flagged(
    tollgate: Tollgate,
) -> None:
    """Two images; the second one's completed event is not JSON. Its usage is unknown, so
    the stream is charged its bound, not the first image's usage alone."""
    answer = post(
        tollgate,
        "generations",
        json={
            "model": "gpt-image-2",
            "prompt": "[[fault:garbage]]",
            "quality": "low",
            "size": "1024x1024",
            "n": 2,
            "stream": True,
        },
    )
    assert answer.status_code == 200
    assert answer.text.count("event: image_generation.completed") == 2
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0
    assert (row["error_code"], row["reserved_nanos"]) == ("malformed_answer", 0)


def test_a_stream_that_ends_with_fewer_completed_images_than_asked_charges_its_bound_flagged(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    """Two images asked; the stream ends cleanly after the first one's completed event (each
    carries one image). Whether the upstream billed the second is unknown, and it did: the
    first image's usage alone was charged, below the bill, unflagged. The bound is charged,
    flagged, and it covers the bill."""
    with tollgate.client().images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt="[[fault:dropcompleted]]",
        quality="low",
        size="1024x1024",
        n=2,
        stream=True,
    ) as response:
        request_id = response.headers["x-tollgate-request-id"]
        events = [e.type for e in response.parse()]
    assert events == ["image_generation.completed"]
    row = wait_settled(tollgate, request_id)
    billed = expected_cost(simulator.record(row["upstream_request_id"]))
    assert (row["outcome"], row["flagged"], row["error_code"]) == (
        "ok", 1, "stream_images_missing",
    )  # fmt: skip
    assert row["cost_nanos"] == row["estimated_nanos"]
    assert Decimal(row["cost_nanos"]) / 10**9 >= billed > 0
    assert row["reserved_nanos"] == 0


def test_client_disconnect_is_still_metered(tollgate: Tollgate, simulator: Simulator) -> None:
    simulator.configure(latency_ms=1500)
    before = len(tollgate.rows())
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(
                tollgate,
                "generations",
                json={
                    "model": "gpt-image-2",
                    "prompt": "slow",
                    "quality": "low",
                    "size": "1024x1024",
                },
                timeout=0.3,
            )
        row = wait_settled(tollgate, wait_row(tollgate, before)["id"])
    finally:
        simulator.configure(latency_ms=0)
    assert row["outcome"] == "ok"
    record = simulator.record(row["upstream_request_id"])
    assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(record) > 0


def test_stream_client_disconnect_is_still_metered(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(latency_ms=1200)
    try:
        client = tollgate.client()
        with client.images.with_streaming_response.generate(
            model="gpt-image-2",
            prompt="slow stream",
            quality="low",
            size="1024x1024",
            stream=True,
            partial_images=3,
        ) as response:
            request_id = response.headers["x-tollgate-request-id"]
            next(iter(response.parse()))  # one partial image, then hang up
        row = wait_settled(tollgate, request_id)
    finally:
        simulator.configure(latency_ms=0)
    record = simulator.record(row["upstream_request_id"])
    assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(record)
    assert row["flagged"] == 0


@pytest.fixture
def orphan_tollgate(tmp_path: Path) -> Iterator[Tollgate]:
    write_config(tmp_path, f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    proxy = start_tollgate(tmp_path)
    yield proxy
    proxy.stop()


def test_unreachable_upstream_is_502_and_releases(orphan_tollgate: Tollgate) -> None:
    """A connection never made: the request never left, nothing can have been billed."""
    with pytest.raises(openai.APIStatusError) as caught:
        orphan_tollgate.client().images.generate(model="gpt-image-2", prompt="x", quality="low")
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unavailable"
    assert caught.value.response.headers["x-tollgate-cost-usd"] == "0"
    row = wait_settled(orphan_tollgate, caught.value.response.headers["x-tollgate-request-id"])
    assert row["reserved_nanos"] == 0 and row["cost_nanos"] == 0 and row["flagged"] == 0
    assert orphan_tollgate.process.poll() is None
