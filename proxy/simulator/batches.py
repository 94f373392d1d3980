"""Stored batches and how each moves through OpenAI's statuses (pure; time passed in).

A batch of delay D (`batch_delay_ms` when it was created) created at t:
    validating   t … t + D/10
    in_progress  t + D/10 … t + 9D/10; its N lines finish one by one, evenly, line i
                 (from 1) at t + D/10 + (8D/10)·i/N
    finalizing   t + 9D/10 … t + D
    completed    from t + D
A file that fails validation makes the batch `failed` at t + D/10, nothing run.
`expires_at` is t + `batch_window_ms`: a batch not finalizing by then is `expired`
there; lines finished before are billed and in the output file, the others are in the
error file as OpenAI writes them (`response: null`, `error.code` "batch_expired") and
count as failed. Cancelling (while validating, in progress or finalizing) makes it
`cancelling`, then `cancelled` D/10 later: lines finished before the cancel are billed
and in the output file, the others are in neither file. Cancelling an ended batch is a
409; cancelling a cancelling one returns it unchanged.

When a batch ends (seen by any later request to the simulator: `settle`) its files are
written, purpose `batch_output`, dated as OpenAI dates them: when it started finalizing
(cancelling), before its `completed_at` (`cancelled_at`); when it expired, then. The
output file holds the 200 lines, the error file the others; a file with no line is not
written (its id stays null). Each line that ran
is added to the billing record as its Images API request would be, with `batch_id` and
`custom_id`, at the batch's end time (OpenAI books batch spend on the UTC day the batch
completed, was cancelled or expired); the 200 ones billed, at the batch rate (`costs`).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.simulator.batch_lines import LineProblem, LineResult
from proxy.simulator.batch_responses import ResponseLineResult
from proxy.simulator.billing import BilledUsage, BillingRecord, Entry
from proxy.simulator.files import FileStore, StoredFile, new_file_id
from proxy.simulator.refusals import ApiError

Status = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
End = Literal["failed", "completed", "expired", "cancelled"]
ENDED: frozenset[Status] = frozenset({"failed", "completed", "expired", "cancelled"})
VALIDATING_SHARE = 0.1
RUNNING_SHARE = 0.8
CANCELLING_SHARE = 0.1
EXPIRED_ERROR: Mapping[str, str] = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


def _at(value: float | None) -> int | None:
    return None if value is None else int(value)


@dataclass
class StoredBatch:
    """One batch: what it was made of and what it will do; where it stands is `status(now)`."""

    id: str
    input_file_id: str
    endpoint: str
    created_at: float
    delay: float
    window: float
    model: str | None
    problems: tuple[LineProblem, ...]
    results: tuple[LineResult | ResponseLineResult, ...]
    metadata: Mapping[str, str] | None = None
    output_expires_after: int | None = None
    authorization: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    padding: int = 0
    cancelling_at: float | None = None
    ended: bool = False
    """Whether its end was settled: files written, lines recorded."""
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def project(self) -> str | None:
        """The `OpenAI-Project` it was created under (None: the key's default project)."""
        return self.headers.get("openai-project")

    @property
    def in_progress_at(self) -> float:
        return self.created_at + VALIDATING_SHARE * self.delay

    @property
    def finalizing_at(self) -> float:
        return self.created_at + (VALIDATING_SHARE + RUNNING_SHARE) * self.delay

    @property
    def expires_at(self) -> float:
        return self.created_at + self.window

    def done_at(self, index: int) -> float:
        """When line `index` (from 0) finishes running."""
        share = RUNNING_SHARE * (index + 1) / len(self.results)
        return self.in_progress_at + share * self.delay

    def end(self) -> tuple[End, float, float]:
        """How it ends, when, and the time before which its lines ran (its cut)."""
        if self.problems:
            return "failed", self.in_progress_at, self.created_at
        if self.cancelling_at is not None:
            ended = self.cancelling_at + CANCELLING_SHARE * self.delay
            return "cancelled", ended, self.cancelling_at
        if self.expires_at < self.finalizing_at:
            return "expired", self.expires_at, self.expires_at
        return "completed", self.created_at + self.delay, math.inf

    def files_at(self) -> float:
        """When its output and error files are made, as OpenAI makes them: while it
        finalizes (when it starts to), or is cancelled (when it starts cancelling), before
        the end its batch reports; when it expired, then."""
        end, end_at, cut = self.end()
        if end == "completed":
            return self.finalizing_at
        return cut if end == "cancelled" else end_at

    def status(self, now: float) -> Status:
        end, end_at, _ = self.end()
        if now >= end_at:
            return end
        if self.cancelling_at is not None:
            return "cancelling"
        if now < self.in_progress_at or end == "failed":
            return "validating"
        return "in_progress" if now < self.finalizing_at else "finalizing"

    def ran(self, until: float) -> list[LineResult | ResponseLineResult]:
        """The lines that finished before `until` (and before the cut)."""
        _, _, cut = self.end()
        until = min(until, cut)
        return [r for i, r in enumerate(self.results) if self.done_at(i) < until]

    def counts(self, now: float) -> dict[str, int]:
        status = self.status(now)
        if status in ("validating", "failed"):
            return {"total": 0, "completed": 0, "failed": 0}
        ran = self.ran(now)
        completed = sum(r.status == 200 for r in ran)
        failed = len(ran) - completed
        if status == "expired":
            failed += len(self.results) - len(ran)
        return {"total": len(self.results), "completed": completed, "failed": failed}

    def usage(self, now: float) -> dict[str, Any]:
        """The batch's `usage`: the sum of its billed lines' so far."""
        counts = [r.batch_tokens for r in self.ran(now)]
        inputs = sum(i for i, _ in counts)
        outputs = sum(o for _, o in counts)
        return {
            "input_tokens": inputs,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": outputs,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inputs + outputs,
        }

    def to_json(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        end, end_at, cut = self.end()
        reached = min(now, cut, end_at)

        def when(moment: float) -> int | None:
            return int(moment) if moment <= reached and end != "failed" else None

        def ended_at(kind: End) -> int | None:
            return int(end_at) if status == kind else None

        errors = None
        if status == "failed":
            errors = {"object": "list", "data": [p.to_json() for p in self.problems]}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created_at),
            "in_progress_at": when(self.in_progress_at),
            "expires_at": int(self.expires_at),
            "finalizing_at": when(self.finalizing_at),
            "completed_at": ended_at("completed"),
            "failed_at": ended_at("failed"),
            "expired_at": ended_at("expired"),
            "cancelling_at": _at(self.cancelling_at),
            "cancelled_at": ended_at("cancelled"),
            "request_counts": self.counts(now),
            "usage": self.usage(now),
            "metadata": dict(self.metadata) if self.metadata is not None else None,
        }


