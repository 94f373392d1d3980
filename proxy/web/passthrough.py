"""Other `/v1/*` paths: 404 in OpenAI's shape, or forwarded as they are for a
`passthrough:` prefix (free endpoints such as `/v1/models`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.auth import identify
from proxy.core.errors import (
    AuthenticationFailed,
    MethodNotAllowed,
    NotFound,
    RequestError,
)
from proxy.core.paths import CHAT_COMPLETIONS, OBJECT_PATHS, TOLLGATE_PATHS, under
from proxy.web.admission import read_body
from proxy.web.gateway import path_of, query_of
from proxy.web.observe import KeyRefusals
from proxy.web.pipeline import identified_again, new_request_id
from proxy.web.responses import error_response, streamed_response
from proxy.web.runtime import Runtime


def not_served(method: str, path: str) -> str:
    """The 404's message for a path Tollgate neither serves nor forwards."""
    if any(under(path.lower(), p) for p in OBJECT_PATHS):
        # A path of an API Tollgate serves (`/v1/responses/compact`, which runs a model):
        # say that it is Tollgate that does not take it, not that OpenAI has no such URL.
        return (
            f"Invalid URL ({method} {path}): Tollgate does not forward this path of the "
            "Responses, Files or Batch API, whose cost it cannot bound or whose objects it "
            "cannot keep to your team. It serves POST /v1/responses and a response's own "
            "paths, /v1/files and /v1/batches."
        )
    return f"Invalid URL ({method} {path}): Tollgate proxies only the image endpoints."


class OtherPaths:
    """Any other `/v1/*` path: 404 in OpenAI's error shape, unless a `passthrough:` prefix
    lists it; then it is forwarded for an authenticated team with the upstream key, as is
    and unmetered (for free endpoints such as `/v1/models`), for the methods the prefix
    lists (GET and HEAD unless configured).

    The path is already canonical (`Gateway`): the prefix matched is the path forwarded.
    """

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("passthrough")

    async def handle(self, request: Request, runtime: Runtime) -> Response:
        s = runtime
        path, method = path_of(request), request.method
        refused = forwarded(s, path, method)
        if refused is not None:
            return error_response(refused)
        headers = {"x-tollgate-request-id": new_request_id()}
        try:
            team, _ = identify(request.headers.get("authorization"), s.config.team_by_key_hash())
        except AuthenticationFailed as exc:
            return self.key_refusals.refuse(request, exc, headers, s)
        try:
            allow_method(s, path, method)
            query = query_of(request)
            body = await read_body(request, s.config.limits.generations_bytes, s.bodies)
            try:
                # A body may take `limits.body_timeout_s` to arrive: a reload meanwhile that
                # revoked the key, or the prefix, is what the request is forwarded under.
                newer = identified_again(request, s)
            except AuthenticationFailed as exc:
                return self.key_refusals.refuse(request, exc, headers, s)
            if newer is not None:
                s, team, _ = newer
                refused = forwarded(s, path, method)
                if refused is not None:
                    raise refused
                allow_method(s, path, method)
            answer = await s.upstream.send(
                path.removeprefix("/v1"),
                body,
                request.headers.get("content-type", ""),
                request.headers.items(),
                method=method,
                query=query,
            )
        except RequestError as exc:
            return error_response(exc, headers)
        return streamed_response(answer, {**headers, "x-tollgate-team": team.name})


def forwarded(runtime: Runtime, path: str, method: str) -> NotFound | None:
    """None when a `passthrough:` prefix of `runtime` lists `path` and it is no path kept
    from passthrough; else the 404 to answer."""
    listed = [p for p in runtime.config.passthrough if under(path, p.prefix)]
    # Image requests are never unmetered, whatever a prefix or the path's case says;
    # Tollgate's own paths, the objects it keeps to each team, and the chat completions
    # stored under the company key (all but a new one) are never forwarded.
    lowered = path.lower()
    kept = ("/v1/images", TOLLGATE_PATHS, *OBJECT_PATHS)
    stored = under(lowered, CHAT_COMPLETIONS) and (method, path) != ("POST", CHAT_COMPLETIONS)
    if not listed or stored or any(under(lowered, p) for p in kept):
        return NotFound(not_served(method, path))
    return None


def allow_method(runtime: Runtime, path: str, method: str) -> None:
    """MethodNotAllowed unless a prefix of `runtime` listing `path` lists `method`."""
    listed = [p for p in runtime.config.passthrough if under(path, p.prefix)]
    allowed = frozenset[str]().union(*(p.methods for p in listed))
    if method not in allowed:
        raise MethodNotAllowed(
            f"{method} {path} is not forwarded: passthrough allows "
            f"{', '.join(sorted(allowed))} here.",
            tuple(sorted(allowed)),
        )
