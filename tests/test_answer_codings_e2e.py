"""An answer compressed though Tollgate asked for it as it is never reaches a team.

Tollgate asks for every answer with `Accept-Encoding: identity`: a body in another content
coding is one the scrubber cannot search for the company key and the meters cannot read,
and the team's client would decompress it all the same. The upstream here is a small
scripted stand-in served from this process that compresses anyway, echoing the key it was
sent; Tollgate runs as a real process in front of it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import (
    DESIGN_KEY,
    UPSTREAM_KEY,
    Tollgate,
    serving,
    start_tollgate,
    write_config,
)
from tests.test_proxy_e2e import wait_settled

TEAM = {"authorization": f"Bearer {DESIGN_KEY}"}
ASKED: list[str] = []
"""The Accept-Encoding of every request the upstream got."""
PACK = {"gzip": gzip.compress, "deflate": zlib.compress}
WIDE = ["utf-16", "utf-16-be", "utf-32", "utf-32-be"]


async def echo(request: Request) -> Response:
    """The `Authorization` header sent, in a body compressed as the prompt (or on a
    passthrough path, the query's `pack`) says: `gzip-403` is gzip, answered 403."""
    ASKED.append(request.headers.get("accept-encoding", ""))
    pack = request.query_params.get("pack") or (await request.json())["prompt"]
    coding, _, status = pack.partition("-")
    body = json.dumps({"error": {"message": request.headers["authorization"]}}).encode()
    if pack in WIDE:
        # Not compressed: JSON in an encoding a JSON reader tells by its first bytes.
        page = {"object": "list", "data": [], "echo": request.headers["authorization"]}
        return Response(json.dumps(page).encode(pack), media_type="application/json")
    return Response(
        PACK[coding](body),
        status_code=int(status or 200),
        headers={"content-encoding": coding, "x-ratelimit-limit-requests": "5"},
        media_type="application/json",
    )


APP = Starlette(
    routes=[
        Route("/v1/images/generations", echo, methods=["POST"]),
        Route("/v1/models", echo, methods=["GET"]),
    ]
)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root: Path = tmp_path_factory.mktemp("codings")
    with serving(APP) as upstream:
        write_config(root, f"{upstream}/v1", settings="passthrough: [/v1/models]\n")
        tollgate = start_tollgate(root)
        yield tollgate
        tollgate.stop()


def decoded(body: bytes) -> bytes:
    """`body` as a client that decompressed it would read it."""
    for unpack in (gzip.decompress, zlib.decompress):
        try:
            return unpack(body)
        except (OSError, zlib.error):
            pass
    return body


def assert_no_key(answer: httpx.Response) -> None:
    assert UPSTREAM_KEY.encode() not in decoded(answer.content)
    assert UPSTREAM_KEY not in str(answer.headers)
    assert "content-encoding" not in answer.headers


GENERATE = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


@pytest.mark.parametrize("coding", list(PACK))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_error_answer_compressed_anyway_reaches_the_team_without_its_body_and_free(
    proxy: Tollgate, coding: str, stream: bool
) -> None:
    ASKED.clear()
    answer = httpx.post(
        f"{proxy.url}/v1/images/generations",
        json={**GENERATE, "prompt": f"{coding}-403", "stream": stream},
        headers={**TEAM, "accept-encoding": "gzip, deflate, br"},
        timeout=30,
    )
    # A 403: a 401 is answered with Tollgate's own body (tests/test_key_refused_e2e.py).
    assert answer.status_code == 403 and answer.content == b""
    assert_no_key(answer)
    assert ASKED == ["identity"]
    row = wait_settled(proxy, answer.headers["x-tollgate-request-id"])
    assert row["outcome"] == "upstream_error" and row["cost_nanos"] == 0


@pytest.mark.parametrize("coding", list(PACK))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_success_compressed_anyway_is_a_502_charged_its_bound_flagged(
    proxy: Tollgate, coding: str, stream: bool
) -> None:
    answer = httpx.post(
        f"{proxy.url}/v1/images/generations",
        json={**GENERATE, "prompt": coding, "stream": stream},
        headers=TEAM,
        timeout=30,
    )
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_unavailable"
    assert_no_key(answer)
    row = wait_settled(proxy, answer.headers["x-tollgate-request-id"])
    assert row["flagged"] == 1 and row["cost_nanos"] == row["estimated_nanos"] > 0


@pytest.mark.parametrize(("pack", "status"), [("gzip", 502), ("deflate-401", 401)])
def test_a_passthrough_answer_compressed_anyway_never_reaches_the_team(
    proxy: Tollgate, pack: str, status: int
) -> None:
    answer = httpx.get(f"{proxy.url}/v1/models", params={"pack": pack}, headers=TEAM, timeout=30)
    assert answer.status_code == status
    assert_no_key(answer)
    assert answer.headers["x-tollgate-request-id"]


@pytest.mark.parametrize("encoding", WIDE)
def test_a_passthrough_answer_in_utf_16_or_utf_32_reaches_the_team_masked(
    proxy: Tollgate, encoding: str
) -> None:
    answer = httpx.get(
        f"{proxy.url}/v1/models", params={"pack": encoding}, headers=TEAM, timeout=30
    )
    assert answer.status_code == 200
    page = answer.json()  # as the SDK reads it: the encoding told by the first bytes
    assert page["echo"] == "Bearer [redacted]" + "*" * (len(UPSTREAM_KEY) - len("[redacted]"))
