"""What Tollgate reserves for an edit's input images, checked on a running Tollgate: every
image OpenAI is given is inside the bound."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.conftest import DESIGN_KEY, Tollgate

IMAGE_INPUT_NANOS = 10_000  # gpt-image-1: $10 per 1M image input tokens, in nano-dollars


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return out.getvalue()


def reserved(gate: Tollgate, files: list[tuple[str, tuple[str, bytes, str]]]) -> int:
    answer = httpx.post(
        f"{gate.url}/v1/images/edits",
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
        data={"model": "gpt-image-1", "prompt": "a hat", "quality": "low", "size": "1024x1024"},
        files=files,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-tollgate-request-id"]
    return int(gate.row(request_id)["estimated_nanos"])


def test_a_markup_is_reserved_as_an_input_image(tollgate: Tollgate) -> None:
    image = ("image", ("a.png", png(1024, 1024), "image/png"))
    markup = ("markup", ("m.png", png(1024, 1024, "RGBA"), "image/png"))
    plain = reserved(tollgate, [image])
    marked = reserved(tollgate, [image, markup])
    assert marked - plain == 194 * IMAGE_INPUT_NANOS  # 65 + 129 a tile, one 512-px tile


def test_tiles_of_a_scaled_image_are_reserved_rounding_up(tollgate: Tollgate) -> None:
    # 1250x2501 scales to 512 x 1024.41: three 512-px tiles unless the side is rounded down.
    square = reserved(tollgate, [("image", ("a.png", png(1024, 1024), "image/png"))])
    tall = reserved(tollgate, [("image", ("a.png", png(1250, 2501), "image/png"))])
    assert tall - square == (65 + 129 * 3 - 194) * IMAGE_INPUT_NANOS
