"""A stream the upstream ended with an error before any image billed nothing: a repeat of
it is forwarded as a new request, not answered with that error again.

The upstream here is a scripted stand-in served from this process: the first generation
it is sent is answered with a stream whose only event is an `error` (OpenAI's shape),
every later one with a whole image.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import DEADLINE_S, DESIGN_KEY, Tollgate, in_front_of_raw, read_request
from tests.test_proxy_e2e import wait_settled

ASKED = {
    "model": "gpt-image-2",
    "prompt": "a lighthouse",
    "quality": "low",
    "size": "1024x1024",
    "stream": True,
}
FAILURE = {"type": "server_error", "code": "server_error", "message": "An error.", "param": None}
ERROR = {"type": "error", "error": FAILURE}
COMPLETED = {
    "type": "image_generation.completed",
    "b64_json": "AAAA",
    "usage": {"input_tokens": 1, "output_tokens": 196, "total_tokens": 197,
              "input_tokens_details": {"text_tokens": 1, "image_tokens": 0}},
}  # fmt: skip
sent: list[int] = []
"""One item per request the upstream was sent."""


def stream(event: dict[str, object]) -> bytes:
    name = str(event["type"])
    body = f"event: {name}\ndata: {json.dumps(event)}\n\n".encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body


async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The first generation: a stream of one error event; every later one: an image."""
    try:
        while True:
            await read_request(reader)
            sent.append(1)
            writer.write(stream(ERROR if len(sent) == 1 else COMPLETED))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("stream-errors")
    with in_front_of_raw(reply, root) as tollgate:
        yield tollgate


def test_a_keyed_stream_that_failed_without_a_charge_is_sent_again(proxy: Tollgate) -> None:
    headers = {"authorization": f"Bearer {DESIGN_KEY}", "idempotency-key": "stream-failed"}
    url = f"{proxy.url}/v1/images/generations"
    first = httpx.post(url, json=ASKED, headers=headers, timeout=DEADLINE_S)
    assert "event: error" in first.text
    row = wait_settled(proxy, first.headers["x-tollgate-request-id"])
    assert (row["outcome"], row["cost_nanos"]) == ("upstream_error", 0)
    again = httpx.post(url, json=ASKED, headers=headers, timeout=DEADLINE_S)
    assert "x-tollgate-replay-of" not in again.headers, again.text
    assert "image_generation.completed" in again.text
    assert len(sent) == 2
