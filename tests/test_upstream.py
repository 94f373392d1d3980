"""The upstream client: answers read as they arrive, errors translated at the boundary.

Against the simulated upstream on 127.0.0.1, and a tiny loopback server where the
exact bytes on the wire matter.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp.client_reqrep import ConnectionKey
from starlette.testclient import TestClient

from proxy.config import load_config
from proxy.core.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.upstream import Upstream, response_headers, translate
from proxy.upstream.answer import Answer
from proxy.web.app import create_app
from proxy.web.runtime import Overrides
from tests.conftest import UPSTREAM_KEY, Simulator, free_port, read_request, write_config

JSON = "application/json"
KEY = ConnectionKey("api.openai.com", 443, True, True, None, None, None)
CLIENT_HEADERS = [("authorization", "Bearer tg_team_key"), ("x-stainless-lang", "python")]


def order(prompt: str = "a lighthouse", **extra: object) -> bytes:
    body = {"model": "gpt-image-2", "prompt": prompt, "quality": "low", "size": "1024x1024"}
    return json.dumps({**body, **extra}).encode()


async def read(answer: Answer) -> list[bytes]:
    try:
        return [chunk async for chunk in answer.chunks()]
    finally:
        await answer.aclose()


@asynccontextmanager
async def upstream(
    base_url: str,
    *,
    timeout_s: float = 30.0,
    organization: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Upstream]:
    client = Upstream(
        base_url, UPSTREAM_KEY, timeout_s=timeout_s, organization=organization, transport=transport
    )
    try:
        yield client
    finally:
        await client.aclose()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def loopback(reply: Handler) -> AsyncIterator[str]:
    """A server on 127.0.0.1 that runs `reply` for each connection; yields its URL."""
    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/v1"


async def request_head(reader: asyncio.StreamReader) -> bytes:
    head, _ = await read_request(reader)
    return head


def writing(raw: bytes) -> Handler:
    """A scripted upstream's reply to each connection: read one request, write `raw`, close."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(raw)
        await writer.drain()
        writer.close()

    return reply


async def test_an_answer_has_its_status_headers_and_raw_body(simulator: Simulator) -> None:
    async with upstream(f"{simulator.url}/v1") as client:
        answer = await client.send("/images/generations", order(), JSON, CLIENT_HEADERS)
        body = b"".join(await read(answer))
    assert answer.status == 200
    assert answer.headers.get("Content-Type") == answer.headers.get("content-type") == JSON
    upstream_id = answer.headers.get("x-request-id")
    assert upstream_id and json.loads(body)["usage"]["output_tokens"] > 0
    passed_back = dict(response_headers(answer))
    assert passed_back["x-request-id"] == upstream_id
    assert not {"content-length", "date", "server"} & set(passed_back)
    assert simulator.record(upstream_id)["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_the_body_is_read_chunk_by_chunk_as_it_arrives() -> None:
    first_read = asyncio.Event()

    async def two_events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n"
        )
        await writer.drain()
        await first_read.wait()  # the second event is sent only once the first was read
        writer.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    chunks = []
    async with loopback(two_events) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(stream=True), JSON, [])
        async with asyncio.timeout(5):
            async for chunk in answer.chunks():
                chunks.append(chunk)
                first_read.set()
        await answer.aclose()
    assert chunks == [b"data: 1\n", b"data: 2\n"]


async def test_an_upstream_error_answer_is_an_answer(simulator: Simulator) -> None:
    async with upstream(f"{simulator.url}/v1") as client:
        answer = await client.send("/images/generations", order("[[fault:429]]"), JSON, [])
        body = b"".join(await read(answer))
    assert answer.status == 429
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"


async def test_a_silent_upstream_is_a_504(simulator: Simulator) -> None:
    async with upstream(f"{simulator.url}/v1", timeout_s=0.5) as client:
        with pytest.raises(UpstreamTimeout) as caught:
            await client.send("/images/generations", order("[[fault:timeout]]"), JSON, [])
    assert caught.value.status == 504


