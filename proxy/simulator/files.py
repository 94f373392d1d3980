"""The simulated Files API's store: uploads, and the output and error files batches write
(pure; time passed in).

What OpenAI checks at upload, the simulator checks too: the purpose is one it knows,
`expires_after` is 1 hour to 30 days, a `batch` file is a `.jsonl` of at most 200 MB.
The lines of a batch file are read only when a batch is created from it (as OpenAI
does: a file of malformed lines uploads fine, and the batch made from it fails).
Of OpenAI's purposes, the simulator keeps `batch`, `vision` and `user_data`; the others
(`assistants`, `fine-tune`, `evals`) are refused, saying so.

Lists are OpenAI's cursor pages: newest first unless `order=asc`, `limit` 1 to 10,000,
`after` the id of the last file of the previous page.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from proxy.simulator.refusals import ApiError, invalid

OPENAI_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
SIMULATED_PURPOSES = ("batch", "vision", "user_data")
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
BATCH_FILE_SECONDS = 30 * 86_400
"""A `batch` file's default lifetime."""
MIN_EXPIRY_SECONDS = 3_600
MAX_EXPIRY_SECONDS = 30 * 86_400
MAX_LIST_LIMIT = 10_000

Purpose = Literal["batch", "vision", "user_data", "batch_output"]


@dataclass(frozen=True)
class StoredFile:
    """One file: its bytes and the `File` object's fields."""

    id: str
    filename: str
    purpose: Purpose
    content: bytes
    created_at: int
    expires_at: int | None = None
    project: str | None = None
    """The `OpenAI-Project` it was uploaded (or its batch created) under; None: the key's
    default project. Another project's requests do not find it, as OpenAI's do not."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex[:22]}"


def not_found(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param="id", code=None)


def expiry_seconds(value: object, param: str) -> int:
    """`expires_after.seconds` (or a batch's `output_expires_after.seconds`), checked."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"Invalid '{param}': expected an integer.", param=param, code="invalid_type")
    if not MIN_EXPIRY_SECONDS <= value <= MAX_EXPIRY_SECONDS:
        raise invalid(
            f"Invalid '{param}': expected a value between {MIN_EXPIRY_SECONDS} and "
            f"{MAX_EXPIRY_SECONDS}, but got {value} instead.",
            param=param,
        )
    return value


def upload_purpose(purpose: object) -> Purpose:
    """The purpose of an upload, or OpenAI's refusal (the simulator's, for the purposes it
    does not keep)."""
    if not isinstance(purpose, str) or not purpose:
        raise invalid(
            "Missing required parameter: 'purpose'.",
            param="purpose",
            code="missing_required_parameter",
        )
    if purpose not in OPENAI_PURPOSES:
        allowed = ", ".join(f"'{p}'" for p in OPENAI_PURPOSES)
        raise invalid(
            f"Invalid value for 'purpose': '{purpose}'. Supported values are: {allowed}.",
            param="purpose",
        )
    if purpose == "batch":
        return "batch"
    if purpose == "vision":
        return "vision"
    if purpose == "user_data":
        return "user_data"
    raise invalid(
        f"The simulated upstream keeps only files with purpose 'batch', 'vision' or "
        f"'user_data', not '{purpose}'.",
        param="purpose",
    )


def check_upload(purpose: Purpose, filename: str, size: int) -> None:
    """OpenAI's checks of an upload's name and size, for its purpose."""
    if size > MAX_FILE_BYTES:
        raise invalid(
            f"File is too large: {size} bytes; the maximum is {MAX_FILE_BYTES} bytes.",
            param="file",
        )
    if purpose != "batch":
        return
    if not filename.lower().endswith(".jsonl"):
        raise invalid("Invalid file format for Batch API. Must be .jsonl", param=None, code=None)
    if size > MAX_BATCH_FILE_BYTES:
        raise invalid(
            f"File is too large for the Batch API: {size} bytes; the maximum is "
            f"{MAX_BATCH_FILE_BYTES} bytes (200 MB).",
            param="file",
        )


def list_page(
    items: list[Any], query: Mapping[str, str], *, max_limit: int, default_limit: int
) -> dict[str, Any]:
    """One cursor page of objects with an `id` and `to_json()`, in the given order."""
    try:
        limit = int(query.get("limit") or default_limit)
    except ValueError as exc:
        raise invalid("Invalid 'limit': expected an integer.", param="limit") from exc
    if not 1 <= limit <= max_limit:
        raise invalid(
            f"Invalid 'limit': expected a value between 1 and {max_limit}.", param="limit"
        )
    after = query.get("after")
    if after:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    data = [item.to_json() for item in page]
    return {
        "object": "list",
        "data": data,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(items) > limit,
    }


class FileStore:
    """The simulator's files, by id, oldest first (cleared by `POST /_sim/reset`)."""

    def __init__(self) -> None:
        self._files: dict[str, StoredFile] = {}

    def add(self, stored: StoredFile) -> StoredFile:
        self._files[stored.id] = stored
        return stored

    def get(self, file_id: str, project: str | None) -> StoredFile:
        """The file `file_id`, asked for under `project`; OpenAI's 404 when there is none,
        or it is another project's."""
        stored = self._files.get(file_id)
        if stored is None or stored.project != project:
            raise not_found(file_id)
        return stored

    def delete(self, file_id: str, project: str | None) -> None:
        self.get(file_id, project)
        del self._files[file_id]

    def page(self, query: Mapping[str, str], project: str | None) -> dict[str, Any]:
        """`GET /v1/files` under `project`: filtered by `purpose`, newest first unless
        `order=asc`."""
        order = query.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise invalid(
                f"Invalid value: '{order}'. Supported values are: 'asc', 'desc'.", param="order"
            )
        purpose = query.get("purpose")
        files = [
            f
            for f in self._files.values()
            if f.project == project and (purpose is None or f.purpose == purpose)
        ]
        files.sort(key=lambda f: f.created_at)
        if order == "desc":
            files.reverse()
        return list_page(files, query, max_limit=MAX_LIST_LIMIT, default_limit=MAX_LIST_LIMIT)

    def clear(self) -> None:
        self._files.clear()
