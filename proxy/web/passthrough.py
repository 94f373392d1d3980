"""Other `/v1/*` paths: 404 in OpenAI's shape, or forwarded as they are for a
`passthrough:` prefix (free endpoints such as `/v1/models`)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.auth import bearer_token, carries_key, identify
from proxy.core.errors import (
    AuthenticationFailed,
    InvalidRequest,
    LedgerError,
    MethodNotAllowed,
    NotFound,
    RequestError,
    ServiceUnavailable,
)
from proxy.core.parsing import MAX_VALUES
from proxy.core.paths import CHAT_COMPLETIONS, OBJECT_PATHS, TOLLGATE_PATHS, under
from proxy.web.admission import read_body
from proxy.web.gateway import path_of, query_of
from proxy.web.in_force import identified_again
from proxy.web.observe import KeyRefusals, log_unmetered, unmetered_outcome
from proxy.web.pipeline import new_request_id, owned_files
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
        started = time.monotonic()
        request_id = new_request_id()
        headers = {"x-tollgate-request-id": request_id}
        try:
            team, key = identify(request.headers.get("authorization"), s.config.team_by_key_hash())
        except AuthenticationFailed as exc:
            return self.key_refusals.refuse(request, exc, headers, s)
        headers["x-tollgate-team"] = team.name
        try:
            allow_method(s, path, method)
            refuse_keys(request, s, path)
            query = query_of(request, s)
            body = await read_body(request, s.config.limits.generations_bytes, s.bodies)
            try:
                # A body may take `limits.body_timeout_s` to arrive: a reload meanwhile that
                # revoked the key, or the prefix, is what the request is forwarded under.
                newer = identified_again(request, s)
            except AuthenticationFailed as exc:
                return self.key_refusals.refuse(request, exc, headers, s)
            if newer is not None:
                s, team, key = newer
                headers["x-tollgate-team"] = team.name
                refused = forwarded(s, path, method)
                if refused is not None:
                    raise refused
                allow_method(s, path, method)
                refuse_keys(request, s, path)
            # A long body is read off the event loop (a megabyte of JSON: milliseconds).
            big = len(body) > READ_ON_A_THREAD
            media = request.headers.get("content-type", "")
            named = (
                await asyncio.to_thread(named_files, body, media)
                if big
                else named_files(body, media)
            )
            if named:
                try:
                    await owned_files(s, team, named)
                except LedgerError as exc:
                    raise ServiceUnavailable(
                        "Tollgate cannot read the ledger right now; retry shortly."
                    ) from exc
            answer = await s.upstream.send(
                path.removeprefix("/v1"),
                body,
                request.headers.get("content-type", ""),
                request.headers.items(),
                method=method,
                query=query,
            )
        except RequestError as exc:
            refusal = error_response(exc, headers)
            outcome = unmetered_outcome(refusal, exc.code)
            log_unmetered(
                request_id, team.name, key.id, "passthrough", request, refusal, outcome,
                exc.code, started, s.config.team_by_key_hash(),
            )  # fmt: skip
            return refusal
        response = streamed_response(answer, headers)
        outcome = unmetered_outcome(response, None)
        log_unmetered(
            request_id, team.name, key.id, "passthrough", request, response, outcome, None,
            started, s.config.team_by_key_hash(),
        )  # fmt: skip
        return response


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


def refuse_keys(request: Request, runtime: Runtime, path: str) -> None:
    """InvalidRequest when `path` carries a team key (`proxy.core.auth.carries_key`: the
    caller's own anywhere in it, any team's as a word of it, `/v1/models/tg_...`): a query
    parameter that carries one is left out of what is forwarded, but a path is forwarded
    whole or not at all, and a team key never goes to OpenAI."""
    token = bearer_token(request.headers.get("authorization"))
    if carries_key(path, token, runtime.config.team_by_key_hash()):
        raise InvalidRequest(
            "The path of your request holds a Tollgate key, which is never sent to OpenAI: "
            "take it out of the URL (send it only as 'Authorization: Bearer tg_...')."
        )


READ_ON_A_THREAD = 256 * 1024
"""Bodies longer than this are read for the files they name on a thread."""
FILE_KEYS = ("file_id", "file_ids")
"""Where a body names files by id (a chat completion's `{"type": "file", "file":
{"file_id": …}}`, a tool's `file_ids`)."""


FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")
"""Content types under which the upstream reads a body as a form, whatever else it is."""


def named_files(body: bytes, content_type: str = "") -> tuple[str, ...]:
    """The file ids a passthrough body names, which must be the team's own (`owned_files`):
    OpenAI reads a file named by its id under the company key, whichever team uploaded it,
    so a chat completion naming another team's `user_data` file would read it into its
    answer. A body that is JSON (whatever its content type says) is read whole, every value
    under a `file_id` key and every string in a `file_ids` list, in every object and under
    each of a repeated key; another body that names `file_id` at all (a form field, plain,
    percent-encoded or JSON-escaped) cannot be checked, and is refused. So is a body sent
    as a form (`content_type`) that names it, even one that also reads as JSON naming
    none (`{"a": "&file_id=file-x&"}`): the upstream reads it as the form it says it is."""
    # NULs out: a JSON reader takes a body in UTF-16 or UTF-32 too.
    plain = body.replace(b"\0", b"")
    if b"file" not in plain.lower() and b"\\u" not in plain and b"%" not in plain:
        return ()  # no key can spell `file_id`, escaped or not: nothing to read
    media = content_type.split(";", 1)[0].strip().lower()
    if media in FORMS and _names_file_id(plain):
        raise InvalidRequest(
            "Tollgate forwards a body that names files by id only as JSON, where it "
            "checks that each file is your team's: send it as application/json."
        )
    # Objects and arrays only: a chat's text may hold a document of a million commas,
    # whose scalars cost a few bytes each to decode, where `{}` spam costs hundreds.
    if body.count(b"{") + body.count(b"[") > MAX_VALUES:
        raise InvalidRequest(
            f"The body of your request holds more than {MAX_VALUES:,} objects and arrays: "
            "Tollgate reads it for the files it names, and does not read one that large."
        )
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        for key, value in items:
            if key not in FILE_KEYS:
                continue
            values = value if key == "file_ids" and isinstance(value, list) else [value]
            found.extend(v for v in values if isinstance(v, str))
        return dict(items)

    try:
        # Leniently, as a laxer reader than Python's would: numbers of any length (as text:
        # an int of 5,000 digits is past Python's), control characters inside strings.
        json.loads(body, object_pairs_hook=pairs, parse_int=str, strict=False)
    except (ValueError, RecursionError):
        # Not read (nested deeper than Python reads, say): a key escaped `\u005f` spells
        # `file_id` to a reader that takes the body.
        if _names_file_id(plain):
            raise InvalidRequest(
                "Tollgate forwards a body that names files by id only as JSON, where it "
                "checks that each file is your team's."
            ) from None
        return ()
    return tuple(dict.fromkeys(found))


def _names_file_id(plain: bytes) -> bool:
    """Whether `plain` spells `file_id` anywhere, as sent, percent-encoded or JSON-escaped."""
    return b"file_id" in _unescaped(unquote_to_bytes(plain)).lower()


ESCAPE = re.compile(rb"\\u([0-9a-fA-F]{4})")
"""A JSON string's `\\uXXXX` escape."""


def _unescaped(text: bytes) -> bytes:
    """`text` with each JSON escape of an ASCII character turned into that character."""

    def one(found: re.Match[bytes]) -> bytes:
        code = int(found[1], 16)
        return bytes([code]) if code < 128 else b"?"

    return ESCAPE.sub(one, text)
