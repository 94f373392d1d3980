"""`/v1/files`: uploads priced line by line when they are batch files, and a team's own
files only.

    POST /v1/files   identify → spool the form to disk → a batch file: every line checked
                     and priced (`proxy.doors.batches`), any bad line refusing the file with
                     all of them listed → the form written out again from the parse →
                     forwarded with the company key → the file recorded as the team's
    GET /v1/files, GET /v1/files/{id}, GET …/content, DELETE /v1/files/{id}
                     forwarded for the team that owns the file; a listing shows only
                     the team's files, read from the upstream's pages; another team's id
                     is 404, as OpenAI answers an unknown one

A file is recorded with the OpenAI project it was uploaded under, and read and deleted
there, whatever the team's project is now (OpenAI keeps it there); a listing goes under
the team's project now and shows that project's files (`proxy.web.projects`).

An upload is never held in memory: starlette's form parser spools the file to disk as it
arrives (`limits.files_bytes` bounds it), the lines are read from there in chunks, and the
form sent upstream is written to another file that aiohttp streams with its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from proxy.core.budgets import allow_endpoint
from proxy.core.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    RequestError,
    UpstreamUnavailable,
)
from proxy.core.models import Usage
from proxy.core.paths import canonical
from proxy.core.settings import Team
from proxy.doors.batches import BatchFile
from proxy.ledger import BatchLine, ObjectKind, StoredObject
from proxy.upstream import response_headers
from proxy.upstream.answer import Answer
from proxy.web.admission import body_chunks
from proxy.web.gateway import query_of
from proxy.web.in_force import identified_again
from proxy.web.observe import KeyRefusals
from proxy.web.pipeline import for_team, forward_as_is, free_headers
from proxy.web.projects import created_under
from proxy.web.responses import streamed_response
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.files")

PURPOSES = ("batch", "vision", "user_data")
"""What Tollgate forwards: batch input files (priced), and files an image request may name
(`vision` reference images for edits, `user_data`). Fine-tuning and the other purposes
lead to spend Tollgate does not meter."""
FORM_FIELDS = frozenset({"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"})
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
SAFE_TYPE = re.compile(r"[a-z]+/[a-z0-9.+-]+", re.ASCII)
CHUNK = 256 * 1024
ANSWER_LIMIT = 1024 * 1024
SKIPPED_PAGES = 20
"""Upstream pages a listing reads past when they hold too few of the caller's objects."""
UPSTREAM_PAGE = 100
"""The objects a listing asks the upstream for at a time, whatever the client's `limit`
(the most OpenAI lists of batches at once): the caller's are found among them."""
LIST_ANSWER_LIMIT = 4 * 1024 * 1024
"""An upstream page read whole: 100 batches of 16 metadata pairs each hold about 1 MB."""
CLOCKS_APART_S = 60.0
"""How far the ledger's time of an object (recorded once the upstream answered its
creation, on Tollgate's clock) may be from OpenAI's `created_at` for it (OpenAI's clock)."""
JUMP_READS = 40
"""The team's objects a listing reads one by one when it jumps past other teams' objects
(`jump`): enough for the ledger's order and OpenAI's to disagree within `CLOCKS_APART_S`."""
JUMP_AT_ONCE = 8


def not_found(kind: str, object_id: str) -> NotFound:
    """OpenAI's answer to an id it does not know (and Tollgate's to another team's)."""
    return NotFound(f"No such {kind} object: {object_id}")


