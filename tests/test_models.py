"""The shared vocabulary: money in nano-dollars, usage arithmetic, requests and changes."""

from __future__ import annotations

from dataclasses import fields
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.models import (
    NANOS_PER_USD,
    TOKEN_KINDS,
    Change,
    Entry,
    ImageRequest,
    InputImage,
    TokenKind,
    Usage,
    usd,
    usd_text,
)


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (210_720_000, "0.21072"),
        (0, "0"),
        (1, "0.000000001"),
        (NANOS_PER_USD, "1"),
        (12_500_000_000, "12.5"),
        (100 * NANOS_PER_USD, "100"),
        (-5_000_000, "-0.005"),
    ],
)
def test_usd_text_is_a_plain_decimal_without_trailing_zeros(nanos: int, text: str) -> None:
    assert usd_text(nanos) == text
    assert usd(nanos) == Decimal(text)
    assert "E" not in usd_text(nanos).upper()


def test_usd_is_exact() -> None:
    assert usd(1) * NANOS_PER_USD == 1
    assert sum((usd(1) for _ in range(10)), Decimal(0)) == Decimal("0.00000001")


def test_usage_adds_field_by_field() -> None:
    a = Usage(1, 2, 3, 4, 5, 6, 7)
    b = Usage(10, 20, 30, 40, 50, 60, 70)
    assert a + b == Usage(11, 22, 33, 44, 55, 66, 77)
    assert a + Usage() == a


def test_usage_scales_field_by_field() -> None:
    assert Usage(1, 2, 3, 4, 5, 6, 7).scaled(3) == Usage(3, 6, 9, 12, 15, 18, 21)


def test_total_tokens_counts_every_kind_but_not_images() -> None:
    assert Usage(1, 2, 3, 4, 5, 6, images=100).total_tokens == 21


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_tokens_reads_each_kind(kind: TokenKind) -> None:
    usage = Usage(**{kind: 42})
    assert usage.tokens(kind) == 42
    assert usage.total_tokens == 42


def test_usage_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Usage().text_input = 1  # type: ignore[misc]


def test_image_request_with_changes_returns_a_new_request() -> None:
    request = ImageRequest(endpoint="generations", model="gpt-image-2", quality="high")
    changed = request.with_changes(quality="low", size="1024x1024")
    assert (changed.quality, changed.size, changed.model) == ("low", "1024x1024", "gpt-image-2")
    assert request.quality == "high"


def test_change_reads_as_knob_before_after() -> None:
    assert str(Change("quality", "high", "medium", "budget")) == "quality=high->medium"


def test_an_entry_is_built_in_stages_each_keeping_what_came_before() -> None:
    asked = ImageRequest("generations", "gpt-image-1", 10, n=2, quality="high", user="ana")
    sent = asked.with_changes(quality="medium", size="1024x1024")
    entry = (
        Entry("tg_req_1", 100.0, "generations")
        .identified("design", "CC-1", "web-app")
        .asked(asked)
        .sent(sent, 123, "quality=high->medium")
    )
    assert entry == Entry(
        id="tg_req_1",
        started_at=100.0,
        endpoint="generations",
        team="design",
        cost_center="CC-1",
        key_id="web-app",
        user="ana",
        model_requested="gpt-image-1",
        model="gpt-image-1",
        quality_requested="high",
        quality="medium",
        size_requested="auto",
        size="1024x1024",
        n_requested=2,
        n=2,
        stream=False,
        estimated_nanos=123,
        downgrades="quality=high->medium",
    )


def test_every_field_of_an_entry_is_set_by_a_stage() -> None:
    """A field added to Entry must be given by one of its stages (or the first)."""
    request = ImageRequest(
        "responses", "m", 1, n=3, quality="q", size="s", stream=True, user="u",
        images=(InputImage(),), mainline="mm",
    )  # fmt: skip
    asked = Entry("i", 1.0, "edits").identified("t", "c", "k").asked(request, "digest", "key")
    entry = asked.sent(request, 9, "d")
    # A batch's billed line is built whole when its batch ends, from the line's own result:
    # no request walks the stages with a `custom_id`.
    built_whole = {"custom_id"}
    staged = [f.name for f in fields(Entry) if f.name not in built_whole]
    assert all(getattr(entry, name) not in (None, 0, "", False) for name in staged)


@settings(max_examples=2000)
@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_usd_text_is_decimals_own_plain_form(nanos: int) -> None:
    """What Decimal's exact arithmetic writes, trailing zeros dropped."""
    text = format(Decimal(nanos).scaleb(-9), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    assert usd_text(nanos) == text
    assert usd(nanos) == Decimal(nanos) / NANOS_PER_USD
