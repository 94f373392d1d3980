"""How a request's framing is read: chunked bodies' trailers and extensions, transfer
codings, requests to switch protocols and requests waiting for `100 Continue`, sent byte
for byte over a raw socket (no HTTP client writes them) to a running Tollgate, in front of
a scripted upstream that keeps the head of every request it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.client
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest

from proxy.web.connections import MAX_HEADER_BYTES
from tests.conftest import DESIGN_KEY, Tollgate, in_front_of_raw, read_request

GENERATE = json.dumps(
    {"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low", "size": "1024x1024"}
).encode()
ANSWER = json.dumps(
    {"data": [{"b64_json": "AAAA"}], "usage": {"input_tokens": 3, "output_tokens": 196}}
).encode()
HEADS: list[bytes] = []
"""The head of every request the upstream received, in order."""


async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep each request's head; answer it as a generation with its usage."""
    while True:
        try:
            head, _ = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        HEADS.append(head)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
        )
        await writer.drain()
    writer.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    with in_front_of_raw(reply, tmp_path_factory.mktemp("framing")) as tollgate:
        yield tollgate


def exchange(base: str, head: str, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send `head` (its lines, without the blank line) and `body` byte for byte on a new
    connection; the answer."""
    port = urlsplit(base).port
    assert port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # Refused and closed before all of it was read: the answer came first.
        with contextlib.suppress(ConnectionError):
            sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        answer = http.client.HTTPResponse(sock, method="POST")
        answer.begin()
        return answer.status, answer.headers, answer.read()


def chunked_generation(trailers: bytes) -> tuple[str, bytes]:
    """A generation's head and its body in two chunks (the first with an extension), the
    last chunk followed by `trailers` (each line ending with CRLF)."""
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nhost: tollgate\r\n"
        f"authorization: Bearer {DESIGN_KEY}\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\nconnection: close"
    )
    first, rest = GENERATE[:10], GENERATE[10:]
    body = b"%x;note=1\r\n%s\r\n%x\r\n%s\r\n0\r\n" % (len(first), first, len(rest), rest)
    return head, body + trailers + b"\r\n"


def test_trailer_fields_never_reach_the_upstream(proxy: Tollgate) -> None:
    """uvicorn added a chunked body's trailers to the headers Tollgate had read, so fields
    sent after the body (that no proxy in front saw as headers) were forwarded."""
    sent = len(HEADS)
    head, body = chunked_generation(
        b"OpenAI-Beta: came-after-the-body\r\nX-Stainless-Lang: trailer\r\n"
        b"User-Agent: trailer-agent\r\n"
    )
    status, headers, answer = exchange(proxy.url, head, body)
    assert status == 200, answer
    assert headers["x-tollgate-cost-usd"] != "0"
    (forwarded,) = HEADS[sent:]
    assert b"came-after-the-body" not in forwarded
    assert b"trailer" not in forwarded.lower()


def test_trailers_past_the_header_bound_are_refused_and_never_forwarded(
    proxy: Tollgate,
) -> None:
    """httptools holds a trailer field whole, copying it at each read, with no bound but
    the body's idle deadline: one connection's endless trailer held hundreds of megabytes
    and took the event loop from every other request. The bound counts the reads after
    the one the body ended in (at most 256 KiB, asyncio's read), as for headers."""
    sent = len(HEADS)
    head, body = chunked_generation(b"X-Pad: " + b"a" * (6 * MAX_HEADER_BYTES) + b"\r\n")
    status, headers, answer = exchange(proxy.url, head, body)
    assert status == 400, answer
    assert headers["content-type"] == "application/json"
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_request" and "trailer" in error["message"]
    assert HEADS[sent:] == []


H2C = (
    "connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
    "http2-settings: AAMAAABkAARAAAAAAAIAAAAA"
)
"""What `curl --http2` asks of an `http://` URL: to go on in HTTP/2 if the server will."""


def test_a_request_asking_to_switch_protocols_with_a_body_is_refused(proxy: Tollgate) -> None:
    """httptools reads nothing after the headers of such a request, its body included:
    the generation was answered as if it had no body ('could not parse the JSON body'),
    and the connection kept open, every byte sent on it dropped unanswered."""
    sent = len(HEADS)
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nhost: tollgate\r\n"
        f"authorization: Bearer {DESIGN_KEY}\r\ncontent-type: application/json\r\n"
        f"{H2C}\r\ncontent-length: {len(GENERATE)}"
    )
    status, headers, answer = exchange(proxy.url, head, GENERATE)
    assert status == 400, answer
    assert headers["connection"] == "close"
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_request" and "Upgrade" in error["message"]
    assert HEADS[sent:] == []


def test_a_request_asking_to_switch_protocols_without_a_body_closes_after_its_answer(
    proxy: Tollgate,
) -> None:
    """Served, as HTTP/1.1 lets a server ignore an upgrade; but whatever follows on its
    connection is never read, so the answer closes it rather than leave a client's next
    request unanswered until the header deadline."""
    status, headers, answer = exchange(
        proxy.url, f"GET /healthz HTTP/1.1\r\nhost: tollgate\r\n{H2C}", b""
    )
    assert status == 200, answer
    assert headers["connection"] == "close"


@pytest.mark.parametrize(
    ("key", "length", "status"),
    [("tg_unknown_key_0000000000", 1000, 401), (DESIGN_KEY, 10**9, 413)],
    ids=["unknown-key", "too-large"],
)
def test_an_answer_before_a_continue_closes_the_connection(
    proxy: Tollgate, key: str, length: int, status: int
) -> None:
    """A client that waits for `100 Continue` and gets a refusal instead never sends its
    body, which uvicorn still expects: the client's next request on the connection was read
    as that body and dropped, unanswered."""
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nhost: tollgate\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n"
        f"expect: 100-continue\r\ncontent-length: {length}"
    )
    answered, headers, answer = exchange(proxy.url, head, b"")
    assert answered == status, answer
    assert headers["connection"] == "close"
    assert set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}


