"""Bodies built to be read one way by Tollgate and another by the upstream, end to end.

The promise under test: the upstream never bills more, or something other, than what
Tollgate priced and reserved. Each body here once made the simulated upstream (whose
parser, starlette's, honours `charset=` and whose image reader is Pillow) bill another
model, quality, n or image size than the ledger reserved, or made Tollgate answer its
own 500 with no request id and no ledger row.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from proxy.core.auth import key_hash
from tests.conftest import (
    BACKENDS,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    backend_url,
    drop_ledger,
    start_tollgate,
    write_config,
)
from tests.test_proxy_e2e import expected_cost, wait_settled

MINI = "gpt-image-1-mini"


def post(tollgate: Tollgate, path: str, body: bytes, content_type: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {DESIGN_KEY}", "content-type": content_type}
    return httpx.post(f"{tollgate.url}/v1/images/{path}", content=body, headers=headers, timeout=30)


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def png_with_second_ihdr(width: int, height: int) -> bytes:
    """A 1x1 PNG with a second IHDR after the first: a header reader takes 1x1, Pillow the other."""
    data = png(1, 1)
    fields = struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    chunk = struct.pack(">I", 13) + b"IHDR" + fields
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + fields))
    return data[:33] + chunk + data[33:]


def multipart(
    parts: list[tuple[str, bytes, str | None]], charset: str | None = None
) -> tuple[bytes, str]:
    """A multipart body written by hand: (name, value, filename) parts in this order."""
    boundary = "hostile-boundary"
    chunks = []
    for name, value, filename in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"\r\nContent-Type: image/png'
        chunks.append(f"{head}\r\n\r\n".encode())
        chunks += [value, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f"multipart/form-data; boundary={boundary}"
    if charset:
        content_type += f"; charset={charset}"
    return b"".join(chunks), content_type


def billed_as_priced(tollgate: Tollgate, simulator: Simulator, answer: httpx.Response) -> None:
    """What the upstream received and billed is what the ledger priced, and within its bound."""
    assert answer.status_code == 200, answer.text
    row = wait_settled(tollgate, answer.headers["x-tollgate-request-id"])
    record = simulator.record(answer.headers["x-request-id"])
    assert record["model"] == row["model"]
    assert record["n"] == row["n"]
    for knob in ("quality", "size"):
        if row[knob] != "auto":
            assert record[knob] == row[knob]
    assert expected_cost(record) * 10**9 <= row["estimated_nanos"]


def refused_before_upstream(
    tollgate: Tollgate, simulator: Simulator, answer: httpx.Response, param: str | None
) -> None:
    """A 400 in OpenAI's shape with Tollgate's request id, recorded, and nothing billed."""
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param
    request_id = answer.headers["x-tollgate-request-id"]
    row = tollgate.row(request_id)
    assert (row["status"], row["outcome"]) == (400, "client_error")
    assert "x-request-id" not in answer.headers  # never reached the upstream


# --- 1. multipart charset ---------------------------------------------------------------------


def test_utf7_part_names_cannot_smuggle_model_quality_and_n(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    """In UTF-7 `+AG0-odel` is `model`: a charset-honouring parser read gpt-image-1.5, high,
    n=10 where Tollgate priced mini, low, n=1 (69x the reservation)."""
    body, content_type = multipart(
        [
            ("prompt", b"a cat", None),
            ("model", MINI.encode(), None),
            ("quality", b"low", None),
            ("+AG0-odel", b"gpt-image-1.5", None),
            ("q+AHU-ality", b"high", None),
            ("+AG4-", b"10", None),
            ("image", png(64, 64), "a.png"),
        ],
        charset="utf-7",
    )
    before = len(simulator.billing())
    answer = post(tollgate, "edits", body, content_type)
    refused_before_upstream(tollgate, simulator, answer, None)
    assert "charset" in answer.json()["error"]["message"]
    assert len(simulator.billing()) == before


def test_names_that_only_a_charset_makes_known_are_unknown_parameters(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    body, content_type = multipart(
        [("prompt", b"a cat", None), ("+AG4-", b"10", None), ("image", png(64, 64), "a.png")]
    )
    answer = post(tollgate, "edits", body, content_type)
    refused_before_upstream(tollgate, simulator, answer, "+AG4-")


def test_a_plain_multipart_edit_is_billed_as_priced(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    body, content_type = multipart(
        [
            ("prompt", b"a cat", None),
            ("model", MINI.encode(), None),
            ("quality", b"low", None),
            ("n", b"2", None),
            ("image", png(64, 64), "a.png"),
        ],
        charset="UTF-8",
    )
    billed_as_priced(tollgate, simulator, post(tollgate, "edits", body, content_type))


# --- 2. empty model -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["generations", "edits"])
def test_an_empty_model_is_the_default_model_upstream_too(
    tollgate: Tollgate, simulator: Simulator, path: str
) -> None:
    """`model: ""` was priced as the default model but forwarded empty, so the upstream used
    its own default (dall-e-2 for generations, gpt-image-1.5 for edits)."""
    fields: dict[str, Any] = {"prompt": "a cat", "model": "", "quality": "", "size": None}
    if path == "edits":
        reference = tollgate.client().files.create(file=("a.png", png(64, 64)), purpose="vision")
        fields["images"] = [{"file_id": reference.id}]
    answer = post(tollgate, path, json.dumps(fields).encode(), "application/json")
    billed_as_priced(tollgate, simulator, answer)
    assert answer.headers["x-tollgate-model"] == "gpt-image-2"
    assert simulator.record(answer.headers["x-request-id"])["model"] == "gpt-image-2"


@pytest.fixture(scope="module")
def mini_only(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("mini-only")
    write_config(
        root,
        f"{simulator.url}/v1",
        teams={
            "design": f"""
                name: design
                keys:
                  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
                allow:
                  models: [{MINI}]
            """
        },
    )
    config = root / "tollgate.yaml"
    config.write_text(
        config.read_text().replace("default_model: gpt-image-2", f"default_model: {MINI}")
    )
    proxy = start_tollgate(root)
    yield proxy
    proxy.stop()


def test_a_mini_only_team_sending_an_empty_model_gets_mini(
    mini_only: Tollgate, simulator: Simulator
) -> None:
    body = json.dumps({"prompt": "a cat", "model": ""}).encode()
    answer = post(mini_only, "generations", body, "application/json")
    billed_as_priced(mini_only, simulator, answer)
    assert simulator.record(answer.headers["x-request-id"])["model"] == MINI


# --- 3. an image that lies about its size -------------------------------------------------------


def test_a_png_with_two_headers_is_refused(tollgate: Tollgate, simulator: Simulator) -> None:
    """Reserved at 1x1 (the first IHDR), billed at 2048x16 (Pillow keeps the last)."""
    files = [("image[]", png_with_second_ihdr(2048, 16), "a.png")] * 4
    body, content_type = multipart(
        [("prompt", b"a cat", None), ("model", b"gpt-image-1", None), *files]
    )
    before = len(simulator.billing())
    answer = post(tollgate, "edits", body, content_type)
    refused_before_upstream(tollgate, simulator, answer, "image[]")
    assert "IHDR" in answer.json()["error"]["message"]
    assert len(simulator.billing()) == before


def test_an_honest_image_is_billed_within_its_reservation(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    body, content_type = multipart(
        [
            ("prompt", b"a cat", None),
            ("model", b"gpt-image-1", None),
            ("image", png(2048, 16), "a.png"),
        ]
    )
    billed_as_priced(tollgate, simulator, post(tollgate, "edits", body, content_type))


# --- 4. values that made Tollgate's own 500 ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"prompt": "a cat", "n": 9223372036854775808}', "n"),
        (b'{"prompt": "a cat", "n": 99999999999999999999999}', "n"),
        ('{"prompt": "a cat", "size": "²⁰⁴⁸x¹⁰²⁴"}'.encode(), "size"),
        (b'{"prompt": "\\ud800"}', "prompt"),
        (b'{"prompt": "a cat", "model": "\\ud800"}', "model"),
        (b'{"prompt": "a cat", "quality": "\\udfff"}', "quality"),
        (b'{"prompt": "a cat", "user": "u\\ud800"}', "user"),
        (b'{"prompt": "a cat", "user": "u\\u0000"}', "user"),
    ],
)
def test_crafted_values_are_a_recorded_400_not_a_500(
    tollgate: Tollgate, simulator: Simulator, body: bytes, param: str
) -> None:
    answer = post(tollgate, "generations", body, "application/json")
    refused_before_upstream(tollgate, simulator, answer, param)


def test_a_huge_n_in_a_form_field_is_a_recorded_400(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    body, content_type = multipart(
        [
            ("prompt", b"a cat", None),
            ("n", b"9223372036854775808", None),
            ("image", png(8, 8), "a.png"),
        ]
    )
    refused_before_upstream(tollgate, simulator, post(tollgate, "edits", body, content_type), "n")


@pytest.fixture(scope="module", params=BACKENDS)
def on_each_ledger(
    simulator: Simulator, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp(f"ledger-{request.param}")
    write_config(root, f"{simulator.url}/v1")
    proxy = start_tollgate(root, ledger_url=backend_url(request.param))
    yield proxy
    proxy.stop()
    drop_ledger(proxy.ledger_url)


@pytest.mark.parametrize(("n", "recorded"), [(2**31 - 1, 2**31 - 1), (2**31, None), (2**63, None)])
def test_the_largest_n_is_recorded_and_a_larger_one_is_not(
    on_each_ledger: Tollgate, simulator: Simulator, n: int, recorded: int | None
) -> None:
    """A refused request's row holds validated values only: the ledger's 32-bit `n_requested`
    column takes the largest n parsing lets through, and a larger one is never written."""
    body = json.dumps({"prompt": "a cat", "n": n}).encode()
    answer = post(on_each_ledger, "generations", body, "application/json")
    refused_before_upstream(on_each_ledger, simulator, answer, "n")
    assert on_each_ledger.row(answer.headers["x-tollgate-request-id"])["n_requested"] == recorded


@pytest.mark.parametrize("path", ["images/generations", "responses"])
def test_a_body_nested_past_the_recursion_limit_is_a_recorded_400(
    tollgate: Tollgate, simulator: Simulator, path: str
) -> None:
    """1,500 levels of arrays (3 kB) once raised a RecursionError out of the JSON decoder:
    a 500 with no ledger row, and one more in-flight request on the gauge for good."""
    inflight = tollgate.metric("tollgate_inflight_requests")
    billed = len(simulator.billing())
    body = b'{"model": "gpt-image-2", "prompt": "a cat", "metadata": ' + b"[" * 1500
    body += b"]" * 1500 + b"}"
    answer = httpx.post(
        f"{tollgate.url}/v1/{path}",
        content=body,
        headers={"authorization": f"Bearer {DESIGN_KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "invalid_request"
    row = tollgate.row(answer.headers["x-tollgate-request-id"])
    assert (row["status"], row["outcome"]) == (400, "client_error")
    assert len(simulator.billing()) == billed
    assert tollgate.metric("tollgate_inflight_requests") == inflight


def test_a_multipart_boundary_too_long_for_the_parser_is_a_recorded_400(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    """A 300-byte boundary once raised python-multipart's FormParserError out of the parser's
    constructor: a 500 with no ledger row, and an in-flight request left on the gauge."""
    inflight = tollgate.metric("tollgate_inflight_requests")
    body, _ = multipart([("prompt", b"a cat", None), ("image", png(8, 8), "a.png")])
    boundary = "b" * 300
    body = body.replace(b"hostile-boundary", boundary.encode())
    answer = post(tollgate, "edits", body, f"multipart/form-data; boundary={boundary}")
    refused_before_upstream(tollgate, simulator, answer, None)
    assert tollgate.metric("tollgate_inflight_requests") == inflight


@pytest.mark.parametrize(
    "cut", [b"\r\n--hostile-boundary--\r\n", b"--\r\n", b"w\r\n--hostile-boundary--\r\n"]
)
def test_a_multipart_body_cut_before_its_closing_boundary_is_a_recorded_400(
    tollgate: Tollgate, simulator: Simulator, cut: bytes
) -> None:
    """The parser's `finalize` does not check that the body ended: the part left open was
    dropped, and an edit asking for `quality: low` was forwarded without it, as `auto`, the
    dearest quality, or with an image fewer than it was sent with."""
    billed = len(simulator.billing())
    body, content_type = multipart(
        [
            ("prompt", b"a cat", None),
            ("model", b"gpt-image-1", None),
            ("image", png(8, 8), "a.png"),
            ("quality", b"low", None),
        ]
    )
    assert body.endswith(cut)
    answer = post(tollgate, "edits", body[: -len(cut)], content_type)
    refused_before_upstream(tollgate, simulator, answer, None)
    assert "closing boundary" in answer.json()["error"]["message"]
    assert len(simulator.billing()) == billed
