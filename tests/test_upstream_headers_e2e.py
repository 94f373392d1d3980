"""An upstream header that is not plain text never costs a team its answer, nor the ledger
its settlement.

HTTP header values are bytes: one that is not UTF-8 (an `x-request-id` of `\\xff`), or that
holds a control character, must neither fail the ledger that records the request id nor
the answer that forwards it, after the upstream billed. The upstream here is a small
stand-in served from this process; Tollgate runs as a real process in front of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import DESIGN_KEY, Tollgate, serving, start_tollgate, write_config
from tests.test_proxy_e2e import wait_settled

USAGE = {  # within the bound of the shortest prompt sent ("plain": at most 5 tokens)
    "input_tokens": 5,
    "input_tokens_details": {"text_tokens": 5, "image_tokens": 0},
    "output_tokens": 196,
    "total_tokens": 201,
}
HEADERS = {
    # starlette writes a value as Latin-1: these are the bytes \xff\xfe and \xc3\xa9.
    "plain": {"x-request-id": "req_plain"},
    "not-utf-8": {"x-request-id": "req_\xff\xfe", "x-ratelimit-remaining-requests": "\xff"},
    "utf-8": {"x-request-id": "req_\xc3\xa9"},
}


async def images(request: Request) -> Response:
    body = await request.json()
    headers = HEADERS[body["prompt"]]
    answer = {"created": 1, "data": [{"b64_json": "iVBORw0KGgo="}], "usage": USAGE}
    return JSONResponse(answer, headers=headers)


async def models(request: Request) -> Response:
    headers = HEADERS[request.query_params["headers"]]
    return JSONResponse({"object": "list", "data": []}, headers=headers)


APP = Starlette(
    routes=[
        Route("/v1/images/generations", images, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
    ]
)
TEAM = {"authorization": f"Bearer {DESIGN_KEY}"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("headers")
    with serving(APP) as upstream:
        write_config(root, f"{upstream}/v1", settings="passthrough: [/v1/models]\n")
        tollgate = start_tollgate(root)
        yield tollgate
        tollgate.stop()


@pytest.mark.parametrize("kind", list(HEADERS))
def test_an_answer_whose_headers_are_not_utf_8_is_answered_and_settled_at_its_price(
    proxy: Tollgate, kind: str
) -> None:
    answer = httpx.post(
        f"{proxy.url}/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": kind, "quality": "low", "size": "1024x1024"},
        headers=TEAM,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    sent = HEADERS[kind]["x-request-id"].encode("latin-1")
    assert dict(answer.headers.raw)[b"x-request-id"] == sent
    row = wait_settled(proxy, answer.headers["x-tollgate-request-id"])
    assert row["outcome"] == "ok" and row["flagged"] == 0 and row["reserved_nanos"] == 0
    assert Decimal(answer.headers["x-tollgate-cost-usd"]) * 10**9 == row["cost_nanos"] > 0


@pytest.mark.parametrize("kind", list(HEADERS))
def test_a_passthrough_answer_whose_headers_are_not_utf_8_is_answered(
    proxy: Tollgate, kind: str
) -> None:
    answer = httpx.get(f"{proxy.url}/v1/models", params={"headers": kind}, headers=TEAM, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"object": "list", "data": []}