async def test_a_refused_connection_is_a_502() -> None:
    async with upstream(f"http://127.0.0.1:{free_port()}/v1") as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.send("/images/generations", order(), JSON, [])
    assert caught.value.status == 502


async def test_a_connection_reset_before_the_answer_is_a_502(simulator: Simulator) -> None:
    async with upstream(f"{simulator.url}/v1") as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.send("/images/generations", order("[[fault:reset]]"), JSON, [])
    assert caught.value.maybe_billed  # the request was sent: OpenAI may have accepted it


async def test_a_silence_after_the_request_was_sent_may_have_been_billed(
    simulator: Simulator,
) -> None:
    async with upstream(f"{simulator.url}/v1", timeout_s=0.5) as client:
        with pytest.raises(UpstreamTimeout) as caught:
            await client.send("/images/generations", order("[[fault:timeout]]"), JSON, [])
    assert caught.value.maybe_billed


async def test_a_refused_connection_was_never_billed() -> None:
    async with upstream(f"http://127.0.0.1:{free_port()}/v1") as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.send("/images/generations", order(), JSON, [])
    assert not caught.value.maybe_billed


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_a_body_cut_short_raises_upstream_unavailable_while_reading(
    simulator: Simulator, stream: bool
) -> None:
    async with upstream(f"{simulator.url}/v1") as client:
        answer = await client.send(
            "/images/generations", order("[[fault:truncate]]", stream=stream), JSON, []
        )
        assert answer.status == 200
        with pytest.raises(UpstreamUnavailable) as caught:
            await read(answer)
        assert caught.value.code == "upstream_unavailable"
        await answer.aclose()  # a second close is harmless


async def test_an_upstream_silent_in_mid_answer_is_a_timeout_while_reading() -> None:
    async def half_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"{" * 10)
        await writer.drain()
        await reader.read()  # until Tollgate hangs up
        writer.close()

    async with loopback(half_then_silence) as url, upstream(url, timeout_s=0.3) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        with pytest.raises(UpstreamTimeout):
            await read(answer)


async def test_an_answer_closed_before_its_end_does_not_go_back_to_the_pool() -> None:
    connections = 0

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"{" * 10)
        await writer.drain()
        await reader.read()  # until Tollgate hangs up
        writer.close()

    async with loopback(half) as url, upstream(url) as client:
        for _ in range(2):
            answer = await client.send("/images/generations", order(), JSON, [])
            await answer.aclose()
            await answer.aclose()
    assert connections == 2


GENERATED = b'{"data":[{"b64_json":"AAAA"}],"usage":{"input_tokens":1,"output_tokens":196}}'
STALE = b'{"data":[{"b64_json":"BBBB"}],"usage":{"input_tokens":9,"output_tokens":99999}}'


