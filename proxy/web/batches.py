"""`/v1/batches`: a batch reserved as the sum of its lines' bounds, followed to its end,
and settled one ledger row per billed line.

    POST /v1/batches     identify → the input file must be the team's batch file → the
                         sum of its lines' bounds (batch rates, priced at upload) reserved
                         against every budget that applies, in one transaction (429
                         `budget_exceeded` naming the budget; a batch is never downgraded)
                         → forwarded → the batch recorded as the team's, its reservation
                         held (`Ledger.hold`) and followed
    GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
                         the team's own batches only (404 for another team's id)

`BatchFollow` polls `GET /v1/batches/{id}` with the company key until the batch ended
(completed, failed, expired, cancelled), then reads its output file line by line and
settles, in one ledger transaction, one row per line that OpenAI answered 200 (its
`usage` at the model's batch rates, on the day the batch ended, as OpenAI books it) and
releases the rest of the reservation (`Ledger.settle_batch`). A held reservation survives
a restart and is adopted by a live process, and `settle_batch` writes only once, so two
replicas never settle one batch twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.budgets import Variant, allow_endpoint, decide
from proxy.core.errors import (
    InvalidRequest,
    LedgerError,
    MalformedAnswer,
    RequestError,
    UpstreamFailure,
)
from proxy.core.metering import usage_from_openai
from proxy.core.models import Charge, Entry, Estimate, ImageRequest, Settlement, Usage, usd_text
from proxy.core.parsing import json_object
from proxy.core.periods import counters, spanning, zone
from proxy.core.settings import Team
from proxy.core.short_strings import ShortStrings
from proxy.ledger import BatchLine, BilledLine, Reservation, StoredObject
from proxy.upstream import BROKEN_OFF, response_headers
from proxy.web import repeats
from proxy.web.admission import read_body
from proxy.web.files import not_found, read_answer, scoped_listing, scoped_object
from proxy.web.observe import KeyRefusals, observe
from proxy.web.pipeline import new_request_id, refuse
from proxy.web.responses import error_response
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")

CREATE_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
ENDED = ("completed", "failed", "expired", "cancelled")
ENDED_AT = {
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}
BATCH_SPAN_S = 26 * 3600.0
"""How long after its creation a batch may end (and its lines be billed): its 24-hour
window, then the time it takes to expire or finalize."""
UNKNOWN_LINE = "batch_line_unknown"
OUTPUT_GONE = "batch_output_gone"
"""The error code of the lines of a batch whose output file was deleted before it was read:
each charged its bound, flagged."""
"""The error code of an output line whose `custom_id` was not in the file priced: charged
the dearest line's bound, flagged."""


