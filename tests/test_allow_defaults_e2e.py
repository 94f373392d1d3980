"""A team's `allow` end to end, through each door (the official openai client → Tollgate →
the simulator): a field left out counts as OpenAI's default for it, `size: auto` passes
`allow.sizes` only where listed, and a downgrade picks only sizes the team may request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.core.auth import key_hash
from tests.batches_e2e import data_url, line, png_bytes, upload
from tests.conftest import Simulator, Tollgate, run_tollgate, write_config

KEYS = {name: f"tg_test_{name}_allow_key" for name in ("opaque", "sized", "sizedr")}


def team(name: str, body: str) -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TEAMS = {
    "opaque": team(
        "opaque",
        """
allow:
  params: {background: [opaque]}
  sizes: [1024x1024, 1536x1024]
""",
    ),
    # gpt-image-2 high at 2048x1152 ($0.17) fits $0.14 at 1536x864 ($0.13), a 16:9 size the
    # team may not request; the allowed 1280x720 ($0.11) fits too.
    "sized": team(
        "sized",
        """
budgets:
  - {period: day, limit_usd: 0.14}
allow:
  sizes: [2048x1152, 1280x720]
downgrade: {order: [size]}
""",
    ),
    # The same through the Responses API's image tool, its mainline model's bound ($0.10)
    # on top: $0.24 fits 1536x864 ($0.233) and 1280x720 ($0.217).
    "sizedr": team(
        "sizedr",
        """
budgets:
  - {period: day, limit_usd: 0.24}
allow:
  sizes: [2048x1152, 1280x720]
downgrade: {order: [size]}
responses: {max_output_tokens: 16, max_tool_calls: 1}
""",
    ),
}
OPAQUE = {"background": "opaque", "size": "1024x1024", "quality": "low"}


@pytest.fixture(scope="module")
def gate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("allow")
    write_config(root, f"{simulator.url}/v1", teams=TEAMS)
    yield from run_tollgate(root)


def refused(call: Any) -> openai.PermissionDeniedError:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        call()
    error = caught.value
    assert error.code == "policy_violation"
    return error


def test_a_generation_that_leaves_out_a_field_whose_default_is_not_allowed_is_refused(
    gate: Tollgate,
) -> None:
    """`background` left out runs at OpenAI's default `auto`: it used to pass a rule that
    allows `opaque` only."""
    client = gate.client(KEYS["opaque"])
    error = refused(
        lambda: client.images.generate(
            model="gpt-image-2", prompt="a kettle", size="1024x1024", quality="low"
        )
    )
    assert error.param == "background"
    message = error.body["message"]  # type: ignore[index]
    assert "omitted" in message and "auto" in message and "opaque" in message
    made = client.images.generate(model="gpt-image-2", prompt="a kettle", **OPAQUE)
    assert made.data


def test_an_edit_that_leaves_out_a_field_whose_default_is_not_allowed_is_refused(
    gate: Tollgate,
) -> None:
    client = gate.client(KEYS["opaque"])
    error = refused(
        lambda: client.images.edit(
            model="gpt-image-2",
            image=("in.png", png_bytes(), "image/png"),
            prompt="a kettle",
            size="1024x1024",
            quality="low",
        )
    )
    assert error.param == "background"
    edited = client.images.edit(
        model="gpt-image-2", image=("in.png", png_bytes(), "image/png"), prompt="a kettle", **OPAQUE
    )
    assert edited.data


@pytest.mark.parametrize("size", [None, "auto"])
def test_size_auto_asked_or_left_out_is_refused_unless_allow_sizes_lists_it(
    gate: Tollgate, size: str | None
) -> None:
    """With `auto` the model picks a size that may not be on the list: it used to pass."""
    client = gate.client(KEYS["opaque"])
    asked = {"size": size} if size else {}
    error = refused(
        lambda: client.images.generate(
            model="gpt-image-2", prompt="a kettle", background="opaque", quality="low", **asked
        )
    )
    assert error.param == "size"
    message = error.body["message"]  # type: ignore[index]
    assert "auto" in message and "1024x1024" in message
    assert ("omitted" in message) == (size is None)


def test_the_image_tool_is_held_to_the_defaults_and_to_allow_sizes(gate: Tollgate) -> None:
    client = gate.client(KEYS["opaque"])
    tool = {"type": "image_generation", "model": "gpt-image-2", "quality": "low"}

    def create(**options: Any) -> Any:
        return client.responses.create(
            model="gpt-5.5",
            input="A lantern",
            tools=[{**tool, **options}],  # type: ignore[list-item]
        )

    error = refused(lambda: create(size="1024x1024"))
    assert error.param == "tools[0].background"
    assert "omitted" in error.body["message"]  # type: ignore[index]
    assert refused(lambda: create(background="opaque")).param == "tools[0].size"
    assert refused(lambda: create(background="opaque", size="auto")).param == "tools[0].size"
    assert create(background="opaque", size="1024x1024").status == "completed"


def test_batch_lines_are_held_to_the_defaults_and_to_allow_sizes(gate: Tollgate) -> None:
    client = gate.client(KEYS["opaque"])
    body = {"model": "gpt-image-2", "prompt": "a kettle", "quality": "low"}
    with pytest.raises(openai.BadRequestError) as caught:
        upload(
            client,
            [
                line("no-background", {**body, "size": "1024x1024"}),
                line("no-size", {**body, "background": "opaque"}),
                line("fine", {**body, **OPAQUE}),
            ],
        )
    message = caught.value.body["message"]  # type: ignore[index]
    assert "line 1:" in message and "background" in message and "omitted" in message
    assert "line 2:" in message and "size" in message
    assert "line 3:" not in message
    edit = {"model": "gpt-image-2", "prompt": "a kettle", "images": [{"image_url": data_url()}]}
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, [line("edit", {**edit, "size": "1024x1024"}, url="/v1/images/edits")])
    assert "background" in caught.value.body["message"]  # type: ignore[index]
    tool = {"type": "image_generation", "model": "gpt-image-2", "size": "1024x1024"}
    responses = {"model": "gpt-5.5", "input": "A lantern", "tools": [tool]}
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, [line("tool", responses, url="/v1/responses")])
    assert "background" in caught.value.body["message"]  # type: ignore[index]
    # A line that sends what the rules ask passes, at upload and when its batch is created.
    uploaded = upload(client, [line("fine", {**body, **OPAQUE})])
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    assert batch.status != "failed"


def test_a_size_downgrade_of_a_generation_chooses_only_an_allowed_size(gate: Tollgate) -> None:
    """It used to send 1536x864, the most faithful 16:9 size that fits, which the team may
    not request."""
    raw = gate.client(KEYS["sized"]).images.with_raw_response.generate(
        model="gpt-image-2", prompt="a kettle", size="2048x1152", quality="high"
    )
    assert raw.headers["x-tollgate-downgraded"] == "size=2048x1152->1280x720"
    assert raw.parse().size == "1280x720"


def test_a_size_downgrade_of_the_image_tool_chooses_only_an_allowed_size(gate: Tollgate) -> None:
    raw = gate.client(KEYS["sizedr"]).responses.with_raw_response.create(
        model="gpt-5.5",
        input="A lantern",
        tools=[
            {
                "type": "image_generation",
                "model": "gpt-image-2",
                "quality": "high",
                "size": "2048x1152",
            }
        ],
        max_output_tokens=16,
    )
    assert "size=2048x1152->1280x720" in raw.headers["x-tollgate-downgraded"]
    calls = [item for item in raw.parse().output if item.type == "image_generation_call"]
    assert calls and all(getattr(call, "size", "1280x720") == "1280x720" for call in calls)
