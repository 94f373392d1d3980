"""How Tollgate answers: every error in OpenAI's shape, and spooled upstream answers.

`as_request_error` is the one mapping from an exception to what the client is told:
Tollgate's RequestErrors answer for themselves, starlette's own refusals (no route, a
method the route does not take) become their OpenAI equivalents, and anything else is a
fault of Tollgate's, logged with its traceback and answered 500 without it.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from proxy.core.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestError,
)
from proxy.upstream import response_headers
from proxy.upstream.answer import Answer
from proxy.web.spool import Spool

log = logging.getLogger("tollgate")


def error_response(exc: RequestError, headers: dict[str, str] | None = None) -> Response:
    """`exc` as OpenAI answers an error: its status, `{"error": {...}}` and its headers."""
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**(headers or {}), **exc.headers()}
    )


def as_request_error(exc: BaseException, method: str, path: str) -> RequestError:
    """What the client is told about `exc`, raised while answering `method path`."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, HTTPException):
        return from_starlette(exc, method, path)
    log.error("unhandled error on %s %s", method, route_of(path), exc_info=exc)
    return InternalError("Tollgate failed to handle this request; it has been logged.")


ROUTE_WORDS = frozenset(
    {
        "v1", "images", "generations", "edits", "variations", "responses", "files", "batches",
        "content", "cancel", "input_items", "input_tokens", "models", "admin", "budgets",
        "report", "reload", "metrics", "healthz", "readyz", "tollgate", "budget",
    }
)  # fmt: skip
"""The words of Tollgate's and OpenAI's paths, which a log line shows as they are."""


def route_of(path: str) -> str:
    """`path` as a log line of a fault shows it: its route's words, any other segment (an
    id, or a key a client wrote into its path, which no log line shows) as `{…}`."""
    return "/".join(p if not p or p in ROUTE_WORDS else "{…}" for p in path.split("/"))


def from_starlette(exc: HTTPException, method: str, path: str) -> RequestError:
    """starlette's own refusal, as OpenAI words it."""
    if exc.status_code == 404:
        return NotFound(f"Invalid URL ({method} {path}).")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return MethodNotAllowed(
            f"Invalid method ({method} {path}).",
            # starlette joins a set: sorted, the header is the same on every answer.
            tuple(sorted(m.strip() for m in allowed.split(",") if m.strip())),
        )
    error = InvalidRequest(str(exc.detail))
    error.status = exc.status_code
    return error


def error_answer(request: Request, exc: Exception) -> Response:
    """starlette's exception handler: whatever a route raised, in OpenAI's shape."""
    return error_response(as_request_error(exc, request.method, request.scope["path"]))


EXCEPTION_HANDLERS: dict[Any, Any] = {
    # Raised by Tollgate's routes (answered here, nothing more to log).
    RequestError: error_answer,
    # No route, a method the route does not take.
    HTTPException: error_answer,
    # Anything else: starlette answers it with this, then raises it on to the server.
    Exception: error_answer,
}
"""For `Starlette(exception_handlers=...)`."""


def streamed_response(answer: Answer, headers: dict[str, str]) -> Response:
    """`answer` passed on as it comes, with its allowed headers and then `headers`; the
    upstream's answer is closed once it is sent."""
    return StreamingResponse(
        answer.chunks(),
        status_code=answer.status,
        headers={**dict(response_headers(answer)), **headers},
        background=BackgroundTask(answer.aclose),
    )


def spooled_response(spool: Spool, answer: Answer, headers: dict[str, str]) -> Response:
    all_headers = {**dict(response_headers(answer)), **headers}
    if spool.small:
        return Response(spool.getvalue(), status_code=answer.status, headers=all_headers)
    all_headers["content-length"] = str(spool.size)
    if spool.in_memory:
        return HeldResponse(spool, answer.status, all_headers)
    return StreamingResponse(spool.stream(), status_code=answer.status, headers=all_headers)


class HeldResponse(Response):
    """An answer held in memory past its spool's own threshold, sent in one message, as a
    `Response` sends its body: its pieces joined once, then dropped. The server writes the
    body whole into its buffer; the last, empty message waits until that buffer has drained
    (uvicorn's flow control), and only then is what the spool took of the process's
    `SpoolMemory` given back: a slow reader's answer still counts against it.

    A `StreamingResponse` over the pieces copied as much (into 256 KiB messages) and
    cost a task group per answer to watch for the client's disconnect, which these sends
    do not need: the server drops what it is sent for a connection that is gone."""

    def __init__(self, spool: Spool, status: int, headers: dict[str, str]) -> None:
        super().__init__(None, status_code=status, headers=headers)
        self.spool = spool

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            body = self.spool.take_all()
            await send(
                {"type": "http.response.start", "status": self.status_code,
                 "headers": self.raw_headers}
            )  # fmt: skip
            await send({"type": "http.response.body", "body": body, "more_body": True})
            del body
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.spool.close()