class Files:
    """The paths under `/v1/files`."""

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("files")

    async def upload(self, request: Request, runtime: Runtime) -> Response:
        return await for_team(request, runtime, self.key_refusals, self._upload)

    async def _upload(
        self, request: Request, runtime: Runtime, team: Team, headers: dict[str, str]
    ) -> Response:
        form = await read_form(request, runtime)
        try:
            # The form may take `limits.body_timeout_s` to arrive: a reload meanwhile that
            # revoked the key, or moved it, is what the upload is admitted under.
            newer = identified_again(request, runtime)
        except AuthenticationFailed as exc:
            await form.close()
            return self.key_refusals.refuse(request, exc, headers, runtime)
        except RequestError:  # its worker replaced by a reload: answered by `for_team`
            await form.close()
            raise
        if newer is not None:
            runtime, team, _ = newer
            headers["x-tollgate-team"] = team.name
            headers.pop("x-tollgate-budget-remaining-usd", None)
            headers.update(await free_headers(runtime, team))
        project = runtime.config.project_of(team.name)
        try:
            purpose, upload, extra = checked_form(form)
            if purpose == "batch":
                allow_endpoint(team, "batches")
            with tempfile.TemporaryFile() as outgoing:
                boundary = f"tollgate-{secrets.token_hex(16)}"
                write_fields(outgoing, boundary, [("purpose", purpose), *extra])
                write_file_head(outgoing, boundary, upload, purpose)
                batch = None
                if purpose == "batch":
                    batch = BatchFile(team, runtime.config)
                    await copy_lines(upload, batch, outgoing)
                    if not batch.ok:
                        raise InvalidRequest(batch.report(), param="file")
                    await self.check_files(runtime, team, batch)
                else:
                    await copy_file(upload, outgoing)
                outgoing.write(f"\r\n--{boundary}--\r\n".encode())
                outgoing.seek(0)
                answer = await runtime.upstream.send(
                    "/files",
                    outgoing,
                    f"multipart/form-data; boundary={boundary}",
                    request.headers.items(),
                    project=project,
                )
                body = await read_answer(answer)
        finally:
            await form.close()
        if 200 <= answer.status < 300:
            await own_file(runtime, team, purpose, body, batch, project)
        return Response(body, answer.status, headers={**dict(response_headers(answer)), **headers})

    async def check_files(self, runtime: Runtime, team: Team, batch: BatchFile) -> None:
        """Every file a batch line names must be the team's."""
        named = sorted({f for line in batch.lines for f in line.file_ids})
        if not named:
            return
        teams = await runtime.ledger.teams_of(named)
        for line in batch.lines:
            foreign = [f for f in line.file_ids if teams.get(f) != team.name]
            if foreign:
                batch.refuse(
                    line.line,
                    f"no such File object: {foreign[0]} (a file uploaded by your team "
                    "through Tollgate)",
                )
        if not batch.ok:
            raise InvalidRequest(batch.report(), param="file")

    async def listing(self, request: Request, runtime: Runtime) -> Response:
        """`GET /v1/files`: the team's files, read from the upstream's pages."""
        return await scoped_listing(request, runtime, self.key_refusals, FILES)

    async def one(self, request: Request, runtime: Runtime) -> Response:
        """`GET`/`DELETE /v1/files/{id}`, `GET …/content`: the team's own file only."""
        return await scoped_object(
            request, runtime, self.key_refusals, request.path_params["file_id"], "File"
        )


async def read_form(request: Request, runtime: Runtime) -> Any:
    """The upload's form, its file spooled to disk (starlette's parser) as it arrives."""
    media = request.headers.get("content-type", "")
    if not media.startswith("multipart/form-data"):
        raise InvalidRequest(
            f"Unsupported content type {media or '(none)'!r} for /v1/files: send "
            "multipart/form-data."
        )
    limits = runtime.config.limits
    # Closed when the parse ends, however it ends: the body's deadline with it.
    async with contextlib.aclosing(
        body_chunks(request, limits.files_bytes, runtime.bodies)
    ) as body:
        parser = MultiPartParser(
            request.headers,
            body,
            max_files=1,
            max_fields=len(FORM_FIELDS),
            max_part_size=64 * 1024,
        )
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise InvalidRequest(f"The upload's form could not be read: {exc.message}") from None


def checked_form(form: Any) -> tuple[str, UploadFile, list[tuple[str, str]]]:
    """(purpose, the file, the other fields to forward), or InvalidRequest."""
    seen: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name not in FORM_FIELDS:
            raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name)
        if name in seen:
            raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name)
        seen[name] = value
    upload = seen.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("Missing required parameter: 'file'.", param="file")
    purpose = seen.get("purpose")
    if purpose is None:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"Tollgate forwards files for purposes {', '.join(PURPOSES)}, not {purpose!r}.",
            param="purpose",
        )
    extra = []
    for name in ("expires_after[anchor]", "expires_after[seconds]"):
        value = seen.get(name)
        if value is not None:
            if not isinstance(value, str) or not re.fullmatch(r"[a-z_]{1,32}|[0-9]{1,9}", value):
                raise InvalidRequest(f"Invalid value for '{name}'.", param=name)
            extra.append((name, value))
    return str(purpose), upload, extra


