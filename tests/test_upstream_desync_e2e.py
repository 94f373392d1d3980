"""An answer the upstream sends after another never becomes the next request's answer.

The upstream here answers one team's passthrough request with a 204 and then, 50 ms
later, writes a whole image answer of another generation on the same keep-alive
connection: a scripted stand-in served from this process, with Tollgate as a real process
in front of it. The late answer waited in Tollgate's connection pool, and the next
request sent on that connection, another team's generation, took it as its own: that
team received the other image and was charged its 99,999 output tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DESIGN_KEY, RESEARCH_KEY, Tollgate, in_front_of_raw, read_request
from tests.test_proxy_e2e import wait_settled

GENERATE = {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}
OWN = {"data": [{"b64_json": "AAAA"}], "usage": {"input_tokens": 1, "output_tokens": 196}}
OTHER = {"data": [{"b64_json": "BBBB"}], "usage": {"input_tokens": 9, "output_tokens": 99999}}


def whole(answer: dict[str, object]) -> bytes:
    body = json.dumps(answer).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a generation with `OWN`, anything else with a 204 and, 50 ms later, `OTHER`."""
    try:
        while True:
            head, _ = await read_request(reader)
            if b"/images/generations" in head.split(b"\r\n")[0]:
                writer.write(whole(OWN))
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(whole(OTHER))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("desync")
    with in_front_of_raw(reply, root, settings="passthrough: [/v1/models]\n") as tollgate:
        yield tollgate


def test_a_late_answer_after_a_204_never_reaches_the_next_team(proxy: Tollgate) -> None:
    for _ in range(3):
        seen = httpx.get(
            f"{proxy.url}/v1/models", headers={"authorization": f"Bearer {RESEARCH_KEY}"}
        )
        assert seen.status_code == 204
        time.sleep(0.2)  # the late answer has come, and waits on the idle connection
        answer = httpx.post(
            f"{proxy.url}/v1/images/generations",
            json=GENERATE,
            headers={"authorization": f"Bearer {DESIGN_KEY}"},
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.json()["data"] == OWN["data"]
        row = wait_settled(proxy, answer.headers["x-tollgate-request-id"])
        assert row["team"] == "design" and row["image_output_tokens"] == 196
