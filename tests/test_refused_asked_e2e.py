"""A request refused while its body is parsed is recorded with what it asked (its model,
quality, size, `n` and user), as one refused later is, and is refused as before: the
same error and status, nothing forwarded, nothing charged."""

from __future__ import annotations

import io
from typing import Any

import openai
import pytest
from PIL import Image

from tests.conftest import Tollgate

ASKED = ("gpt-image-1", "low", "1024x1024", 2)
COLUMNS = ("model_requested", "quality_requested", "size_requested", "n_requested")
SENT = ("model", "quality", "size", "n")


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def refused_row(tollgate: Tollgate, error: openai.APIStatusError) -> dict[str, Any]:
    """The row of the refused request `error` answered, checked to be a $0 refusal."""
    assert error.response.headers["x-tollgate-cost-usd"] == "0"
    row = tollgate.row(error.response.headers["x-tollgate-request-id"])
    assert (row["outcome"], row["status"], row["state"]) == ("client_error", 400, "settled")
    assert (row["cost_nanos"], row["estimated_nanos"], row["upstream_request_id"]) == (0, 0, None)
    assert tuple(row[c] for c in SENT) == (None,) * 4  # nothing was sent
    return row


@pytest.mark.parametrize(
    ("options", "param", "recorded"),
    [
        ({"partial_images": 2}, "partial_images", ASKED),
        ({"extra_body": {"bogus": True}}, "bogus", ASKED),
        ({"extra_body": {"n": "2"}}, "n", (*ASKED[:3], None)),
        ({"size": "big"}, "size", ("gpt-image-1", "low", "big", 2)),
    ],
    ids=["partial_images_without_stream", "unknown_parameter", "n_as_text", "bad_size"],
)
def test_a_generation_refused_at_its_parse_records_what_it_asked(
    tollgate: Tollgate, options: dict[str, Any], param: str, recorded: tuple[Any, ...]
) -> None:
    asked: dict[str, Any] = {"model": "gpt-image-1", "quality": "low", "size": "1024x1024"}
    with tollgate.client() as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(prompt="a lighthouse", n=2, user="ada", **{**asked, **options})
    error = caught.value
    assert (error.code, error.param) == ("invalid_request", param)  # type: ignore[attr-defined]
    row = refused_row(tollgate, error)
    assert tuple(row[c] for c in COLUMNS) == recorded
    assert row["user"] == "ada"


def test_a_generation_whose_values_the_ledger_cannot_hold_records_none_of_them(
    tollgate: Tollgate,
) -> None:
    """A model name of 1,000 characters and a `user` of 300 are refused at the parse (the
    user as too long): the row records neither, and what it can hold of the rest."""
    with tollgate.client() as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(
            model="m" * 1000, prompt="a lighthouse", quality="low", n=2, user="u" * 300
        )
    error = caught.value
    assert error.param == "user"  # type: ignore[attr-defined]
    row = refused_row(tollgate, error)
    assert tuple(row[c] for c in COLUMNS) == (None, "low", "auto", 2)
    assert row["user"] is None


def test_an_edit_refused_at_its_parse_records_what_its_form_asked(tollgate: Tollgate) -> None:
    with tollgate.client() as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.images.edit(
            image=("hat.png", png(), "image/png"),
            prompt="a hat",
            model="gpt-image-1",
            quality="low",
            size="1024x1024",
            n=2,
            partial_images=1,
            user="bob",
        )
    error = caught.value
    assert (error.code, error.param) == ("invalid_request", "partial_images")  # type: ignore[attr-defined]
    row = refused_row(tollgate, error)
    assert row["endpoint"] == "edits"
    assert tuple(row[c] for c in COLUMNS) == ASKED
    assert row["user"] == "bob"


def test_a_response_refused_at_its_parse_records_its_models(tollgate: Tollgate) -> None:
    tool = {
        "type": "image_generation",
        "model": "gpt-image-1",
        "quality": "low",
        "size": "1024x1024",
    }
    with tollgate.client() as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.responses.create(
            model="gpt-5.5",
            input=[{"type": "item_reference", "id": "msg_1"}],
            tools=[tool],  # type: ignore[list-item]
            max_output_tokens=300,
        )
    error = caught.value
    assert (error.code, error.param) == ("invalid_request", "input[0].type")  # type: ignore[attr-defined]
    row = refused_row(tollgate, error)
    assert row["endpoint"] == "responses"
    assert row["mainline_model"] == "gpt-5.5"
    assert tuple(row[c] for c in COLUMNS[:3]) == ASKED[:3]


def test_a_model_name_too_long_for_the_ledger_is_not_recorded_where_it_is_refused(
    tollgate: Tollgate,
) -> None:
    """A model of 3,000 characters passes the parse and is refused as unpriced: its row
    recorded the whole name (the ledger keeps no client text without a bound); it now
    records none, and the rest of what was asked."""
    with tollgate.client() as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.images.generate(model="m" * 3000, prompt="a lighthouse", quality="low", n=2)
        assert caught.value.code == "unpriced_model"  # type: ignore[attr-defined]
        row = refused_row(tollgate, caught.value)
        assert tuple(row[c] for c in COLUMNS) == (None, "low", "auto", 2)
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.responses.create(model="m" * 3000, input="a lighthouse", max_output_tokens=300)
        assert caught.value.code == "unpriced_model"  # type: ignore[attr-defined]
        row = refused_row(tollgate, caught.value)
        assert row["mainline_model"] is None