def test_a_body_sent_after_its_continue_is_read_and_the_connection_kept(
    proxy: Tollgate,
) -> None:
    port = urlsplit(proxy.url).port
    assert port
    head = (
        "POST /v1/images/generations HTTP/1.1\r\nhost: tollgate\r\n"
        f"authorization: Bearer {DESIGN_KEY}\r\ncontent-type: application/json\r\n"
        f"expect: 100-continue\r\ncontent-length: {len(GENERATE)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        assert sock.recv(25).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(GENERATE)
        answer = http.client.HTTPResponse(sock, method="POST")
        answer.begin()
        assert answer.status == 200, answer.read()
        assert answer.headers["connection"] is None
        answer.read()


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate, chunked", "x-custom, chunked"])
def test_a_body_in_a_transfer_coding_other_than_chunked_is_refused(
    proxy: Tollgate, coding: str
) -> None:
    """The HTTP parser takes off `chunked` alone: the body under the other codings was read
    and priced as if they were not there, as a body with a Content-Encoding would be."""
    sent = len(HEADS)
    head, body = chunked_generation(b"")
    head = head.replace("transfer-encoding: chunked", f"transfer-encoding: {coding}")
    status, _, answer = exchange(proxy.url, head, body)
    assert status == 415, answer
    assert json.loads(answer)["error"]["code"] == "unsupported_content_encoding"
    assert HEADS[sent:] == []


@pytest.mark.parametrize(
    "head",
    [
        "GARBAGE",
        "GET /healthz HTTP/9.9\r\nhost: tollgate",
        "GET /healthz HTTP/1.1\r\nhost: tollgate\r\nno colon here",
        "GET /healthz HTTP/1.1\r\nhost: tollgate\r\ncontent-length: 1\r\ncontent-length: 2",
        f"POST /v1/images/generations HTTP/1.1\r\nhost: tollgate\r\n{H2C}\r\ncontent-length: 2",
    ],
    ids=["request-line", "version", "header-line", "two-lengths", "upgrade"],
)
def test_a_refusal_of_the_http_layer_is_dated(proxy: Tollgate, head: str) -> None:
    """A 4xx from an origin server with a clock carries `date` (RFC 9110, 6.6.1). uvicorn's
    own date is off (the app dates its answers as they start): the refusals of bytes no
    request can be read from, written by the protocol, date themselves, once."""
    status, headers, _ = exchange(proxy.url, head, b"{}")
    assert status == 400
    (date,) = headers.get_all("date")
    assert abs(email.utils.parsedate_to_datetime(date) - datetime.now(UTC)).total_seconds() < 5


@pytest.mark.parametrize(
    "head",
    ["GET /healthz HTTP/1.1\r\nhost: tollgate", "GARBAGE"],
    ids=["answered", "refused-by-the-http-layer"],
)
def test_no_answer_names_the_server_software(proxy: Tollgate, head: str) -> None:
    """No `server` header tells a client (or anyone scanning the port) what runs there."""
    _, headers, _ = exchange(proxy.url, head + "\r\nconnection: close", b"")
    assert headers.get_all("server") is None
