"""A batch followed to its end, then settled one ledger row per billed line.

`BatchFollow` polls `GET /v1/batches/{id}` with the company key until the batch ended
(completed, failed, expired, cancelled), then reads its output file line by line and
settles, in one ledger transaction, one row per line that OpenAI answered 200 (its
`usage` at the model's batch rates, on the day the batch ended, as OpenAI books it) and
releases the rest of the reservation (`Ledger.settle_batch`); what each line is charged
is `proxy.web.batch_charges`'. A held reservation survives
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

import asyncio
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.core.errors import LedgerError, MalformedAnswer, RequestError
from proxy.core.models import Entry, Settlement, Usage, usd_text
from proxy.core.paths import canonical
from proxy.core.pricing import PriceBook
from proxy.core.settlement import MALFORMED_ANSWER
from proxy.core.short_strings import ShortStrings
from proxy.doors.batches import CUSTOM_ID_BYTES
from proxy.ledger import BatchLine, BilledLine, StoredObject
from proxy.upstream.answer import BROKEN_OFF
from proxy.web.batch_charges import Rows, charged, share_nanos, whole_bound, within
from proxy.web.files import read_answer
from proxy.web.follow import REFUSED, Refusals, error_code
from proxy.web.observe import observe
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
OUTPUT_GONE = "batch_output_gone"
"""The error code of the lines of a batch whose output file was deleted before it was read:
each charged its bound, flagged."""
BATCH_GONE = "batch_not_found"
"""The error code of the lines of a batch the upstream no longer finds: each charged its
bound, flagged."""
OBSERVED_AT_ONCE = 1_000
"""Lines of a settled batch counted and logged in one turn of the event loop."""
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
        if batch.get("id") != self.batch_id:
            # Another batch (a cache or proxy before the upstream answering for the wrong
            # path): settled from it, this batch would be charged another's lines, and its
            # team given another's output file.
            log.warning(
                "following %s: answered batch %r instead; will ask again",
                self.batch_id, str(batch.get("id"))[:100],
            )  # fmt: skip
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
        rows = Rows(runtime.config, entry, ended_at, self.batch_id, expected=len(lines))
        await self.write(runtime, await asyncio.to_thread(gone_rows, rows, lines, outcome), outcome)

    async def settle(self, runtime: Runtime, batch: dict[str, Any], status: str) -> None:
        """Read the ended batch's output file and settle a row per billed line. The file is
        read here and split into lines on a thread (`OutputLines`); they are parsed and
        charged, and their rows built, on a thread too (`batch_charges.charged`), with the
        configuration taken once before: a 50,000-line batch kept the event loop from every
        other request for seconds."""
        entry, config = self.entry, runtime.config
        lines = await self.priced_lines(runtime, batch.get("input_file_id"))
        ended_at = booked_at(batch.get(ENDED_AT[status]), entry.started_at, runtime.clock())
        unread: str | None = None  # why what the lines billed cannot be read, if it cannot
        read = OutputLines(
            None if lines else f"the lines of {self.input_file_id} are not on record"
        )
        output, errors = file_id_of(batch, "output_file_id"), file_id_of(batch, "error_file_id")
        try:
            if output is not None:
                await _read_file(runtime, output, self.project, read)
            elif completed_lines(batch):
                raise OutputGone(None)
        except OutputUnreadable as exc:
            # The rest of the file cannot be read (a number no usage holds): the lines
            # billed so far stand, and every other line is charged its bound, flagged.
            log.warning("batch %s: output file %s unreadable: %s", self.batch_id, output, exc)
            unread = MALFORMED_ANSWER
        except OutputGone:
            # Deleted before it was read (its team may delete it as soon as it sees it), or
            # never named though lines completed: what each line billed cannot be read, so
            # each line is charged its bound, flagged, rather than nothing or the batch
            # never being settled.
            log.warning("batch %s: its output file %s is gone", self.batch_id, output)
            read.lines, unread = [], OUTPUT_GONE
        rows = Rows(config, entry, ended_at, self.batch_id, self.prices)
        completed = completed_lines(batch)
        billed = await asyncio.to_thread(charged, rows, lines, read.lines, unread, completed)
        for file_id in (output, errors):
            if file_id is not None:  # another team's already stays theirs: settled all the same
                team = entry.team or ""
                await own_output(runtime, team, file_id, self.batch_id, self.project, ended_at)
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
            billed = [whole_bound(config, entry, replace(outcome, error_code=unread))]
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
        users: dict[str | None, Entry] = {}
        for index, line in enumerate(billed or [BilledLine(entry, outcome, ())]):
            if index and not index % OBSERVED_AT_ONCE:
                await asyncio.sleep(0)  # the loop serves between runs of lines
            if index:
                runtime.metrics.started()  # each line is a request in the metrics
            observe(runtime, line.entry, line.settlement, ())
            users.setdefault(line.entry.user, line.entry)
        # The budgets' alert thresholds, as for any settlement: the team's, and each
        # user's of its lines (once a user, not once a line).
        for first in users.values():
            runtime.alerts.settled(first)


def gone_rows(rows: Rows, lines: Mapping[str, BatchLine], outcome: Settlement) -> list[BilledLine]:
    """The rows of a batch the upstream no longer finds (on a thread, as `charged`'s): each
    line charged its bound, flagged `BATCH_GONE` (the whole reservation in one row as
    `outcome` says when its lines are not on record), held to the reservation and each
    user's lines to her share."""
    entry, config = rows.reservation, rows.config
    billed = [
        replace(b, settlement=replace(b.settlement, outcome="upstream_error", status=404))
        for b in rows.at_bounds(lines.values(), BATCH_GONE)
    ] or [whole_bound(config, entry, outcome)]
    return within(billed, entry.estimated_nanos, share_nanos(config, lines, entry))


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


async def own_output(
    runtime: Runtime, team: str, file_id: str, batch_id: Any, project: str | None, at: float
) -> None:
    """Record the output or error file `file_id` of the batch `batch_id` as `team`'s, kept
    under the batch's `project`, at OpenAI's `created_at` of it: a listing's jump reads the
    team's files by the ledger's time, which must be within `CLOCKS_APART_S` of OpenAI's,
    and OpenAI makes the file while the batch finalizes, which may be long before Tollgate
    sees it (a team may read its batch days after it ended). That time is read once, with
    one `GET /v1/files/{id}`, when the file is not yet on record (a batch read again reads
    nothing upstream); when it cannot be read (the file gone, or no answer), the file is
    recorded at `at`, when Tollgate saw it."""
    try:
        known = await runtime.ledger.stored(file_id)
        if known is not None and known.team == team:
            return
        if known is None:  # another team's is refused by `own`, whatever its time
            at = await _created_at(runtime, file_id, project) or at
        owned = StoredObject(file_id, team, "file", "batch_output", at, project=project)
        await runtime.ledger.own(owned)
    except LedgerError as exc:
        # Another team's already (OpenAI's answers are not ours to trust): the file stays
        # theirs.
        log.error("batch %s: recording %s failed: %s", batch_id, file_id, exc)


async def _created_at(runtime: Runtime, file_id: str, project: str | None) -> float | None:
    """OpenAI's `created_at` of the file `file_id` kept under `project` (None when it cannot
    be read: the file gone, or no readable answer; an id that is not one path segment is
    not asked for)."""
    path = f"/files/{file_id}"
    if canonical(path.encode()) != path:
        return None
    try:
        answer = await runtime.upstream.send(path, b"", "", (), method="GET", project=project)
        body = await read_answer(answer)
        found = json.loads(body) if answer.status == 200 else None
    except (RequestError, ValueError) as exc:
        log.debug("output file %s: its created_at not read: %s", file_id, exc)
        return None
    at = found.get("created_at") if isinstance(found, dict) and found.get("id") == file_id else None
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        log.debug("output file %s: answered %s, no created_at read", file_id, answer.status)
        return None
    return float(at)


def completed_lines(batch: dict[str, Any]) -> int:
    """How many lines the batch says completed (0 when it does not say)."""
    counts = batch.get("request_counts")
    completed = counts.get("completed") if isinstance(counts, dict) else None
    return completed if type(completed) is int and completed > 0 else 0


class OutputGone(Exception):
    """A batch's output file that the upstream no longer has (it was deleted)."""


class OutputUnreadable(Exception):
    """A batch's output file that cannot be read past some point, whenever it is read."""


FEED_BYTES = 1024 * 1024
"""How much of an output file is read (its chunks held) before they are filtered and split
into lines on a thread: a 50,000-line file's 1,800 chunks, filtered and split on the event
loop, kept it a second (much of it without a turn, the chunks already at hand), while a few
hundred hops to a thread cost little, and the file is never held whole."""


class OutputLines:
    """The lines of a batch's output file, from its chunks (on a thread, `feed` after
    `feed`), each with its long strings (images) emptied: what the file's body holds once
    they are, not the body itself (megabytes of images per line)."""

    def __init__(self, not_on_record: str | None = None) -> None:
        self.lines: list[bytes] = []
        self.not_on_record = not_on_record
        """Why a line cannot be charged (its file's lines are not on record; None: they
        are): the file is unreadable from its first line."""
        # Its custom_ids are kept whole (up to `CUSTOM_ID_BYTES`, the longest a file may
        # hold): emptied, a line would answer no line of the file, and be charged another's
        # bound.
        self._strings = ShortStrings(CUSTOM_ID_BYTES)
        self._held = b""  # the start of a line whose end is still to come

    def feed(self, chunks: Sequence[bytes]) -> None:
        """Add the lines that `chunks` complete. OutputUnreadable from a chunk that cannot
        be read (the lines before it stand), and from every later one."""
        for chunk in chunks:
            try:
                self._held += self._strings.filter(chunk)
            except MalformedAnswer as exc:  # the same bytes again: asking again cannot help
                raise OutputUnreadable(str(exc)) from None
            *complete, self._held = self._held.split(b"\n")
            self._add([line for line in complete if line.strip()])

    def end(self) -> None:
        """The file read to its end: its last line, if it ends without a newline."""
        if self._held.strip():
            self._add([self._held])
        self._held = b""

    def _add(self, lines: list[bytes]) -> None:
        if lines and self.not_on_record is not None:
            raise OutputUnreadable(self.not_on_record)  # no line to charge it as
        self.lines += lines


async def _read_file(
    runtime: Runtime, file_id: str, project: str | None, read: OutputLines
) -> None:
    """Read an upstream file into `read`, `FEED_BYTES` at a time."""
    answer = await runtime.upstream.send(
        f"/files/{file_id}/content", b"", "", (), method="GET", project=project
    )
    if answer.status != 200:
        await answer.aclose()
        if answer.status == 404:
            raise OutputGone(file_id)
        raise MalformedAnswer(f"the batch's output file {file_id} answered {answer.status}")
    pending: list[bytes] = []
    size = 0
    try:
        async for chunk in answer.chunks():
            pending.append(chunk)
            size += len(chunk)
            if size >= FEED_BYTES:
                await asyncio.to_thread(read.feed, pending)
                pending, size = [], 0
    finally:
        await answer.aclose()
    if pending:
        await asyncio.to_thread(read.feed, pending)
    read.end()


@dataclass
class LostBatchFollow(BatchFollow):
    """The batch of a create whose answer was lost, found upstream after its create was
    charged its bound, flagged (`proxy.web.batches.watch_orphan`): followed to its end as
    any batch, then its create's row is resolved to what its lines cost, each line charged
    as a followed batch's (`Ledger.resolve`, which moves every counter the row charged by
    the difference; the row stays flagged, its answer lost, with the resolution's note).
    The row was settled when its answer was lost, so the lines are not rows of their own:
    the create's one row says what the batch cost, on the day the create was sent."""

    async def write(self, runtime: Runtime, billed: list[BilledLine], outcome: Settlement) -> None:
        entry = self.entry
        cost = sum(line.settlement.cost_nanos for line in billed)
        now = runtime.clock()
        note = f"batch {self.batch_id}, found after its create's answer was lost: {len(billed)} "
        note += f"billed lines, ${usd_text(cost)}"
        before = await runtime.ledger.resolve(entry.id, cost, now, note)
        log.info(
            "create %s, charged its bound $%s when its answer was lost, resolved to its batch "
            "%s's %d billed lines: $%s",
            entry.id, usd_text(before), self.batch_id, len(billed), usd_text(cost),
        )  # fmt: skip
