"""The proxy end to end: the official openai client → Tollgate → the simulated upstream.

Every cost is checked against price × usage computed here, from the upstream's own
billing record and OpenAI's published rates (not from Tollgate's price book).
"""

from __future__ import annotations

import base64
import io
import json
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import DESIGN_KEY, UPSTREAM_KEY, Simulator, Tollgate

# OpenAI's published USD per 1M tokens (text in, image in, image out, text out).
RATES = {
    "gpt-image-2": (5, 8, 30, 0),
    "gpt-image-2.5-sunburst": (5, 8, 30, 0),
    "gpt-image-2.6-flare": (5, 8, 30, 0),
    "gpt-image-1.5": (5, 8, 32, 10),
    "gpt-image-1": (5, 10, 40, 0),
    "gpt-image-1-mini": (2, Decimal("2.5"), 8, 0),
}


def expected_cost(record: dict[str, Any]) -> Decimal:
    usage = record["usage"]
    text_in, image_in, image_out, text_out = (Decimal(r) for r in RATES[record["model"]])
    micro = (
        usage["text_input"] * text_in
        + usage["image_input"] * image_in
        + usage["image_output"] * image_out
        + usage.get("text_output", 0) * text_out
    )
    return micro / Decimal(1_000_000)


def png(width: int, height: int, alpha: bool = False) -> bytes:
    out = io.BytesIO()
    Image.new(
        "RGBA" if alpha else "RGB", (width, height), (10, 20, 30, 0) if alpha else (10, 20, 30)
    ).save(out, "PNG")
    return out.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def wait_settled(tollgate: Tollgate, request_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in tollgate.rows() if r["id"] == request_id]
        if rows and rows[0]["state"] == "settled":
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never settled")


def check_charge(tollgate: Tollgate, simulator: Simulator, raw: Any) -> dict[str, Any]:
    """The header and the ledger row both equal price x usage of the upstream's record."""
    record = simulator.record(raw.headers["x-request-id"])
    assert record["authorization"] == f"Bearer {UPSTREAM_KEY}"
    cost = expected_cost(record)
    assert Decimal(raw.headers["x-tollgate-cost-usd"]) == cost
    row = wait_settled(tollgate, raw.headers["x-tollgate-request-id"])
    assert Decimal(row["cost_nanos"]) / 10**9 == cost
    assert row["upstream_request_id"] == record["id"]
    assert row["image_output_tokens"] == record["usage"]["image_output"]
    assert row["text_input_tokens"] == record["usage"]["text_input"]
    assert row["image_input_tokens"] == record["usage"]["image_input"]
    assert row["flagged"] == 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
    return row


@pytest.mark.parametrize(
    ("model", "quality", "size"),
    [
        ("gpt-image-2", "low", "1024x1024"),
        ("gpt-image-2", "high", "1536x864"),
        ("gpt-image-1.5", "high", "1536x1024"),
        ("gpt-image-1-mini", "medium", "1024x1536"),
        ("gpt-image-2.5-sunburst", "xhigh", "2048x1152"),
        ("gpt-image-2.6-flare", "low", "1024x1024"),
        ("gpt-image-1", "auto", "auto"),
    ],
)
def test_generate_is_forwarded_with_the_real_key_and_metered_exactly(
    tollgate: Tollgate, simulator: Simulator, model: str, quality: str, size: str
) -> None:
    raw = tollgate.client().images.with_raw_response.generate(
        model=model,
        prompt="a lighthouse at dawn",
        quality=quality,
        size=size,  # type: ignore[arg-type]
    )
    result = raw.parse()
    image = decoded(result.data[0].b64_json)
    assert image.format == "PNG"
    if size != "auto":
        assert f"{image.width}x{image.height}" == size
    assert raw.headers["x-tollgate-team"] == "design"
    row = check_charge(tollgate, simulator, raw)
    assert row["team"] == "design" and row["key_id"] == "web-app"
    assert row["model"] == model and row["outcome"] == "ok" and row["status"] == 200


def test_several_images_and_formats(tollgate: Tollgate, simulator: Simulator) -> None:
    raw = tollgate.client().images.with_raw_response.generate(
        model="gpt-image-2",
        prompt="two cats",
        n=2,
        quality="medium",
        size="1024x1024",
        output_format="jpeg",
        output_compression=60,
    )
    result = raw.parse()
    assert [decoded(d.b64_json).format for d in result.data] == ["JPEG", "JPEG"]
    row = check_charge(tollgate, simulator, raw)
    assert row["images"] == 2 and row["n"] == 2


def test_edit_with_one_image(tollgate: Tollgate, simulator: Simulator) -> None:
    raw = tollgate.client().images.with_raw_response.edit(
        model="gpt-image-1",
        image=("in.png", png(1024, 1024), "image/png"),
        prompt="add a hat",
        quality="low",
        size="1024x1024",
        input_fidelity="high",
    )
    assert decoded(raw.parse().data[0].b64_json).size == (1024, 1024)
    row = check_charge(tollgate, simulator, raw)
    assert row["endpoint"] == "edits"
    # gpt-image-1's published rule: 1 tile (65 + 129) + 4160 for a square at high fidelity.
    assert row["image_input_tokens"] == 65 + 129 + 4160