class Batches:
    """The paths under `/v1/batches`."""

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("batches")

    async def create(self, request: Request, runtime: Runtime) -> Response:
        config = runtime.config
        entry = Entry(new_request_id(), runtime.clock(), "batches")
        headers = {"x-tollgate-request-id": entry.id}
        caller = self.key_refusals.key_of(request, runtime, headers)
        if isinstance(caller, Response):
            return caller
        team, key = caller
        runtime.metrics.started()
        entry = entry.identified(team.name, team.cost_center, key.id)
        try:
            allow_endpoint(team, "batches")
            fields = json_object(
                await read_body(request, config.limits.generations_bytes, runtime.bodies)
            )
            stored, lines = await self.input_file(runtime, team.name, fields)
            first = next(iter(lines.values()))
            asked = ImageRequest(
                endpoint="batches",
                model=first.model,
                n=sum(line.n for line in lines.values()),
                quality=first.quality,
                size=first.size,
            )
            sent = {k: v for k, v in fields.items() if k in CREATE_FIELDS}
            found = None
            if config.retries.enabled and repeats.repeatable(request):
                digest = hashlib.sha256(json.dumps(sent, sort_keys=True).encode()).digest()
                found = repeats.marks(request, team.name, "batches", digest)
            entry = entry.asked(asked, *((found.content, found.key) if found else (None, None)))
            if found is not None and found.repeat:
                again = await replay_create(runtime, entry, team.name, found, headers)
                if again is not None:
                    return again
            model = config.prices.find(first.model)
            if model is None:
                raise InvalidRequest(
                    f"Model {first.model!r} of this batch file is no longer in Tollgate's price "
                    "book: upload the file again.",
                    param="input_file_id",
                )
            variant = Variant(asked, model, Estimate(stored.bound_usage, stored.bound_nanos))
            # Its lines are billed on the day the batch ends, to the users they name: the
            # bound is held in every window it may end in, and in its user's budgets.
            user = batch_user(team, lines.values())
            budgets, adds_to = spanning(config, team, user, entry.started_at, BATCH_SPAN_S)
            tz = zone(config.timezone)
            strict = replace(team, on_exhausted="reject", throttle=())
            remaining: list[int | None] = []

            def choose(totals: Any) -> Reservation:
                # A batch is reserved whole or refused: never downgraded, never throttled.
                decision = decide(strict, variant, budgets, totals, config.prices, tz)
                remaining.append(decision.remaining_nanos)
                sent = entry.sent(asked, stored.bound_nanos, "")
                return Reservation(sent, stored.bound_usage, adds_to)

            read = tuple(dict.fromkeys(a.counter for a in budgets))
            reservation = await runtime.ledger.reserve(read, choose)
        except RequestError as exc:
            return await refuse(runtime, entry, exc, headers)
        entry = reservation.entry
        headers["x-tollgate-reserved-usd"] = usd_text(entry.estimated_nanos)
        if remaining and remaining[-1] is not None:
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(remaining[-1], 0))
        project = config.project_of(team.name)
        try:
            answer = await runtime.upstream.send(
                "/batches",
                json.dumps(sent, separators=(",", ":")).encode(),
                "application/json",
                request.headers.items(),
                project=project,
            )
            body = await read_answer(answer)
        except RequestError as exc:
            await self.not_created(runtime, entry, exc, stored.id, project)
            return error_response(exc, headers)
        if 200 <= answer.status < 300:
            batch_id = _id_of(body)
            if found is not None:
                # Kept at once (a few hundred bytes): a retry of this create is answered with
                # this batch instead of creating, and paying for, a second one.
                kept = [*response_headers(answer), *headers.items()]
                store = config.retries.store_bytes
                keep = repeats.Keep(team.name, True, request.is_disconnected, store)
                try:
                    await keep.keep(runtime, entry.id, answer.status, kept, body)
                except LedgerError as exc:
                    log.error("keeping the answer of %s failed: %s", entry.id, exc)
            if batch_id is not None:
                await self.follow(runtime, entry, stored, batch_id, project)
        else:
            await release(runtime, entry, answer.status, "batch_not_created")
        return Response(body, answer.status, headers={**dict(response_headers(answer)), **headers})

    async def input_file(
        self, runtime: Runtime, team: str, fields: dict[str, Any]
    ) -> tuple[StoredObject, dict[str, BatchLine]]:
        """The batch's input file, the team's own batch file, and its priced lines."""
        unknown = sorted(set(fields) - CREATE_FIELDS)
        if unknown:
            raise InvalidRequest(f"Unknown parameter: '{unknown[0]}'.", param=unknown[0])
        file_id = fields.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise InvalidRequest(
                "Missing required parameter: 'input_file_id'.", param="input_file_id"
            )
        stored = await runtime.ledger.stored(file_id)
        if stored is None or stored.team != team:
            raise not_found("File", file_id)
        if stored.purpose != "batch" or not stored.lines:
            raise InvalidRequest(
                f"File {file_id} was not uploaded with purpose 'batch'.", param="input_file_id"
            )
        lines = await runtime.ledger.batch_lines(file_id)
        endpoint = f"/v1/images/{next(iter(lines.values())).endpoint}"
        if fields.get("endpoint") != endpoint:
            raise InvalidRequest(
                f"The file's requests are for {endpoint}: set 'endpoint' to it.", param="endpoint"
            )
        if fields.get("completion_window") != "24h":
            raise InvalidRequest(
                "Invalid 'completion_window': the only window supported is '24h'.",
                param="completion_window",
            )
        return stored, lines

    async def follow(
        self,
        runtime: Runtime,
        entry: Entry,
        stored: StoredObject,
        batch_id: str,
        project: str | None,
    ) -> None:
        """A batch created: the team's, its reservation held and followed to its end."""
        try:
            await runtime.ledger.own(
                StoredObject(
                    batch_id, entry.team or "", "batch", None, runtime.clock(),
                    stored.lines, stored.bound_nanos, stored.bound_usage, stored.id,
                )
            )  # fmt: skip
            await runtime.ledger.hold(entry.id, batch_id, project)
        except LedgerError as exc:
            log.error("recording batch %s failed: %s", batch_id, exc)
        runtime.followers.follow(entry.id, BatchFollow(entry, batch_id, stored.id, project))

    async def not_created(
        self,
        runtime: Runtime,
        entry: Entry,
        failure: RequestError,
        file_id: str,
        project: str | None,
    ) -> None:
        """No answer to the create: if it may have reached the upstream, the batch may exist;
        the upstream's list says (a batch of this input file not yet Tollgate's is followed),
        else the reservation is released."""
        if isinstance(failure, UpstreamFailure) and failure.maybe_billed:
            found = await _batch_of_file(runtime, file_id, project)
            if found is not None and await runtime.ledger.stored(found) is None:
                stored = await runtime.ledger.stored(file_id)
                if stored is not None:
                    await self.follow(runtime, entry, stored, found, project)
                    return
        await release(runtime, entry, failure.status, failure.code)

    async def listing(self, request: Request, runtime: Runtime) -> Response:
        return await scoped_listing(request, runtime, self.key_refusals, "/batches", own_outputs)

    async def one(self, request: Request, runtime: Runtime) -> Response:
        """`GET /v1/batches/{id}` and `POST …/cancel` for the batch's team."""
        response = await scoped_object(
            request,
            runtime,
            self.key_refusals,
            request.path_params["batch_id"],
            "Batch",
            own_outputs,
        )
        if request.url.path.endswith("/cancel"):
            runtime.followers.nudge()
        return response


