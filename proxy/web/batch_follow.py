"""A batch followed to its end, then settled one ledger row per billed line.

`BatchFollow` polls `GET /v1/batches/{id}` with the company key until the batch ended
(completed, failed, expired, cancelled), then reads its output file line by line and
settles, in one ledger transaction, one row per line that OpenAI answered 200 (its
`usage` at the model's batch rates, on the day the batch ended, as OpenAI books it) and
releases the rest of the reservation (`Ledger.settle_batch`). A held reservation survives
a restart and is adopted by a live process, and `settle_batch` writes only once, so two
replicas never settle one batch twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from proxy.core.errors import LedgerError, MalformedAnswer, RequestError
from proxy.core.metering import usage_from_openai
from proxy.core.models import Charge, Entry, Outcome, Settlement, Usage
from proxy.core.periods import counters, zone
from proxy.core.pricing import PriceBook
from proxy.core.settlement import MALFORMED_ANSWER, Bound, metered
from proxy.core.short_strings import ShortStrings
from proxy.doors.response_meters import read_response
from proxy.ledger import BatchLine, BilledLine, StoredObject
from proxy.upstream import BROKEN_OFF
from proxy.web.files import read_answer
from proxy.web.observe import observe
from proxy.web.pipeline import new_request_id
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")

ENDED = ("completed", "failed", "expired", "cancelled")
ENDED_AT = {
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}
BATCH_SPAN_S = 26 * 3600.0
"""How long after its creation a batch may end (and its lines be billed): its 24-hour
window, then the time it takes to expire or finalize. Its reservation holds room in every
window of that span, and its lines are booked within it."""
UNKNOWN_LINE = "batch_line_unknown"
NOT_FOUND = "not_found"
"""The status of a followed batch the upstream answers 404 for: it does not know it (the
upstream was moved to another account by a reload since it was created). What it billed
cannot be read there: each line is charged its bound, flagged `batch_not_found`."""
OUTPUT_GONE = "batch_output_gone"
"""The error code of the lines of a batch whose output file was deleted before it was read:
each charged its bound, flagged."""
"""The error code of an output line whose `custom_id` was not in the file priced: charged
the dearest line's bound, flagged."""


@dataclass
class BatchFollow:
    """A batch followed to its end, then settled by its billed lines."""

    entry: Entry
    """Its reservation's row: the team, key and cost center its lines are booked to."""
    batch_id: str
    input_file_id: str | None
    project: str | None
    """The OpenAI project the batch was created under, where it (and its output) is read:
    recorded with its held reservation, so a process that adopts it after a restart reads
    it there too (`proxy.web.follow.created_under`)."""
    prices: PriceBook | None = None
    """The price book its reservation was priced with (None: adopted after a restart, whose
    book is not known). A line is charged the dearer of its price in this book and in the
    book in force when the batch ends: a reload that lowered a rate while it ran settled
    it at the new one, below what it was reserved at (a tenth of it for a rate cut ten
    times), as no image request is; one that raised it is held to the reservation (`within`)."""

    async def poll(self, runtime: Runtime) -> bool:
        try:
            answer = await runtime.upstream.send(
                f"/batches/{self.batch_id}", b"", "", (), method="GET", project=self.project
            )
            body = await read_answer(answer)
        except (RequestError, *BROKEN_OFF) as exc:
            log.warning("following %s: %s; will ask again", self.batch_id, exc)
            return False
        try:
            batch = json.loads(body)
            status = batch["status"]
        except (ValueError, KeyError, TypeError):
            if answer.status != 404:
                log.warning(
                    "following %s: answered %s; will ask again", self.batch_id, answer.status
                )
                return False
            # Asked again, it held its reservation for good (and logged every second).
            log.error(
                "following %s: the upstream does not know it (404); each line charged its "
                "bound, flagged batch_not_found: see `tollgate ledger flagged`",
                self.batch_id,
            )
            batch, status = {}, NOT_FOUND
        if status not in ENDED and status != NOT_FOUND:
            return False
        try:
            await self.settle(runtime, batch, status)
        except (RequestError, LedgerError, MalformedAnswer, *BROKEN_OFF) as exc:
            log.error("settling batch %s failed: %s; will try again", self.batch_id, exc)
            return False
        return True

    async def settle(self, runtime: Runtime, batch: dict[str, Any], status: str) -> None:
        """Read the ended batch's output file and settle a row per billed line."""
        ledger, entry = runtime.ledger, self.entry
        if self.input_file_id is None:
            stored = await ledger.stored(self.batch_id)
            self.input_file_id = stored.input_file_id if stored else batch.get("input_file_id")
        lines = await ledger.batch_lines(self.input_file_id or "")
        ended = batch.get(ENDED_AT.get(status, "")) or runtime.clock()
        # Booked within the span its reservation held room in: an end reported later (or
        # none, the batch read late after an outage) would land in a window it held none in.
        ended_at = min(float(ended), entry.started_at + BATCH_SPAN_S)
        billed: list[BilledLine] = []
        output = batch.get("output_file_id")
        if status == NOT_FOUND:
            billed = at_bound(runtime, entry, lines, f"batch_{NOT_FOUND}", ended_at, self.batch_id)
        elif isinstance(output, str):
            try:
                async for raw in _file_lines(runtime, output, self.project):
                    line = billed_line(
                        runtime, entry, lines, raw, ended_at, self.batch_id, self.prices
                    )
                    if line is not None:
                        billed.append(line)
            except OutputGone:
                # Deleted before it was read (its team may delete it as soon as it sees
                # it): what each line billed can no longer be read, so each line is
                # charged its bound, flagged, rather than the batch never being settled.
                log.warning("batch %s: its output file %s is gone", self.batch_id, output)
                billed = at_bound(runtime, entry, lines, OUTPUT_GONE, ended_at, self.batch_id)
        billed = within(billed, entry.estimated_nanos)
        for file_id in (output, batch.get("error_file_id")):
            if isinstance(file_id, str):
                team = entry.team or ""
                owned = StoredObject(
                    file_id, team, "file", "batch_output", ended_at, project=self.project
                )
                await ledger.own(owned)
        outcome = Settlement(
            finished_at=ended_at,
            outcome="ok" if status == "completed" else "upstream_error",
            status=404 if status == NOT_FOUND else 200,
            upstream_request_id=self.batch_id,
            error_code=None if status == "completed" else f"batch_{status}",
            latency_ms=(ended_at - entry.started_at) * 1000,
            response_id=self.batch_id,
        )
        written = await ledger.settle_batch(entry.id, billed, outcome)
        if not written:
            return  # settled already (another replica, or an earlier try)
        for index, line in enumerate(billed or [BilledLine(entry, outcome, ())]):
            if index:
                runtime.metrics.started()  # each line is a request in the metrics
            observe(runtime, line.entry, line.settlement, ())