def test_edit_with_several_images_and_a_mask(tollgate: Tollgate, simulator: Simulator) -> None:
    raw = tollgate.client().images.with_raw_response.edit(
        model="gpt-image-1.5",
        image=[("a.png", png(1024, 1024), "image/png"), ("b.png", png(1536, 1024), "image/png")],
        mask=("mask.png", png(1024, 1024, alpha=True), "image/png"),
        prompt="merge them",
        quality="medium",
        size="1536x1024",
    )
    assert decoded(raw.parse().data[0].b64_json).size == (1536, 1024)
    record = simulator.record(raw.headers["x-request-id"])
    assert record["image_count"] == 2
    check_charge(tollgate, simulator, raw)


def test_edit_as_json_with_image_urls(tollgate: Tollgate, simulator: Simulator) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png(512, 512)).decode()
    reference = tollgate.client().files.create(file=("b.png", png(64, 64)), purpose="vision")
    answer = httpx.post(
        f"{tollgate.url}/v1/images/edits",
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
        json={
            "model": "gpt-image-2",
            "prompt": "make it blue",
            "quality": "low",
            "size": "1024x1024",
            "images": [{"image_url": data_url}, {"file_id": reference.id}],
        },
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    check_charge(tollgate, simulator, answer)


def test_stream_passes_events_through_and_meters_completed_usage(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    client = tollgate.client()
    with client.images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt="a fox",
        quality="low",
        size="1024x1024",
        stream=True,
        partial_images=2,
    ) as response:
        reserved = Decimal(response.headers["x-tollgate-reserved-usd"])
        request_id = response.headers["x-tollgate-request-id"]
        upstream_id = response.headers["x-request-id"]
        events = [e for e in response.parse()]
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert decoded(events[-1].b64_json).size == (1024, 1024)
    record = simulator.record(upstream_id)
    row = wait_settled(tollgate, request_id)
    assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(record)
    assert row["image_output_tokens"] == 196 + 2 * 100
    assert Decimal(row["estimated_nanos"]) / 10**9 == reserved >= expected_cost(record)
    assert row["stream"] == 1


def test_stream_of_several_images_sums_every_completed_event(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    image = ("in.png", png(1024, 1024), "image/png")
    with tollgate.client().images.with_streaming_response.edit(
        model="gpt-image-1.5",
        image=image,
        prompt="two variants",
        n=2,
        quality="low",
        size="1024x1024",
        stream=True,
        partial_images=1,
    ) as response:
        request_id = response.headers["x-tollgate-request-id"]
        upstream_id = response.headers["x-request-id"]
        events = list(response.parse())
    assert sum(e.type == "image_edit.completed" for e in events) == 2
    row = wait_settled(tollgate, request_id)
    assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(simulator.record(upstream_id))


def test_no_model_gets_the_default_model_explicitly(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    answer = httpx.post(
        f"{tollgate.url}/v1/images/generations",
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
        json={"prompt": "a boat", "quality": "low", "size": "1024x1024"},
        timeout=30,
    )
    assert answer.status_code == 200
    assert answer.headers["x-tollgate-model"] == "gpt-image-2"
    assert simulator.record(answer.headers["x-request-id"])["model"] == "gpt-image-2"


def test_variations_are_forwarded_and_priced_per_image(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    raw = tollgate.client().images.with_raw_response.create_variation(
        image=("in.png", png(256, 256), "image/png"),
        n=2,
        size="512x512",
        response_format="b64_json",
    )
    assert len(raw.parse().data or []) == 2
    assert Decimal(raw.headers["x-tollgate-cost-usd"]) == Decimal("0.036")
    row = wait_settled(tollgate, raw.headers["x-tollgate-request-id"])
    assert row["model"] == "dall-e-2" and row["cost_nanos"] == 36_000_000
    assert row["flagged"] == 1  # per-image price, no usage: reconcile


@pytest.mark.parametrize(
    ("endpoint", "model", "takes"),
    [
        ("variations", "gpt-image-2", "dall-e-2"),
        ("variations", "dall-e-3", "dall-e-2"),
        ("edits", "dall-e-3", "dall-e-2, gpt-image-1"),
    ],
)
def test_a_model_the_endpoint_does_not_take_is_refused_before_it_is_sent(
    tollgate: Tollgate, simulator: Simulator, endpoint: str, model: str, takes: str
) -> None:
    """Variations took dall-e-2 only, edits never dall-e-3: such a request was reserved at
    its bound and sent with the company key, for OpenAI's 400."""
    before = len(simulator.billing())
    images = tollgate.client(max_retries=0).images.with_raw_response
    image = ("in.png", png(256, 256), "image/png")
    with pytest.raises(openai.BadRequestError) as caught:
        if endpoint == "variations":
            images.create_variation(model=model, image=image, size="1024x1024")
        else:
            images.edit(model=model, image=image, prompt="a boat")
    error = caught.value
    assert error.status_code == 400 and error.code == "invalid_request" and error.param == "model"
    assert isinstance(error.body, dict) and error.body["type"] == "invalid_request_error"
    assert f"/v1/images/{endpoint}" in error.message and takes in error.message
    assert len(simulator.billing()) == before  # nothing was sent upstream
    row = tollgate.rows()[-1]
    assert row["status"] == 400 and row["upstream_request_id"] is None
    assert row["reserved_nanos"] == 0 and row["cost_nanos"] == 0


def test_team_key_never_reaches_the_upstream(tollgate: Tollgate, simulator: Simulator) -> None:
    tollgate.client(organization="org-team", project="proj-team").images.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    record = simulator.billing()[-1]
    assert DESIGN_KEY not in json.dumps(record)
    assert record["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "openai-organization" not in record["headers"]