def batch_user(team: Team, lines: Iterable[BatchLine]) -> str | None:
    """The one user the lines of a batch name (None: none, or several for a team without
    per-user budgets); InvalidRequest when they name several and the team has per-user
    budgets, which one reservation cannot hold room in."""
    users = sorted({line.user for line in lines if line.user})
    if len(users) > 1 and team.per_user:
        raise InvalidRequest(
            f"The lines of this batch name {len(users)} users ({users[0]!r}, {users[1]!r}"
            f"{', …' if len(users) > 2 else ''}) and team {team.name} has per-user budgets: "
            "a batch is reserved against one user's budgets, so send one batch per user.",
            param="input_file_id",
        )
    return users[0] if len(users) == 1 else None


async def own_outputs(runtime: Runtime, team: Team, batch: Any) -> None:
    """The output and error files of a batch shown to its team are that team's: the team
    may read them as soon as it sees them, before the follower has settled the batch."""
    if not isinstance(batch, dict):
        return
    for name in ("output_file_id", "error_file_id"):
        file_id = batch.get(name)
        if isinstance(file_id, str) and file_id:
            try:
                await runtime.ledger.own(
                    StoredObject(file_id, team.name, "file", "batch_output", runtime.clock())
                )
            except LedgerError as exc:
                log.error("recording %s of batch %s failed: %s", file_id, batch.get("id"), exc)


async def release(runtime: Runtime, entry: Entry, status: int, code: str | None) -> None:
    """A batch reservation whose batch was never created: released, at no cost."""
    now = runtime.clock()
    settled = Settlement(
        finished_at=now,
        outcome="upstream_error",
        status=status,
        error_code=code,
        latency_ms=(now - entry.started_at) * 1000,
    )
    try:
        await runtime.ledger.settle(entry.id, settled)
    except LedgerError as exc:
        log.error("ledger settle failed for %s: %s", entry.id, exc)
    observe(runtime, entry, settled, ())


async def _batch_of_file(runtime: Runtime, file_id: str, project: str | None) -> str | None:
    try:
        answer = await runtime.upstream.send(
            "/batches", b"", "", (), method="GET", query="limit=100", project=project
        )
        page = json.loads(await read_answer(answer))
        return next(
            (b["id"] for b in page.get("data", []) if b.get("input_file_id") == file_id), None
        )
    except (RequestError, ValueError, AttributeError, TypeError, KeyError):
        return None


