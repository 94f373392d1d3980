"""What a request refused before its body was understood asked: read for its ledger row,
each field only when it is of the right type and short enough for the ledger to hold."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from proxy.core.asked import images_asked
from proxy.core.image_params import MAX_INTEGER, MAX_USER_CHARS
from proxy.core.models import MAX_ASKED_CHARS, Asked, Entry
from proxy.core.parsing import parse_request
from proxy.core.settings import Allow, Team
from proxy.doors.responses import read_body, responses_asked

JSON = "application/json"
DEFAULT_MODEL = "gpt-image-2"
ASKED = {"model": "gpt-image-1", "quality": "low", "size": "1024x1024", "n": 2, "user": "ada"}
PNG = ("img.png", b"\x89PNG\r\n\x1a\n not really an image", "image/png")


def generation(fields: dict[str, Any]) -> Asked:
    return images_asked("generations", JSON, json.dumps(fields).encode(), DEFAULT_MODEL)


def edit(fields: dict[str, Any], *, files: Any = (("image", PNG),)) -> Asked:
    sent = httpx.Request("POST", "http://test/v1/images/edits", data=fields, files=list(files))
    return images_asked("edits", sent.headers["content-type"], sent.read(), DEFAULT_MODEL)


def test_what_a_generation_refused_at_its_parse_asked_is_read() -> None:
    asked = generation({**ASKED, "prompt": "a cat", "partial_images": 2, "bogus": True})
    assert asked == Asked("gpt-image-1", "low", "1024x1024", 2, "ada")


def test_an_absent_field_is_read_as_the_parse_reads_it() -> None:
    assert generation({"prompt": "a cat", "bogus": 1, "model": ""}) == Asked(
        DEFAULT_MODEL, "auto", "auto", 1, None
    )
    variation = images_asked(
        "variations", *content(httpx.Request("POST", "http://t", files=[("image", PNG)])), "x"
    )
    assert variation.model == "dall-e-2"


def content(sent: httpx.Request) -> tuple[str, bytes]:
    return sent.headers["content-type"], sent.read()


def test_the_safety_identifier_is_the_user_before_user() -> None:
    assert generation({"user": "ada", "safety_identifier": "sid-1"}).user == "sid-1"
    assert generation({"user": "ada", "safety_identifier": ""}).user == "ada"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model", "m" * (MAX_ASKED_CHARS + 1)),
        ("model", 42),
        ("model", ["gpt-image-1"]),
        ("quality", "q" * (MAX_ASKED_CHARS + 1)),
        ("quality", {"level": "high"}),
        ("size", "9" * 100_000),
        ("size", 1024),
        ("n", "2"),
        ("n", True),
        ("n", 2.0),
        ("n", -1),
        ("n", MAX_INTEGER + 1),
        ("n", 10**400),
        ("user", "u" * (MAX_USER_CHARS + 1)),
        ("user", 7),
        ("safety_identifier", "s" * (MAX_USER_CHARS + 1)),
    ],
)
def test_an_over_long_or_wrongly_typed_value_is_not_recorded(name: str, value: Any) -> None:
    asked = generation({**ASKED, name: value})
    recorded = "user" if name == "safety_identifier" else name
    assert getattr(asked, recorded) is None
    others = {k: v for k, v in ASKED.items() if k != recorded}
    assert {k: getattr(asked, k) for k in others} == others


def test_a_value_the_ledger_could_not_hold_is_not_recorded() -> None:
    # A lone surrogate cannot be stored (a JSON body holding one is no body: nothing).
    assert generation({**ASKED, "model": "\ud800"}) == Asked()
    body, content_type = multipart({**ASKED, "model": "gpt\x00image"})
    assert images_asked("edits", content_type, body, DEFAULT_MODEL).model is None


def test_the_longest_values_the_ledger_may_hold_are_recorded() -> None:
    model, user = "m" * MAX_ASKED_CHARS, "u" * MAX_USER_CHARS
    assert generation({**ASKED, "model": model, "user": user}) == Asked(
        model, "low", "1024x1024", 2, user
    )


def multipart(fields: dict[str, Any]) -> tuple[bytes, str]:
    sent = httpx.Request("POST", "http://t", data=fields, files=[("image", PNG)])
    return sent.read(), sent.headers["content-type"]


def test_what_a_multipart_edit_asked_is_read_from_its_form() -> None:
    asked = edit({**ASKED, "n": "2", "prompt": "a hat", "partial_images": "1"})
    assert asked == Asked("gpt-image-1", "low", "1024x1024", 2, "ada")


@pytest.mark.parametrize("n", ["two", "+2", "٢", "1" * 11, "99999999999"])
def test_a_forms_n_is_recorded_only_in_ascii_digits_and_in_range(n: str) -> None:
    assert edit({**ASKED, "n": n}).n is None


def test_a_field_given_twice_in_a_form_is_not_recorded() -> None:
    sent = httpx.Request(
        "POST",
        "http://t",
        data={"model": ["gpt-image-1", "dall-e-2"], "quality": "low"},
        files=[("image", PNG)],
    )
    asked = images_asked("edits", *content(sent), DEFAULT_MODEL)
    assert (asked.model, asked.quality) == (None, "low")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (JSON, b"not json"),
        (JSON, b"[1, 2]"),
        (JSON, b'{"model": "a", "model": "b"}'),
        ("text/plain", json.dumps(ASKED).encode()),
        ("multipart/form-data", b"no boundary"),
    ],
)
def test_a_body_that_cannot_be_read_records_nothing(content_type: str, body: bytes) -> None:
    assert images_asked("generations", content_type, body, DEFAULT_MODEL) == Asked()


def test_what_a_response_asked_is_its_mainline_model_and_first_image_tools() -> None:
    tool = {"type": "image_generation", "model": "gpt-image-1", "quality": "low"}
    fields = {
        "model": "gpt-5.5",
        "tools": [{"type": "function", "name": "f"}, tool, {**tool, "model": "other"}],
        "input": [{"type": "item_reference", "id": "msg_1"}],
    }
    assert responses_asked(fields, DEFAULT_MODEL) == Asked(
        "gpt-image-1", "low", "auto", mainline="gpt-5.5"
    )
    unnamed = responses_asked({**fields, "tools": [{"type": "image_generation"}]}, "gpt-image-2")
    assert unnamed == Asked("gpt-image-2", "auto", "auto", mainline="gpt-5.5")


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "gpt-5.5"},
        {"model": "gpt-5.5", "tools": "image_generation"},
        {"model": "gpt-5.5", "tools": [{"type": "image_generation"}], "tool_choice": "none"},
    ],
)
def test_a_response_that_calls_no_image_tool_records_its_mainline_model_alone(
    fields: dict[str, Any],
) -> None:
    assert responses_asked(fields, DEFAULT_MODEL) == Asked(mainline="gpt-5.5")


def test_a_responses_over_long_or_wrongly_typed_value_is_not_recorded() -> None:
    tool = {"type": "image_generation", "model": "x" * 10_000, "quality": 3, "size": "auto"}
    asked = responses_asked({"model": ["gpt-5.5"], "tools": [tool]}, DEFAULT_MODEL)
    assert asked == Asked(None, None, "auto", mainline=None)


def test_an_entry_refused_before_it_was_understood_records_what_it_asked() -> None:
    entry = Entry("tg_req_1", 1.0, "generations").identified("design", "CC-1", "web-app")
    row = entry.asking(Asked("gpt-image-1", "low", "1024x1024", 2, "ada", None))
    assert (row.team, row.cost_center, row.key_id, row.user) == ("design", "CC-1", "web-app", "ada")
    assert (row.model_requested, row.quality_requested, row.size_requested, row.n_requested) == (
        "gpt-image-1",
        "low",
        "1024x1024",
        2,
    )
    assert (row.model, row.quality, row.size, row.n, row.estimated_nanos) == (
        None,
        None,
        None,
        None,
        0,
    )


def test_a_parsed_request_records_no_model_quality_or_size_too_long_for_the_ledger() -> None:
    """The parse takes a model, a quality and a Responses tool's size of any length (the
    price book refuses them after): its row recorded them whole, megabytes of a client's
    text, where it now records nothing."""
    long = "x" * (MAX_ASKED_CHARS + 1)
    body = json.dumps({"model": long, "prompt": "a cat", "quality": long, "size": "1024x1024"})
    request = parse_request("generations", JSON, body.encode(), DEFAULT_MODEL).request
    row = Entry("tg_req_1", 1.0, "generations").asked(request)
    assert (row.model_requested, row.quality_requested, row.size_requested) == (
        None,
        None,
        "1024x1024",
    )
    team = Team("design", None, (), (), (), Allow(), ())
    tool = {"type": "image_generation", "model": long, "quality": long, "size": long}
    fields = {"model": long, "input": "a cat", "tools": [tool], "max_output_tokens": 300}
    response = read_body(fields, 100, DEFAULT_MODEL, team).request
    row = Entry("tg_req_2", 1.0, "responses").asked(response)
    assert (row.mainline_model, row.model_requested, row.quality_requested) == (None,) * 3
    assert row.size_requested is None
    short = {**fields, "model": "gpt-5.5", "tools": [{**tool, "model": "m" * MAX_ASKED_CHARS}]}
    row = Entry("tg_req_3", 1.0, "responses").asked(read_body(short, 100, "x", team).request)
    assert (row.mainline_model, row.model_requested) == ("gpt-5.5", "m" * MAX_ASKED_CHARS)
