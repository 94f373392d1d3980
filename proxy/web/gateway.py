"""The ASGI entry: every path made canonical, image requests straight to their handler."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.core.auth import bearer_token, without_keys
from proxy.core.errors import (
    InvalidRequest,
    NotFound,
    Overloaded,
    ServiceUnavailable,
    UnsupportedEncoding,
)
from proxy.core.paths import canonical, plain_query
from proxy.metrics import Metrics
from proxy.web.admission import BodyBudget
from proxy.web.connections import OVER_CAPACITY, http_date
from proxy.web.responses import as_request_error, error_response
from proxy.web.runtime import Runtime

# Answered even on a connection past `limits.max_connections`: the probes must tell a busy
# process from a dead one, and a saturated process is when its metrics matter most.
ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})
CLOSE = {"connection": "close"}


class Handler(Protocol):
    """What answers the requests of one image endpoint."""

    async def handle(self, request: Request, runtime: Runtime) -> Response: ...


class Gateway:
    """The ASGI entry: every path is made canonical first, then image requests go straight
    to their handler, the rest to starlette.

    A path that is not canonical (see `proxy.core.paths`) is refused here, before any route or
    `passthrough:` prefix is matched against it, so what is matched is what is forwarded.
    A body with a content coding is refused too: Tollgate prices the body it reads.
    The image endpoints are the request path, and starlette's router and middleware
    (error pages, exception handlers, path matching) had nothing to do for them but cost
    CPU on every request. Whatever the refusals and the handlers raise is answered here, in
    OpenAI's error shape (a fault of Tollgate's own as a 500, its traceback in the log);
    starlette's routes answer their own errors with the same mapping.

    Every request's body charge (`proxy.web.admission`) is given back here, and a request on
    a connection past `limits.max_connections` is answered 503 here and the connection closed.
    """

    def __init__(
        self,
        app: ASGIApp,
        images: dict[str, Handler],
        bodies: BodyBudget,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.images = images
        self.bodies = bodies
        self.metrics = metrics
        self.runtime: Runtime | None = None
        """The runtime in force (None until the app has started): replaced whole on reload;
        each request reads it once, when it arrives."""
        self.on_replaced: Callable[[], None] = lambda: None
        """What this worker does once a reload replaced it (`--workers N`):
        `proxy.web.reload.Reloader.replaced`."""

    def current(self) -> Runtime:
        if self.runtime is None:
            raise ServiceUnavailable("Tollgate is starting; retry shortly.")
        return self.runtime

    def bind(
        self, endpoint: Callable[[Request, Runtime], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A starlette endpoint that calls `endpoint` with the runtime in force."""

        async def bound(request: Request) -> Response:
            return await endpoint(request, self.current())

        return bound

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = dated(send)
        if expects_continue(scope):
            receive, send = closing_unless_read(receive, send)
        try:
            respond = await self.respond(scope, receive)
        except Exception as exc:
            error = as_request_error(exc, scope["method"], scope["path"])
            respond = error_response(error, CLOSE if OVER_CAPACITY in scope else None)
        try:
            await respond(scope, receive, send)
        finally:
            self.bodies.release(scope)

    async def respond(self, scope: Scope, receive: Receive) -> ASGIApp:
        """What answers the request of `scope`: its image handler's response, or the routes."""
        self.admit(scope)
        handler = self.images.get(scope["path"])
        if handler is None or scope["method"] != "POST":
            return self.app
        try:
            return await handler.handle(Request(scope, receive), self.current())
        finally:
            # The body and its parsed copies are dropped with the handler's frame; the answer
            # (spooled, or streamed from upstream) no longer needs them.
            self.bodies.release(scope)

    def admit(self, scope: Scope) -> None:
        """Make the path of `scope` canonical, or raise the refusal of its request."""
        if OVER_CAPACITY in scope and scope["path"] not in ALWAYS_ANSWERED:
            # Every connection the process may hold is busy: this one is answered and closed.
            self.metrics.refused("connections")
            raise Overloaded(
                "Tollgate is serving as many connections as it safely can; retry in a moment."
            )
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        path = canonical(raw)
        if path is None:
            raise refused(scope, raw)
        refuse_encoded(scope["headers"])
        scope["path"] = path


