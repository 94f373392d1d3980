"""An upstream that refuses the company key: no piece of the key ever reaches a team.

OpenAI's 401 quotes the key it refused (`Incorrect API key provided: sk-ref***0000`, its
first 6 and last 4 characters), as the simulated upstream does. Through Tollgate, every
door answers Tollgate's own error in OpenAI's shape, with the upstream's status and code
(`401 invalid_api_key`) and a message of its own; neither the answers, the ledger, the
metrics nor the log carry any piece of the key.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import (
    DESIGN_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    in_front_of_raw,
    read_request,
    run_tollgate,
    wait_for,
    write_config,
)

REFUSED_KEY = "sk-refused-company-key-0000000000009z7Q"
PIECES = (REFUSED_KEY[:6], REFUSED_KEY[-4:], "***")
"""What OpenAI shows of a refused key (and the stars between them)."""
TEAM = {"authorization": f"Bearer {DESIGN_KEY}"}
LOW = {"quality": "low", "size": "1024x1024"}


@pytest.fixture(scope="module")
def refused(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """A Tollgate whose configured key the upstream refuses."""
    root = tmp_path_factory.mktemp("refused")
    write_config(root, f"{simulator.url}/v1", settings="passthrough: [/v1/models]\n")
    config = root / "tollgate.yaml"
    config.write_text(config.read_text().replace(UPSTREAM_KEY, REFUSED_KEY))
    yield from run_tollgate(root)


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(out, "PNG")
    return out.getvalue()


def assert_no_piece(text: str | bytes) -> None:
    text = text if isinstance(text, str) else text.decode("utf-8", "replace")
    assert not [p for p in PIECES if p in text], text[:400]


def assert_tollgates_own(answer: httpx.Response) -> None:
    """401 invalid_api_key in OpenAI's shape, its message Tollgate's, no piece of the key."""
    assert answer.status_code == 401, answer.text[:400]
    error = answer.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "upstream.api_key" in error["message"]
    assert_no_piece(answer.content)
    for name, value in answer.headers.raw:
        assert_no_piece(name + b": " + value)
    assert answer.headers["x-tollgate-team"] == "design"


def test_the_simulated_upstream_quotes_a_refused_key_as_openai_does(simulator: Simulator) -> None:
    answer = httpx.post(
        f"{simulator.url}/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": "x"},
        headers={"authorization": f"Bearer {REFUSED_KEY}"},
    )
    assert answer.status_code == 401
    assert f"{REFUSED_KEY[:6]}***{REFUSED_KEY[-4:]}" in answer.json()["error"]["message"]


def test_the_official_client_gets_tollgates_own_401_from_the_images_api(
    refused: Tollgate,
) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        refused.client().images.generate(model="gpt-image-2", prompt="a kite", **LOW)  # type: ignore[arg-type]
    assert caught.value.code == "invalid_api_key"
    assert_tollgates_own(caught.value.response)
    with pytest.raises(openai.AuthenticationError) as caught:
        refused.client().images.edit(
            model="gpt-image-2", prompt="a kite", image=("a.png", png(), "image/png")
        )
    assert_tollgates_own(caught.value.response)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/images/generations", {"model": "gpt-image-2", "prompt": "x", "stream": True}),
        ("/v1/responses", {"model": "gpt-5.5", "input": "x", "max_output_tokens": 16}),
        (
            "/v1/responses",
            {"model": "gpt-5.5", "input": "x", "max_output_tokens": 16, "stream": True},
        ),
        (
            "/v1/responses",
            {"model": "gpt-5.5", "input": "x", "max_output_tokens": 16, "background": True},
        ),
    ],
    ids=["images-stream", "responses", "responses-stream", "responses-background"],
)
def test_every_request_door_answers_tollgates_own_401(
    refused: Tollgate, path: str, body: dict[str, object]
) -> None:
    answer = httpx.post(f"{refused.url}{path}", json=body, headers=TEAM, timeout=30)
    assert_tollgates_own(answer)


def test_batch_files_listings_and_passthrough_answer_tollgates_own_401(
    refused: Tollgate,
) -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/images/generations",
        "body": {"model": "gpt-image-1", "prompt": "x", **LOW},
    }
    upload = httpx.post(
        f"{refused.url}/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
        data={"purpose": "batch"},
        headers=TEAM,
        timeout=30,
    )
    assert_tollgates_own(upload)
    assert_tollgates_own(httpx.get(f"{refused.url}/v1/models", headers=TEAM, timeout=30))
    for path in ("/v1/files", "/v1/batches", "/v1/batches/batch_x", "/v1/files/file-x/content"):
        # Answered from what Tollgate knows of the team's objects, or asked upstream.
        answer = httpx.get(f"{refused.url}{path}", headers=TEAM, timeout=30)
        if answer.status_code == 401:
            assert_tollgates_own(answer)
        assert_no_piece(answer.content)


def test_no_piece_of_the_key_reaches_the_ledger_the_metrics_or_the_log(
    refused: Tollgate, tmp_path: Path
) -> None:
    with pytest.raises(openai.AuthenticationError):
        refused.client().images.generate(model="gpt-image-2", prompt="a heron", **LOW)  # type: ignore[arg-type]
    rows = wait_for(
        "a settled row", lambda: [r for r in refused.rows() if r["status"] == 401] or None
    )
    assert all(r["error_code"] == "invalid_api_key" for r in rows)
    assert all(r["cost_nanos"] == 0 for r in rows)
    assert_no_piece(json.dumps(refused.rows(), default=str))
    assert_no_piece(httpx.get(f"{refused.url}/metrics").text)
    log = refused.stop()
    assert "401" in log
    assert_no_piece(log)


@pytest.mark.parametrize("status", [401, 500])
def test_an_upstream_request_id_that_echoes_the_key_is_not_logged_as_it_came(
    tmp_path: Path, status: int
) -> None:
    """An upstream (or a debugging proxy before it) that echoes the `Authorization` header
    it got into its `x-request-id`, on an error that refuses or quotes the key: the warning
    that names the upstream's request id never shows the key, as the answer and the ledger
    never do."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        auth = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"authorization:"))
        echoed = auth.split(b":", 1)[1].strip()
        body = json.dumps({"error": {"message": echoed.decode(), "type": "x", "code": "x"}})
        writer.write(
            f"HTTP/1.1 {status} No\r\nContent-Type: application/json\r\n".encode()
            + b"x-request-id: req_" + echoed.replace(b" ", b"_") + b"\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )  # fmt: skip
        await writer.drain()
        writer.close()

    with in_front_of_raw(reply, tmp_path) as tollgate:
        with pytest.raises(openai.APIStatusError) as raised:
            tollgate.client().images.generate(model="gpt-image-2", prompt="a heron", **LOW)  # type: ignore[arg-type]
        assert raised.value.status_code == status
        answer = raised.value.response
        assert UPSTREAM_KEY not in answer.text + repr(answer.headers.raw)
        assert UPSTREAM_KEY not in json.dumps(tollgate.rows(), default=str)
        log = tollgate.stop()
    assert "quoting or refusing the company key" in log
    assert UPSTREAM_KEY not in log
