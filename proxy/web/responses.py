"""How Tollgate answers: its own errors in OpenAI's shape, and spooled upstream answers."""

from __future__ import annotations

from starlette.responses import JSONResponse, Response, StreamingResponse

from proxy.core.errors import RequestError
from proxy.upstream import Answer, response_headers
from proxy.web.spool import Spool


def error_response(exc: RequestError, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        exc.body(), status_code=exc.status, headers={**(headers or {}), **exc.headers()}
    )


def spooled_response(spool: Spool, answer: Answer, headers: dict[str, str]) -> Response:
    all_headers = {**dict(response_headers(answer)), **headers}
    if spool.in_memory:
        return Response(spool.getvalue(), status_code=answer.status, headers=all_headers)
    all_headers["content-length"] = str(spool.size)
    return StreamingResponse(spool.stream(), status_code=answer.status, headers=all_headers)
