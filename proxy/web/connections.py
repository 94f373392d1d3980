"""Client connections: how many one process holds, and how long one may take to say what it wants.

uvicorn closes idle keep-alive connections but has no bound on the time to receive a
request's headers, and no bound on connections but `limit_concurrency`, which answers in
plain text and still lets idle sockets take every file descriptor: 750 sockets that never
sent a byte left a process limited to 700 descriptors unable to accept even `/healthz`.

`GuardedProtocol` is uvicorn's httptools protocol with both bounds:

- a timer (one `call_later` handle, no task) runs from the moment a connection opens, or
  its previous answer ends, to the end of the next request's headers; at
  `limits.header_timeout_s` the connection is closed (data arriving does not reset it, so
  headers sent a byte at a time are no way around it);
- past `limits.max_connections`, a new connection makes room by closing the connection
  that has waited longest for its headers (idle sockets never crowd out a request);
  when every connection is busy with a request, the new one is still read, its request
  answered 503 `server_overloaded` in OpenAI's shape by the web layer (`/healthz`,
  `/readyz` and `/metrics` are answered as usual) and the connection closed; past an
  eighth more, it is closed at once;
- when the server stops (SIGTERM, or a worker replaced at a reload), no connection is
  closed under a client that may be sending on it: a request in flight, or the next one
  on an idle connection, is answered with `Connection: close` and its connection closed
  after the answer; an idle connection that gets no request closes as any does (uvicorn's
  keep-alive timeout, or the header deadline of one that never sent a request);
- bytes the HTTP parser refuses (`Content-Length` with `Transfer-Encoding`, a malformed
  chunk, a header line) are answered 400 in OpenAI's error shape, not uvicorn's plain
  text, and a request line and headers past `MAX_HEADER_BYTES` 431: each after the
  answers of the requests read before them, and the connection closed;
- a chunked body's trailer fields are never merged into the request's headers (RFC 9110,
  6.5.1): uvicorn added them to the headers the app had already read, so that headers
  sent after the body reached the upstream (`OpenAI-Beta`, `x-stainless-*`) though no
  proxy in front had seen them among the headers; and past `MAX_HEADER_BYTES` of framing
  without a byte of body (chunk extensions, trailer fields, which httptools holds and
  copies whole at each read as it does a header) the body is refused 400;
- a request asking to switch protocols (`Connection: upgrade` with `Upgrade: h2c`, or a
  WebSocket where uvicorn has no WebSocket library) is never switched: httptools stops
  reading at its headers, taking its body for bytes of the other protocol, and uvicorn
  drops every byte after them. One that declares a body is refused 400 (it was served
  with no body at all); one without is served, and its connection closed after the
  answer (the next request sent on it was never answered).
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import time
from email.utils import formatdate
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.core.errors import InvalidRequest, RequestError, RequestTooLarge
from proxy.core.settings import Limits

UNREADABLE = InvalidRequest(
    "Tollgate could not read this request as HTTP/1.1 (for example: Content-Length together "
    "with Transfer-Encoding, a malformed chunk, or a header line no HTTP parser accepts); "
    "the connection is closed."
)
"""The answer to bytes the HTTP parser refuses: uvicorn's is plain text."""
MAX_HEADER_BYTES = 64 * 1024
"""A request line and headers longer than this are refused (`HEADERS_TOO_LARGE`): what an
OpenAI SDK sends is a few hundred bytes. httptools has no bound of its own, and grows a
header by copying it whole at each read: one connection's endless header line held
130 MB within the header deadline, and the copying took the event loop from every other
request (`/healthz` answered in 850 ms instead of 30)."""
HEADERS_TOO_LARGE = RequestTooLarge(
    f"The request line and headers are larger than the {MAX_HEADER_BYTES:,} bytes Tollgate "
    "accepts; the connection is closed."
)
HEADERS_TOO_LARGE.status = 431
FRAMING_TOO_LARGE = InvalidRequest(
    f"The chunked body carries more than {MAX_HEADER_BYTES:,} bytes of chunk extensions or "
    "trailer fields without a byte of body; Tollgate does not read such a body, and the "
    "connection is closed."
)
UPGRADE_WITH_BODY = InvalidRequest(
    "Tollgate does not switch protocols ('Connection: upgrade' with 'Upgrade: h2c', a "
    "WebSocket): send this request as plain HTTP/1.1, without 'Connection: upgrade', "
    "whose body is otherwise not read; the connection is closed."
)
STATUS_LINES = {400: b"400 Bad Request", 431: b"431 Request Header Fields Too Large"}
OVER_CAPACITY = "tollgate.over_capacity"
"""Set in the scope of a request that came on a connection past `max_connections`."""