def whole(body: bytes, status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


def chunked(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(body),
        body,
    )


LATE = whole(STALE)
# The first answer on a connection, the method that asked for it, and whether it is read whole.
FIRST_ANSWERS = {
    "204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
    "204 with a length": (
        "GET",
        b"HTTP/1.1 204 No Content\r\ncontent-length: %d\r\n\r\n" % len(LATE),
        True,
    ),
    "304": ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", True),
    "HEAD": ("HEAD", whole(STALE)[: -len(STALE)], True),
    "content-length": ("POST", whole(GENERATED), True),
    "chunked": ("POST", chunked(GENERATED), True),
    "error read in part": ("POST", whole(b"{" * 2**21, b"500 Internal Server Error"), False),
}


class Scripted:
    """An upstream that answers the first request on its first connection with `first`,
    then, `after` seconds later, writes a whole answer of another generation on the same
    connection; it answers every other request with `GENERATED`."""

    def __init__(self, first: bytes, after: float | None = 0.05) -> None:
        self.first = first
        self.after = after
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            while True:
                await request_head(reader)
                if first:
                    first = False
                    writer.write(self.first)
                    await writer.drain()
                    if self.after is not None:
                        await asyncio.sleep(self.after)
                        writer.write(LATE)
                else:
                    writer.write(whole(GENERATED))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def first_then_order(client: Upstream, method: str, read_whole: bool, gap: float) -> bytes:
    """Send a request by `method` and read its answer (whole, or its first chunk), then,
    `gap` seconds later, an image order; the order's body as received."""
    answer = await client.send("/models", b"", "", [], method=method)
    try:
        async for _ in answer.chunks():
            if not read_whole:
                break
    finally:
        await answer.aclose()
    await asyncio.sleep(gap)
    return b"".join(await read(await client.send("/images/generations", order(), JSON, [])))


@pytest.mark.parametrize("first", list(FIRST_ANSWERS))
async def test_bytes_after_an_answer_are_never_read_as_the_next_requests_answer(
    first: str,
) -> None:
    # The late answer came while the connection waited in the pool: aiohttp parsed it and
    # kept it, and the next order sent on that connection (perhaps another team's) took it
    # as its own, with its images and 99,999 output tokens.
    method, answer, read_whole = FIRST_ANSWERS[first]
    scripted = Scripted(answer)
    async with loopback(scripted) as url, upstream(url) as client:
        body = await first_then_order(client, method, read_whole, gap=0.2)
    assert body == GENERATED
    assert scripted.connections == 2


@pytest.mark.parametrize("first", ["204", "204 with a length", "304", "HEAD"])
async def test_a_connection_answered_without_a_body_is_never_reused(first: str) -> None:
    # Sent at once, the next order went out before the late answer came, which was then
    # read as the order's: whether a body follows a body-less answer is not known.
    method, answer, _ = FIRST_ANSWERS[first]
    scripted = Scripted(answer)
    async with loopback(scripted) as url, upstream(url) as client:
        body = await first_then_order(client, method, True, gap=0)
    assert body == GENERATED
    assert scripted.connections == 2


@pytest.mark.parametrize("first", ["content-length", "chunked"])
async def test_ordinary_answers_keep_their_connection(first: str) -> None:
    method, answer, _ = FIRST_ANSWERS[first]
    scripted = Scripted(answer, after=None)
    async with loopback(scripted) as url, upstream(url) as client:
        for gap in (0, 0.05):
            assert await first_then_order(client, method, True, gap) == GENERATED
    assert scripted.connections == 1


async def test_an_upstream_that_answers_before_it_is_asked_is_a_502_never_billed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect = aiohttp.TCPConnector.connect

    async def slow_connect(*args: Any) -> Any:
        connection = await connect(*args)
        await asyncio.sleep(0.05)  # the unasked answer arrives before anything is sent
        return connection

    monkeypatch.setattr(aiohttp.TCPConnector, "connect", slow_connect)

    async def eager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(LATE)
        await writer.drain()
        await reader.read()  # until Tollgate hangs up
        writer.close()

    async with loopback(eager) as url, upstream(url) as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.send("/images/generations", order(), JSON, [])
    assert not caught.value.maybe_billed


async def test_only_allowed_client_headers_and_the_upstreams_own_are_sent() -> None:
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                heads.append(await request_head(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        writer.close()

    client_headers = [
        *CLIENT_HEADERS,
        ("X-Stainless-Helper-Method", "a"),
        ("x-stainless-helper-method", "b"),
        ("X-Trace", "a"),
        ("accept-encoding", "gzip"),
        ("content-encoding", "gzip"),
        ("content-length", "999"),
        ("idempotency-key", "k-1"),
        ("cookie", "session=1"),
        ("forwarded", "for=10.0.0.1"),
        ("openai-project", "proj-team"),
    ]
    async with loopback(record) as url, upstream(url, organization="org-1") as client:
        await (await client.send("/images/generations", order(), JSON, client_headers)).aclose()
        await (await client.send("/models", b"", "", [], method="GET", query="a=1")).aclose()
    post, get = (h.decode().lower().split("\r\n") for h in heads)
    assert post[0] == "post /v1/images/generations http/1.1"
    assert f"authorization: bearer {UPSTREAM_KEY}".lower() in post
    assert "authorization: bearer tg_team_key" not in post
    helper = [h for h in post if h.startswith("x-stainless-helper-method")]
    assert helper == ["x-stainless-helper-method: a", "x-stainless-helper-method: b"]
    assert {"content-type: application/json", "openai-organization: org-1"} <= set(post)
    assert "x-stainless-lang: python" in post
    names = {h.partition(":")[0] for h in post + get}
    assert not {"accept", "user-agent"} & names  # aiohttp adds none
    # The client's coding is not asked for: Tollgate asks for the body as it is.
    for head in (post, get):
        assert [h for h in head if h.startswith("accept-encoding")] == ["accept-encoding: identity"]
    # Only what is on the allow-list is forwarded: never a content coding or a credential.
    dropped = {"x-trace", "content-encoding", "idempotency-key", "cookie", "forwarded"}
    assert not dropped & names
    assert [h for h in post if h.startswith("openai-project")] == []
    assert [h for h in post if h.startswith("content-length")] != ["content-length: 999"]
    assert get[0] == "get /v1/models?a=1 http/1.1"
    assert not any(h.startswith("content-type") for h in get)


@pytest.mark.parametrize(
    ("configured", "team", "sent"),
    [
        ("proj_company", "proj_design", "proj_design"),
        ("proj_company", None, "proj_company"),
        (None, "proj_design", "proj_design"),
        (None, None, None),
    ],
)
def test_the_project_sent_is_the_teams_else_the_configured_one(
    configured: str | None, team: str | None, sent: str | None
) -> None:
    client = Upstream("http://127.0.0.1:1/v1", UPSTREAM_KEY, project=configured)
    client_headers = [*CLIENT_HEADERS, ("OpenAI-Project", "proj_from_the_client")]
    headers = client.headers(client_headers, JSON, team)
    projects = [v for k, v in headers if k.lower() == "openai-project"]
    assert projects == ([sent] if sent else [])


async def test_redirects_are_not_followed_and_cookies_not_kept() -> None:
    heads: list[bytes] = []

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await request_head(reader))
        writer.write(
            b"HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\nset-cookie: team=design\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async with loopback(redirect) as url, upstream(url) as client:
        for _ in range(2):
            answer = await client.send("/models", b"", "", [], method="GET")
            assert answer.status == 302
            await read(answer)
    assert len(heads) == 2
    assert b"cookie" not in heads[1].lower()


STATUS_LINES = [
    b"101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade",
    b"600 Beyond",
    b"000 Nothing",
    b"999 Anything",
]


@pytest.mark.parametrize("line", STATUS_LINES, ids=lambda line: line[:3].decode())
async def test_an_answer_without_a_final_http_status_is_a_502_that_may_have_been_billed(
    line: bytes,
) -> None:
    # A generation's whole answer, under a status no server can write back to a client.
    body = json.dumps({"data": [{"b64_json": "AAAA"}], "usage": {"output_tokens": 196}})
    reply = writing(
        b"HTTP/1.1 " + line + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body.encode())
    )

    async with loopback(reply) as url, upstream(url) as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.send("/images/generations", order(), JSON, [])
    assert caught.value.maybe_billed
    assert f"status {int(line[:3])}," in caught.value.message


async def test_an_in_process_transport_gives_the_same_answer() -> None:
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    transport = httpx.ASGITransport(app=simulator)
    async with upstream("http://simulated/v1", transport=transport) as client:
        answer = await client.send("/images/generations", order(), JSON, CLIENT_HEADERS)
        body = b"".join(await read(answer))
        await answer.aclose()
    assert answer.status == 200 and answer.headers.get("X-Request-Id")
    assert json.loads(body)["usage"]["output_tokens"] > 0


async def test_an_in_process_transport_error_is_translated() -> None:
    def time_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("silent", request=request)

    async with upstream("http://simulated/v1", transport=httpx.MockTransport(time_out)) as client:
        with pytest.raises(UpstreamTimeout):
            await client.send("/images/generations", order(), JSON, [])


async def test_an_answer_that_echoes_the_key_is_scrubbed_in_process() -> None:
    def echo(request: httpx.Request) -> httpx.Response:
        authorization = request.headers["authorization"]
        body = json.dumps({"echo": authorization}).encode()

        async def halves() -> AsyncIterator[bytes]:
            cut = body.index(b"real-key")
            yield body[:cut]
            yield body[cut:]

        return httpx.Response(200, headers={"x-echo": authorization}, content=halves())

    async with upstream("http://simulated/v1", transport=httpx.MockTransport(echo)) as client:
        answer = await client.send("/images/generations", order(), JSON, CLIENT_HEADERS)
        body = b"".join(await read(answer))
    masked = "[redacted]" + "*" * (len(UPSTREAM_KEY) - 10)
    assert answer.headers["x-echo"] == f"Bearer {masked}"
    assert json.loads(body) == {"echo": f"Bearer {masked}"}


async def test_an_answer_that_echoes_the_key_is_scrubbed_over_the_network() -> None:
    """Over aiohttp, with the key split between two writes of a chunked body (an error
    answer that quotes it is not passed on at all: `test_an_error_quoting_the_key_*`)."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await request_head(reader)
        authorization = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"authorization:")
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"x-echo: " + authorization + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        body = b'{"error": {"message": "bad key ' + authorization + b'"}}'
        cut = body.index(b"real-key")
        for part in (body[:cut], body[cut:]):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        body = b"".join(await read(answer))
    assert answer.status == 200
    assert answer.headers["x-echo"] == "Bearer [redacted]" + "*" * (len(UPSTREAM_KEY) - 10)
    assert UPSTREAM_KEY.encode() not in body and body.endswith(b'*"}}')


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nBearer KEY\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 2x0 KEY\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\nKEY\r\n",
    ],
    ids=["header-line", "status-line", "chunk-size"],
)
async def test_an_unreadable_answer_that_echoes_the_key_fails_without_it(answer: bytes) -> None:
    """aiohttp's parser quotes the line it stopped at: neither the 502's message nor the
    detail the log shows may carry it."""
    reply = writing(answer.replace(b"KEY", UPSTREAM_KEY.encode()))
    async with loopback(reply) as url, upstream(url) as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await read(await client.send("/images/generations", order(), JSON, []))
    detail = caught.value.detail or ""
    assert "[redacted]" in detail and UPSTREAM_KEY not in detail
    assert UPSTREAM_KEY not in caught.value.message and UPSTREAM_KEY not in str(caught.value)


async def test_a_body_that_breaks_off_on_an_echo_of_the_key_fails_without_it() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"{}"
            raise httpx.RemoteProtocolError(f"malformed line: {UPSTREAM_KEY}")

        return httpx.Response(200, content=body())

    async with upstream("http://simulated/v1", transport=httpx.MockTransport(broken)) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        with pytest.raises(UpstreamUnavailable) as caught:
            await read(answer)
    detail = caught.value.detail or ""
    assert "[redacted]" in detail and UPSTREAM_KEY not in detail
    assert UPSTREAM_KEY not in str(caught.value)


async def test_a_streamed_echo_of_the_key_followed_by_more_stars_is_masked_whole() -> None:
    # The stream's first event ends inside an echo, the second after more `*`s.
    echo = f"{UPSTREAM_KEY[:6]}***{UPSTREAM_KEY[-4:]}***x"
    event = f'data: {{"type": "response.output_text.delta", "delta": "{echo} done"}}\n\n'
    cut = event.index(echo) + 8
    ends = event.index("***x") + 4

    def streamed(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield event[:cut].encode()
            yield event[cut:ends].encode()
            yield event[ends:].encode()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    async with upstream("http://simulated/v1", transport=httpx.MockTransport(streamed)) as client:
        answer = await client.send("/responses", order(), JSON, [])
        body = b"".join(await read(answer)).decode()
    assert len(body) == len(event) and body.endswith(' done"}\n\n')
    assert not any(p in body for p in pieces()), body


async def test_an_error_body_read_ahead_when_its_exchange_is_cancelled_is_closed() -> None:
    # The upstream stalls in the middle of an error body; the exchange's deadline (here a
    # cancel) stops the read ahead: the answer is closed, its connection not kept out.
    started = asyncio.Event()
    answered: list[httpx.Response] = []

    def stalled(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield b'{"error": {"message": "'
            started.set()
            await asyncio.Event().wait()
            yield b'"}}'

        answered.append(httpx.Response(400, headers={"content-type": JSON}, content=body()))
        return answered[-1]

    async with upstream("http://simulated/v1", transport=httpx.MockTransport(stalled)) as client:
        sending = asyncio.ensure_future(client.send("/images/generations", order(), JSON, []))
        await started.wait()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert [r.is_closed for r in answered] == [True]


def coded_reply(status: bytes, coding: bytes) -> Handler:
    """An answer that echoes the key in a body compressed with `coding` (gzip if it names
    none zlib makes), though Tollgate asked for it as it is. A `coding` that starts with
    `transfer-encoding:` is a transfer coding, chunked after it."""
    body = json.dumps({"error": {"message": f"Bearer {UPSTREAM_KEY}"}}).encode()
    packed = zlib.compress(body) if b"deflate" in coding else gzip.compress(body)
    if coding.startswith(b"transfer-encoding:"):
        framing = coding + b", chunked\r\n\r\n%x\r\n" % len(packed)
        packed += b"\r\n0\r\n\r\n"
    else:
        framing = b"content-encoding: " + coding + b"\r\ncontent-length: %d\r\n\r\n" % len(packed)
    return writing(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"connection: close\r\n" + framing + packed
    )


CODINGS = [
    b"gzip",
    b"deflate",
    b"br",
    b"identity, gzip",
    b"GZIP",
    b"transfer-encoding: gzip",
    b"transfer-encoding: deflate",
]


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: c.decode())
async def test_an_error_answer_in_a_coding_not_asked_for_comes_without_its_body(
    coding: bytes,
) -> None:
    async with loopback(coded_reply(b"403 Forbidden", coding)) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        body = b"".join(await read(answer))
    assert answer.status == 403 and body == b""


@pytest.mark.parametrize("coding", CODINGS, ids=lambda c: c.decode())
async def test_a_success_in_a_coding_not_asked_for_cannot_be_read_and_may_have_been_billed(
    coding: bytes,
) -> None:
    async with loopback(coded_reply(b"200 OK", coding)) as url, upstream(url) as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.send("/images/generations", order(), JSON, [])
    assert caught.value.maybe_billed
    assert "content coding" in caught.value.message


async def test_an_answer_marked_identity_is_read_as_it_is() -> None:
    reply = writing(
        b"HTTP/1.1 200 OK\r\ncontent-encoding: identity\r\ncontent-length: 2\r\n"
        b"connection: close\r\n\r\n{}"
    )
    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        assert b"".join(await read(answer)) == b"{}"


async def test_header_values_come_as_their_bytes_and_without_control_characters() -> None:
    """A value that is not UTF-8 is read as its bytes (never a lone surrogate, which neither
    the ledger nor the answer to the client can write), one with a control character that
    no answer may carry is dropped."""
    reply = writing(
        b"HTTP/1.1 200 OK\r\nx-request-id: req_\xff\xfe\r\nx-ratelimit-a: \xc3\xa9\r\n"
        b"x-ratelimit-b: a\x01b\r\nx-ratelimit-c: a\tb\r\ncontent-length: 2\r\n"
        b"connection: close\r\n\r\n{}"
    )
    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        assert b"".join(await read(answer)) == b"{}"
    assert answer.headers["x-request-id"].encode("latin-1") == b"req_\xff\xfe"
    assert answer.headers["x-request-id"].encode("utf-8")  # no lone surrogate
    assert answer.headers["x-ratelimit-a"].encode("latin-1") == b"\xc3\xa9"
    assert "x-ratelimit-b" not in answer.headers
    assert answer.headers["x-ratelimit-c"] == "a\tb"
    assert response_headers(answer)[:1] == [("x-request-id", "req_\xff\xfe")]


async def test_a_header_folding_the_key_over_two_lines_is_dropped() -> None:
    """aiohttp joins a folded header line (`obs-fold`) with a space: the key with a blank
    inside, which a reader puts back together."""
    cut = len(UPSTREAM_KEY) // 2
    key = UPSTREAM_KEY.encode()
    reply = writing(
        b"HTTP/1.1 403 Forbidden\r\nx-ratelimit-echo: Bearer " + key[:cut] + b"\r\n "
        + key[cut:] + b"\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    )  # fmt: skip
    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        await read(answer)
    assert "x-ratelimit-echo" not in answer.headers
    assert response_headers(answer) == []


async def test_a_request_the_client_refuses_to_write_is_a_502_without_the_key() -> None:
    """A key with a control character (a secret file's last newline, which the
    configuration refuses) fails before anything is written: a 502, never an error of
    Tollgate's own that would leave its reservation held. aiohttp's ValueError does not say
    whether the request left, so it counts as sent."""
    arrived: list[bytes] = []

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(await reader.read())
        writer.close()

    async with loopback(reply) as url:
        client = Upstream(url, UPSTREAM_KEY + "\n")
        try:
            with pytest.raises(UpstreamUnavailable) as caught:
                await client.send("/images/generations", order(), JSON, [])
        finally:
            await client.aclose()
    assert UPSTREAM_KEY not in caught.value.message
    assert arrived in ([], [b""])


async def test_a_client_never_used_closes_without_a_session() -> None:
    await Upstream("http://127.0.0.1:9/v1", UPSTREAM_KEY).aclose()


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        aiohttp.ServerTimeoutError("read"),
        aiohttp.ConnectionTimeoutError("connect"),
        aiohttp.SocketTimeoutError("socket"),
        httpx.ReadTimeout("read"),
        httpx.PoolTimeout("pool"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_timeouts_are_504(exc: Exception) -> None:
    assert isinstance(translate(exc), UpstreamTimeout)


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientPayloadError("cut"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(111, "refused"),
        aiohttp.ClientConnectionResetError("reset"),
        ConnectionResetError(),
        OSError("no route"),
        httpx.ConnectError("refused"),
        httpx.RemoteProtocolError("cut"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_everything_else_is_502(exc: Exception) -> None:
    failure = translate(exc)
    assert isinstance(failure, UpstreamUnavailable) and failure.status == 502


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientConnectorError(KEY, OSError(111, "refused")),
        aiohttp.ClientConnectorDNSError(KEY, OSError(-2, "no such host")),
        aiohttp.ConnectionTimeoutError("connect or pool wait"),
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("connect"),
        httpx.PoolTimeout("pool"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_a_connection_never_made_was_never_billed(exc: Exception) -> None:
    assert not translate(exc).maybe_billed


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "reset mid-request"),
        aiohttp.ClientConnectionResetError("reset"),
        aiohttp.SocketTimeoutError("no answer headers within sock_read"),
        aiohttp.ClientPayloadError("cut"),
        TimeoutError(),
        ConnectionResetError(),
        httpx.ReadTimeout("read"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("cut"),
        httpx.WriteError("broken pipe"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_a_failure_after_sending_may_have_been_billed(exc: Exception) -> None:
    """OpenAI bills a generation it accepted, answered or not: charged at the bound."""
    assert translate(exc).maybe_billed


async def test_a_socket_error_of_an_in_process_upstream_is_translated() -> None:
    """An ASGI upstream (the simulator in process) raises socket errors as such: a reset
    after the request went is a 502 that may have been billed, never an escaped OSError."""

    async def reset(request: httpx.Request) -> httpx.Response:
        raise ConnectionResetError("reset by peer")

    upstream = Upstream("http://upstream/v1", "sk-test", transport=httpx.MockTransport(reset))
    with pytest.raises(UpstreamUnavailable) as caught:
        await upstream.send("/images/generations", b"{}", "application/json", [])
    assert caught.value.maybe_billed
    await upstream.aclose()


def test_the_pool_is_made_when_the_app_starts_and_when_a_reload_replaces_it(
    tmp_path: Path,
) -> None:
    """The TLS context and the HTTP client's modules cost tens of milliseconds: made at
    start (and by a reload that builds a new client), not on the first request."""
    write_config(
        tmp_path, "http://127.0.0.1:9/v1", settings="admin_token: admin-secret-for-tests\n"
    )
    app = create_app(load_config(tmp_path), Overrides(upstream_key=UPSTREAM_KEY), tmp_path)
    with TestClient(app) as client:
        first = app.current().upstream
        assert first._client._session is not None  # type: ignore[attr-defined]
        text = (tmp_path / "tollgate.yaml").read_text()
        (tmp_path / "tollgate.yaml").write_text(text.replace("timeout_s: 3", "timeout_s: 4"))
        reloaded = client.post(
            "/admin/reload", headers={"authorization": "Bearer admin-secret-for-tests"}
        )
        assert reloaded.status_code == 200
        second = app.current().upstream
        assert second is not first
        assert second._client._session is not None  # type: ignore[attr-defined]


def openai_error(
    status: bytes, message: str, code: str, kind: str = "invalid_request_error"
) -> Handler:
    """A reply in OpenAI's error shape, with `x-request-id` and a rate-limit header."""
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()
    return writing(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"x-request-id: req_refused\r\nx-ratelimit-remaining-requests: 59\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
    )


def pieces(key: str = UPSTREAM_KEY) -> list[str]:
    """What OpenAI shows of a key it refuses: its first 6 and its last 4 characters."""
    return [key[:6], key[-4:]]


@pytest.mark.parametrize("coding", [None, b"gzip"], ids=["plain", "gzip"])
async def test_an_upstream_401_is_tollgates_own_error_with_no_piece_of_the_key(
    coding: bytes | None,
) -> None:
    message = (
        f"Incorrect API key provided: {UPSTREAM_KEY[:6]}***{UPSTREAM_KEY[-4:]}. You can find "
        "your API key at https://platform.openai.com/account/api-keys."
    )
    reply = (
        openai_error(b"401 Unauthorized", message, "invalid_api_key")
        if coding is None
        else coded_reply(b"401 Unauthorized", coding)
    )
    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        body = b"".join(await read(answer))
    assert answer.status == 401
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "upstream.api_key" in error["message"] and error["param"] is None
    assert not any(p in body.decode() for p in pieces())
    assert answer.headers["content-type"] == JSON
    if coding is None:
        assert response_headers(answer) == [
            ("x-request-id", "req_refused"),
            ("x-ratelimit-remaining-requests", "59"),
            ("content-type", JSON),
        ]


@pytest.mark.parametrize(
    ("status", "code", "shown"),
    [
        (b"403 Forbidden", "insufficient_permissions", f"{UPSTREAM_KEY[:6]}***{UPSTREAM_KEY[-4:]}"),
        (b"429 Too Many Requests", "rate_limit_exceeded", f"sk-***{UPSTREAM_KEY[-4:]}"),
        (b"400 Bad Request", "invalid_value", f"{UPSTREAM_KEY[:8]}*********"),
    ],
)
async def test_an_error_quoting_a_masked_key_is_tollgates_own_with_its_status_and_code(
    status: bytes, code: str, shown: str
) -> None:
    message = f"The key {shown} has no access to gpt-image-2 in project proj_1."
    async with loopback(openai_error(status, message, code)) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        body = b"".join(await read(answer))
    assert answer.status == int(status[:3])
    error = json.loads(body)["error"]
    assert error["code"] == code and "quotes the API key" in error["message"]
    assert not any(p in body.decode() for p in pieces()) and "***" not in body.decode()


async def test_an_error_that_quotes_no_key_passes_as_it_came_however_long() -> None:
    message = "Invalid size **3000x3000**: " + "x" * 100_000 + " *** done"
    reply = openai_error(b"400 Bad Request", message, "invalid_value")
    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        body = b"".join(await read(answer))
    assert answer.status == 400
    assert json.loads(body)["error"]["message"] == message


async def test_an_error_body_that_breaks_off_while_read_ahead_breaks_off_when_read() -> None:
    reply = writing(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
        b"content-length: 1000\r\nconnection: close\r\n\r\n" + b'{"error": {"message": "x'
    )
    async with loopback(reply) as url, upstream(url) as client:
        answer = await client.send("/images/generations", order(), JSON, [])
        with pytest.raises(UpstreamUnavailable):
            await read(answer)
    assert answer.status == 500
