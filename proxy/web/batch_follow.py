"""A batch followed to its end, then settled one ledger row per billed line.

`BatchFollow` polls `GET /v1/batches/{id}` with the company key until the batch ended
(completed, failed, expired, cancelled), then reads its output file line by line and
settles, in one ledger transaction, one row per line that OpenAI answered 200 (its
`usage` at the model's batch rates, on the day the batch ended, as OpenAI books it) and
releases the rest of the reservation (`Ledger.settle_batch`). A held reservation survives
a restart and is adopted by a live process, and `settle_batch` writes only once, so two
replicas never settle one batch twice.

A batch the upstream keeps answering 404 (the company key moved to another organization or
project, or the batch is gone: OpenAI deletes no batch) cannot end as far as Tollgate can
see, and its reservation would be held for good: once the 404 has been the answer to
`GONE_POLLS` polls in a row over `GONE_AFTER_S` seconds, each of its lines is charged its
bound, flagged `batch_not_found`, for `tollgate ledger resolve`. A poll that fails (no
answer, a 5xx, an unreadable body) neither counts nor breaks the run; an answer that reads
as the batch starts it again.

A poll answered 401 or 403 (the company key revoked, or no longer allowed in the batch's
project) is a configuration fault the operator fixes, and the batch may still run and be
billed upstream: it is never settled for it, neither counts nor breaks a run of 404s, and is
asked again. It is logged as an error when it starts and every `REFUSED_LOG_EVERY_S` while
it lasts, and counted in the `tollgate_batches_refused` gauge until a poll reads the batch
(or a 404) again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.core.errors import LedgerError, MalformedAnswer, RequestError
from proxy.core.metering import usage_from_openai
from proxy.core.models import Charge, Entry, Outcome, Settlement, Usage, usd_text
from proxy.core.periods import counters, zone
from proxy.core.pricing import PriceBook
from proxy.core.settlement import MALFORMED_ANSWER, Bound, metered
from proxy.core.short_strings import ShortStrings
from proxy.doors.batches import CUSTOM_ID_BYTES
from proxy.doors.response_meters import read_response
from proxy.ledger import BatchLine, BilledLine, StoredObject
from proxy.upstream import BROKEN_OFF
from proxy.web.files import read_answer
from proxy.web.follow import REFUSED, Refusals, error_code
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
"""The error code of an output line whose `custom_id` was not in the file priced: charged
the dearest line's bound, flagged."""
REPEATED_LINE = "batch_line_repeated"
"""The error code of a second answer to one line (OpenAI answers each once): charged as it
reads, flagged, for reconciliation."""
OUTPUT_GONE = "batch_output_gone"
"""The error code of the lines of a batch whose output file was deleted before it was read:
each charged its bound, flagged."""
BATCH_GONE = "batch_not_found"
"""The error code of the lines of a batch the upstream no longer finds: each charged its
bound, flagged."""
GONE_POLLS = 10
GONE_AFTER_S = 900.0
"""A batch is taken as gone once `GONE_POLLS` polls in a row, the first `GONE_AFTER_S`
seconds before the last, were answered 404: a 404 that a moment of the upstream's (or of a
proxy before it) answers is not mistaken for a batch's end."""


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
    not_found: list[float] = field(default_factory=list, compare=False)
    """When each poll of the current run of 404 answers was answered (see `GONE_POLLS`)."""
    refusals: Refusals = field(default_factory=lambda: Refusals("batch"), compare=False)
    """The current run of polls answered 401 or 403."""

    async def poll(self, runtime: Runtime) -> bool:
        try:
            answer = await runtime.upstream.send(
                f"/batches/{self.batch_id}", b"", "", (), method="GET", project=self.project
            )
            body = await read_answer(answer)
        except (RequestError, *BROKEN_OFF) as exc:
            log.warning("following %s: %s; will ask again", self.batch_id, exc)
            return False
        if answer.status in REFUSED:
            self.refused(runtime, answer.status, body)
            return False
        if answer.status in (200, 404) and (polls := self.refusals.read_again(runtime)):
            log.warning(
                "following %s (%s): the upstream reads it again after %d refused polls",
                self.batch_id, self.entry.id, polls,
            )  # fmt: skip
        if answer.status == 404:
            return await self.gone(runtime)
        try:
            batch = json.loads(body)
            status = batch["status"]
        except (ValueError, KeyError, TypeError):
            log.warning("following %s: answered %s; will ask again", self.batch_id, answer.status)
            return False
        if answer.status == 200:
            self.not_found.clear()  # the upstream has it
        if status not in ENDED:
            return False
        try:
            await self.settle(runtime, batch, status)
        except (RequestError, LedgerError, MalformedAnswer, *BROKEN_OFF) as exc:
            log.error("settling batch %s failed: %s; will try again", self.batch_id, exc)
            return False
        return True

    def refused(self, runtime: Runtime, status: int, body: bytes) -> None:
        """A poll answered 401 or 403: the company key is refused, and what the batch runs
        and bills cannot be read. It is never settled for it (the upstream may still run it
        and bill its lines): logged, at most every `REFUSED_LOG_EVERY_S`, and counted."""
        refusals = self.refusals
        if not refusals.refused(runtime):
            return
        log.error(
            "following batch %s (%s, team %s): the upstream refuses the company key (%d %s) "
            "for %d polls over %.0f s; its reservation of $%s stays held, as it may still run "
            "and be billed: fix upstream.api_key or the project it was created under (%s)",
            self.batch_id, self.entry.id, self.entry.team, status, error_code(body),
            refusals.polls, refusals.lasted_s(runtime), usd_text(self.entry.estimated_nanos),
            self.project or "the key's default",
        )  # fmt: skip

    async def gone(self, runtime: Runtime) -> bool:
        """A poll answered 404: once the run of them is long enough, the batch is settled
        with each line at its bound, flagged (True); until then it is asked again."""
        self.not_found.append(runtime.clock())
        first, polls = self.not_found[0], len(self.not_found)
        if polls < GONE_POLLS or self.not_found[-1] - first < GONE_AFTER_S:
            log.warning(
                "following %s: not found (%d polls in a row, over %.0f s); will ask again",
                self.batch_id, polls, self.not_found[-1] - first,
            )  # fmt: skip
            return False
        try:
            await self.settle_gone(runtime)
        except LedgerError as exc:
            log.error("settling batch %s failed: %s; will try again", self.batch_id, exc)
            return False
        return True

    async def settle_gone(self, runtime: Runtime) -> None:
        """The batch the upstream no longer finds: what its lines billed cannot be read, so
        each is charged its bound, flagged `BATCH_GONE` (the whole reservation in one row
        when its lines are not on record), booked now, within the span held."""
        entry = self.entry
        log.error(
            "batch %s (%s): the upstream has answered 404 since %.0f s; each line charged its "
            "bound, flagged %s: see `tollgate ledger flagged`",
            self.batch_id, entry.id, runtime.clock() - self.not_found[0], BATCH_GONE,
        )  # fmt: skip
        lines = await self.priced_lines(runtime)
        ended_at = booked_at(None, entry.started_at, runtime.clock())
        outcome = Settlement(
            finished_at=ended_at,
            outcome="upstream_error",
            status=404,
            usage=Usage(images=entry.n or 0),
            cost_nanos=entry.estimated_nanos,
            flagged=True,
            upstream_request_id=self.batch_id,
            error_code=BATCH_GONE,
            latency_ms=(ended_at - entry.started_at) * 1000,
            response_id=self.batch_id,
        )
        billed = [
            replace(b, settlement=replace(b.settlement, outcome="upstream_error", status=404))
            for b in at_bounds(runtime, entry, lines.values(), BATCH_GONE, ended_at, self.batch_id)
        ] or [whole_bound(runtime, entry, outcome)]
        await self.write(runtime, within(billed, entry.estimated_nanos), outcome)

    async def settle(self, runtime: Runtime, batch: dict[str, Any], status: str) -> None:
        """Read the ended batch's output file and settle a row per billed line."""
        ledger, entry = runtime.ledger, self.entry
        lines = await self.priced_lines(runtime, batch.get("input_file_id"))
        ended_at = booked_at(batch.get(ENDED_AT[status]), entry.started_at, runtime.clock())
        billed: list[BilledLine] = []
        unread: str | None = None  # why what the lines billed cannot be read, if it cannot
        read: set[str | None] = set()
        output, errors = file_id_of(batch, "output_file_id"), file_id_of(batch, "error_file_id")
        try:
            if output is not None:
                async for raw in _file_lines(runtime, output, self.project):
                    if not lines:  # no line to charge it as (nor the dearest's bound)
                        raise OutputUnreadable(
                            f"the lines of {self.input_file_id} are not on record"
                        )
                    line = billed_line(
                        runtime, entry, lines, raw, ended_at, self.batch_id, self.prices
                    )
                    if line is None:
                        continue
                    if line.entry.custom_id in read and not line.settlement.flagged:
                        settled = replace(line.settlement, flagged=True, error_code=REPEATED_LINE)
                        line = replace(line, settlement=settled)
                    read.add(line.entry.custom_id)
                    billed.append(line)
            elif completed_lines(batch):
                raise OutputGone(None)
        except OutputUnreadable as exc:
            # The rest of the file cannot be read (a number no usage holds): the lines
            # billed so far stand, and every other line is charged its bound, flagged.
            log.warning("batch %s: output file %s unreadable: %s", self.batch_id, output, exc)
            left = [line for line in lines.values() if line.custom_id not in read]
            billed += at_bounds(runtime, entry, left, MALFORMED_ANSWER, ended_at, self.batch_id)
            unread = MALFORMED_ANSWER
        except OutputGone:
            # Deleted before it was read (its team may delete it as soon as it sees it), or
            # never named though lines completed: what each line billed cannot be read, so
            # each line is charged its bound, flagged, rather than nothing or the batch
            # never being settled.
            log.warning("batch %s: its output file %s is gone", self.batch_id, output)
            billed = at_bounds(runtime, entry, lines.values(), OUTPUT_GONE, ended_at, self.batch_id)
            unread = OUTPUT_GONE
        billed = within(billed, entry.estimated_nanos)
        for file_id in (output, errors):
            if file_id is not None:
                owned = StoredObject(
                    file_id, entry.team or "", "file", "batch_output", ended_at,
                    project=self.project,
                )  # fmt: skip
                try:
                    await ledger.own(owned)
                except LedgerError as exc:
                    # Another team's already (OpenAI's answers are not ours to trust): the
                    # file stays theirs, and the batch is settled all the same.
                    log.error("batch %s: recording %s failed: %s", self.batch_id, file_id, exc)
        outcome = Settlement(
            finished_at=ended_at,
            outcome="ok" if status == "completed" else "upstream_error",
            status=200,
            upstream_request_id=self.batch_id,
            error_code=None if status == "completed" else f"batch_{status}",
            latency_ms=(ended_at - entry.started_at) * 1000,
            response_id=self.batch_id,
        )
        if unread is not None and not billed:
            # Nor are its lines on record: the whole reservation, rather than nothing.
            billed = [whole_bound(runtime, entry, replace(outcome, error_code=unread))]
        await self.write(runtime, billed, outcome)

    async def priced_lines(self, runtime: Runtime, named: Any = None) -> dict[str, BatchLine]:
        """The lines of its input file as priced at its upload, by custom_id (none when they
        are not on record): the file recorded with the batch, else the one the upstream
        names (`named`)."""
        if self.input_file_id is None:
            stored = await runtime.ledger.stored(self.batch_id)
            found = stored.input_file_id if stored else named
            self.input_file_id = found if isinstance(found, str) and found else None
        if self.input_file_id is None:
            return {}
        return await runtime.ledger.batch_lines(self.input_file_id)

    async def write(self, runtime: Runtime, billed: list[BilledLine], outcome: Settlement) -> None:
        """Settle the reservation by the rows of `billed`, once, and count them."""
        entry = self.entry
        written = await runtime.ledger.settle_batch(entry.id, billed, outcome)
        if not written:
            return  # settled already (another replica, or an earlier try)
        for index, line in enumerate(billed or [BilledLine(entry, outcome, ())]):
            if index:
                runtime.metrics.started()  # each line is a request in the metrics
            observe(runtime, line.entry, line.settlement, ())