def write_fields(out: IO[bytes], boundary: str, fields: list[tuple[str, str]]) -> None:
    for name, value in fields:
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )


def write_file_head(out: IO[bytes], boundary: str, upload: UploadFile, purpose: str) -> None:
    """The file part's head: a plain ASCII name (the client's when it is one), a plain type."""
    name = upload.filename or ""
    if not SAFE_NAME.fullmatch(name):
        name = "batch.jsonl" if purpose == "batch" else "upload"
    given = (upload.content_type or "").split(";", 1)[0].strip().lower()
    kind = given if SAFE_TYPE.fullmatch(given) else "application/octet-stream"
    out.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n".encode()
    )


async def copy_lines(upload: UploadFile, batch: BatchFile, out: IO[bytes]) -> None:
    """Read the batch file from its spool, write each line as priced."""
    while chunk := await upload.read(CHUNK):
        out.write(batch.feed(chunk))
    out.write(batch.finish())


async def copy_file(upload: UploadFile, out: IO[bytes]) -> None:
    while chunk := await upload.read(CHUNK):
        out.write(chunk)


async def read_answer(answer: Answer, limit: int = ANSWER_LIMIT) -> bytes:
    """A small JSON answer read whole (an upstream that sends more is cut at the limit)."""
    chunks, size = [], 0
    try:
        async for chunk in answer.chunks():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
    finally:
        await answer.aclose()
    return b"".join(chunks)


async def own_file(
    runtime: Runtime,
    team: Team,
    purpose: str,
    body: bytes,
    batch: BatchFile | None,
    project: str | None,
) -> None:
    """Record the uploaded file as the team's, uploaded under `project`, with a batch
    file's priced lines."""
    try:
        file_id = json.loads(body)["id"]
    except (ValueError, KeyError, TypeError):
        return  # not a file object: nothing to own (the client sees the answer as it came)
    if not isinstance(file_id, str):
        return
    lines = [
        BatchLine(
            line.custom_id, line.line, line.endpoint, line.model, line.quality, line.size,
            line.n, line.user, line.bound_nanos, line.mainline, line.policy,
        )
        for line in (batch.lines if batch else ())
    ]  # fmt: skip
    await runtime.ledger.own(
        StoredObject(
            file_id,
            team.name,
            "file",
            purpose,
            runtime.clock(),
            len(lines),
            batch.bound_nanos if batch else 0,
            batch.usage if batch else Usage(),
            None,
            project,
        ),
        lines,
    )


Seen = Callable[[Runtime, Team, Any, str | None], Awaitable[None]]
"""Told of each object (parsed JSON) a team is shown, and the OpenAI project it was read
under: see `proxy.web.batches.own_outputs`."""


@dataclass(frozen=True)
class Listing:
    """A list endpoint: its upstream path, the kind of object it lists, the query parameters
    OpenAI takes there, and its page sizes."""

    path: str
    kind: ObjectKind
    params: frozenset[str]
    default_limit: int
    max_limit: int


FILES = Listing("/files", "file", frozenset({"after", "limit", "order", "purpose"}), 10_000, 10_000)
BATCHES = Listing("/batches", "batch", frozenset({"after", "limit"}), 20, 100)


