"""The simulated Files and Batch APIs' request paths.

every request:  authenticate → settle the batches that have ended → answer
upload:         read the multipart form → check purpose, name, size, expiry → store
create batch:   read the JSON body → check its parameters → read the input file's lines
                (taking `batch_read_ms`) → run each valid line as the Images API would → store
                (answer `validating`)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from proxy.simulator.batch_lines import (
    BATCH_ENDPOINTS,
    OPENAI_BATCH_ENDPOINTS,
    read_input,
    run_line,
)
from proxy.simulator.batch_responses import run_response_line
from proxy.simulator.batches import StoredBatch
from proxy.simulator.billing import RECORDED_HEADERS
from proxy.simulator.files import (
    BATCH_FILE_SECONDS,
    StoredFile,
    check_upload,
    expiry_seconds,
    list_page,
    new_file_id,
    upload_purpose,
)
from proxy.simulator.forms import parse_json
from proxy.simulator.refusals import ApiError, invalid, invalid_api_key, missing
from proxy.simulator.routes import SimulatorState, error_response, json_response, sleep_ms

MAX_BATCH_LIST_LIMIT = 100
DEFAULT_BATCH_LIST_LIMIT = 20
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

Handler = Callable[[SimulatorState, Request, float], Awaitable[Response]]


async def _guarded(handler: Handler, state: SimulatorState, request: Request) -> Response:
    """Authenticate, settle what has ended, then run `handler`; its ApiError answered."""
    request_id = f"req_{uuid.uuid4().hex}"
    now = time.time()
    authorization = request.headers.get("authorization")
    try:
        if not state.admits(authorization):
            raise invalid_api_key(authorization)
        state.settle(now)
        return await handler(state, request, now)
    except ApiError as error:
        return error_response(error, request_id)


def _project(request: Request) -> str | None:
    """The project the request is made under: OpenAI scopes files and batches to it."""
    return request.headers.get("openai-project")


def _ok(body: dict[str, Any]) -> Response:
    return json_response(200, body, f"req_{uuid.uuid4().hex}", {})


async def _upload(state: SimulatorState, request: Request, now: float) -> Response:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except HTTPException as exc:
        raise invalid(f"Could not parse multipart form: {exc.detail}", param=None) from exc
    try:
        purpose = upload_purpose(form.get("purpose"))
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise missing("file")
        content = await upload.read()
        filename = upload.filename or "upload"
        check_upload(purpose, filename, len(content))
        anchor = form.get("expires_after[anchor]")
        seconds = form.get("expires_after[seconds]")
    finally:
        await form.close()
    expires_at = int(now) + BATCH_FILE_SECONDS if purpose == "batch" else None
    if anchor is not None or seconds is not None:
        if anchor != "created_at":
            raise invalid(
                "Invalid 'expires_after.anchor': the only anchor supported is 'created_at'.",
                param="expires_after.anchor",
            )
        expires_at = int(now) + expiry_seconds(seconds, "expires_after.seconds")
    stored = StoredFile(
        new_file_id(), filename, purpose, content, int(now), expires_at, _project(request)
    )
    return _ok(state.files.add(stored).to_json())


async def _list_files(state: SimulatorState, request: Request, now: float) -> Response:
    return _ok(state.files.page(request.query_params, _project(request)))


async def _retrieve_file(state: SimulatorState, request: Request, now: float) -> Response:
    return _ok(state.files.get(request.path_params["file_id"], _project(request)).to_json())


async def _file_content(state: SimulatorState, request: Request, now: float) -> Response:
    stored = state.files.get(request.path_params["file_id"], _project(request))
    return Response(stored.content, media_type="application/octet-stream")


async def _delete_file(state: SimulatorState, request: Request, now: float) -> Response:
    file_id = request.path_params["file_id"]
    state.files.delete(file_id, _project(request))
    return _ok({"id": file_id, "object": "file", "deleted": True})


def _endpoint(value: object) -> str:
    if value is None:
        raise missing("endpoint")
    if value not in OPENAI_BATCH_ENDPOINTS:
        allowed = ", ".join(f"'{e}'" for e in OPENAI_BATCH_ENDPOINTS)
        raise invalid(
            f"Invalid value: '{value}'. Supported values are: {allowed}.", param="endpoint"
        )
    if value not in BATCH_ENDPOINTS:
        raise invalid(
            f"The simulated upstream runs only image and Responses batches "
            f"('/v1/images/generations', '/v1/images/edits', '/v1/responses'), not '{value}'.",
            param="endpoint",
            code="unsupported_value",
        )
    return str(value)


def _metadata(value: object) -> Mapping[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA_KEYS
        or not all(
            isinstance(k, str)
            and isinstance(v, str)
            and len(k) <= MAX_METADATA_KEY_CHARS
            and len(v) <= MAX_METADATA_VALUE_CHARS
            for k, v in value.items()
        )
    ):
        raise invalid(
            f"Invalid 'metadata': expected an object of at most {MAX_METADATA_KEYS} string "
            f"values, keys up to {MAX_METADATA_KEY_CHARS} characters and values up to "
            f"{MAX_METADATA_VALUE_CHARS}.",
            param="metadata",
        )
    return dict(value)


def _output_expiry(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise invalid(
            "Invalid 'output_expires_after': expected {'anchor': 'created_at', 'seconds': …}.",
            param="output_expires_after",
        )
    return expiry_seconds(value.get("seconds"), "output_expires_after.seconds")


async def _create_batch(state: SimulatorState, request: Request, now: float) -> Response:
    fields = parse_json("generations", await request.body()).fields
    input_file_id = fields.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise missing("input_file_id")
    endpoint = _endpoint(fields.get("endpoint"))
    window = fields.get("completion_window")
    if window is None:
        raise missing("completion_window")
    if window != "24h":
        raise invalid(
            f"Invalid value: '{window}'. Supported values are: '24h'.",
            param="completion_window",
        )
    metadata = _metadata(fields.get("metadata"))
    output_expiry = _output_expiry(fields.get("output_expires_after"))
    source = state.files.get(input_file_id, _project(request))
    if source.purpose != "batch":
        raise invalid(
            f"Invalid 'input_file_id': the file '{input_file_id}' has purpose "
            f"'{source.purpose}'; a batch's input file must have purpose 'batch'.",
            param="input_file_id",
        )
    if state.knobs.batch_fail_status:
        raise ApiError(
            state.knobs.batch_fail_status,
            "The server had an error while processing your request.",
            type="server_error",
        )
    read = read_input(source.content, endpoint)
    run = run_response_line if endpoint == "/v1/responses" else run_line
    knobs = state.knobs
    if knobs.batch_read_ms:
        # Reading the input file takes time: the batch exists once it is read, whether or
        # not the client still waits for the answer (a create that timed out may have run).
        await sleep_ms(knobs.batch_read_ms)
        now = time.time()
    batch = StoredBatch(
        id=f"batch_{uuid.uuid4().hex}",
        input_file_id=input_file_id,
        endpoint=endpoint,
        created_at=now,
        delay=knobs.batch_delay_ms / 1000,
        window=knobs.batch_window_ms / 1000,
        model=None if isinstance(read, list) else read.model,
        problems=tuple(read) if isinstance(read, list) else (),
        results=() if isinstance(read, list) else tuple(run(li) for li in read.lines),
        metadata=metadata,
        output_expires_after=output_expiry,
        authorization=request.headers.get("authorization"),
        headers={n: request.headers[n] for n in RECORDED_HEADERS if n in request.headers},
        padding=knobs.payload_bytes,
    )
    state.batches.put(batch)
    if knobs.batch_answer_ms:
        # The batch exists (and is listed) before its create is answered: an answer that
        # comes too late for the client leaves the batch made all the same.
        await sleep_ms(knobs.batch_answer_ms)
    if knobs.batch_answer_status:
        # A gateway's error in front of a create that was made all the same: the batch
        # runs, and bills, though its client was told it failed.
        raise ApiError(
            knobs.batch_answer_status,
            "The server had an error while processing your request.",
            type="server_error",
        )
    return _ok(batch.to_json(now))


async def _list_batches(state: SimulatorState, request: Request, now: float) -> Response:
    views = [_View(b.id, b.to_json(now)) for b in state.batches.newest_first(_project(request))]
    return _ok(
        list_page(
            views,
            request.query_params,
            max_limit=MAX_BATCH_LIST_LIMIT,
            default_limit=DEFAULT_BATCH_LIST_LIMIT,
        )
    )


class _View:
    """A batch as a list page shows it (an `id` and `to_json()`)."""

    def __init__(self, id: str, data: dict[str, Any]) -> None:
        self.id = id
        self.data = data

    def to_json(self) -> dict[str, Any]:
        return self.data


async def _retrieve_batch(state: SimulatorState, request: Request, now: float) -> Response:
    return _ok(state.batches.get(request.path_params["batch_id"], _project(request)).to_json(now))


async def _cancel_batch(state: SimulatorState, request: Request, now: float) -> Response:
    batch = state.batches.cancel(request.path_params["batch_id"], now, _project(request))
    return _ok(batch.to_json(now))


def _bound(handler: Handler) -> Callable[[SimulatorState, Request], Awaitable[Response]]:
    async def run(state: SimulatorState, request: Request) -> Response:
        return await _guarded(handler, state, request)

    return run


upload_file = _bound(_upload)
list_files = _bound(_list_files)
retrieve_file = _bound(_retrieve_file)
file_content = _bound(_file_content)
delete_file = _bound(_delete_file)
create_batch = _bound(_create_batch)
list_batches = _bound(_list_batches)
retrieve_batch = _bound(_retrieve_batch)
cancel_batch = _bound(_cancel_batch)