def not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch found with id '{batch_id}'.", param=None, code=None)


class BatchStore:
    """The simulator's batches, by id, oldest first."""

    def __init__(self) -> None:
        self._batches: dict[str, StoredBatch] = {}

    def put(self, batch: StoredBatch) -> None:
        self._batches[batch.id] = batch

    def get(self, batch_id: str, project: str | None) -> StoredBatch:
        """The batch `batch_id`, asked for under `project`; OpenAI's 404 when there is
        none, or it is another project's."""
        batch = self._batches.get(batch_id)
        if batch is None or batch.project != project:
            raise not_found(batch_id)
        return batch

    def newest_first(self, project: str | None) -> list[StoredBatch]:
        """The batches of `project`, newest first."""
        return [b for b in reversed(self._batches.values()) if b.project == project]

    def cancel(self, batch_id: str, now: float, project: str | None) -> StoredBatch:
        batch = self.get(batch_id, project)
        status = batch.status(now)
        if status in ENDED:
            raise ApiError(
                409,
                f"Cannot cancel a batch with status '{status}'.",
                param=None,
                code=None,
            )
        if batch.cancelling_at is None:
            batch.cancelling_at = now
        return batch

    def settle(self, now: float, record: BillingRecord, files: FileStore) -> None:
        """Write the files and record the lines of every batch that has ended."""
        for batch in self._batches.values():
            if not batch.ended and batch.status(now) in ENDED:
                _settle(batch, record, files)

    def clear(self) -> None:
        self._batches.clear()


def _settle(batch: StoredBatch, record: BillingRecord, files: FileStore) -> None:
    end, end_at, _ = batch.end()
    batch.ended = True
    if end == "failed":
        return
    ran = batch.ran(end_at)
    output: list[str] = []
    errors: list[str] = []
    for index, result in enumerate(ran):
        request_id = f"req_{uuid.uuid4().hex}"
        body = result.body(
            created=int(batch.done_at(index)), padding=batch.padding, request_id=request_id
        )
        line = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": result.line.custom_id,
            "response": {"status_code": result.status, "request_id": request_id, "body": body},
            "error": None,
        }
        (output if result.status == 200 else errors).append(json.dumps(line))
        record.append(_entry(batch, result, request_id, end_at))
    if end == "expired":
        for result in batch.results[len(ran) :]:
            line = {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": result.line.custom_id,
                "response": None,
                "error": dict(EXPIRED_ERROR),
            }
            errors.append(json.dumps(line))
    made_at = batch.files_at()
    batch.output_file_id = _write(batch, files, "output", output, made_at)
    batch.error_file_id = _write(batch, files, "error", errors, made_at)


def _write(
    batch: StoredBatch, files: FileStore, kind: str, lines: list[str], at: float
) -> str | None:
    if not lines:
        return None
    expires = batch.output_expires_after
    stored = StoredFile(
        new_file_id(),
        f"{batch.id}_{kind}.jsonl",
        "batch_output",
        "".join(f"{line}\n" for line in lines).encode(),
        int(at),
        int(at) + expires if expires is not None else None,
        project=batch.project,
    )
    return files.add(stored).id


def _entry(
    batch: StoredBatch, result: LineResult | ResponseLineResult, request_id: str, booked: float
) -> Entry:
    """The line's record entry, as its direct request's, booked when the batch ended."""
    if isinstance(result, ResponseLineResult):
        return result.entry(request_id, booked, batch.id, batch.authorization, batch.headers)
    order, tokens, raw = result.order, result.tokens, result.line.raw
    model = raw.fields.get("model")
    billed = tokens is not None and order is not None
    return Entry(
        id=request_id,
        time=booked,
        endpoint=raw.endpoint,
        model=order.model.name if order else (model if isinstance(model, str) else None),
        quality=order.quality if order else None,
        size=order.size if order else None,
        n=order.n if order else None,
        stream=False,
        status=result.status,
        billed=billed,
        usage=BilledUsage.of(tokens) if tokens is not None else None,
        images=order.n if billed and order else 0,
        authorization=batch.authorization,
        headers=batch.headers,
        params=raw.scalar_params(),
        image_count=len(order.images) if order else 0,
        batch_id=batch.id,
        custom_id=result.line.custom_id,
    )
