"""GuardedProtocol in process: when the header deadline is armed, and whom the cap closes."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from proxy.core.settings import Limits
from proxy.web.connections import (
    MAX_HEADER_BYTES,
    OVER_CAPACITY,
    GuardedProtocol,
    ServerConfig,
    accept_batch,
    default_max_connections,
    descriptors_needed,
)

REQUEST = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"


class Transport:
    """What the protocol needs of an asyncio transport, recording what it is told."""

    def __init__(self) -> None:
        self.closed = False
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Recorder:
    """An ASGI app that answers 200 and keeps each scope it saw."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def server(app: Recorder, max_connections: int) -> tuple[ServerConfig, ServerState]:
    config = ServerConfig(app, limits=Limits(max_connections=max_connections), lifespan="off")
    config.load()
    return config, ServerState()


def connect(config: ServerConfig, state: ServerState) -> tuple[GuardedProtocol, Transport]:
    protocol = GuardedProtocol(config, state, {})
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


async def answered(app: Recorder, count: int) -> None:
    for _ in range(1000):
        if len(app.scopes) >= count:
            await asyncio.sleep(0)  # the response completes in the same task
            return
        await asyncio.sleep(0)
    raise AssertionError("the request was never answered")


def held_back(app: Recorder) -> tuple[GuardedProtocol, Transport, asyncio.Event]:
    """A connection whose requests `app` answers only once the event returned is set."""
    release = asyncio.Event()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await release.wait()
        await app(scope, receive, send)

    protocol, transport = connect(*server(app, 10))
    protocol.app = slow  # type: ignore[assignment]
    return protocol, transport, release


async def test_the_header_deadline_runs_while_idle_and_stops_at_the_headers() -> None:
    app = Recorder()
    protocol, transport = connect(*server(app, 10))
    assert protocol.headers_due is not None  # armed from the first moment
    protocol.data_received(REQUEST[:20])
    assert protocol.headers_due is not None  # data does not reset it
    protocol.data_received(REQUEST[20:])
    assert protocol.headers_due is None  # the request is being served
    await answered(app, 1)
    assert b"200 OK" in transport.written
    assert protocol.headers_due is not None  # idle again, waiting for the next request
    protocol.connection_lost(None)
    assert protocol.headers_due is None


async def test_the_deadline_closes_a_connection_without_headers() -> None:
    protocol, transport = connect(*server(Recorder(), 10))
    assert protocol.headers_due is not None
    protocol.headers_due._run()  # the timer fires
    assert transport.closed


async def test_past_the_cap_the_connection_idle_longest_is_closed() -> None:
    config, state = server(Recorder(), 2)
    first, first_transport = connect(config, state)
    second, second_transport = connect(config, state)
    assert first.headers_due is not None and second.headers_due is not None
    # The first has waited longest: its deadline is the earliest.
    loop = asyncio.get_running_loop()
    first.headers_due.cancel()
    first.headers_due = loop.call_at(loop.time() - 1, lambda: None)
    third, third_transport = connect(config, state)
    assert first_transport.closed
    assert not second_transport.closed and not third_transport.closed
    assert not third.over_capacity


