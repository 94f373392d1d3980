"""An upstream answer under a status that is no final HTTP answer never reaches a team.

The upstream here writes its status lines byte for byte (a 101 no request asked for, a
600), each over a generation's whole answer with its usage: a scripted stand-in served
from this process, with Tollgate as a real process in front of it. Relayed, a 101 left the
team's connection speaking no protocol and a 600 broke it off with nothing sent, each
settled at nothing; now each is a 502 in OpenAI's shape, charged its bound and flagged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DESIGN_KEY, Tollgate, in_front_of_raw, read_request
from tests.test_proxy_e2e import wait_settled

TEAM = {"authorization": f"Bearer {DESIGN_KEY}"}
GENERATE = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}
BODY = json.dumps(
    {"data": [{"b64_json": "AAAA"}], "usage": {"input_tokens": 1, "output_tokens": 196}}
).encode()
STATUS_LINES = {
    101: b"101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade",
    600: b"600 Beyond",
}


async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one request with the status its path ends with (`/v1/models/600`), or its
    prompt names (`600`)."""
    head, body = await read_request(reader)
    target = head.split(b" ")[1]
    status = int(json.loads(body)["prompt"]) if body else int(target.rsplit(b"/", 1)[1])
    writer.write(
        b"HTTP/1.1 " + STATUS_LINES[status] + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("statuses")
    with in_front_of_raw(reply, root, settings="passthrough: [/v1/models]\n") as tollgate:
        yield tollgate


@pytest.mark.parametrize("status", list(STATUS_LINES))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_answer_without_a_final_status_is_a_502_charged_its_bound_flagged(
    proxy: Tollgate, status: int, stream: bool
) -> None:
    answer = httpx.post(
        f"{proxy.url}/v1/images/generations",
        json={**GENERATE, "prompt": str(status), "stream": stream},
        headers=TEAM,
        timeout=30,
    )
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "upstream_unavailable" and f"status {status}" in error["message"]
    row = wait_settled(proxy, answer.headers["x-tollgate-request-id"])
    assert row["status"] == 502 and row["flagged"] == 1
    assert row["cost_nanos"] == row["estimated_nanos"] > 0
    assert answer.headers["x-tollgate-cost-usd"] != "0"


@pytest.mark.parametrize("status", list(STATUS_LINES))
def test_a_passthrough_answer_without_a_final_status_is_a_502(proxy: Tollgate, status: int) -> None:
    answer = httpx.get(f"{proxy.url}/v1/models/{status}", headers=TEAM, timeout=30)
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_unavailable"