def booked_at(ended: Any, started_at: float, now: float) -> float:
    """When the lines of a batch created at `started_at` are booked: the end the upstream
    reports (`now` when it reports none, or no finite number), within the span its
    reservation held room in. An end reported later (the batch read late after an outage),
    or earlier than its creation (a skewed or wrong clock: 0 would book it in 1970), would
    land in a window it held no room in, and its spend would pass that window's budget.
    OpenAI reports whole seconds: an end in the second the batch was created is its own
    (every window starts on a whole second, so that second is in the windows held)."""
    if isinstance(ended, bool) or not isinstance(ended, int | float) or not math.isfinite(ended):
        ended = now
    return min(max(float(ended), math.floor(started_at)), started_at + BATCH_SPAN_S)


def file_id_of(batch: dict[str, Any], name: str) -> str | None:
    """The batch's output or error file; None when it names none (OpenAI writes an empty
    string for a file it did not write, which is no file, and no team's)."""
    found = batch.get(name)
    return found if isinstance(found, str) and found else None


def completed_lines(batch: dict[str, Any]) -> int:
    """How many lines the batch says completed (0 when it does not say)."""
    counts = batch.get("request_counts")
    completed = counts.get("completed") if isinstance(counts, dict) else None
    return completed if type(completed) is int and completed > 0 else 0