# Descriptors kept for the listening socket, the ledger, log and metric files, the loop.
RESERVED_FDS = 64
MIN_CONNECTIONS = 16
MAX_DEFAULT_CONNECTIONS = 8192


def default_max_connections(soft_limit: int | None = None) -> int:
    """Connections one process may hold within its descriptor limit (`ulimit -n`).

    A connection being served may hold three descriptors (the client's socket, one to the
    upstream, a spooled answer's temporary file), and an eighth more connections are let
    in to be answered 503: 307 connections for 1024 descriptors, 203 for 700."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CONNECTIONS
    usable = (soft_limit - RESERVED_FDS) * 8 // 25
    return max(MIN_CONNECTIONS, min(MAX_DEFAULT_CONNECTIONS, usable))


def descriptors_needed(max_connections: int, soft_limit: int | None = None) -> int | None:
    """The descriptor limit `max_connections` need (the inverse of `default_max_connections`)
    when `ulimit -n` is below it, else None. Below it, a burst of connections takes every
    descriptor before the cap acts: asyncio's accepts fail (`out of system resource`,
    logged at each), the SQLite ledger or the upstream cannot open a file or a socket, and
    clients see their connections closed rather than 503 `server_overloaded`."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = RESERVED_FDS + -(-max_connections * 25 // 8)
    if soft_limit == resource.RLIM_INFINITY or soft_limit >= need:
        return None
    return need


_dated: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The value of an answer's `date` header now (RFC 9110, 6.6.1), made once a second."""
    global _dated
    now = int(time.time())
    if _dated[0] != now:
        _dated = (now, formatdate(now, usegmt=True).encode())
    return _dated[1]


class ServerConfig(uvicorn.Config):
    """uvicorn's settings, served by `GuardedProtocol` with `limits`' connection bounds.

    The values are plain attributes: the configuration is pickled to each worker process."""

    def __init__(self, app: Any, *, limits: Limits, **options: Any) -> None:
        max_connections = limits.max_connections or default_max_connections()
        options.setdefault("backlog", accept_batch(max_connections))
        # uvicorn's `date` is the one of the second its request arrived (its header list is
        # taken then, and renewed once a second): an answer sent later (a replay that waited
        # for its first attempt, a rendering of a minute) told a past date. The app writes
        # the date its answer starts at (`proxy.web.gateway`), the refusals here theirs.
        options.setdefault("date_header", False)
        # `server: uvicorn` would tell anyone what runs behind the port, and no client
        # reads it (OpenAI's answers name their edge, not their stack).
        options.setdefault("server_header", False)
        super().__init__(app, http=GuardedProtocol, **options)
        self.header_timeout_s = limits.header_timeout_s
        self.max_connections = max_connections


def accepting(transport: asyncio.BaseTransport) -> bool:
    """Whether the server that accepted `transport` still accepts connections.

    asyncio tells the protocol of a connection a loop turn or two after accepting it: a
    connection accepted just before uvicorn stopped accepting was not among those it told
    to stop (`GuardedProtocol.shutdown`), so it was kept alive, and a client sending on it
    back to back kept it busy until uvicorn's graceful-shutdown timeout cancelled its
    request in flight (a plain 500, now and then at a multi-worker reload under load).
    asyncio keeps the server on the transports it accepts (`_server`, not part
    of its API); a transport without one counts as accepted while serving."""
    server = getattr(transport, "_server", None)
    return server is None or bool(server.is_serving())