def dated(send: Send) -> Send:
    """`send` with the answer's `date` header written as its head goes out (uvicorn's is
    off: it told the second the request arrived, not the one the answer started)."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"date", http_date())]
            message = {**message, "headers": headers}
        await send(message)

    return sending


def expects_continue(scope: Scope) -> bool:
    """Whether the client waits for `100 Continue` before it sends the body."""
    return any(
        name == b"expect" and value.strip().lower() == b"100-continue"
        for name, value in scope["headers"]
    )


def closing_unless_read(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """`receive` and `send` of a request whose client waits for `100 Continue`: answered
    before its body is asked for (a refusal for its key, its path, its declared length),
    the answer closes the connection. The client then never sends the body, which uvicorn
    still expects: the next request on the connection was read as that body, and dropped
    unanswered (RFC 9110, 10.1.1: a server answering before reading the content says
    whether it closes the connection)."""
    read = False

    async def receiving() -> Message:
        nonlocal read
        read = True  # uvicorn sends `100 Continue`: the body comes
        return await receive()

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and not read:
            headers = [*message.get("headers", []), (b"connection", b"close")]
            message = {**message, "headers": headers}
        await send(message)

    return receiving, sending


def path_of(request: Request) -> str:
    """The path of `request` as `Gateway` made it canonical, which its route matched and
    checked: what is forwarded and told.

    Never `request.url.path`: starlette before 1.7 read it back out of a URL it built with
    the client's `Host` header, so that `Host: x/v1/files/{another team's}/content#` on
    `GET /v1/files/{own}/content` had the own file checked and the other one read."""
    path: str = request.scope["path"]
    return path


def query_of(request: Request, runtime: Runtime) -> str:
    """The query of `request` as it is forwarded: as sent, still percent-encoded, without
    a parameter that carries a team key (`proxy.core.auth.carries_key`: Tollgate's
    credential is never sent to OpenAI); or InvalidRequest when a URL parser further down
    could read it otherwise."""
    query = plain_query(request.scope.get("query_string", b""))
    if query is None:
        raise InvalidRequest("The query string holds characters that must be percent-encoded.")
    if not query:
        return query
    token = bearer_token(request.headers.get("authorization"))
    return without_keys(query, token, runtime.config.team_by_key_hash())


def refused(scope: Scope, raw: bytes) -> NotFound:
    """The answer to a path that is not canonical: it names no endpoint."""
    shown = raw.decode("ascii", "backslashreplace")
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return NotFound(
        f"Invalid URL ({scope['method']} {shown}): Tollgate accepts only plain paths (no '.' "
        "or '..' segments, empty segments, encoded '/' or '%', backslashes or control "
        "characters)."
    )


def refuse_encoded(headers: list[tuple[bytes, bytes]]) -> None:
    """Raise when the body comes with a content coding other than identity, or a transfer
    coding other than chunked: the HTTP parser takes off `chunked` alone, and the body
    would be read (and priced) as if the others were not there."""
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() != b"identity":
            raise UnsupportedEncoding(
                f"Content-Encoding {value.decode('latin-1')!r} is not accepted: Tollgate reads "
                "and prices the request body itself, so send it uncompressed."
            )
        if name == b"transfer-encoding" and any(
            coding.strip().lower() not in TRANSFER_CODINGS for coding in value.split(b",")
        ):
            raise UnsupportedEncoding(
                f"Transfer-Encoding {value.decode('latin-1')!r} is not accepted: Tollgate reads "
                "and prices the request body itself, so send it uncompressed (chunked only)."
            )


TRANSFER_CODINGS = frozenset({b"chunked", b"identity"})
"""The transfer codings a request body may come in: `identity` is no coding."""


WEBSOCKETS_REFUSED = InvalidRequest(
    "WebSocket connections are not supported by Tollgate (the Responses API's WebSocket "
    "mode included): send POST /v1/responses, with stream: true for events."
)


async def refuse_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a WebSocket handshake with a 400 in OpenAI's error shape where the server can
    send one (the ASGI denial response), else close it with policy violation (1008)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    body = json.dumps(WEBSOCKETS_REFUSED.body()).encode()
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": WEBSOCKETS_REFUSED.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": "not supported"})