def at_bound(
    runtime: Runtime,
    reservation: Entry,
    lines: dict[str, BatchLine],
    code: str,
    ended_at: float,
    batch_id: str,
) -> list[BilledLine]:
    """Every line of a batch whose billed lines cannot be read, charged its bound, flagged
    `code`, for `tollgate ledger resolve`."""
    return [
        line_row(
            runtime, reservation, line, Charge(Usage(images=line.n), line.bound_nanos, True),
            code, ended_at, batch_id, {},
        )
        for line in lines.values()
    ]  # fmt: skip


class OutputGone(Exception):
    """A batch's output file that the upstream no longer has (it was deleted)."""


async def _file_lines(runtime: Runtime, file_id: str, project: str | None) -> Any:
    """The lines of an upstream file, each with its long strings (images) emptied."""
    answer = await runtime.upstream.send(
        f"/files/{file_id}/content", b"", "", (), method="GET", project=project
    )
    if answer.status != 200:
        await answer.aclose()
        if answer.status == 404:
            raise OutputGone(file_id)
        raise MalformedAnswer(f"the batch's output file {file_id} answered {answer.status}")
    strings, held = ShortStrings(), b""
    try:
        async for chunk in answer.chunks():
            held += strings.filter(chunk)
            *complete, held = held.split(b"\n")
            for line in complete:
                if line.strip():
                    yield line
    finally:
        await answer.aclose()
    if held.strip():
        yield held


