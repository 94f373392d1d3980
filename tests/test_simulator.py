"""The simulated upstream, driven by the official openai SDK over loopback."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.simulator.options import (
    DEFAULT_BACKGROUND_MS,
    DEFAULT_BATCH_DELAY_MS,
    DEFAULT_BATCH_WINDOW_MS,
)
from proxy.simulator.tokens import formula_tokens, image_input_tokens, text_tokens
from tests.conftest import serving

API_KEY = "sk-sim-test-key-0001"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@dataclass
class Sim:
    """A running simulator: its base URL and a plain HTTP client for the /_sim endpoints."""

    url: str
    http: httpx.Client

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **options)

    def billing(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = self.http.get("/_sim/billing").json()["requests"]
        return requests

    def last(self) -> dict[str, Any]:
        return self.billing()[-1]

    def generate(self, body: dict[str, Any]) -> httpx.Response:
        """`POST /v1/images/generations` with the simulator's key, over plain HTTP."""
        return self.http.post("/v1/images/generations", headers=AUTH, json=body)

    def configure(self, **knobs: Any) -> dict[str, Any]:
        answer = self.http.post("/_sim/config", json=knobs)
        answer.raise_for_status()
        config: dict[str, Any] = answer.json()
        return config


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(create_simulator_app(SimulatorSettings(api_key=API_KEY))) as url:
        yield url


@pytest.fixture
def sim(server: str) -> Iterator[Sim]:
    with httpx.Client(base_url=server) as http:
        http.post("/_sim/reset").raise_for_status()
        http.post(
            "/_sim/config",
            json={"latency_ms": 0, "payload_bytes": 0, "fault": None, "response_headers": {}},
        )
        yield Sim(server, http)


@pytest.fixture
def client(sim: Sim) -> Iterator[openai.OpenAI]:
    with sim.client() as c:
        yield c


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


# --- generations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "quality", "size", "fmt", "want_quality", "want_size"),
    [
        ("gpt-image-1", "low", "1024x1024", "png", "low", "1024x1024"),
        ("gpt-image-1.5", "auto", "auto", "jpeg", "medium", "1024x1024"),
        ("gpt-image-1-mini", "high", "1536x1024", "webp", "high", "1536x1024"),
        ("chatgpt-image-latest", "medium", "1024x1536", "png", "medium", "1024x1536"),
        ("gpt-image-2", "high", "2048x1152", "jpeg", "high", "2048x1152"),
        ("gpt-image-2-2026-04-21", "low", "1536x864", "png", "low", "1536x864"),
        ("gpt-image-2.5-sunburst", "xhigh", "1024x1024", "webp", "xhigh", "1024x1024"),
        ("gpt-image-2.6-flare", "max", "1024x1536", "png", "max", "1024x1536"),
    ],
)
def test_generate_returns_a_decodable_image_of_the_effective_size_and_format(
    client: openai.OpenAI,
    model: str,
    quality: Any,
    size: str,
    fmt: Any,
    want_quality: str,
    want_size: str,
) -> None:
    answer = client.images.generate(
        model=model,
        prompt="a lighthouse",
        quality=quality,
        size=size,
        output_format=fmt,
    )
    assert answer.quality == want_quality
    assert answer.size == want_size
    assert answer.output_format == fmt
    assert answer.data is not None and len(answer.data) == 1
    image = decode(answer.data[0].b64_json)
    assert f"{image.width}x{image.height}" == want_size
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert answer.usage is not None
    assert answer._request_id is not None and answer._request_id.startswith("req_")


def test_generate_with_n_returns_n_images_and_bills_n_times(
    sim: Sim, client: openai.OpenAI
) -> None:
    answer = client.images.generate(
        model="gpt-image-1", prompt="two cats", n=3, quality="low", size="1024x1024"
    )
    assert answer.data is not None and len(answer.data) == 3
    assert answer.usage is not None
    assert answer.usage.output_tokens == 3 * 272
    # The prompt is billed for every image (OpenAI does not say it is billed once).
    assert answer.usage.input_tokens_details.text_tokens == 3 * text_tokens("two cats") == 6
    assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
    entry = sim.last()
    assert entry["images"] == 3
    assert entry["usage"]["image_output"] == 816