async def scoped_listing(
    request: Request,
    runtime: Runtime,
    refusals: KeyRefusals,
    listing: Listing,
    seen: Seen | None = None,
) -> Response:
    """A list endpoint (`/files`, `/batches`): the caller's objects, in the upstream's order,
    read from the upstream's pages (`UPSTREAM_PAGE` objects each) until `limit` of them are
    found, the upstream has no more, or `SKIPPED_PAGES + 1` pages were read. A page may so
    come out shorter than `limit`; `first_id` and `last_id` are its own objects' (None when
    it holds none) and `has_more` says whether the upstream has more past the last one. The
    SDKs ask for the next page `after` the last object of `data`: always one of the
    caller's, so another team's objects are read past again, never skipped over. The SDKs
    stop at an empty page, so pages that held none of the caller's objects are not answered
    empty while the caller has more: the listing jumps to the caller's next objects, which
    the ledger knows (`jump`).

    The query is written from its parse (the parameters OpenAI takes there, each once);
    an `after` that is not one of the caller's objects is answered as OpenAI answers an
    unknown one, with an empty page, and never forwarded. A team without any object of
    the kind is answered that empty page at once, without reading the upstream. It is
    asked for under the team's project now, and so lists that project's objects (those
    the team created under a former one are read one by one, `scoped_object`)."""

    async def serve(
        request: Request, runtime: Runtime, team: Team, headers: dict[str, str]
    ) -> Response:
        asked = listed_query(request, runtime, listing)
        limit = int(asked.pop("limit", listing.default_limit))
        after = asked.pop("after", None)
        found: list[Any] = []
        more = False
        upstream: dict[str, str] = {}  # the last page's headers (x-request-id, rate limits)
        project = runtime.config.project_of(team.name)
        if after is None:
            walk = await runtime.ledger.owns_any(team.name, listing.kind)
        else:
            walk = (await runtime.ledger.teams_of([after])).get(after) == team.name
        asked_after = after
        first: Any = None  # the first object read past `after`
        if walk:
            for _ in range(SKIPPED_PAGES + 1):
                query = [*asked.items(), ("limit", str(UPSTREAM_PAGE))]
                answer = await runtime.upstream.send(
                    listing.path, b"", "", request.headers.items(), method="GET",
                    query=urlencode([*query, *((("after", after),) if after else ())]),
                    project=project,
                )  # fmt: skip
                body = await read_answer(answer, LIST_ANSWER_LIMIT)
                if not 200 <= answer.status < 300:
                    return Response(
                        body, answer.status, headers={**dict(response_headers(answer)), **headers}
                    )
                upstream = dict(response_headers(answer))
                ids, more = page_of(body)
                if first is None and ids:
                    first = ids[0][1]
                teams = await runtime.ledger.teams_of([i for i, _ in ids])
                found += [item for i, item in ids if teams.get(i) == team.name]
                if len(found) >= limit or not more or not ids:
                    break
                after = ids[-1][0]
            else:
                if not found:  # a long run of other teams' objects, and more to come
                    jumped = await jump(
                        request, runtime, team, listing, asked, (first, ids[-1][1]),
                        asked_after, headers,
                    )  # fmt: skip
                    if isinstance(jumped, Response):
                        return jumped
                    if jumped is not None:
                        found, more = jumped
            more = more or len(found) > limit
            found = found[:limit]
            if seen is not None:
                for item in found:
                    await seen(runtime, team, item, project)
        page = {
            "object": "list",
            "data": found,
            "first_id": found[0]["id"] if found else None,
            "last_id": found[-1]["id"] if found else None,
            "has_more": more,
        }
        return Response(
            json.dumps(page).encode(), 200, media_type="application/json",
            headers={**upstream, **headers},
        )  # fmt: skip

    return await for_team(request, runtime, refusals, serve)