async def test_past_the_cap_with_every_connection_busy_the_request_is_marked() -> None:
    app = Recorder()

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.Event().wait()  # busy for ever

    config, state = server(app, 1)
    busy, _ = connect(config, state)
    busy.app = slow  # type: ignore[assignment]
    busy.data_received(REQUEST)
    assert busy.headers_due is None
    late, late_transport = connect(config, state)
    assert late.over_capacity and not late_transport.closed
    late.data_received(REQUEST)
    await answered(app, 1)
    assert app.scopes[0][OVER_CAPACITY] is True  # the web layer answers it 503
    tasks = list(state.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_past_the_overflow_a_connection_is_closed_at_once() -> None:
    config, state = server(Recorder(), 1)
    held = []
    for _ in range(9):  # the cap, and eight more let in to be answered 503
        protocol, transport = connect(config, state)
        protocol._headers_received()  # as if each were busy with a request
        held.append(transport)
    assert not any(t.closed for t in held)
    _, transport = connect(config, state)
    assert transport.closed


def test_the_accept_batch_is_two_thirds_of_the_cap_within_bounds() -> None:
    assert [accept_batch(n) for n in (16, 203, 307, 8192)] == [64, 135, 204, 2048]


async def test_a_stopping_server_answers_the_next_request_of_an_idle_connection() -> None:
    """At a reload's worker replacement or SIGTERM, a client may be sending on a connection
    the server sees idle: closing it then resets the client's request. It stays open, and
    its next request is answered and the connection closed after it."""
    app = Recorder()
    protocol, transport = connect(*server(app, 10))
    protocol.data_received(REQUEST)
    await answered(app, 1)
    assert b"connection: close" not in transport.written.lower()
    protocol.shutdown()
    assert not transport.closed
    assert protocol.timeout_keep_alive_task is not None  # an idle close as any other
    transport.written = b""
    protocol.data_received(REQUEST)
    await answered(app, 2)
    assert b"200 OK" in transport.written
    assert b"connection: close" in transport.written.lower()
    assert transport.closed


async def test_a_stopping_server_closes_a_connection_after_its_answer_in_flight() -> None:
    app = Recorder()
    protocol, transport, release = held_back(app)
    protocol.data_received(REQUEST)
    await asyncio.sleep(0)
    protocol.shutdown()
    assert not transport.closed
    release.set()
    await answered(app, 1)
    assert b"connection: close" in transport.written.lower() and transport.closed


async def test_a_stopping_server_leaves_a_new_connection_its_header_deadline() -> None:
    protocol, transport = connect(*server(Recorder(), 10))
    protocol.shutdown()
    assert not transport.closed and protocol.headers_due is not None
    protocol.headers_due._run()
    assert transport.closed


def refusal(written: bytes) -> dict[str, Any]:
    """The error of the 400 that `written` ends with, in OpenAI's shape."""
    head, _, body = written.rpartition(b"HTTP/1.1 400 Bad Request\r\n")[2].partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head and b"connection: close" in head
    error: dict[str, Any] = json.loads(body)["error"]
    return error


async def test_bytes_the_parser_refuses_get_a_400_in_openai_shape() -> None:
    # Content-Length and Transfer-Encoding together: uvicorn answered in plain text.
    framing = b"POST /v1/images/generations HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
    protocol, transport = connect(*server(Recorder(), 10))
    protocol.data_received(framing + b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert refusal(transport.written)["code"] == "invalid_request"
    assert transport.closed


async def test_garbage_pipelined_after_a_request_is_refused_after_its_answer() -> None:
    """The request before the garbage is forwarded and billed: its client gets its answer,
    then the 400, not the 400 instead (uvicorn's, written at once, and the connection closed
    under the answer still being made)."""
    app = Recorder()
    protocol, transport, release = held_back(app)
    protocol.data_received(REQUEST + REQUEST + b"GARBAGE\r\n\r\n")
    protocol.data_received(b"more garbage\r\n\r\n")
    await asyncio.sleep(0)
    assert transport.written == b"" and not transport.closed
    release.set()
    await answered(app, 2)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", transport.written) == [b"200", b"200", b"400"]
    assert refusal(transport.written)["type"] == "invalid_request_error"
    assert transport.closed


async def test_a_request_whose_own_body_cannot_be_read_is_refused_at_once() -> None:
    reading = asyncio.Event()

    async def reader(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reading.set()
        while (await receive())["type"] != "http.disconnect":
            pass

    protocol, transport = connect(*server(Recorder(), 10))
    protocol.app = reader  # type: ignore[assignment]
    chunked = b"POST /v1/images/generations HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
    protocol.data_received(chunked + b'\r\n5\r\n{"pro\r\n')
    await reading.wait()
    protocol.data_received(b"zz\r\n")
    assert refusal(transport.written)["code"] == "invalid_request"
    assert transport.closed


async def test_headers_past_the_bound_get_a_431_and_the_connection_closes() -> None:
    # httptools bounds no header: an endless one was held, and copied whole at each read.
    protocol, transport = connect(*server(Recorder(), 10))
    protocol.data_received(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-pad: ")
    for _ in range(MAX_HEADER_BYTES // 4096 + 1):
        protocol.data_received(b"a" * 4096)
        if transport.closed:
            break
    assert transport.written.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert refusal(transport.written)["code"] == "request_too_large"
    assert transport.closed


async def test_headers_within_the_bound_are_served_however_they_arrive() -> None:
    app = Recorder()
    protocol, transport = connect(*server(app, 10))
    for _ in range(2):  # the count starts again with each request
        protocol.data_received(b"GET /healthz HTTP/1.1\r\nhost: t\r\nx-pad: ")
        for _ in range(MAX_HEADER_BYTES // 4096 - 1):
            protocol.data_received(b"a" * 4096)
        protocol.data_received(b"\r\n\r\n")
    await answered(app, 2)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", transport.written) == [b"200", b"200"]
    assert not transport.closed


async def test_headers_past_the_bound_after_a_request_wait_for_its_answer() -> None:
    app = Recorder()
    protocol, transport, release = held_back(app)
    protocol.data_received(REQUEST + b"GET /healthz HTTP/1.1\r\nx-pad: ")
    for _ in range(MAX_HEADER_BYTES // 4096 + 1):
        protocol.data_received(b"a" * 4096)
    await asyncio.sleep(0)
    assert transport.written == b"" and not transport.closed
    release.set()
    await answered(app, 1)
    assert re.findall(rb"HTTP/1.1 (\d{3}) ", transport.written) == [b"200", b"431"]
    assert transport.closed


def test_a_descriptor_limit_too_low_for_the_connections_is_named() -> None:
    assert descriptors_needed(default_max_connections(1024), 1024) is None
    assert descriptors_needed(default_max_connections(700), 700) is None
    assert descriptors_needed(default_max_connections(64), 64) == 114  # the floor's 16
    assert descriptors_needed(1000, 1024) == 3189  # a cap set past what the limit holds


async def test_a_connection_accepted_as_the_server_stops_is_closed_after_its_answer() -> None:
    """asyncio tells the protocol of a connection a loop turn after accepting it: one
    accepted just before uvicorn stops accepting was not among the connections it told to
    stop, so it was kept alive, and a client sending back to back kept it busy until the
    graceful-shutdown timeout cancelled its request in flight (a plain 500 at a reload)."""
    app = Recorder()
    config = ServerConfig(app, limits=Limits(max_connections=10), lifespan="off")
    server = uvicorn.Server(config)
    stops: list[asyncio.Task[None]] = []

    class StopsWhileAccepting(GuardedProtocol):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            # Made as asyncio accepts the connection: the server stops before it is told.
            stops.append(asyncio.ensure_future(server.shutdown([listener])))

    config.http = StopsWhileAccepting
    config.load()
    server.lifespan = config.lifespan_class(config)
    listener = socket.create_server(("127.0.0.1", 0))
    await server.startup([listener])
    reader, writer = await asyncio.open_connection(*listener.getsockname())
    try:
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"200 OK" in head and b"connection: close" in head.lower()
        assert (await reader.read()).endswith(b"0\r\n\r\n")  # then closed after the answer
    finally:
        writer.close()
    [stop] = stops
    await asyncio.wait_for(stop, 5)
