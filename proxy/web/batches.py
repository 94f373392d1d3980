"""`/v1/batches`: a batch reserved as the sum of its lines' bounds, followed to its end,
and settled one ledger row per billed line.

    POST /v1/batches     identify → the input file must be the team's batch file → the
                         sum of its lines' bounds (batch rates, priced at upload) reserved
                         against every budget that applies, each user's share of it in
                         that user's counters and budgets, in one transaction (429
                         `budget_exceeded` naming the budget; a batch is never downgraded)
                         → forwarded → the batch recorded as the team's, its reservation
                         held (`Ledger.hold`) and followed
    GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
                         the team's own batches only (404 for another team's id); one
                         batch under the project it was created under, a listing under
                         the team's project now (`proxy.web.projects`)

A batch is created in the team's project now, from an input file uploaded there: a file
uploaded under the team's former project is refused (400 `object_in_other_project`,
`proxy.web.projects.same_project`). OpenAI would not find it in the new project, and a
batch created in the former one, where the file is, would be billed to a project the team
no longer maps to.

A batch created is followed to its end by `proxy.web.batch_follow.BatchFollow`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.core.budgets import Variant, allow_endpoint, decide, endpoint_path, share_fits
from proxy.core.errors import (
    InvalidRequest,
    LedgerError,
    RepeatArrived,
    RequestError,
    ServiceUnavailable,
    UpstreamFailure,
    UpstreamUnavailable,
)
from proxy.core.models import Counter, Entry, Estimate, ImageRequest, Settlement, Usage, usd_text
from proxy.core.parsing import json_object
from proxy.core.periods import Applied, spanning, zone
from proxy.core.settings import Config, Team
from proxy.doors.batches import bound_now, user_shares
from proxy.ledger import (
    BatchLine,
    FirstAttempt,
    KeptAnswer,
    RepeatGuard,
    Reservation,
    StoredObject,
    UserShare,
    codecs,
)
from proxy.upstream import response_headers
from proxy.web import repeats
from proxy.web.admission import read_body
from proxy.web.batch_follow import BATCH_SPAN_S, BatchFollow, LostBatchFollow, own_output
from proxy.web.files import BATCHES, not_found, read_answer, scoped_listing, scoped_object
from proxy.web.gateway import path_of
from proxy.web.in_force import Caller, decided, still_in_force
from proxy.web.observe import KeyRefusals, observe
from proxy.web.pipeline import new_request_id, refuse, unavailable
from proxy.web.projects import created_under, same_project
from proxy.web.responses import error_response
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")

CREATE_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)


class Batches:
    """The paths under `/v1/batches`."""

    def __init__(self) -> None:
        self.key_refusals = KeyRefusals("batches")

    async def create(self, request: Request, runtime: Runtime) -> Response:
        entry = Entry(new_request_id(), runtime.clock(), "batches")
        headers = {"x-tollgate-request-id": entry.id}
        holder = self.key_refusals.key_of(request, runtime, headers)
        if isinstance(holder, Response):
            return holder
        team, key = holder
        runtime.metrics.started()
        entry = entry.identified(team.name, team.cost_center, key.id)
        caller = Caller(runtime, team, key, entry, headers)
        try:
            allow_endpoint(team, "batches")
            limit = runtime.config.limits.generations_bytes
            body = await read_body(request, limit, runtime.bodies)
            admitted = await decided(request, caller, partial(self.decide_for, request, body))
        except RequestError as exc:
            return await refuse(caller.runtime, caller.entry, exc, headers)
        except LedgerError as exc:
            return unavailable(caller.runtime, caller.entry, exc, headers)
        except Exception:
            # A fault of Tollgate's own, answered 500 (and logged) by the Gateway: the create
            # is no longer in flight, whatever raised.
            caller.runtime.metrics.abandoned()
            raise
        if isinstance(admitted, Response):
            return admitted  # a repeat, answered with its first attempt's batch
        runtime, team, config = caller.runtime, caller.team, caller.runtime.config
        entry, stored, bound = admitted.reservation.entry, admitted.stored, admitted.bound
        sent, found, project = admitted.sent, admitted.found, admitted.project
        headers["x-tollgate-reserved-usd"] = usd_text(entry.estimated_nanos)
        if admitted.remaining is not None:
            headers["x-tollgate-budget-remaining-usd"] = usd_text(max(admitted.remaining, 0))
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
            adopted = await self.not_created(runtime, entry, exc, stored.id, project, bound.usage)
            failed = error_response(exc, headers)
            if adopted and found is not None:
                # Its batch was made and is followed, its reservation held: a repeat of this
                # create finds it neither kept nor settled, and would make a second batch
                # once it stopped waiting. It is answered this failure instead.
                store = config.retries.store_bytes
                keep = repeats.Keep(team.name, True, request.is_disconnected, store)
                try:
                    await keep.keep(
                        runtime, entry.id, failed.status_code,
                        list(failed.headers.items()), bytes(failed.body),
                    )  # fmt: skip
                except LedgerError as keep_failed:
                    log.error("keeping the answer of %s failed: %s", entry.id, keep_failed)
            return failed
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
                await self.follow(runtime, entry, stored, batch_id, project, bound.usage)
            else:
                # A success whose batch cannot be read (no id): the batch was made, and runs
                # and bills. Found among the upstream's and followed, or its bound charged,
                # flagged, as a create that got no answer; never a reservation left unheld.
                unreadable = UpstreamUnavailable(
                    "The upstream answered the create with a batch that has no readable id.",
                    maybe_billed=True,
                )
                await self.not_created(runtime, entry, unreadable, stored.id, project, bound.usage)
        elif answer.status < 500 or not await self.made_anyway(
            runtime, entry, stored, project, answer.status, bound.usage
        ):
            await release(runtime, entry, answer.status, "batch_not_created")
        return Response(body, answer.status, headers={**dict(response_headers(answer)), **headers})

    async def decide_for(
        self, request: Request, body: bytes, caller: Caller
    ) -> BatchAdmitted | Response:
        """The create, whose `body` is in, decided for `caller` under its runtime: its input
        file checked and its lines bounded under the team's policy, the bound reserved
        against every budget that applies (`caller.entry` the row so far); or, when it
        repeats a create already answered, that answer. Runs again whole when a reload
        overtakes it (`decided`)."""
        runtime, team = caller.runtime, caller.team
        config = runtime.config
        allow_endpoint(team, "batches")
        fields = json_object(body)
        stored, lines = await self.input_file(runtime, team.name, fields)
        project = config.project_of(team.name)
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
        entry = caller.entry = caller.entry.asked(
            asked, *((found.content, found.key) if found else (None, None))
        )
        guard: RepeatGuard | None = None
        if found is not None and found.repeat:
            again = await replay_create(runtime, entry, team.name, found, caller.headers, stored)
            if isinstance(again, Response):
                return again
            guard = again
        # After a replay: a repeat of a create answered before the team's project
        # changed is still answered with its batch.
        same_project(runtime, stored, project, f"File '{stored.id}'")
        model = config.prices.find(first.model)
        if model is None:
            raise InvalidRequest(
                f"Model {first.model!r} of this batch file is no longer in Tollgate's price "
                "book: upload the file again.",
                param="input_file_id",
            )
        # Checked and bounded again under the configuration in force now: a reload since
        # the upload may have tightened the team's policy or raised a rate.
        # Its lines are billed on the day the batch ends, to the users they name: the
        # bound is held in every window it may end in and, for a team with per-user
        # budgets, each user's share of it in that user's counters of those windows,
        # against that user's budgets. (Held for a team without them too, a file naming
        # 50,000 users kept the event loop 3 s longer on 200,000 counter writes.) The
        # bound, the shares and each user's budgets walk every line or user: on a thread
        # (`BatchPlan`), so that the event loop serves meanwhile.
        plan = await asyncio.to_thread(
            BatchPlan.of, team, config, lines.values(), stored, entry.started_at
        )
        bound, shares, budgets, per_user = plan.bound, plan.shares, plan.budgets, plan.users
        variant = Variant(asked, model, bound)
        tz = zone(config.timezone)
        strict = replace(team, on_exhausted="reject", throttle=())
        remaining: list[int | None] = []
        periods = tuple(dict.fromkeys(b.period for b in team.per_user))
        # What it reserves and writes, whatever the totals: worked out before its
        # transaction, which only reads, decides and writes it.
        held = Reservation(
            entry.sent(asked, bound.cost_nanos, ""),
            bound.usage,
            plan.adds_to,
            project=project,
            shares=plan.held,
            share_periods=periods,
        )
        if plan.held:
            held = replace(held, written=await asyncio.to_thread(codecs.written, held))

        def choose(totals: Any) -> Reservation:
            still_in_force(runtime)
            # A batch is reserved whole or refused: never downgraded, never throttled.
            # Each user's share is decided as a direct request of that user costing it
            # would be (`share_fits`; `decide` says why one does not fit).
            decision = decide(strict, variant, budgets, totals, config.prices, tz)
            least = decision.remaining_nanos
            for user, applied in per_user:
                blocker, left = share_fits(shares[user], applied, totals)
                if blocker is not None:
                    share = Variant(replace(asked, user=user), model, shares[user])
                    found = decide(strict, share, applied, totals, config.prices, tz)
                    left = found.remaining_nanos
                if left is not None and (least is None or left < least):
                    least = left
            remaining.append(least)
            return held

        for _ in range(repeats.RACES):
            try:
                reservation = await runtime.ledger.reserve(plan.read, choose, guard=guard)
            except RepeatArrived:
                # Another attempt of this create reserved first (on another worker or
                # replica): answered with its batch, never a second one.
                assert found is not None
                again = await replay_create(
                    runtime, entry, team.name, found, caller.headers, stored
                )
                if isinstance(again, Response):
                    return again
                guard = again
                continue
            return BatchAdmitted(reservation, stored, sent, found, bound, remaining[-1], project)
        raise ServiceUnavailable(
            "Attempts of this batch create keep arriving together; retry shortly."
        )

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
        endpoint = endpoint_path(next(iter(lines.values())).endpoint)
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
        usage: Usage,
    ) -> None:
        """A batch created, its create answered: the team's, its reservation held and
        followed to its end. The batch is claimed for it in the ledger (`Ledger.claim`): a
        create whose answer was lost may have taken it for its own meanwhile (when its look
        outlasted its wait for this answer). Then this create's reservation is the one left
        without a batch, and looks for one as a create whose answer was lost: the batch the
        other made, if it made one (`seek`); else it is charged its bound, flagged, and the
        upstream watched for the batch it may still make (`usage`: its bound's). A batch is
        never followed, and charged, by two reservations."""
        try:
            claimed = await runtime.ledger.claim(entry.id, batch_id, project)
        except LedgerError as exc:
            log.error("recording batch %s failed: %s", batch_id, exc)
            claimed = True  # followed all the same, as before the ledger could claim it
        if claimed:
            await self.following(runtime, entry, stored, batch_id, project, None)
            return
        log.warning(
            "batch %s, the answer to create %s, was taken by a create whose answer was "
            "lost: this create looks for the batch that one made",
            batch_id, entry.id,
        )  # fmt: skip
        lost = UpstreamUnavailable(
            f"The batch made, {batch_id}, is followed for another create of its file.",
            maybe_billed=True,
        )
        await self.not_created(runtime, entry, lost, stored.id, project, usage)

    async def following(
        self,
        runtime: Runtime,
        entry: Entry,
        stored: StoredObject,
        batch_id: str,
        project: str | None,
        created_at: float | None,
    ) -> None:
        """The batch `batch_id`, claimed for `entry`'s reservation: the team's, followed to
        its end. It is recorded at `created_at` when given (OpenAI's time of a batch found
        after its create's answer was lost, which may be minutes before now), else now."""
        at = runtime.clock() if created_at is None else created_at
        try:
            await runtime.ledger.own(
                StoredObject(
                    batch_id, entry.team or "", "batch", None, at,
                    stored.lines, stored.bound_nanos, stored.bound_usage, stored.id, project,
                )
            )  # fmt: skip
        except LedgerError as exc:
            log.error("recording batch %s failed: %s", batch_id, exc)
        followed = BatchFollow(entry, batch_id, stored.id, project, prices=runtime.config.prices)
        runtime.followers.follow(entry.id, followed)

    async def seek(
        self, runtime: Runtime, entry: Entry, stored: StoredObject, project: str | None
    ) -> str | None:
        """The batch a create of the input file `stored` whose answer was lost made, claimed
        for its reservation and followed: its id; None when the upstream lists none that
        can be it. Its row is marked as looking first, then it waits for the other creates
        of the team still waiting for their answer (`await_answers`): a batch listed may be
        one of theirs, which their answer gives them. Then it takes the oldest batch of the
        file created since it was sent (`ORPHAN_SKEW_S` allowed) that no reservation holds
        and that is no one's, claimed atomically (`Ledger.claim`): two creates looking at
        once each take a batch of their own, and a batch is never followed twice. Which of
        the creates' batches each takes does not matter: they are of one file, one team.
        LedgerError when whose a batch is cannot be read."""
        team = entry.team or ""
        try:
            await runtime.ledger.seeking(entry.id, MAYBE_CREATED)
        except LedgerError as exc:
            log.error("marking create %s as looking for its batch failed: %s", entry.id, exc)
        await await_answers(runtime, team, entry.id)
        found = await batches_of_file(runtime, stored.id, project, entry.started_at - ORPHAN_SKEW_S)
        for batch_id, created_at in found:
            if await runtime.ledger.stored(batch_id) is not None:
                continue  # already someone's: answered to its create, or found before
            if not await runtime.ledger.claim(entry.id, batch_id, project):
                continue
            log.warning(
                "batch create %s got no answer it could read, and the upstream lists a "
                "batch of its file, %s: followed as the create's",
                entry.id, batch_id,
            )  # fmt: skip
            await self.following(runtime, entry, stored, batch_id, project, created_at)
            return batch_id
        return None

    async def made_anyway(
        self,
        runtime: Runtime,
        entry: Entry,
        stored: StoredObject,
        project: str | None,
        status: int,
        usage: Usage,
    ) -> bool:
        """A create answered with a server error (5xx, `status`): a gateway in front of the
        upstream may answer so after the batch was made, which then runs and bills. When the
        upstream lists a batch of the input file `stored` that is no one's yet, it is the
        team's and is followed, its reservation held (the client, told the create failed,
        finds it in its list); whether one was found. None found: the create failed, as
        the upstream said. A ledger that cannot say whether the batch found is already
        someone's: the create may have made it, and is charged its bound (`usage`),
        flagged, as a create that got no answer (True); never a 500 of Tollgate's own."""
        try:
            return await self.seek(runtime, entry, stored, project) is not None
        except LedgerError as exc:
            log.error(
                "batch create %s was answered a server error, and whether a batch of its "
                "file is already recorded could not be read: charged its bound: %s",
                entry.id, exc,
            )  # fmt: skip
            await release(runtime, entry, status, MAYBE_CREATED, charged=usage)
            return True

    async def not_created(
        self,
        runtime: Runtime,
        entry: Entry,
        failure: RequestError,
        file_id: str,
        project: str | None,
        usage: Usage,
    ) -> bool:
        """No answer to the create: if it may have reached the upstream, the batch may exist;
        the upstream's list says (a batch of this input file not yet Tollgate's is followed).
        When it does not, the upstream may still be creating it (it reads the whole file
        first) and would bill its lines: the bound is charged, flagged for reconciliation, as
        any request that may have been billed, and the batch, once listed, is the team's
        (`watch_orphan`). Else the reservation is released. Whether the batch was found and
        is followed."""
        if isinstance(failure, UpstreamFailure) and failure.maybe_billed:
            stored = None
            try:
                stored = await runtime.ledger.stored(file_id)
                if stored is not None and await self.seek(runtime, entry, stored, project):
                    return True
            except LedgerError as exc:
                # Whose a batch found is cannot be read: charged its bound, as if none
                # were found.
                log.error("looking for the batch of file %s failed: %s", file_id, exc)
            await release(runtime, entry, failure.status, failure.ledger_code, charged=usage)
            if stored is not None and entry.team:
                # The upstream may still be reading the file: the batch it makes is the
                # team's once it is listed, so that the team reads what it paid for.
                watch_orphan(runtime, entry, stored)
            return False
        await release(runtime, entry, failure.status, failure.code)
        return False

    async def listing(self, request: Request, runtime: Runtime) -> Response:
        return await scoped_listing(request, runtime, self.key_refusals, BATCHES, own_outputs)

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
        if path_of(request).endswith("/cancel"):
            runtime.followers.nudge()
        return response


def bound_and_shares(
    team: Team, config: Config, lines: Collection[BatchLine], stored: StoredObject
) -> tuple[Estimate, dict[str, Estimate]]:
    """The bound of a batch of `lines` from the file `stored` under `config` now
    (`bound_now`), and each user's share of it when `team` has per-user budgets."""
    bound = bound_now(team, config, lines, Estimate(stored.bound_usage, stored.bound_nanos))
    return bound, user_shares(lines, bound) if team.per_user else {}


@dataclass(frozen=True, slots=True)
class BatchAdmitted:
    """A batch create decided and reserved: what forwarding it needs."""

    reservation: Reservation
    stored: StoredObject
    """Its input file."""
    sent: dict[str, Any]
    """The fields forwarded."""
    found: repeats.Marks | None
    """What its repeats match, when it may be repeated: its answer is then kept for them."""
    bound: Estimate
    remaining: int | None
    """The least room left, in nanodollars, in the budgets it was decided against."""
    project: str | None
    """The OpenAI project it is created under."""


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What a batch's reservation decides on and writes that its totals do not change:
    worked out before its transaction, off the event loop (`of`), each a pass over the
    lines or the users they name."""

    bound: Estimate
    shares: dict[str, Estimate]
    """Each user's share of `bound` (`bound_and_shares`)."""
    budgets: tuple[Applied, ...]
    """The team's and organization's budgets of every window the batch may end in."""
    adds_to: tuple[Counter, ...]
    users: list[tuple[str, tuple[Applied, ...]]]
    """Each user with her budgets of those windows (`users_budgets`)."""
    held: tuple[UserShare, ...]
    """The shares as its reservation holds them."""
    read: tuple[Counter, ...]
    """Every counter its decisions read."""

    @classmethod
    def of(
        cls,
        team: Team,
        config: Config,
        lines: Collection[BatchLine],
        stored: StoredObject,
        start: float,
    ) -> BatchPlan:
        """The plan of a batch of `lines` from `stored`, created at `start`."""
        bound, shares = bound_and_shares(team, config, lines, stored)
        budgets, adds_to = spanning(config, team, None, start, BATCH_SPAN_S)
        users = users_budgets(config, team, shares, start)
        held = tuple(UserShare(u, e.cost_nanos, e.usage) for u, e in shares.items())
        read = [a.counter for a in budgets]
        read += [a.counter for _, applied in users for a in applied]
        return cls(bound, shares, budgets, adds_to, users, held, tuple(dict.fromkeys(read)))


def users_budgets(
    config: Config, team: Team, shares: Mapping[str, Any], start: float
) -> list[tuple[str, tuple[Applied, ...]]]:
    """Each user of `shares` with the per-user budgets of every window a batch created at
    `start` may end in (none when the team has no per-user budgets). The windows are the
    same for every user: worked out once, then named for each, so a batch naming thousands
    of users costs a pass over them."""
    if not team.per_user or not shares:
        return []
    probe = next(iter(shares))
    found, _ = spanning(config, team, probe, start, BATCH_SPAN_S)
    own = tuple(a for a in found if a.counter.scope == "user")
    return [
        (user, tuple(replace(a, counter=replace(a.counter, user=user)) for a in own))
        for user in shares
    ]


async def own_outputs(runtime: Runtime, team: Team, batch: Any, project: str | None) -> None:
    """The output and error files of a batch shown to its team are that team's: the team
    may read them as soon as it sees them, before the follower has settled the batch.
    OpenAI keeps them in the batch's project, where the batch was just read (`project`):
    they are recorded there, at OpenAI's time of each (`own_output`)."""
    if not isinstance(batch, dict):
        return
    for name in ("output_file_id", "error_file_id"):
        file_id = batch.get(name)
        if isinstance(file_id, str) and file_id:
            await own_output(runtime, team.name, file_id, batch.get("id"), project, runtime.clock())


MAYBE_CREATED = "batch_maybe_created"
"""The error code of a create answered a server error that may have made its batch."""


async def release(
    runtime: Runtime, entry: Entry, status: int, code: str | None, *, charged: Usage | None = None
) -> None:
    """A batch reservation whose batch was never created: released, at no cost (`charged`:
    the bound usage of one that may have been, charged its bound, flagged)."""
    now = runtime.clock()
    settled = Settlement(
        finished_at=now,
        outcome="upstream_error",
        status=status,
        usage=charged or Usage(),
        cost_nanos=entry.estimated_nanos if charged else 0,
        flagged=charged is not None,
        error_code=code,
        latency_ms=(now - entry.started_at) * 1000,
    )
    try:
        await runtime.ledger.settle(entry.id, settled)
    except LedgerError as exc:
        log.error("ledger settle failed for %s: %s", entry.id, exc)
    observe(runtime, entry, settled, ())
    runtime.alerts.settled(entry)  # charged its bound: a threshold it crosses is announced


LIST_PAGES = 20
"""How many pages of the upstream's batches (100 each) a look for a create's batch reads at
most, back to the create's send time: a team that made more than 2,000 batches since then
has its oldest of them left out."""
ANSWER_POLL_S = 0.2
"""How often a create whose answer was lost asks whether the other creates of its team
still wait for theirs (`await_answers`)."""


async def batches_of_file(
    runtime: Runtime, file_id: str, project: str | None, since: float
) -> list[tuple[str, float | None]]:
    """The upstream's batches of the input file `file_id` created at or after `since`,
    oldest first: each one's id and `created_at` (None when it has none that is a number).
    The list is read newest first, a page of 100 at a time, back to `since` (at most
    `LIST_PAGES` pages). None found, or the list unreadable: empty."""
    found: list[tuple[str, float | None]] = []
    after = ""
    for _ in range(LIST_PAGES):
        query = "limit=100" + (f"&after={after}" if after else "")
        try:
            answer = await runtime.upstream.send(
                "/batches", b"", "", (), method="GET", query=query, project=project
            )
            page = json.loads(await read_answer(answer))
            batches = page.get("data", [])
            older = False
            for batch in batches:
                at = batch.get("created_at")
                finite = isinstance(at, int | float) and not isinstance(at, bool)
                created = float(at) if finite and math.isfinite(at) else None
                if created is not None and created < since:
                    older = True
                    continue
                if batch.get("input_file_id") == file_id and isinstance(batch.get("id"), str):
                    found.append((batch["id"], created))
            last = batches[-1].get("id") if batches else None
            if older or not page.get("has_more") or not isinstance(last, str):
                break
            after = last
        except (RequestError, ValueError, AttributeError, TypeError, KeyError):
            break
    return found[::-1]


async def await_answers(runtime: Runtime, team: str, request_id: str) -> None:
    """Wait until no batch create of `team` but `request_id` that started before now still
    waits for its upstream's answer (`Ledger.unanswered`), or until the latest of them is
    past its deadline and `timeout_s` more (its process answers it, or it is lost)."""
    upstream = runtime.config.upstream
    try:
        while starts := await runtime.ledger.unanswered(team, request_id, runtime.clock()):
            if runtime.clock() >= max(starts) + upstream.deadline_s + upstream.timeout_s:
                return
            await asyncio.sleep(ANSWER_POLL_S)
    except LedgerError as exc:
        log.error("reading the batch creates of %s in flight failed: %s", team, exc)


async def replay_create(
    runtime: Runtime,
    entry: Entry,
    team: str,
    found: repeats.Marks,
    headers: dict[str, str],
    stored: StoredObject,
) -> Response | RepeatGuard:
    """A repeated create of a batch of the input file `stored` answered with its first
    attempt's batch (a batch's reservation is held until it ends, so the first is awaited
    until its answer is kept, not settled); else, when it must be forwarded as new (no
    first, or a first that failed), the guard its reservation checks (`RepeatGuard`)."""
    now = runtime.clock()
    first = await repeats.first_of(runtime, team, found, now)
    since = now - runtime.config.retries.window_s

    def forward(past: str | None) -> RepeatGuard:
        return RepeatGuard(team, since, found.content, found.key, past)

    if first is None:
        return forward(None)
    # The first's own process answers it by its deadline and settles it (or finds and
    # follows the batch it may have made) within `timeout_s` more, as `repeats.replay`.
    upstream = runtime.config.upstream
    began = repeats.began(first, runtime.clock())
    deadline = min(entry.started_at, began) + upstream.deadline_s + upstream.timeout_s
    while True:
        kept = await runtime.ledger.kept_answer(first.request_id)
        if kept is not None and kept.team == team:
            return await repeats.replayed(runtime, entry, first.request_id, kept, headers)
        if first.settled and repeats.unanswered(first):
            # Charged its bound, no batch of the file found when its answer was lost: the
            # upstream, still reading the file then, may have made it since.
            made = first.made or await adopt_orphan(
                runtime, team, stored, first.started_at, first.request_id
            )
            named = f" {orphan_named(made)}." if made is not None else ""
            return await repeats.failed_again(runtime, entry, team, first, headers, named)
        if (
            first.settled
            and (first.made is None or first.status is None)
            and repeats.charged(first, found.key is not None)
        ):
            # Charged its bound with no batch on record: its process stopped (killed) after
            # the create was sent, and the reservation was reclaimed. The upstream may have
            # made the batch, which runs and bills: a second create would make, and bill,
            # another. (A reclaimed row has no status; the batch it names was found for it.)
            why = await orphan_found(runtime, team, stored, repeats.CHARGED, first)
            return await repeats.not_kept(runtime, entry, team, first, headers, why)
        if (first.held or first.settled) and first.made is not None:
            # Its batch was made (and is followed, or ended and was settled), but its
            # create's answer is not kept (larger than `retries.store_bytes`, or pushed out
            # by newer ones): sent again, the create would make a second batch, billed
            # again. The repeat gets the batch as it stands.
            current = await batch_now(runtime, entry, team, first, first.made, headers)
            if current is not None:
                return current
            if first.settled or runtime.clock() >= deadline:
                raise ServiceUnavailable(
                    f"An earlier attempt of this create made batch {first.made}, which "
                    "could not be read now: retrieve it (GET /v1/batches/"
                    f"{first.made}) rather than create another."
                )
        elif first.settled:
            return forward(first.request_id)
        elif runtime.clock() >= deadline:
            # Neither answered nor settled by now: its process stopped while the create may
            # have reached the upstream, and it is reclaimed at its bound.
            why = await orphan_found(runtime, team, stored, repeats.LOST, first)
            return await repeats.not_kept(runtime, entry, team, first, headers, why)
        await asyncio.sleep(repeats.WAIT_S)
        first = await repeats.first_of(runtime, team, found, runtime.clock()) or first


ORPHAN_SKEW_S = 60.0
"""How far OpenAI's clock may be behind Tollgate's: a batch of the file created more than
this before a create was sent is an earlier batch, not the one that create made."""


async def orphan_found(
    runtime: Runtime, team: str, stored: StoredObject, why: str, first: FirstAttempt
) -> str:
    """`why` a first create attempt `first` lost with its process is not sent again, naming
    the batch it made when the upstream has one of the input file `stored` (`adopt_orphan`)
    or one was found for it already."""
    made = first.made or await adopt_orphan(
        runtime, team, stored, first.started_at, first.request_id
    )
    return why if made is None else f"{why}; {orphan_named(made)}"


def orphan_named(batch_id: str) -> str:
    return (
        f"the batch it made upstream, {batch_id}, is your team's: retrieve it "
        f"(GET /v1/batches/{batch_id}) rather than create another"
    )


async def adopt_orphan(
    runtime: Runtime, team: str, stored: StoredObject, since: float, request_id: str
) -> str | None:
    """The batch the upstream made of the input file `stored` for the create `request_id`,
    sent at `since`, that was charged its bound with no batch on record (its answer lost,
    its process stopped): the oldest batch of the file the upstream lists created since
    then (`ORPHAN_SKEW_S` allowed) that no other reservation holds and that is no other
    team's, claimed for the create's row (`Ledger.claim`: the row, settled, names the
    batch), so that no other create takes it, and the team's, so that it can be read with
    its output. None: the upstream lists none (yet)."""
    project = created_under(runtime, stored)
    for batch_id, created_at in await batches_of_file(
        runtime, stored.id, project, since - ORPHAN_SKEW_S
    ):
        try:
            holder = await runtime.ledger.response(batch_id)
            if holder is not None:
                if holder.request_id == request_id:
                    return batch_id  # found by an earlier look
                continue  # another create's batch
            owner = await runtime.ledger.stored(batch_id)
            if owner is not None and owner.team != team:
                continue
            if not await runtime.ledger.claim(request_id, batch_id, project):
                continue
            at = runtime.clock() if created_at is None else created_at
            await runtime.ledger.own(
                StoredObject(
                    batch_id, team, "batch", None, at, stored.lines, stored.bound_nanos,
                    stored.bound_usage, stored.id, project,
                )
            )  # fmt: skip
        except LedgerError as exc:
            log.error("recording batch %s failed: %s", batch_id, exc)
            return None
        log.warning(
            "batch %s of file %s, made upstream for create %s, charged its bound with no "
            "batch on record, is team %s's",
            batch_id, stored.id, request_id, team,
        )  # fmt: skip
        return batch_id
    return None


ORPHAN_WATCH_S = (5.0, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1800.0, 3600.0)
"""When a create charged its bound with no batch found looks again for the batch the
upstream may still be making of its file, in seconds after its answer was lost."""


def watch_orphan(runtime: Runtime, entry: Entry, stored: StoredObject) -> None:
    """Look for the batch the create `entry`, charged its bound with no batch found, may
    yet become (`adopt_orphan`), at each of `ORPHAN_WATCH_S` until it is found; then follow
    it to its end, and resolve the create's row to what its lines cost (`LostBatchFollow`).
    A process stopping stops the watch, and the following (a repeat of the create still
    looks, and names the batch; the row keeps its bound)."""
    team = entry.team or ""

    def at(step: int) -> None:
        async def check() -> None:
            now = runtime.newest()
            try:
                found = await adopt_orphan(now, team, stored, entry.started_at, entry.id)
            except Exception:  # a fault of its own must not end the process's tasks
                log.exception("looking for the batch of file %s failed", stored.id)
                found = None
            if found is not None and entry.id not in now.followers.following:
                project = created_under(now, stored)
                followed = LostBatchFollow(
                    entry, found, stored.id, project, prices=runtime.config.prices
                )
                now.followers.follow(entry.id, followed)
            if found is None and step + 1 < len(ORPHAN_WATCH_S):
                at(step + 1)

        delay = ORPHAN_WATCH_S[step] - (ORPHAN_WATCH_S[step - 1] if step else 0.0)
        runtime.tasks.later(delay, check)

    at(0)


async def batch_now(
    runtime: Runtime,
    entry: Entry,
    team: str,
    first: FirstAttempt,
    batch_id: str,
    headers: dict[str, str],
) -> Response | None:
    """A repeat of the create `first`, which made `batch_id`, answered with that batch as
    the upstream has it now (recorded `replayed` at no cost); None when it cannot be read
    now."""
    stored = await runtime.ledger.stored(batch_id)
    if stored is None or stored.team != team:
        return None
    try:
        answer = await runtime.upstream.send(
            f"/batches/{batch_id}", b"", "", (), method="GET",
            project=created_under(runtime, stored),
        )  # fmt: skip
        body = await read_answer(answer)
    except RequestError as exc:
        log.warning("reading batch %s for a repeat of its create: %s", batch_id, exc.message)
        return None
    if answer.status != 200:
        return None
    kept = KeptAnswer(
        first.request_id, team, 200, (("content-type", "application/json"),), body, False,
        runtime.clock(),
    )  # fmt: skip
    return await repeats.replayed(runtime, entry, first.request_id, kept, headers)


def _id_of(body: bytes) -> str | None:
    try:
        found = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None