def billed_line(
    runtime: Runtime,
    reservation: Entry,
    lines: dict[str, BatchLine],
    raw: bytes,
    ended_at: float,
    batch_id: str,
    reserved_under: PriceBook | None = None,
) -> BilledLine | None:
    """The row of one output line that OpenAI answered 200; None for an error line. Charged
    at the book in force, or at `reserved_under` (the book its batch was reserved with)
    where that is dearer."""
    try:
        found = json.loads(raw)
        response = found.get("response") or {}
        if response.get("status_code") != 200:
            return None
        body = response.get("body")
        custom_id = found.get("custom_id")
    except (ValueError, AttributeError):
        raise MalformedAnswer(f"batch {batch_id}: an output line is not JSON") from None
    if not isinstance(body, dict):
        body = {}  # a billed line whose answer cannot be read: charged its bound, flagged
    line = lines.get(custom_id) if isinstance(custom_id, str) else None
    if line is None:
        line = max(lines.values(), key=lambda priced: priced.bound_nanos)
        charge = Charge(Usage(), line.bound_nanos, True)
        return line_row(
            runtime, reservation, line, charge, UNKNOWN_LINE, ended_at, batch_id, response
        )
    charge, code, outcome = line_charge(runtime.config.prices, line, body)
    if reserved_under is not None and reserved_under is not runtime.config.prices:
        then = line_charge(reserved_under, line, body)
        if then[0].cost_nanos > charge.cost_nanos:
            charge, code, outcome = then
    row = line_row(runtime, reservation, line, charge, code, ended_at, batch_id, response)
    return replace(row, settlement=replace(row.settlement, outcome=outcome))


def line_charge(
    prices: PriceBook, line: BatchLine, body: dict[str, Any]
) -> tuple[Charge, str | None, Outcome]:
    """What a line answered 200 costs at `prices`, its error code and outcome."""
    if line.mainline is not None:
        return response_charge(prices, line, body)
    model = prices.find(line.model)
    usage = usage_from_openai(body.get("usage"))
    data = body.get("data")
    images = len(data) if isinstance(data, list) else line.n
    if model is None or usage is None:
        return Charge(Usage(images=images), line.bound_nanos, True), None, "ok"
    return model.for_batch().charge(replace(usage, images=images)), None, "ok"


def response_charge(
    prices: PriceBook, line: BatchLine, body: Any
) -> tuple[Charge, str | None, Outcome]:
    """What a `/v1/responses` line answered 200 costs: its Responses object metered as the
    Responses door meters a whole response (`read_response`, `settlement.metered`: its
    mainline tokens and its image tool's, each model at its batch rates), with its outcome
    and error code. Without trustworthy usage (none, unreadable, images made but no
    `tool_usage`, or a model gone from the price book): its bound, flagged."""
    mainline = prices.find_mainline(line.mainline or "")
    model = prices.find(line.model)
    if mainline is None or not mainline.accepts_batch or model is None:
        return Charge(Usage(images=line.n), line.bound_nanos, True), None, "ok"
    bound = Bound(
        model.for_batch() if model.accepts_batch else model,
        line.n, line.quality, line.size, line.bound_nanos, Usage(), mainline.for_batch(),
    )  # fmt: skip
    try:
        verdict = metered(bound, read_response(body))
    except MalformedAnswer:
        return bound.charged(), MALFORMED_ANSWER, "ok"
    return verdict.charge, verdict.error_code, verdict.outcome


def within(billed: list[BilledLine], reserved_nanos: int) -> list[BilledLine]:
    """`billed`, each line's cost capped at what is left of the batch's reservation after
    the lines before it (a capped line is flagged, for reconciliation). A batch is priced at
    the rates in force when it is created; a reload that raised a rate while it ran would
    otherwise settle it at the new one, past what was reserved and past a hard limit."""
    left, found = reserved_nanos, []
    for line in billed:
        settled = line.settlement
        if settled.cost_nanos > left:
            settled = replace(settled, cost_nanos=left, flagged=True)
            line = replace(line, settlement=settled)
        left -= settled.cost_nanos
        found.append(line)
    return found


def line_row(
    runtime: Runtime,
    reservation: Entry,
    line: BatchLine,
    charge: Charge,
    code: str | None,
    ended_at: float,
    batch_id: str,
    response: dict[str, Any],
) -> BilledLine:
    """The row of billed line `line`, charged `charge`, booked when the batch ended."""
    config = runtime.config
    entry = Entry(
        new_request_id(), ended_at, "batches", reservation.team, reservation.cost_center,
        reservation.key_id, line.user, line.model, line.model, line.quality, line.quality,
        line.size, line.size, line.n, line.n, False, line.bound_nanos,
    )  # fmt: skip
    entry = replace(entry, custom_id=line.custom_id, mainline_model=line.mainline)
    settled = Settlement(
        finished_at=ended_at,
        outcome="ok",
        status=200,
        usage=charge.usage,
        cost_nanos=charge.cost_nanos,
        mainline_cost_nanos=charge.mainline_nanos,
        flagged=charge.flagged,
        upstream_request_id=response.get("request_id"),
        error_code=code,
        response_id=batch_id,
    )
    tz = zone(config.timezone)
    return BilledLine(entry, settled, counters(reservation.team or "", line.user, ended_at, tz))