class OutputGone(Exception):
    """A batch's output file that the upstream no longer has (it was deleted)."""


class OutputUnreadable(Exception):
    """A batch's output file that cannot be read past some point, whenever it is read."""


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
    # Its custom_ids are kept whole (up to `CUSTOM_ID_BYTES`, the longest a file may hold):
    # emptied, a line would answer no line of the file, and be charged another's bound.
    strings, held = ShortStrings(CUSTOM_ID_BYTES), b""
    try:
        async for chunk in answer.chunks():
            try:
                held += strings.filter(chunk)
            except MalformedAnswer as exc:  # the same bytes again: asking again cannot help
                raise OutputUnreadable(str(exc)) from None
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
    where that is dearer.

    A line that cannot be read (not a JSON object, a `response` that is not one, or a
    `status_code` that is not a number; OpenAI writes none) may be a billed line: it is
    charged the bound of the line it names (of the dearest line when it names none),
    flagged `malformed_answer`, rather than the batch never being settled and its
    reservation held for good."""
    try:
        found = json.loads(raw)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        found = {}
    response, custom_id = found.get("response"), found.get("custom_id")
    if response is None and isinstance(found.get("error"), dict):
        return None  # not run (expired, say): `error` says why, and it is not billed
    status = response.get("status_code") if isinstance(response, dict) else None
    readable = type(status) is int
    if readable and status != 200:
        return None  # answered with an error: not billed
    answered = response if isinstance(response, dict) else {}
    body = answered.get("body")
    if not isinstance(body, dict):
        body = {}  # a billed line whose answer cannot be read: charged its bound, flagged
    code: str | None
    line = lines.get(custom_id) if isinstance(custom_id, str) else None
    if line is None:
        line = max(lines.values(), key=lambda priced: priced.bound_nanos)
        code = UNKNOWN_LINE if readable else MALFORMED_ANSWER
        charge = Charge(Usage(), line.bound_nanos, True)
    elif not readable:
        charge, code = Charge(Usage(images=line.n), line.bound_nanos, True), MALFORMED_ANSWER
    else:
        prices = runtime.config.prices
        charge, code, outcome = line_charge(prices, line, body)
        if reserved_under is not None and reserved_under is not prices:
            then = line_charge(reserved_under, line, body)
            if then[0].cost_nanos > charge.cost_nanos:
                charge, code, outcome = then
        row = line_row(runtime, reservation, line, charge, code, ended_at, batch_id, answered)
        return replace(row, settlement=replace(row.settlement, outcome=outcome))
    return line_row(runtime, reservation, line, charge, code, ended_at, batch_id, answered)


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


def at_bounds(
    runtime: Runtime,
    reservation: Entry,
    lines: Iterable[BatchLine],
    code: str,
    ended_at: float,
    batch_id: str,
) -> list[BilledLine]:
    """Each of `lines`, whose billed answer cannot be read, charged its bound, flagged
    `code`, for `tollgate ledger resolve`."""
    return [
        line_row(
            runtime, reservation, line, Charge(Usage(images=line.n), line.bound_nanos, True),
            code, ended_at, batch_id, {},
        )
        for line in lines
    ]  # fmt: skip


def whole_bound(runtime: Runtime, reservation: Entry, outcome: Settlement) -> BilledLine:
    """The one row of a batch whose lines are not on record, what they billed unread: its
    whole reservation charged, flagged, as `outcome` says otherwise."""
    ended_at = outcome.finished_at
    settled = replace(
        outcome,
        usage=Usage(images=reservation.n or 0),
        cost_nanos=reservation.estimated_nanos,
        flagged=True,
    )
    tz = zone(runtime.config.timezone)
    return BilledLine(
        replace(reservation, started_at=ended_at),
        settled,
        counters(reservation.team or "", reservation.user, ended_at, tz),
    )


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