@pytest.mark.parametrize(
    ("model", "quality", "size", "per_image"),
    [
        ("gpt-image-2", "high", "1024x1024", 7024),
        ("gpt-image-2", "medium", "1536x1024", 1372),
        ("gpt-image-2", "high", "3840x2160", 13342),
        ("gpt-image-1.5", "medium", "1536x1024", 1568),
        ("gpt-image-2.5-sunburst", "xhigh", "1024x1024", 3122),
        ("gpt-image-2.5-flare", "medium", "2048x2048", 892),
        ("gpt-image-2.6-sunburst", "low", "1024x1024", 824),  # 196 x 664/158, rounded up
        ("gpt-image-2.6-sunburst", "low", "1536x1024", 664),  # as measured (a third party)
        ("gpt-image-2.6-flare", "medium", "1024x1024", 4 * 439),
        ("gpt-image-2.6-flare", "high", "1536x1024", 1372),
    ],
)
def test_billing_record_carries_the_token_rules(
    sim: Sim, client: openai.OpenAI, model: str, quality: Any, size: str, per_image: int
) -> None:
    prompt = "a red bicycle"
    answer = client.images.generate(
        model=model,
        prompt=prompt,
        quality=quality,
        size=size,
    )
    assert answer.usage is not None
    assert answer.usage.output_tokens == per_image
    entry = sim.last()
    assert entry["model"] == model
    assert entry["billed"] is True and entry["status"] == 200
    assert entry["usage"] == {
        "text_input": 4,
        "image_input": 0,
        "image_output": per_image,
        "text_output": 0,
    }
    assert entry["authorization"] == f"Bearer {API_KEY}"
    assert entry["params"]["quality"] == quality
    assert entry["params"]["size"] == size
    assert entry["params"]["prompt_len"] == len(prompt)
    assert "prompt" not in entry["params"]


def test_output_tokens_details_only_for_models_that_report_text_output(
    client: openai.OpenAI,
) -> None:
    with_details = client.images.generate(model="gpt-image-1.5", prompt="x", quality="low")
    assert with_details.usage is not None and with_details.usage.output_tokens_details
    assert with_details.usage.output_tokens_details.text_tokens == 0
    assert with_details.usage.output_tokens_details.image_tokens == 272
    without = client.images.generate(model="gpt-image-2", prompt="x", quality="low")
    assert without.usage is not None and without.usage.output_tokens_details is None


def test_dalle_answers_without_usage_and_bills_per_image(sim: Sim, client: openai.OpenAI) -> None:
    answer = client.images.generate(
        model="dall-e-3", prompt="a fox", quality="hd", size="1792x1024", response_format="b64_json"
    )
    assert answer.usage is None
    assert answer.data is not None
    assert decode(answer.data[0].b64_json).size == (1792, 1024)
    assert answer.data[0].revised_prompt == "a fox"
    entry = sim.last()
    assert entry["billed"] is True and entry["usage"] is None and entry["images"] == 1
    assert entry["quality"] == "hd"
    # URLs unless asked for base64: OpenAI's default for DALL·E.
    urls = client.images.generate(model="dall-e-2", prompt="a fox", n=2, size="256x256")
    assert urls.data is not None
    assert all(d.url and d.url.startswith("http://127.0.0.1/") for d in urls.data)
    assert sim.last()["quality"] == "standard"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_variations_take_one_png_for_dall_e_2(sim: Sim, client: openai.OpenAI) -> None:
    answer = client.images.create_variation(
        image=("a.png", png(512, 512), "image/png"),
        model="dall-e-2",
        n=2,
        size="512x512",
        response_format="b64_json",
    )
    assert answer.data is not None and len(answer.data) == 2
    assert decode(answer.data[1].b64_json).size == (512, 512)
    entry = sim.last()
    assert entry["endpoint"] == "variations" and entry["images"] == 2
    assert entry["image_count"] == 1


