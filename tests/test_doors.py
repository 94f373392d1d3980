"""The Images door (`proxy.doors.images`): what it answers the pipeline, pure."""

from __future__ import annotations

import json

import pytest

from proxy.core.budgets import Variant
from proxy.core.errors import InvalidRequest, PolicyViolation, UnpricedModel, UpstreamUnavailable
from proxy.core.models import Change, Usage
from proxy.core.settings import Config
from proxy.core.settlement import StreamEnd
from proxy.doors import Door, ImagesDoor
from proxy.doors.images import ImageEvents
from tests.conftest import team_named, two_teams

JSON = "application/json"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return two_teams(
        tmp_path_factory.mktemp("doors"),
        "allow:\n  models: [gpt-image-1]\n",
    )


def body(**fields: object) -> bytes:
    return json.dumps({"prompt": "a lighthouse", **fields}).encode()


def test_each_endpoint_goes_to_its_own_upstream_path_with_its_own_body_limit(
    config: Config,
) -> None:
    limits = config.limits
    doors = {e: ImagesDoor(e) for e in ("generations", "edits", "variations")}
    assert [d.upstream_path for d in doors.values()] == [
        "/images/generations",
        "/images/edits",
        "/images/variations",
    ]
    assert doors["generations"].body_limit(limits) == limits.generations_bytes
    assert doors["edits"].body_limit(limits) == limits.edits_bytes
    assert doors["variations"].body_limit(limits) == limits.variations_bytes


def test_the_images_door_is_a_door() -> None:
    door: Door[object] = ImagesDoor("generations")  # type: ignore[assignment]
    assert door.endpoint == "generations"


def test_a_body_without_model_gets_the_default_and_says_so(config: Config) -> None:
    door = ImagesDoor("generations")
    parsed = door.parse(JSON, body(quality="low"), config, team_named(config, "design"))
    assert door.request(parsed).model == config.default_model
    assert not door.names_model(parsed)
    assert door.names_model(
        door.parse(JSON, body(model="gpt-image-1"), config, team_named(config, "design"))
    )


def test_a_body_it_cannot_read_is_an_invalid_request(config: Config) -> None:
    with pytest.raises(InvalidRequest):
        ImagesDoor("generations").parse(JSON, b"{", config, team_named(config, "design"))


def test_admit_prices_the_model_and_applies_the_allow_policy(config: Config) -> None:
    door = ImagesDoor("generations")
    unpriced = door.parse(JSON, body(model="gpt-image-0"), config, team_named(config, "design"))
    with pytest.raises(UnpricedModel):
        door.admit(team_named(config, "design"), unpriced, config)
    other = door.parse(JSON, body(model="gpt-image-2"), config, team_named(config, "design"))
    with pytest.raises(PolicyViolation):
        door.admit(team_named(config, "strict"), other, config)
    variant = door.admit(team_named(config, "design"), other, config)
    assert variant.model.name == "gpt-image-2"
    assert variant.estimate.cost_nanos > 0


def test_the_bytes_forwarded_are_written_from_the_parse_with_the_downgrades(
    config: Config,
) -> None:
    door = ImagesDoor("generations")
    parsed = door.parse(
        JSON, body(model="gpt-image-1", quality="high"), config, team_named(config, "design")
    )
    variant = door.admit(team_named(config, "design"), parsed, config)
    lower = Variant(
        variant.request.with_changes(quality="low"),
        variant.model,
        variant.estimate,
        (Change("quality", "high", "low", "budget"),),
    )
    sent, content_type = door.encode(parsed, lower)
    assert content_type == JSON
    assert json.loads(sent) == {"prompt": "a lighthouse", "model": "gpt-image-1", "quality": "low"}


COMPLETED = (
    b'event: image_generation.completed\ndata: {"type": "image_generation.completed", '
    b'"b64_json": "AAAA", "usage": {"input_tokens": 5, "output_tokens": 10, '
    b'"input_tokens_details": {"text_tokens": 5, "image_tokens": 0}}}\n\n'
)


def test_an_image_stream_ends_with_its_completed_events() -> None:
    events = ImageEvents()
    for i in range(0, len(COMPLETED), 7):  # in pieces, as chunks arrive
        events.feed(COMPLETED[i : i + 7])
    assert events.end(None) == StreamEnd(1, Usage(text_input=5, image_output=10))


def test_a_last_event_without_its_blank_line_still_counts() -> None:
    events = ImageEvents()
    events.feed(COMPLETED.rstrip(b"\n"))
    assert events.end(None).completed == 1


def test_a_stream_that_broke_off_says_how() -> None:
    events = ImageEvents()
    events.feed(COMPLETED.rstrip(b"\n"))  # the last event's end never came
    assert events.end("upstream_timeout") == StreamEnd(0, Usage(), broken="upstream_timeout")


PARTIAL = (
    b'event: image_generation.partial_image\ndata: {"type": "image_generation.partial_image"}\n\n'
)


@pytest.mark.parametrize(
    ("sent", "opening"),
    [(PARTIAL, b"event: error\n"), (PARTIAL + COMPLETED[:40], b"\n\nevent: error\n")],
    ids=["between events", "inside an event"],
)
def test_a_stream_cut_short_ends_with_an_error_event_the_sdks_raise(
    sent: bytes, opening: bytes
) -> None:
    events = ImageEvents()
    events.feed(sent)
    tail = events.cut_short(UpstreamUnavailable("The upstream closed the connection."))
    assert tail.startswith(opening) and tail.endswith(b"\n\n")
    [data] = [line for line in tail.split(b"\n") if line.startswith(b"data: ")]
    assert json.loads(data.removeprefix(b"data: ")) == {
        "type": "error",
        "error": {
            "message": "The upstream's stream broke off before its end. The upstream closed "
            "the connection.",
            "type": "api_error",
            "param": None,
            "code": "upstream_unavailable",
        },
    }
    # Tollgate's own meter reads the whole stream as one that ended without its image.
    events.feed(tail)
    assert events.end("upstream_unavailable").completed == 0
