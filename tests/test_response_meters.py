"""The Responses door's meters (`proxy.doors.response_meters`) and what each ending of a
response costs (`proxy.core.settlement`), pure: what an answer or a stream bills."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.config.prices import load_price_book
from proxy.core import settlement
from proxy.core.errors import MalformedAnswer, UpstreamTimeout
from proxy.core.models import Usage
from proxy.core.settings import Config
from proxy.doors.response_meters import ResponseAnswer, ResponseEvents, read_response
from tests.conftest import team_named
from tests.test_responses_door import DOOR, TOOL, body, config, parse

__all__ = ["config"]  # the shared fixture


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


def test_the_input_written_to_the_prompt_cache_is_read_within_the_uncached_input() -> None:
    """`cache_write_tokens` (gpt-5.6 on bills them above the input rate): part of the
    uncached input, never more than it."""
    details = {"cached_tokens": 1280, "cache_write_tokens": 500}
    usage = {**response()["usage"], "input_tokens_details": details}
    found = metered(response(usage=usage)).usage
    assert (found.mainline_input, found.mainline_cache_write) == (540, 500)
    usage["input_tokens_details"] = {**details, "cache_write_tokens": 9000}
    assert metered(response(usage=usage)).usage.mainline_cache_write == 540


def test_image_calls_without_tool_usage_are_unknown_usage() -> None:
    assert metered(response(tool_usage=None)).usage is None
    no_images = response(tool_usage=None, output=[])
    assert metered(no_images).usage == Usage(
        mainline_input=540, mainline_cached_input=1280, mainline_output=210
    )


def test_image_calls_whose_tool_usage_counts_no_output_each_are_unknown_usage() -> None:
    # `image_gen` skips calls whose usage records are missing: zero counts, or fewer
    # output tokens than images made, are not free images.
    zero = {
        "input_tokens": 0,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens": 0,
        "total_tokens": 0,
    }
    assert metered(response(tool_usage={"image_gen": zero})).usage is None
    call = {"type": "image_generation_call", "status": "completed", "result": ""}
    one = {**zero, "output_tokens": 1, "output_tokens_details": {"image_tokens": 1}}
    assert metered(response(tool_usage={"image_gen": one}, output=[call, call])).usage is None
    assert metered(response(tool_usage={"image_gen": one}, output=[call])).usage is not None
    # Without a completed image, zero counts are what they say.
    failed = {**call, "status": "failed"}
    assert metered(response(tool_usage={"image_gen": zero}, output=[failed])).usage == Usage(
        mainline_input=540, mainline_cached_input=1280, mainline_output=210
    )


BOOK = load_price_book()


def tool_charge(model: str, calls: list[dict[str, Any]], output_tokens: int, **details: Any) -> Any:
    """What a response with image `calls` of `model` whose `image_gen` reports
    `output_tokens` output tokens is charged (a gpt-5.5 mainline; `details`: its
    `output_tokens_details`, `None` for none)."""
    image_gen = {
        "input_tokens": 30,
        "input_tokens_details": {"text_tokens": 30, "image_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0, **details},
        "total_tokens": 30 + output_tokens,
    }
    if details.get("image_tokens", 0) is None:
        del image_gen["output_tokens_details"]
    items = [{"type": "image_generation_call", "status": "completed", **c} for c in calls]
    found = metered(response(output=items, tool_usage={"image_gen": image_gen}))
    prices = BOOK.find(model)
    mainline = BOOK.find_mainline("gpt-5.5")
    assert prices is not None and mainline is not None
    bound = settlement.Bound(prices, len(calls), "high", "auto", 10**9, Usage(), mainline)
    return settlement.metered(bound, found).charge


LOW = {"quality": "low", "size": "1024x1024"}


@pytest.mark.parametrize(
    ("model", "calls", "reported", "flagged"),
    [
        # gpt-image-2, low 1024x1024: 196 output tokens a call.
        ("gpt-image-2", [LOW] * 3, 3 * 196, False),
        ("gpt-image-2", [LOW] * 3, 2 * 196, True),  # one call of three left out
        ("gpt-image-2", [LOW, {"quality": "high", "size": "1024x1024"}], 2 * 196, True),
        ("gpt-image-2", [LOW] * 2 + [{"quality": "high", "size": "1024x1024"}], 7024 + 196, True),
        # Partial images add tokens; the floor counts none.
        ("gpt-image-2", [LOW] * 2, 2 * 196 + 300, False),
        # `auto` quality: the least of the ladder at that size; `auto` size of a model
        # that takes any size, or an item that names none: no floor of its own.
        ("gpt-image-2", [{"quality": "auto", "size": "1024x1024"}] * 2, 2 * 196, False),
        ("gpt-image-2", [{"quality": "auto", "size": "1024x1024"}] * 2, 196, True),
        ("gpt-image-2", [{"quality": "high", "size": "auto"}] * 2, 2, False),
        ("gpt-image-2", [{}] * 2, 2, False),
        # gpt-image-1-mini may report the guide's table (272), below its price book's 625.
        ("gpt-image-1-mini", [LOW] * 2, 2 * 272, False),
        ("gpt-image-1-mini", [LOW] * 2, 272 + 271, True),
        ("gpt-image-1-mini", [{"quality": "auto", "size": "auto"}] * 2, 2 * 272, False),
        # gpt-image-2.6: no published rule, only a ceiling: no floor.
        ("gpt-image-2.6-sunburst", [LOW] * 3, 3, False),
        ("gpt-image-1.5", [{"quality": "high", "size": "1536x1024"}] * 2, 6208 + 6207, True),
    ],
)
def test_image_output_below_what_the_completed_calls_bill_at_the_least_is_the_bound(
    model: str, calls: list[dict[str, Any]], reported: int, flagged: bool
) -> None:
    # OpenAI's `image_gen` "may skip calls with missing or incomplete usage records": one
    # call of several left out leaves a sum that has tokens for every image, yet less than
    # the images made bill. Each completed call's item names its quality and size.
    charge = tool_charge(model, calls, reported)
    assert (charge.flagged, charge.cost_nanos == 10**9) == (flagged, flagged)


def test_image_output_without_details_counts_toward_the_floor() -> None:
    charge = tool_charge("gpt-image-2", [LOW] * 2, 2 * 196, image_tokens=None)
    assert not charge.flagged
    charge = tool_charge("gpt-image-2", [LOW] * 2, 196, image_tokens=None)
    assert charge.flagged


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
        {"usage": {**response()["usage"], "input_tokens_details": {"cache_write_tokens": -1}}},
        {"tool_usage": {"image_gen": {"input_tokens": 30, "output_tokens": "196"}}},
        {"tool_usage": {"image_gen": {}}, "output": []},
    ],
    ids=[
        "string",
        "negative",
        "empty",
        "cached-string",
        "written-negative",
        "tool-string",
        "tool-empty",
    ],
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
    bound = DOOR.bound(parsed, DOOR.admit(team_named(config), parsed, config))
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
    variant = DOOR.admit(team_named(config), parsed, config)
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
    bound = DOOR.bound(parsed, DOOR.admit(team_named(config), parsed, config))
    verdict = settlement.metered(bound, metered(response(tool_usage=None)))
    assert verdict.cost_nanos == bound.cost_nanos and verdict.charge.flagged
    assert verdict.charge.mainline_nanos == bound.mainline_nanos


def test_a_failed_response_is_charged_the_usage_it_reports(config: Config) -> None:
    parsed = parse(config, body())
    bound = DOOR.bound(parsed, DOOR.admit(team_named(config), parsed, config))
    failed = settlement.metered(bound, metered(response(status="failed")))
    assert failed.outcome == "upstream_error" and failed.cost_nanos > 0


def test_a_failed_response_that_made_images_but_reports_no_usage_is_charged_its_bound(
    config: Config,
) -> None:
    """A response that failed after its image calls ran billed them, whatever usage it
    reports: without usage it is charged its bound, flagged, never nothing. The images
    are known from its output (whole) or from the partial images streamed."""
    parsed = parse(config, body(stream=True, tools=[{**TOOL, "partial_images": 2}]))
    bound = DOOR.bound(parsed, DOOR.admit(team_named(config), parsed, config))
    failed = response(status="failed", usage=None, tool_usage=None)
    whole = settlement.metered(bound, metered(failed))
    assert whole.cost_nanos == bound.cost_nanos and whole.charge.flagged
    assert whole.error_code == "response_failed"
    no_image = {**failed, "output": [{**failed["output"][1], "status": "failed"}]}
    meter = ResponseEvents()
    meter.feed(
        events(
            ("response.created", {"type": "response.created", "response": {"id": "resp_1"}}),
            ("response.image_generation_call.partial_image", {"partial_image_b64": "!"}),
            ("response.failed", {"type": "response.failed", "response": no_image}),
        )
    )
    streamed = settlement.stream_ended(bound, meter.end(None))
    assert streamed.cost_nanos == bound.cost_nanos and streamed.charge.flagged
    nothing_ran = {**no_image, "output": []}
    assert settlement.metered(bound, metered(nothing_ran)).cost_nanos == 0


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


@pytest.mark.parametrize("status", ["paused", "requires_action", "", "Completed"])
def test_a_response_in_a_status_of_no_known_end_is_charged_its_bound_flagged(
    config: Config, status: str
) -> None:
    """A status that is neither pending nor one of the ends OpenAI documents may be a
    response that still runs (and bills): the usage it reports so far is not what it billed,
    so it is charged its bound, flagged (or that usage when it costs more), never freed."""
    parsed = parse(config, body())
    bound = DOOR.bound(parsed, DOOR.admit(team_named(config), parsed, config))
    little = {"input_tokens": 1, "output_tokens": 0}
    found = metered(response(status=status, usage=little, tool_usage=None, output=[]))
    assert not found.pending
    verdict = settlement.metered(bound, found)
    assert verdict.cost_nanos == bound.cost_nanos and verdict.charge.flagged
    assert verdict.error_code == "response_status_unknown"


def test_a_cancelled_response_that_reports_no_usage_is_charged_its_bound(
    config: Config,
) -> None:
    """OpenAI bills what a background response read and wrote before its cancel, and its
    cancelled object reports no usage. Whether it had begun is unknown (an empty output
    says nothing: a team polling its own response can cancel it the moment it runs), so it
    is its bound, flagged, never nothing; with the usage it reports, that usage."""
    parsed = parse(config, body())
    bound = DOOR.bound(parsed, DOOR.admit(team_named(config), parsed, config))
    cancelled = response(status="cancelled", usage=None, tool_usage=None, output=[])
    reasoning = {"type": "reasoning", "summary": []}
    for output in ([], [reasoning]):
        verdict = settlement.metered(bound, metered({**cancelled, "output": output}))
        assert verdict.cost_nanos == bound.cost_nanos and verdict.charge.flagged
        assert (verdict.outcome, verdict.error_code) == ("upstream_error", "response_cancelled")
    little = {"input_tokens": 10, "output_tokens": 0}
    reported = settlement.metered(bound, metered({**cancelled, "usage": little}))
    assert 0 < reported.cost_nanos < bound.cost_nanos and not reported.charge.flagged