def test_payload_padding_keeps_images_decodable(sim: Sim, client: openai.OpenAI) -> None:
    sim.configure(payload_bytes=300_000)
    for fmt in ("png", "jpeg"):
        answer = client.images.generate(
            model="gpt-image-1", prompt="x", quality="low", output_format=fmt
        )
        assert answer.data is not None and answer.data[0].b64_json is not None
        raw = base64.b64decode(answer.data[0].b64_json)
        assert 299_000 <= len(raw) <= 301_000
        assert decode(answer.data[0].b64_json).size == (1024, 1024)


# --- edits ------------------------------------------------------------------------------


def test_edit_with_one_image_bills_its_tiles(sim: Sim, client: openai.OpenAI) -> None:
    answer = client.images.edit(
        model="gpt-image-1",
        image=("a.png", png(1536, 1024), "image/png"),
        prompt="add a hat",
        quality="low",
        size="1024x1024",
    )
    assert answer.usage is not None
    # 1536x1024 -> 768x512: two tiles, low fidelity.
    assert answer.usage.input_tokens_details.image_tokens == 65 + 129 * 2
    entry = sim.last()
    assert entry["endpoint"] == "edits" and entry["image_count"] == 1
    assert entry["usage"]["image_input"] == 323


def test_edit_with_several_images_and_a_mask(sim: Sim, client: openai.OpenAI) -> None:
    answer = client.images.edit(
        model="gpt-image-1.5",
        image=[("a.png", png(1024, 1024), "image/png"), ("b.png", png(1024, 1536), "image/png")],
        mask=("m.png", png(1024, 1024, "RGBA"), "image/png"),
        prompt="merge them",
        input_fidelity="high",
        quality="medium",
        size="1536x1024",
        output_format="jpeg",
        output_compression=40,
    )
    assert answer.usage is not None
    want = image_input_tokens(1024, 1024, high_fidelity=True) + image_input_tokens(
        1024, 1536, high_fidelity=True
    )
    assert want == (194 + 4160) + (65 + 129 * 2 + 6240)  # 1024x1536 -> 512x768
    assert answer.usage.input_tokens_details.image_tokens == want
    assert answer.usage.output_tokens == 1568
    assert answer.data is not None
    assert decode(answer.data[0].b64_json).format == "JPEG"
    entry = sim.last()
    assert entry["image_count"] == 2
    assert entry["params"]["input_fidelity"] == "high"
    assert entry["params"]["output_compression"] == "40"  # form fields stay strings


def test_gpt_image_2_edits_are_always_high_fidelity(client: openai.OpenAI) -> None:
    answer = client.images.edit(
        model="gpt-image-2", image=("a.png", png(1024, 1024), "image/png"), prompt="x"
    )
    assert answer.usage is not None
    assert answer.usage.input_tokens_details.image_tokens == 194 + 4160


def test_json_edits_count_references_as_1024_square(sim: Sim) -> None:
    answer = sim.http.post(
        "/v1/images/edits",
        headers=AUTH,
        json={
            "model": "gpt-image-1",
            "prompt": "blend",
            "images": [{"image_url": "https://example.com/a.png"}, {"file_id": "file-123"}],
            "mask": {"file_id": "file-456"},
            "quality": "low",
        },
    )
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert usage["input_tokens_details"]["image_tokens"] == 2 * 194
    assert sim.last()["image_count"] == 2