async def replay_create(
    runtime: Runtime, entry: Entry, team: str, found: repeats.Marks, headers: dict[str, str]
) -> Response | None:
    """A repeated create answered with its first attempt's batch (a batch's reservation is
    held until it ends, so the first is awaited until its answer is kept, not settled);
    None when it must be forwarded as new (no first, or a first that failed)."""
    first = await repeats.first_of(runtime, team, found, runtime.clock())
    if first is None:
        return None
    deadline = entry.started_at + runtime.config.upstream.deadline_s
    while True:
        kept = await runtime.ledger.kept_answer(first.request_id)
        if kept is not None and kept.team == team:
            return await repeats.replayed(runtime, entry, first.request_id, kept, headers)
        if first.settled or runtime.clock() >= deadline:
            return None
        await asyncio.sleep(repeats.WAIT_S)
        first = await repeats.first_of(runtime, team, found, runtime.clock()) or first


def _id_of(body: bytes) -> str | None:
    try:
        found = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


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
            log.warning("following %s: answered %s; will ask again", self.batch_id, answer.status)
            return False
        if status not in ENDED:
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
        ended = batch.get(ENDED_AT[status]) or runtime.clock()
        ended_at = float(ended)
        billed: list[BilledLine] = []
        output = batch.get("output_file_id")
        if isinstance(output, str):
            try:
                async for raw in _file_lines(runtime, output, self.project):
                    line = billed_line(runtime, entry, lines, raw, ended_at, self.batch_id)
                    if line is not None:
                        billed.append(line)
            except OutputGone:
                # Deleted before it was read (its team may delete it as soon as it sees
                # it): what each line billed can no longer be read, so each line is
                # charged its bound, flagged, rather than the batch never being settled.
                log.warning("batch %s: its output file %s is gone", self.batch_id, output)
                billed = [
                    line_row(
                        runtime, entry, line, Charge(Usage(images=line.n), line.bound_nanos, True),
                        OUTPUT_GONE, ended_at, self.batch_id, {},
                    )
                    for line in lines.values()
                ]  # fmt: skip
        for file_id in (output, batch.get("error_file_id")):
            if isinstance(file_id, str):
                await ledger.own(
                    StoredObject(file_id, entry.team or "", "file", "batch_output", ended_at)
                )
        outcome = Settlement(
            finished_at=ended_at,
            outcome="ok" if status == "completed" else "upstream_error",
            status=200,
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
) -> BilledLine | None:
    """The row of one output line that OpenAI answered 200; None for an error line."""
    try:
        found = json.loads(raw)
        response = found.get("response") or {}
        if response.get("status_code") != 200:
            return None
        body = response.get("body") or {}
        custom_id = found.get("custom_id")
    except (ValueError, AttributeError):
        raise MalformedAnswer(f"batch {batch_id}: an output line is not JSON") from None
    config = runtime.config
    line = lines.get(custom_id) if isinstance(custom_id, str) else None
    if line is None:
        line = max(lines.values(), key=lambda priced: priced.bound_nanos)
        charge, code = Charge(Usage(), line.bound_nanos, True), UNKNOWN_LINE
    else:
        model = config.prices.find(line.model)
        usage = usage_from_openai(body.get("usage"))
        data = body.get("data")
        images = len(data) if isinstance(data, list) else line.n
        if model is None or usage is None:
            charge, code = Charge(Usage(images=images), line.bound_nanos, True), None
        else:
            charge, code = model.for_batch().charge(replace(usage, images=images)), None
    return line_row(runtime, reservation, line, charge, code, ended_at, batch_id, response)


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
    entry = replace(entry, custom_id=line.custom_id)
    settled = Settlement(
        finished_at=ended_at,
        outcome="ok",
        status=200,
        usage=charge.usage,
        cost_nanos=charge.cost_nanos,
        flagged=charge.flagged,
        upstream_request_id=response.get("request_id"),
        error_code=code,
        response_id=batch_id,
    )
    tz = zone(config.timezone)
    return BilledLine(entry, settled, counters(reservation.team or "", line.user, ended_at, tz))