async def jump(
    request: Request,
    runtime: Runtime,
    team: Team,
    listing: Listing,
    asked: dict[str, str],
    run: tuple[Any, Any],
    after: str | None,
    headers: dict[str, str],
) -> tuple[list[Any], bool] | Response | None:
    """The team's next objects in the upstream's order past `cursor` (the last object of
    a run of `SKIPPED_PAGES + 1` pages that held none of the team's, read past `after`;
    `run` is the run's first object and `cursor`), found from the ledger
    rather than by reading on: (the objects, whether the team has more past them). Those
    are the objects with the nearest `created_at` past the cursor's (usually one; several
    created within the same second are given in the ledger's order), read one by one
    under the team's project. The SDKs then ask for the page after the last, and the walk
    goes on from there. An empty list with False: the team has no more. None when the
    cursor has no `created_at`; an upstream error answer is passed on.

    The ledger's time of an object and OpenAI's `created_at` agree within `CLOCKS_APART_S`:
    candidates are the team's objects recorded from that long before the cursor's
    `created_at` on (in the listing's direction), read in the ledger's order until none
    left could come before the nearest found. Objects the upstream no longer has (deleted
    or expired there) are read past. Past `JUMP_READS` objects read without finding one,
    the listing ends as it did before the jump: empty, with `has_more`."""
    start, cursor = run
    created = _created(cursor)
    if created is None:
        return None
    # Past the cursor: older when the newest come first, else newer. The same second is
    # past it too: the pages up to the cursor held none of the team's objects.
    sign = 1 if asked.get("order", "desc") == "desc" else -1
    project = runtime.config.project_of(team.name)
    # What was listed before is `after` and the team's objects before it upstream: none
    # in the cursor's second unless `after` is in it too, and then those before it in the
    # ledger's order, the one order Tollgate has for objects made in the same second.
    # `after` is in another second when the run's first object is (the ledger's order of
    # `after` and an object of the cursor's second says nothing then: their times there
    # may be a minute off OpenAI's); when the whole run is in the cursor's second, `after`
    # is read to know.
    listed = await runtime.ledger.stored(after) if after is not None else None
    began = _created(start)  # `after`'s second, or one past it
    if listed is not None and began in (None, created) and _plain_id(listed.id):
        got = await _read_one(request, runtime, listing, listed.id, project, headers)
        if isinstance(got, Response):
            return got
        began = _created(got)  # None: gone upstream, the ledger's order then
    if began is not None and began != created:
        listed = None
    asked_for = JUMP_READS + 2  # `after` may be among them; one more says there is more
    found = await runtime.ledger.objects_past(
        team.name, listing.kind, project, asked.get("purpose"), sign == 1,
        created + sign * CLOCKS_APART_S, asked_for,
    )  # fmt: skip
    kept = [c for c in found if c.id != after and _plain_id(c.id)]
    candidates = kept[:JUMP_READS]
    ledger_order = {c.id: (c.created_at, c.id) for c in candidates}
    nearest: list[Any] = []  # the objects past the cursor with the nearest `created_at`
    others = 0  # objects past the cursor read, not among the nearest
    read = 0
    while read < len(candidates):
        if nearest and sign * (nearest[0]["created_at"] - candidates[read].created_at) > (
            CLOCKS_APART_S
        ):
            break  # none left can come before the nearest found
        batch = candidates[read : read + JUMP_AT_ONCE]
        read += len(batch)
        answers = await asyncio.gather(
            *(_read_one(request, runtime, listing, c.id, project, headers) for c in batch),
            return_exceptions=True,
        )
        for got in answers:
            if isinstance(got, BaseException):
                raise got
            if isinstance(got, Response):
                return got
            if got is None or sign * (created - got["created_at"]) < 0:
                continue  # gone upstream, or before the cursor: listed already
            if got["created_at"] == created and listed is not None:
                mine, mark = ledger_order[got["id"]], (listed.created_at, listed.id)
                if not (mine < mark if sign == 1 else mine > mark):
                    continue  # in the cursor's second, and not past `after`: listed already
            if not nearest or got["created_at"] == nearest[0]["created_at"]:
                nearest.append(got)
            elif sign * (nearest[0]["created_at"] - got["created_at"]) < 0:
                others += len(nearest)
                nearest = [got]
            else:
                others += 1
    unread = read < len(kept) or len(found) == asked_for
    if not nearest and unread:
        log.warning(
            "listing %s for team %s: %d of the team's objects read past other teams' "
            "without finding the next one; the listing ends here",
            listing.path, team.name, read,
        )  # fmt: skip
    return nearest, bool(others or unread)


def _created(item: Any) -> int | float | None:
    """An upstream object's `created_at`, None when it has none that is a number."""
    at = item.get("created_at") if isinstance(item, dict) else None
    return None if not isinstance(at, int | float) or isinstance(at, bool) else at


