"""A file uploaded through Tollgate is its team's: another team can neither read it at
`/v1/files/{id}` nor have the company key read it for them by naming it in an image
request (a JSON edit's `images` or `mask`, a Responses input image or the image tool's
mask). Such a request is answered 404, as the file's own path is, and never forwarded.
"""

from __future__ import annotations

import io
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import DESIGN_KEY, RESEARCH_KEY, Simulator, Tollgate


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


def edit(images: list[dict[str, str]], **extra: Any) -> tuple[str, dict[str, Any]]:
    body = {"model": "gpt-image-2", "prompt": "copy it", "quality": "low", "size": "1024x1024"}
    return "/v1/images/edits", {**body, "images": images, **extra}


def response(content: list[dict[str, Any]], **tool: Any) -> tuple[str, dict[str, Any]]:
    image_tool = {"type": "image_generation", "model": "gpt-image-2", "quality": "low", **tool}
    return "/v1/responses", {
        "model": "gpt-5.5",
        "max_output_tokens": 64,
        "max_tool_calls": 1,
        "tools": [image_tool],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}, *content]}],
    }


CASES = {
    "json edit image": lambda f: edit([{"file_id": f}]),
    "json edit mask": lambda f: edit([{"image_url": "https://x.test/a.png"}], mask={"file_id": f}),
    "responses input image": lambda f: response([{"type": "input_image", "file_id": f}]),
    "responses tool mask": lambda f: response([], input_image_mask={"file_id": f}),
}


@pytest.fixture(scope="module")
def research_file(tollgate: Tollgate) -> str:
    client = tollgate.client(RESEARCH_KEY)
    return client.files.create(file=("private.png", png()), purpose="vision").id


@pytest.mark.parametrize("case", list(CASES))
def test_another_teams_file_cannot_be_named_in_an_image_request(
    tollgate: Tollgate, simulator: Simulator, research_file: str, case: str
) -> None:
    with pytest.raises(openai.NotFoundError):
        tollgate.client(DESIGN_KEY).files.retrieve(research_file)
    path, body = CASES[case](research_file)
    before = len(httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"])
    answer = httpx.post(
        f"{tollgate.url}{path}",
        json=body,
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert research_file in error["message"] and error["param"] == "file_id"
    assert answer.headers["x-tollgate-cost-usd"] == "0"
    arrived = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"][before:]
    assert [a for a in arrived if a["raw_path"] != "/_sim/arrivals"] == []


@pytest.mark.parametrize("case", ["json edit image", "responses input image"])
def test_a_team_names_its_own_file(tollgate: Tollgate, research_file: str, case: str) -> None:
    path, body = CASES[case](research_file)
    answer = httpx.post(
        f"{tollgate.url}{path}",
        json=body,
        headers={"authorization": f"Bearer {RESEARCH_KEY}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
