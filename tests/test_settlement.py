"""What each ending of an exchange costs (`proxy.core.settlement`): pure, no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from proxy.config.prices import load_price_book
from proxy.core.errors import (
    DeadlineExceeded,
    InvalidRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.core.models import Charge, Usage
from proxy.core.pricing import ModelPrices
from proxy.core.settlement import (
    MOST_BELIEVED_NANOS,
    Bound,
    StreamEnd,
    answered,
    error_code,
    error_code_of,
    not_answered,
    refused,
    stream_ended,
    unknown,
)

BOOK = load_price_book()
RESERVED = Usage(text_input=40, image_output=4160, images=1)


def model(name: str) -> ModelPrices:
    found = BOOK.find(name)
    assert found is not None
    return found


def bound(name: str = "gpt-image-1", n: int = 2, quality: str = "high") -> Bound:
    return Bound(model(name), n, quality, "1024x1024", 123_456_789, RESERVED)


USAGE = Usage(text_input=10, image_output=4160)
LOW = Usage(text_input=10, image_output=272)
"""Costs less than `bound()`."""


def test_an_answer_with_usage_is_charged_its_price_with_the_images_it_held() -> None:
    covering = replace(bound(), cost_nanos=10**9)
    verdict = answered(covering, USAGE, images=2)
    expected = model("gpt-image-1").charge(Usage(text_input=10, image_output=4160, images=2))
    assert verdict.outcome == "ok"
    assert verdict.charge == expected
    assert not verdict.charge.flagged
    assert verdict.error_code is None


def test_usage_that_costs_more_than_the_bound_is_charged_as_it_reads_flagged() -> None:
    """The upstream billed past what was priced and reserved: recorded as billed, and
    flagged for the operator, never passed over in silence."""
    expected = model("gpt-image-1").charge(Usage(text_input=10, image_output=4160, images=2))
    assert expected.cost_nanos > bound().cost_nanos
    verdict = answered(bound(), USAGE, images=2)
    assert verdict.outcome == "ok"
    assert verdict.charge == replace(expected, flagged=True)
    assert verdict.error_code == "usage_over_bound"
    at_bound = replace(bound(), cost_nanos=expected.cost_nanos)
    assert answered(at_bound, USAGE, images=2).error_code is None


def test_an_answer_that_counts_no_image_is_charged_for_the_images_asked() -> None:
    assert answered(bound(n=3), USAGE, images=0).charge.usage.images == 3


def test_an_answer_without_usage_is_charged_its_bound_flagged() -> None:
    verdict = answered(bound(), None, images=1)
    assert verdict.outcome == "ok"
    assert verdict.charge == Charge(Usage(images=1), 123_456_789, flagged=True)


def test_a_per_image_model_is_charged_its_price_list_flagged_whatever_the_usage() -> None:
    dalle = model("dall-e-3")
    verdict = answered(bound("dall-e-3", n=1, quality="hd"), USAGE, images=2)
    per_image = dalle.image_price_nanos("hd", "1024x1024")
    assert verdict.charge == Charge(Usage(images=2), 2 * per_image, flagged=True)


def test_tokens_without_a_rate_are_priced_and_flagged() -> None:
    verdict = answered(bound(), Usage(unclassified_output=100), images=1)
    assert verdict.charge.flagged
    assert verdict.charge.cost_nanos > 0


def test_an_error_answer_costs_nothing_and_keeps_its_code() -> None:
    verdict = refused("moderation_blocked")
    assert verdict.outcome == "upstream_error"
    assert verdict.charge == Charge(Usage(), 0)
    assert verdict.error_code == "moderation_blocked"


def test_an_unknown_outcome_is_charged_the_bound_with_its_usage_flagged() -> None:
    verdict = unknown(bound(n=2), "malformed_answer")
    assert verdict.outcome == "upstream_error"
    assert verdict.charge == Charge(
        Usage(text_input=40, image_output=4160, images=2), 123_456_789, flagged=True
    )
    assert verdict.error_code == "malformed_answer"


@pytest.mark.parametrize(
    ("failure", "cost", "code"),
    [
        (UpstreamUnavailable("refused", maybe_billed=False), 0, "upstream_unavailable"),
        (UpstreamUnavailable("reset", maybe_billed=True), 123_456_789, "upstream_unavailable"),
        (UpstreamTimeout("silent", maybe_billed=True), 123_456_789, "upstream_timeout"),
        (DeadlineExceeded("never sent"), 0, "deadline_exceeded"),
        (DeadlineExceeded("late", maybe_billed=True), 123_456_789, "deadline_exceeded"),
        (InvalidRequest("not sent"), 0, "invalid_request"),
    ],
)
def test_no_answer_costs_the_bound_only_when_the_request_may_have_arrived(
    failure: InvalidRequest, cost: int, code: str
) -> None:
    verdict = not_answered(bound(), failure)
    assert verdict.outcome == "upstream_error"
    assert verdict.cost_nanos == cost
    assert verdict.charge.flagged is (cost > 0)
    assert verdict.error_code == code


def test_a_clean_stream_is_charged_the_usage_of_its_completed_images() -> None:
    verdict = stream_ended(bound(n=2), StreamEnd(completed=2, usage=USAGE))
    assert verdict == answered(bound(n=2), USAGE, 2)


def test_a_stream_that_errored_before_any_image_costs_nothing() -> None:
    end = StreamEnd(0, Usage(), error={"code": "content_policy_violation"})
    assert stream_ended(bound(), end) == refused("content_policy_violation")


@pytest.mark.parametrize(
    ("end", "code"),
    [
        (StreamEnd(0, Usage()), "stream_truncated"),  # ended without its completion
        (StreamEnd(1, LOW, broken="upstream_timeout"), "upstream_timeout"),
        (StreamEnd(1, LOW, unreadable=1), "malformed_answer"),  # an event lost
        (StreamEnd(0, Usage(), error={"code": "x"}, unreadable=1), "malformed_answer"),
        (StreamEnd(1, LOW, error={"code": "server_error"}), "stream_truncated"),
        (StreamEnd(2, LOW, broken="deadline_exceeded"), "deadline_exceeded"),
        (StreamEnd(0, Usage(), error={"code": "x"}, partials=1), "stream_truncated"),
    ],
)
def test_a_stream_cut_short_is_charged_its_bound_flagged(end: StreamEnd, code: str) -> None:
    assert stream_ended(bound(), end) == unknown(bound(), code)
    assert stream_ended(bound(), end).charge == bound().charged()


def test_a_stream_cut_short_after_completions_dearer_than_its_bound_is_charged_those() -> None:
    """The part of a stream that was read reported more than the bound: what it reported is
    the least the upstream billed."""
    end = StreamEnd(2, USAGE, broken="upstream_timeout")
    verdict = stream_ended(bound(), end)
    reported = answered(bound(), USAGE, 2).charge
    assert reported.cost_nanos > bound().cost_nanos
    assert verdict.outcome == "upstream_error"
    assert verdict.charge == Charge(reported.usage, reported.cost_nanos, flagged=True)


def test_a_clean_stream_with_a_completion_without_usage_is_charged_at_least_its_bound() -> None:
    verdict = stream_ended(bound(), StreamEnd(2, LOW, unmetered=1))
    assert verdict.outcome == "ok"
    assert verdict.charge == bound().charged()
    dearer = stream_ended(bound(), StreamEnd(2, USAGE, unmetered=1))
    assert dearer.charge.cost_nanos == answered(bound(), USAGE, 2).charge.cost_nanos
    assert dearer.charge.flagged


def test_an_answer_whose_usage_costs_past_belief_is_charged_its_bound_flagged() -> None:
    absurd = Usage(image_output=2**31 - 1).scaled(3)  # three completions, each at the most
    assert model("gpt-image-1").charge(absurd).cost_nanos > MOST_BELIEVED_NANOS
    assert answered(bound(), absurd, 1).charge == bound().charged()
    end = StreamEnd(40, absurd.scaled(40_000))
    assert stream_ended(bound(), end).charge == bound().charged()


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"error": {"code": "rate_limit_exceeded", "type": "requests"}}', "rate_limit_exceeded"),
        (b'{"error": {"code": null, "type": "server_error"}}', "server_error"),
        (b'{"error": "text"}', None),
        (b"not json", None),
        (b"[1]", None),
        (b"", None),
    ],
)
def test_the_error_code_of_an_upstream_error_answer(body: bytes, code: str | None) -> None:
    assert error_code(body) == code


def test_an_error_event_without_code_or_type_has_no_code() -> None:
    assert error_code_of({"message": "x"}) is None
    assert error_code_of(True) is None