def _plain_id(object_id: str) -> bool:
    """Whether `object_id` is one path segment as it stands (an upstream's id always is)."""
    return canonical(f"/{object_id}".encode()) == f"/{object_id}"


async def _read_one(
    request: Request,
    runtime: Runtime,
    listing: Listing,
    object_id: str,
    project: str | None,
    headers: dict[str, str],
) -> Any | Response | None:
    """The object `object_id` as the upstream has it now (None: it has it no more), or
    its error answer."""
    answer = await runtime.upstream.send(
        f"{listing.path}/{object_id}", b"", "", request.headers.items(), method="GET",
        project=project,
    )  # fmt: skip
    body = await read_answer(answer, LIST_ANSWER_LIMIT)
    if answer.status == 404:
        return None
    if not 200 <= answer.status < 300:
        return Response(body, answer.status, headers={**dict(response_headers(answer)), **headers})
    item = _parsed(body)
    at = item.get("created_at") if isinstance(item, dict) else None
    if not isinstance(at, int | float) or isinstance(at, bool) or item.get("id") != object_id:
        raise UpstreamUnavailable("The upstream answered an object with an unreadable body.")
    return item


def listed_query(request: Request, runtime: Runtime, listing: Listing) -> dict[str, str]:
    """The query of a listing, read: each parameter OpenAI takes there at most once, a
    `limit` within OpenAI's range; anything else is refused."""
    asked: dict[str, str] = {}
    for name, value in parse_qsl(query_of(request, runtime), keep_blank_values=True):
        if name not in listing.params:
            raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name)
        if name in asked:
            raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name)
        if value:
            asked[name] = value
    limit = asked.get("limit")
    if limit is not None and not (
        limit.isascii() and limit.isdigit() and 1 <= int(limit) <= listing.max_limit
    ):
        raise InvalidRequest(
            f"Invalid 'limit': expected an integer between 1 and {listing.max_limit}.",
            param="limit",
        )
    if asked.get("order", "desc") not in ("asc", "desc"):
        raise InvalidRequest("Invalid 'order': expected 'asc' or 'desc'.", param="order")
    return asked


def page_of(body: bytes) -> tuple[list[tuple[str, Any]], bool]:
    """An upstream page's objects, each with its id, and its `has_more`; UpstreamUnavailable
    for a page unlike OpenAI's (or cut at the limit), which would otherwise list nothing."""
    try:
        page = json.loads(body)
        items, more = page["data"], page.get("has_more")
        ids = [(item["id"], item) for item in items]
    except (ValueError, KeyError, TypeError):
        ids, more = [], "unreadable"
    if more not in (True, False, None) or not all(isinstance(i, str) for i, _ in ids):
        raise UpstreamUnavailable("The upstream answered a listing with an unreadable page.")
    return ids, bool(more)


async def scoped_object(
    request: Request,
    runtime: Runtime,
    refusals: KeyRefusals,
    object_id: str,
    kind: str,
    seen: Seen | None = None,
) -> Response:
    """A path naming one object: forwarded for its team, under the project the object was
    created under (`proxy.web.projects.created_under`), 404 for anyone else. With `seen`,
    the answer (a small JSON object) is read whole and `seen` told of it before it is
    answered; else it streams."""

    async def serve(
        request: Request, runtime: Runtime, team: Team, headers: dict[str, str]
    ) -> Response:
        found = await runtime.ledger.stored(object_id)
        if found is None or found.team != team.name:
            raise not_found(kind, object_id)
        project = created_under(runtime, found)
        answer = await forward_as_is(request, runtime, query_of(request, runtime), project)
        if seen is not None:
            body = await read_answer(answer)
            found = _parsed(body)
            # Told only of the object asked for: another's (an upstream answering for the
            # wrong path) would give the team what that object names.
            if (
                200 <= answer.status < 300
                and isinstance(found, dict)
                and found.get("id") == object_id
            ):
                await seen(runtime, team, found, project)
            return Response(
                body, answer.status, headers={**dict(response_headers(answer)), **headers}
            )
        return streamed_response(answer, headers)

    return await for_team(request, runtime, refusals, serve)


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None