def test_a_json_edits_image_url_is_at_most_20_mib_of_characters(sim: Sim) -> None:
    long = "data:image/png;base64," + "A" * 20_971_520
    answer = sim.http.post(
        "/v1/images/edits",
        headers=AUTH,
        json={"model": "gpt-image-1", "prompt": "blend", "images": [{"image_url": long}]},
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("string_above_max_length", "images.image_url")


# --- streaming --------------------------------------------------------------------------


def test_stream_sends_partials_then_completed_per_image(sim: Sim, client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            model="gpt-image-2",
            prompt="a castle",
            quality="medium",
            size="1024x1024",
            n=2,
            stream=True,
            partial_images=2,
        )
    )
    types = [e.type for e in events]
    assert (
        types
        == [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed",
        ]
        * 2
    )
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert [p.partial_image_index for p in partials] == [0, 1, 0, 1]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert decode(completed[0].b64_json).size == (1024, 1024)
    assert completed[0].quality == "medium" and completed[0].size == "1024x1024"
    first, second = (c.usage for c in completed)
    # Each image's completed event carries the input billed for it.
    assert first.input_tokens == second.input_tokens == text_tokens("a castle")
    assert first.output_tokens == second.output_tokens == 1756 + 200
    total = sum(c.usage.total_tokens for c in completed)
    assert total == 2 * (2 + 1756 + 200)
    entry = sim.last()
    assert entry["stream"] is True
    assert entry["usage"]["image_output"] == 2 * 1756 + 4 * 100
    assert entry["params"]["stream"] is True and entry["params"]["partial_images"] == 2