def accept_batch(max_connections: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one turn of
    the loop, before `GuardedProtocol` sees any of them and closes idle ones for room.

    With uvicorn's 2,048, a burst of idle sockets took every descriptor before the cap
    could act: asyncio then logged `socket.accept() out of system resource` up to 2,048
    times and stopped accepting for a second (so /healthz waited a second). Such a burst
    holds about three batches of descriptors (accepted, being seen, being closed) on top of
    the cap, which two thirds of the cap keeps within what `default_max_connections` leaves.
    The price: past a batch of connections opened in the same instant, a client's SYN waits
    for the kernel's retry (1 s)."""
    return max(64, min(2048, max_connections * 2 // 3))


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a header deadline and a cap on connections."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        bounds = cast(ServerConfig, config)  # the only configuration that serves this protocol
        self.header_timeout_s = bounds.header_timeout_s
        self.max_connections = bounds.max_connections
        self.headers_due: asyncio.TimerHandle | None = None
        """Armed while the connection waits for a request's headers: it is idle."""
        self.over_capacity = False
        self.refused: RequestError | None = None
        """The refusal of bytes the HTTP parser refused (or headers too large), answered
        after the answers in progress."""
        self.reading_headers = False
        """A request has begun, and its headers are not all in."""
        self.header_bytes = 0
        """The bytes read of them, but those of the read they began in."""
        self.draining = False
        """The server is stopping: each answer from now on closes its connection."""
        self.in_body = False
        """A request's headers are in, and its body (with any trailer fields) is not."""
        self.progressed = False
        """Body bytes, or a new request, came in the read being handled."""
        self.framing_bytes = 0
        """The bytes read in its body since its last body byte: chunk framing and trailers."""
        self.unserved = False
        """The request being read is refused (`UPGRADE_WITH_BODY`), never given to the app."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not accepting(transport):
            self.draining = True  # the server stopped before it knew of this connection
        if len(self.connections) > self.max_connections and not self._admit():
            return
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_received()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        began, in_body = self.reading_headers, self.in_body
        self.progressed = False
        super().data_received(data)
        if self.transport.is_closing() or self.refused is not None:
            return
        if began and self.reading_headers:  # all of `data` is more of the same headers
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self._refuse_after_answers(HEADERS_TOO_LARGE)
        elif in_body and self.in_body and not self.progressed:
            # All of `data` is framing of the same body: a chunk's extensions, or trailers.
            self.framing_bytes += len(data)
            if self.framing_bytes > MAX_HEADER_BYTES:
                self._refuse_unreadable(FRAMING_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_body:  # else a trailer field, which no one in front of Tollgate saw
            super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        self.progressed = True
        self.framing_bytes = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        if self.unserved:
            self.unserved = False
            return
        super().on_message_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.progressed = True
        self.reading_headers = True
        self.header_bytes = 0

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        self._headers_received()
        if self.over_capacity:
            self.scope[OVER_CAPACITY] = True  # type: ignore[literal-required]
        # Asked to switch protocols, and not switched: httptools reads nothing after these
        # headers (a body included), and uvicorn drops it.
        stuck = self.parser.should_upgrade() and not self._should_upgrade()
        if stuck and declares_body(self.headers):
            self.unserved = True
            self._refuse_unreadable(UPGRADE_WITH_BODY)
            return
        super().on_headers_complete()
        self.in_body = True
        self.framing_bytes = 0
        if self.draining or stuck:
            self.cycle.keep_alive = False

    def shutdown(self) -> None:
        """The server stops: answer what is asked, then close.

        uvicorn closes an idle connection at once; but a client may have sent its next
        request on it already (its bytes unread in the socket, so the close resets the
        connection), or be sending it now: a client error at every reload. So an idle
        connection stays open; its next request is answered with `Connection: close`,
        or it closes when idle for the keep-alive timeout (or the header deadline, if it
        never sent a request), which clients know as they know any idle close."""
        self.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.refused is not None and self.cycle.response_complete:
            self._refuse(self.refused)  # the answers of the requests read before it are out
        # Idle again unless a pipelined request was started (its headers are in).
        if self.cycle.response_complete and not self.transport.is_closing():
            self._expect_headers()

    def send_400_response(self, msg: str) -> None:
        """Answer bytes the HTTP parser refuses (uvicorn's 400, in plain text) with a 400 in
        OpenAI's error shape, and close the connection.

        Not in the middle of another answer: when requests read before those bytes (a
        request whose body came whole, then garbage pipelined after it) are still being
        answered, their answers go first, and the 400 once they are out. uvicorn wrote its
        400 at once and closed: the team's client got it for a request that was forwarded
        and billed, and never got that request's answer (or got the 400 inside it). A
        request whose own body cannot be read, and whose answer has not started, is
        refused at once: it can never be answered otherwise."""
        self._refuse_unreadable(UNREADABLE)

    def _refuse_unreadable(self, refusal: RequestError) -> None:
        """Answer `refusal` to bytes that cannot be read as a request: at once when they are
        the body of the request being read, which is never answered otherwise, else after
        the answers in progress (`send_400_response`)."""
        cycle = self.cycle
        unanswered = cycle is not None and not (cycle.response_started or cycle.response_complete)
        if unanswered and cycle.more_body:
            self._refuse(refusal)  # its own body cannot be read: never answered otherwise
        else:
            self._refuse_after_answers(refusal)

    def _refuse_after_answers(self, refusal: RequestError) -> None:
        """Answer `refusal` once the answers in progress on this connection are out (at
        once when there are none), reading nothing more meanwhile."""
        if self.cycle is None or self.cycle.response_complete:
            self._refuse(refusal)
            return
        self.refused = refusal
        self.flow.pause_reading()

    def _refuse(self, refusal: RequestError) -> None:
        """Answer `refusal` in OpenAI's error shape and close the connection."""
        self.refused = None
        if self.transport.is_closing():
            return
        body = json.dumps(refusal.body()).encode()
        head = [b"HTTP/1.1 %s\r\n" % STATUS_LINES[refusal.status]]
        head.append(b"date: %s\r\n" % http_date())
        for name, value in self.server_state.default_headers:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()

    def _expect_headers(self) -> None:
        if self.headers_due is None:
            self.headers_due = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_received(self) -> None:
        if self.headers_due is not None:
            self.headers_due.cancel()
            self.headers_due = None

    def _headers_late(self) -> None:
        self.headers_due = None
        if not self.transport.is_closing():
            self.transport.close()

    def _admit(self) -> bool:
        """Past the cap: close the connection idle the longest, or else mark this one over
        capacity, or close it when even the overflow is full. Whether it stays open.

        A scan of every connection, only while the process is past its cap."""
        live = 0
        oldest: Any = None
        oldest_due: asyncio.TimerHandle | None = None
        for other in self.connections:
            if other.transport.is_closing():
                continue  # its descriptor is freed in a moment
            live += 1
            due = getattr(other, "headers_due", None)
            if due is not None and (oldest_due is None or due.when() < oldest_due.when()):
                oldest, oldest_due = other, due
        if live <= self.max_connections:
            return True
        if oldest is not None:
            oldest.transport.close()
            return True
        if live > self.max_connections + max(8, self.max_connections // 8):
            self.transport.close()
            return False
        self.over_capacity = True
        return True


def declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether request headers (names in lower case) say a body follows."""
    return any(
        name == b"transfer-encoding"
        or (name == b"content-length" and value.strip().lstrip(b"0") != b"")
        for name, value in headers
    )


def concrete_port(host: str, port: int) -> int:
    """`port`, or for `--port 0` a free port the system gives now: a banner (and each
    worker) then names the port served, not 0, which no client can call."""
    if port:
        return port
    info = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(info[0], socket.SOCK_STREAM) as probe:
        probe.bind(info[4])
        found: int = probe.getsockname()[1]
        return found