def test_streamed_edit_uses_image_edit_events(client: openai.OpenAI) -> None:
    events = list(
        client.images.edit(
            model="gpt-image-1.5",
            image=("a.png", png(1024, 1024), "image/png"),
            prompt="x",
            stream=True,
            partial_images=1,
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[-1].usage.input_tokens_details.image_tokens == 194  # type: ignore[union-attr]


def test_stream_latency_is_spread_over_events(sim: Sim) -> None:
    sim.configure(latency_ms=300)
    started = time.monotonic()
    with sim.http.stream(
        "POST",
        "/v1/images/generations",
        headers=AUTH,
        json={
            "model": "gpt-image-1",
            "prompt": "x",
            "quality": "low",
            "stream": True,
            "partial_images": 2,
        },
    ) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        arrivals = [(time.monotonic() - started, line) for line in answer.iter_lines() if line]
    first_at, first = arrivals[0]
    total = arrivals[-1][0]
    assert first == "event: image_generation.partial_image"
    # A pause before each of the three events: two of them come after the first (lower
    # bounds only, which a slow machine cannot break).
    assert total - first_at >= 0.19 and total >= 0.29
    assert [line for _, line in arrivals if line.startswith("event:")] == [
        "event: image_generation.partial_image",
        "event: image_generation.partial_image",
        "event: image_generation.completed",
    ]
    assert all("[DONE]" not in line for _, line in arrivals)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"model": "gpt-image-1", "prompt": None}, "missing_required_parameter", "prompt"),
        ({"model": "gpt-image-9"}, "invalid_value", "model"),
        ({"model": "gpt-image-1", "size": "2048x2048"}, "invalid_value", "size"),
        ({"model": "gpt-image-2", "size": "1000x1000"}, "invalid_value", "size"),
        # WIDTHxHEIGHT in plain decimal: no leading zero, no line end after it.
        ({"model": "gpt-image-2", "size": "01536x864"}, "invalid_value", "size"),
        ({"model": "gpt-image-2", "size": "1536x864\n"}, "invalid_value", "size"),
        ({"model": "gpt-image-2", "size": "3840x1024"}, "invalid_value", "size"),
        ({"model": "gpt-image-2", "size": "512x512"}, "invalid_value", "size"),
        ({"model": "gpt-image-2", "quality": "xhigh"}, "invalid_value", "quality"),
        ({"model": "dall-e-3", "quality": "high"}, "invalid_value", "quality"),
        ({"model": "gpt-image-1", "n": 11}, "integer_above_max_value", "n"),
        ({"model": "gpt-image-1", "n": 0}, "integer_below_min_value", "n"),
        ({"model": "dall-e-3", "n": 2}, "invalid_value", "n"),
        ({"model": "gpt-image-1", "partial_images": 2}, "invalid_value", "partial_images"),
        (
            {"model": "gpt-image-1", "stream": True, "partial_images": 4},
            "integer_above_max_value",
            "partial_images",
        ),
        ({"model": "gpt-image-1", "output_compression": 50}, "invalid_value", "output_compression"),
        ({"model": "dall-e-2", "stream": True}, "unsupported_parameter", "stream"),
        (
            {"model": "gpt-image-2", "input_fidelity": "high"},
            "unsupported_parameter",
            "input_fidelity",
        ),
        (
            {"model": "gpt-image-1-mini", "input_fidelity": "high"},
            "invalid_value",
            "input_fidelity",
        ),
        ({"model": "gpt-image-1", "n": "2"}, "invalid_type", "n"),
        ({"model": "gpt-image-2", "style": "vivid"}, "unsupported_parameter", "style"),
        ({"model": "dall-e-3", "style": "bold"}, "invalid_value", "style"),
        (
            {"model": "gpt-image-1.5", "response_format": "url"},
            "unknown_parameter",
            "response_format",
        ),
        ({"model": "gpt-image-2", "moderation": "high"}, "invalid_value", "moderation"),
    ],
)
def test_generation_validation_errors(
    sim: Sim, params: dict[str, Any], code: str, param: str
) -> None:
    body = {k: v for k, v in {"prompt": "a cat", **params}.items() if v is not None}
    answer = sim.generate(body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    entry = sim.last()
    assert entry["status"] == 400 and entry["billed"] is False and entry["usage"] is None


def test_sdk_raises_bad_request_with_the_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-1", prompt="x", size="1792x1024")
    assert caught.value.code == "invalid_value"
    assert caught.value.param == "size"
    assert caught.value.request_id is not None


def test_unknown_fields_are_accepted(sim: Sim) -> None:
    answer = sim.generate(
        {"model": "gpt-image-1", "prompt": "x", "quality": "low", "brand_new_knob": 7}
    )
    assert answer.status_code == 200
    assert sim.last()["params"]["brand_new_knob"] == 7


def test_bad_json_is_rejected(sim: Sim) -> None:
    answer = sim.http.post(
        "/v1/images/generations",
        headers={"authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
        content=b"{not json",
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert sim.last()["status"] == 400


def test_edit_validation_errors(sim: Sim, client: openai.OpenAI) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    no_image = sim.http.post(
        "/v1/images/edits",
        headers=headers,
        data={"prompt": "x"},
        files={"mask": ("m.png", png(64, 64), "image/png")},
    )
    assert no_image.json()["error"]["code"] == "missing_required_parameter"
    duplicate = sim.http.post(
        "/v1/images/edits",
        headers=headers,
        data={"prompt": "x", "model": "gpt-image-1"},
        files=[
            ("image", ("a.png", png(64, 64), "image/png")),
            ("image", ("b.png", png(64, 64), "image/png")),
        ],
    )
    assert duplicate.status_code == 400
    assert duplicate.json()["error"]["code"] == "duplicate_parameter"
    both = sim.http.post(
        "/v1/images/edits",
        headers=headers,
        data={"prompt": "x", "model": "gpt-image-2.5-sunburst"},
        files=[
            ("image", ("a.png", png(64, 64), "image/png")),
            ("mask", ("m.png", png(64, 64, "RGBA"), "image/png")),
            ("markup", ("k.png", png(64, 64, "RGBA"), "image/png")),
        ],
    )
    assert (both.status_code, both.json()["error"]["param"]) == (400, "markup")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-1", image=("a.txt", b"hello", "text/plain"), prompt="x")
    assert caught.value.code == "invalid_image_file"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(
            model="gpt-image-2",
            image=("a.png", png(64, 64), "image/png"),
            prompt="x",
            input_fidelity="low",
        )
    assert caught.value.code == "unsupported_parameter"
    assert [e["billed"] for e in sim.billing()] == [False] * 5


def test_wrong_api_key_gets_401(sim: Sim) -> None:
    with (
        sim.client() as good,
        openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-wrong-key-1234", max_retries=0) as bad,
    ):
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.images.generate(model="gpt-image-1", prompt="x")
        assert caught.value.code == "invalid_api_key"
        assert good.images.generate(model="gpt-image-1", prompt="x", quality="low").data
    first = sim.billing()[0]
    assert first["status"] == 401 and first["authorization"] == "Bearer sk-wrong-key-1234"


def test_record_keeps_organization_project_and_retry_headers(sim: Sim) -> None:
    with sim.client(organization="org-abc", project="proj-xyz") as c:
        c.images.generate(model="gpt-image-1", prompt="x", quality="low")
    assert sim.last()["headers"] == {
        "openai-organization": "org-abc",
        "openai-project": "proj-xyz",
        "x-stainless-retry-count": "0",
    }
    arrived = sim.http.get("/_sim/arrivals").json()["requests"]
    [generation] = [a for a in arrived if a["raw_path"] == "/v1/images/generations"]
    assert generation["project"] == "proj-xyz"


# --- faults -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marker", "error", "status"),
    [
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
        ("429", openai.RateLimitError, 429),
    ],
)
def test_error_faults(
    sim: Sim, client: openai.OpenAI, marker: str, error: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(error) as caught:
        client.images.generate(model="gpt-image-1", prompt=f"x [[fault:{marker}]]")
    assert caught.value.status_code == status
    if status == 429:
        assert caught.value.code == "rate_limit_exceeded"
        assert caught.value.response.headers["retry-after"] == "1"
    else:
        assert caught.value.type == "server_error"
    entry = sim.last()
    assert entry["status"] == status and entry["billed"] is False


def test_moderation_block_is_a_bad_request_and_not_billed(sim: Sim, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-2", prompt="something FORBIDDEN here")
    assert caught.value.code == "moderation_blocked"
    assert caught.value.type == "image_generation_user_error"
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["moderation_details"]["moderation_stage"] == "input"
    assert sim.last()["billed"] is False


def test_timeout_fault_hangs_until_the_client_gives_up(sim: Sim) -> None:
    with sim.client(timeout=0.3) as c, pytest.raises(openai.APITimeoutError):
        c.images.generate(model="gpt-image-1", prompt="[[fault:timeout]]")
    deadline = time.monotonic() + 60  # the client may give up before the request arrived
    while not sim.billing():
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.01)
    entry = sim.last()
    assert entry["status"] == 0 and entry["billed"] is False


def test_reset_fault_closes_the_connection_without_an_answer(
    sim: Sim, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.images.generate(model="gpt-image-1", prompt="[[fault:reset]]")
    with pytest.raises(httpx.RemoteProtocolError):
        sim.generate({"model": "gpt-image-1", "prompt": "[[fault:reset]]"})
    assert sim.last()["billed"] is False
    # The server is still healthy afterwards.
    assert sim.http.get("/healthz").json() == {"status": "ok"}


def test_garbage_fault_is_billed(sim: Sim) -> None:
    answer = sim.generate(
        {"model": "gpt-image-2", "prompt": "[[fault:garbage]]", "quality": "high"}
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.content == b"this is not json{"
    entry = sim.last()
    assert entry["billed"] is True and entry["usage"]["image_output"] == 7024


def test_nousage_fault_drops_usage_but_bills(sim: Sim, client: openai.OpenAI) -> None:
    answer = client.images.generate(model="gpt-image-1", prompt="[[fault:nousage]]", quality="low")
    assert answer.usage is None and answer.data
    entry = sim.last()
    assert entry["billed"] is True and entry["usage"]["image_output"] == 272


def test_truncate_fault_cuts_the_stream_before_completed(sim: Sim, client: openai.OpenAI) -> None:
    seen = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
        for event in client.images.generate(
            model="gpt-image-1",
            prompt="[[fault:truncate]]",
            quality="low",
            stream=True,
            partial_images=2,
        ):
            seen.append(event.type)
    assert seen == ["image_generation.partial_image"] * 2
    entry = sim.last()
    assert entry["billed"] is True and entry["usage"]["image_output"] == 272 + 200


def test_runtime_config_sets_a_fault_for_every_request(sim: Sim, client: openai.OpenAI) -> None:
    assert sim.http.get("/_sim/config").json() == {
        "latency_ms": 0,
        "payload_bytes": 0,
        "fault": None,
        "response_headers": {},
        "batch_delay_ms": DEFAULT_BATCH_DELAY_MS,
        "batch_window_ms": DEFAULT_BATCH_WINDOW_MS,
        "queue_ms": 0,
        "background_ms": DEFAULT_BACKGROUND_MS,
        "batch_read_ms": 0,
        "batch_answer_ms": 0,
        "batch_answer_status": 0,
        "batch_fail_status": 0,
        "data_residency": False,
    }
    assert sim.configure(fault="503")["fault"] == "503"
    with pytest.raises(openai.InternalServerError):
        client.images.generate(model="gpt-image-1", prompt="x")
    sim.configure(fault=None, latency_ms=150)
    started = time.monotonic()
    client.images.generate(model="gpt-image-1", prompt="x", quality="low")
    assert time.monotonic() - started >= 0.15
    assert sim.http.post("/_sim/config", json={"fault": "nonsense"}).status_code == 400
    for status in (200, 404):  # a batch create's server error is a 5xx
        refused = sim.http.post("/_sim/config", json={"batch_answer_status": status})
        assert refused.status_code == 400
    assert sim.http.post("/_sim/config", json={"latency": 1}).status_code == 400


def test_runtime_config_adds_headers_to_every_answer_and_arrivals_show_raw_paths(
    sim: Sim, client: openai.OpenAI
) -> None:
    assert sim.configure(response_headers={"openai-organization": "org-x"})["response_headers"] == {
        "openai-organization": "org-x"
    }
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt="x", quality="low")
    assert raw.headers["openai-organization"] == "org-x"
    assert "openai-organization" not in sim.http.get("/_sim/config").headers
    sim.configure(response_headers={})
    assert sim.http.post("/_sim/config", json={"response_headers": ["a"]}).status_code == 400
    sim.http.get("/v1/models/%2e%2e/x")
    arrived = sim.http.get("/_sim/arrivals").json()["requests"]
    assert {
        "method": "GET",
        "raw_path": "/v1/models/%2e%2e/x",
        "query": "",
        "authorization": None,
        "project": None,
    } in [{k: v for k, v in a.items() if k != "headers"} for a in arrived]
    assert all(isinstance(a["headers"], list) for a in arrived)


def echoed(value: str) -> dict[str, str]:
    return {"authorization": value, "authorization_b64": base64.b64encode(value.encode()).decode()}


def test_echo_fault_echoes_the_authorization_header_and_bills(sim: Sim) -> None:
    answer = sim.generate({"model": "gpt-image-2", "prompt": "[[fault:echo]]", "quality": "low"})
    assert answer.status_code == 200
    assert answer.headers["x-echo-authorization"] == f"Bearer {API_KEY}"
    body = answer.json()
    assert body["echo"] == echoed(f"Bearer {API_KEY}") and body["usage"]["output_tokens"] == 196
    assert sim.last()["billed"] is True


def test_echo_fault_echoes_in_every_stream_event_split_inside_the_key(sim: Sim) -> None:
    request = {
        "model": "gpt-image-2",
        "prompt": "[[fault:echo]]",
        "quality": "low",
        "stream": True,
        "partial_images": 1,
    }
    key = f"Bearer {API_KEY}".encode()
    with sim.http.stream(
        "POST",
        "/v1/images/generations",
        headers=AUTH,
        json=request,
    ) as answer:
        assert answer.headers["x-echo-authorization"] == f"Bearer {API_KEY}"
        body = answer.read()
    events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert [e["type"] for e in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert all(e["echo"] == echoed(f"Bearer {API_KEY}") for e in events)
    assert body.count(key) == 2
    assert sim.last()["billed"] is True


def test_echo_fault_set_at_run_time_echoes_in_401_answers_and_the_models_list(sim: Sim) -> None:
    sim.configure(fault="echo")
    refused = sim.http.post(
        "/v1/images/generations",
        headers={"authorization": "Bearer sk-wrong-key-000"},
        json={"model": "gpt-image-2", "prompt": "x"},
    )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.json()["error"]["echo"] == echoed("Bearer sk-wrong-key-000")
    assert refused.headers["x-echo-authorization"] == "Bearer sk-wrong-key-000"
    models = sim.http.get("/v1/models", headers=AUTH)
    assert models.status_code == 200
    assert models.json()["echo"] == echoed(f"Bearer {API_KEY}")
    assert models.headers["x-echo-authorization"] == f"Bearer {API_KEY}"


def test_models_list_needs_the_key(sim: Sim) -> None:
    models = sim.client().models.list()
    assert "gpt-image-2" in {m.id for m in models.data}
    assert "echo" not in sim.http.get("/v1/models", headers=AUTH).json()
    assert sim.http.get("/v1/models").status_code == 401


def test_reset_clears_the_record(sim: Sim, client: openai.OpenAI) -> None:
    client.images.generate(model="gpt-image-1", prompt="x", quality="low")
    assert len(sim.billing()) == 1
    sim.http.post("/_sim/reset")
    assert sim.billing() == []


def test_unknown_v1_path_is_an_openai_style_404(sim: Sim) -> None:
    answer = sim.http.post("/v1/chat/completions", json={})
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "invalid_request_error"


# --- costs ------------------------------------------------------------------------------


def test_costs_api_prices_the_record_by_line_item(sim: Sim, client: openai.OpenAI) -> None:
    client.images.generate(model="gpt-image-2", prompt="abcd", quality="high", size="1024x1024")
    client.images.generate(model="dall-e-3", prompt="x", quality="standard", size="1024x1024")
    now = int(time.time())
    answer = sim.http.get(
        "/v1/organization/costs",
        headers=AUTH,
        params={"start_time": now - 3600, "group_by[]": "line_item", "limit": 1},
    )
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["object"] == "page" and page["has_more"] is False
    results = {r["line_item"]: r for r in page["data"][0]["results"]}
    assert results["gpt-image-2, image output"]["quantity"] == 7024
    assert results["gpt-image-2, image output"]["amount"]["value"] == pytest.approx(7024 * 30 / 1e6)
    assert results["gpt-image-2, text input"]["quantity"] == 1
    assert results["dall-e-3, images"]["amount"]["value"] == pytest.approx(0.04)
    paged = sim.http.get(
        "/v1/organization/costs",
        headers=AUTH,
        params={"start_time": now - 3 * 86_400, "limit": 2},
    ).json()
    assert paged["has_more"] is True and paged["next_page"]
    assert paged["data"][0]["results"] == []


def test_formula_matches_the_published_readings() -> None:
    assert [formula_tokens(f, 1024, 1024) for f in (16, 48, 96)] == [196, 1756, 7024]
    assert formula_tokens(96, 3840, 2160) == 13342
    assert formula_tokens(64, 1536, 864) == 1917
