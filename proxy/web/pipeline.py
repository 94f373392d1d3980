"""The request path, top to bottom, once for every door.

    identify → read → parse → price → decide and reserve → forward → meter → settle
    → observe → answer

`Pipeline.handle` walks a request through the first five steps; `Exchange` (in
`proxy.web.exchange`) forwards it, meters the answer, settles and answers. What differs
per door (how a body is parsed, bounded, written out and metered) is asked of the
door (`proxy.doors`); what each ending costs is decided by `proxy.core.settlement`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Generic

from starlette.requests import Request
from starlette.responses import Response

from proxy.core import rates
from proxy.core.auth import identify
from proxy.core.budgets import Decision, Variant, allow_endpoint, decide, room, summary
from proxy.core.errors import (
    AuthenticationFailed,
    BudgetExceeded,
    IdempotencyConflict,
    InvalidRequest,
    LedgerConnectionLost,
    LedgerError,
    NoReservation,
    NotFound,
    PolicyViolation,
    PreviousResponseNotFound,
    RateLimited,
    RepeatArrived,
    RequestError,
    ServiceUnavailable,
)
from proxy.core.models import Counter, Entry, Outcome, Settlement, Totals, usd_text
from proxy.core.periods import applicable, counters, zone
from proxy.core.rates import Paced
from proxy.core.settings import Team
from proxy.doors.base import Door, Parsed
from proxy.ledger import RepeatGuard, Reservation, ResponseRow, settle_patiently
from proxy.upstream.answer import Answer
from proxy.web import repeats
from proxy.web.admission import read_body
from proxy.web.exchange import Exchange
from proxy.web.gateway import path_of
from proxy.web.in_force import Caller, decided, still_in_force
from proxy.web.observe import KeyRefusals, log_unmetered, observe, unmetered_outcome
from proxy.web.projects import same_project
from proxy.web.responses import error_response
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate.requests")


def new_request_id() -> str:
    """`tg_req_` and 32 hex digits: the time in microseconds (13 digits), then 76 random
    bits. Ids that grow with time are appended to the ledger's primary-key index instead
    of landing on a random page of it, which random ids would (and slow down as the
    ledger grows)."""
    return f"tg_req_{time.time_ns() // 1000:013x}{secrets.token_hex(10)[:19]}"


def new_request_ids(count: int) -> list[str]:
    """`count` request ids (at least one) as `new_request_id` makes them, in one call: the
    clock read once and the random bits drawn once for all of them (a batch's 50,000 rows
    spent a sixth of their building on one call each)."""
    count = max(count, 1)
    stamp = f"tg_req_{time.time_ns() // 1000:013x}"
    bits = secrets.token_hex(10 * count)
    return [stamp + bits[at : at + 19] for at in range(0, 20 * count, 20)]


Serve = Callable[[Request, Runtime, Team, dict[str, str]], Awaitable[Response]]
"""What answers a request for its team, given the headers every answer to it carries."""


async def for_team(
    request: Request, runtime: Runtime, refusals: KeyRefusals, serve: Serve
) -> Response:
    """`serve`'s answer for the team whose key the request carries, with headers naming a
    new request id and the team; `refusals`' answer when it carries no key Tollgate knows,
    and a RequestError `serve` raises in OpenAI's shape. For the requests that leave no
    row in the ledger (uploads, input token counts, stored responses, listings): their
    answers say they cost nothing and the room left (`free_headers`)."""
    started = time.monotonic()
    request_id = new_request_id()
    headers = {"x-tollgate-request-id": request_id}
    caller = refusals.key_of(request, runtime, headers)
    if isinstance(caller, Response):
        return caller
    team, key = caller
    headers.update(await free_headers(runtime, team))
    code = None
    try:
        response = await serve(request, runtime, team, headers)
    except RequestError as exc:
        response, code = error_response(exc, headers), exc.code
        outcome = refusal_outcome(exc)
    else:
        if response.status_code == 401:  # its key revoked meanwhile: counted, not logged
            return response
        outcome = unmetered_outcome(response, None)
    log_unmetered(
        request_id, team.name, key.id, refusals.endpoint, request, response, outcome, code,
        started, runtime.config.team_by_key_hash(),
    )  # fmt: skip
    return response


async def forward_as_is(
    request: Request, runtime: Runtime, query: str, project: str | None
) -> Answer:
    """`request` forwarded without a body, its path, method, headers and `query` as they
    came, under OpenAI project `project`: a read, cancel or delete of a team's object."""
    return await runtime.upstream.send(
        path_of(request).removeprefix("/v1"),
        b"",
        "",
        request.headers.items(),
        method=request.method,
        query=query,
        project=project,
    )


@dataclass(frozen=True, slots=True)
class Admitted(Generic[Parsed]):
    """A request decided and reserved: what forwarding it needs."""

    parsed: Parsed
    decision: Decision
    paced: Paced | None
    found: repeats.Marks | None
    """What its repeats match, when it may be repeated: its answer is then kept for them."""
    project: str | None
    """The OpenAI project it is sent under."""


class Pipeline(Generic[Parsed]):
    """The request path of one door."""

    def __init__(self, door: Door[Parsed]) -> None:
        self.door = door
        self.key_refusals = KeyRefusals(door.endpoint)

    async def handle(self, request: Request, runtime: Runtime) -> Response:
        door = self.door
        entry = Entry(new_request_id(), runtime.clock(), door.endpoint)
        headers = {"x-tollgate-request-id": entry.id}
        try:
            team, key = identify(
                request.headers.get("authorization"), runtime.config.team_by_key_hash()
            )
        except AuthenticationFailed as exc:
            return self.key_refusals.refuse(request, exc, headers, runtime)
        runtime.metrics.started()
        headers["x-tollgate-team"] = team.name
        entry = entry.identified(team.name, team.cost_center, key.id)
        caller = Caller(runtime, team, key, entry, headers)
        body = None
        try:
            allow_endpoint(team, door.endpoint)
            body = await read_body(request, door.body_limit(runtime.config.limits), runtime.bodies)
            admitted = await decided(request, caller, partial(self.decide, request, body))
        except (RequestError, LedgerError) as exc:
            return await self.refused(caller, exc, self.asked(request, body, caller))
        except Exception:
            # A fault of Tollgate's own, answered 500 (and logged) by the Gateway: the request
            # is no longer in flight, whatever raised.
            runtime.metrics.abandoned()
            raise
        if isinstance(admitted, Response):
            return admitted  # a repeat, answered from its first attempt
        runtime, entry = caller.runtime, caller.entry
        parsed, decision, found = admitted.parsed, admitted.decision, admitted.found
        if admitted.paced is not None:
            headers.update(rates.headers(admitted.paced.rooms, runtime.clock()))
        sent = decision.variant
        if not door.names_model(parsed):
            # The parse already wrote the default into the fields it forwards; say so.
            headers["x-tollgate-model"] = sent.request.model
        changed = "; ".join(filter(None, (door.injected(parsed), entry.downgrades)))
        if changed:
            headers["x-tollgate-downgraded"] = changed
        body, content_type = door.encode(parsed, sent)
        bound = door.bound(parsed, sent)
        exchange = Exchange(
            runtime, door, entry, bound, headers, sent.changes, decision.remaining_nanos,
            admitted.project,
        )  # fmt: skip
        if found is not None:
            exchange.keep = repeats.Keep(
                caller.team.name,
                found.key is not None,
                request.is_disconnected,
                runtime.config.retries.store_bytes,
            )
        client_headers = request.headers.items()
        if sent.request.stream:
            return await exchange.stream(body, content_type, client_headers)
        # Shielded: a client that hangs up does not stop the metering of what it asked for.
        return await asyncio.shield(
            runtime.spawn(exchange.whole(body, content_type, client_headers))
        )

    async def decide(
        self, request: Request, body: bytes, caller: Caller
    ) -> Admitted[Parsed] | Response:
        """The request, whose `body` is in, decided for `caller` under its runtime: parsed,
        priced, put through its team's policy and reserved against the budgets and rate
        limits (`caller.entry` the row so far); or, when it repeats an attempt already
        answered, that answer. Runs again whole when a reload overtakes it (`decided`)."""
        door, runtime, team = self.door, caller.runtime, caller.team
        config = runtime.config
        project = config.project_of(team.name)
        allow_endpoint(team, door.endpoint)
        parsed = door.parse(request.headers.get("content-type", ""), body, config, team)
        named = door.file_ids(parsed)
        if named:
            await owned_files(runtime, team, named)
        previous = door.previous(parsed)
        continues: ResponseRow | None = None
        if previous is not None:
            parsed, continues = await self.continued(runtime, team, parsed, previous)
        found = None
        if config.retries.enabled and repeats.repeatable(request):
            found = repeats.marks(request, team.name, door.endpoint, door.digest(parsed))
        caller.entry = caller.entry.asked(
            door.request(parsed), *((found.content, found.key) if found else (None, None))
        )
        for _ in range(repeats.RACES):
            guard: RepeatGuard | None = None
            if found is not None and found.repeat:
                # A replay counts against no limit, and says the room left like any answer.
                room = await rate_headers(runtime, team, caller.entry)
                replayed = await repeats.replay(
                    runtime, caller.entry, team.name, found, {**caller.headers, **room}
                )
                if isinstance(replayed, Response):
                    return replayed
                guard = replayed
            if continues is not None:
                # Checked after a replay: a repeat of a request answered before its team's
                # project changed is still answered as its first attempt was.
                same_project(
                    runtime, continues, project, f"Previous response '{continues.response_id}'"
                )
            variant = door.admit(team, parsed, config)
            try:
                reserved = await self.reserve(runtime, team, caller.entry, variant, project, guard)
            except RepeatArrived:
                # Another attempt of this request reserved first (on another worker or
                # replica): this one is answered from it, as if it had come after it.
                continue
            decision, caller.entry, paced = reserved
            return Admitted(parsed, decision, paced, found, project)
        raise ServiceUnavailable("Attempts of this request keep arriving together; retry shortly.")

    def asked(self, request: Request, body: bytes | None, caller: Caller) -> Entry:
        """The row of a request refused before it is forwarded: `caller.entry` once its body
        was understood; before that (refused by its parse, or by a step before its request
        was read off the parse), what its `body` asked as far as it can be read."""
        entry = caller.entry
        if entry.n_requested is not None or body is None:  # `Entry.asked` sets `n` always
            return entry
        content_type = request.headers.get("content-type", "")
        try:
            asked = self.door.asked(content_type, body, caller.runtime.config)
        except Exception:
            # A fault of the reading's own records nothing of what was asked: it never
            # turns the refusal into a 500.
            log.exception("reading what a refused request asked failed")
            return entry
        return entry.asking(asked)

    async def refused(
        self, caller: Caller, exc: RequestError | LedgerError, recorded: Entry
    ) -> Response:
        """The answer to a request refused before it was forwarded, recorded as `recorded`
        (a ledger that cannot take it: only observed) under the runtime it was last decided
        under. Its answer's headers are those of `caller.entry`: what the body read as
        `recorded` says decides nothing, and no answer says it."""
        runtime, team, entry, headers = caller.runtime, caller.team, caller.entry, caller.headers
        if isinstance(exc, LedgerError):
            return unavailable(runtime, recorded, exc, headers)
        if isinstance(exc, AuthenticationFailed):
            # Its key revoked (or its team removed) by a reload while it was read or
            # decided: refused as any unknown key, with no budget said.
            return await refuse(runtime, recorded, exc, headers)
        if isinstance(exc, IdempotencyConflict):
            # Recorded without the key it reused: the key's repeats still find its first
            # attempt (and conflict), not this refusal (and be forwarded as new).
            return await refuse(runtime, replace(recorded, idempotency_key=None), exc, headers)
        if isinstance(exc, RateLimited):
            runtime.metrics.rate_limited(team.name, exc.per, exc.metric)
            return await refuse(runtime, recorded, exc, headers)
        headers.update(await rate_headers(runtime, team, entry))
        if not isinstance(exc, BudgetExceeded):  # which says it already
            headers.update(await budget_headers(runtime, team, entry.user))
        return await refuse(runtime, recorded, exc, headers)

    async def continued(
        self, runtime: Runtime, team: Team, parsed: Parsed, previous: str
    ) -> tuple[Parsed, ResponseRow]:
        """`parsed` with the context of the response `previous` it continues, which must be
        one its team created through Tollgate (else 404, as OpenAI answers an unknown id),
        and that response's row. The caller then checks that it was created under the
        project this request goes under: one the team created under its former project is
        refused (400 `object_in_other_project`), neither sent where OpenAI would not find it
        nor billed to a project the team no longer maps to (`proxy.web.projects`)."""
        row = await runtime.ledger.response(previous)
        if row is None or row.team != team.name:
            raise PreviousResponseNotFound(
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
            )
        if row.input_tokens == 0 and not row.held:
            # Every response OpenAI ran read some input; none recorded means it ended
            # (failed, cancelled) without reporting usage. Its input is still stored and
            # billed again as this request's context, at a size Tollgate never learnt.
            raise InvalidRequest(
                f"Previous response '{previous}' ended without reporting its usage, so "
                "Tollgate cannot bound the context OpenAI would bill again with it. Send "
                "its input again instead of continuing it.",
                param="previous_response_id",
            )
        carried = row.input_tokens + row.output_tokens, row.context_images + row.images
        return self.door.carry(parsed, *carried), row

    async def reserve(
        self,
        runtime: Runtime,
        team: Team,
        entry: Entry,
        variant: Variant,
        project: str | None,
        guard: RepeatGuard | None = None,
    ) -> tuple[Decision, Entry, Paced | None]:
        """Decide against the budgets and the rate limits and reserve the bound, in one
        ledger transaction; its row records `project`, the one the request is sent under.
        A repeat's `guard` is checked in that transaction (RepeatArrived).

        Its budget periods and rate-limit windows are those of now, when it is decided and
        about to be sent (as OpenAI bills it), not those of its arrival: its body may have
        taken up to `limits.body_timeout_s` to come, and requests whose headers came late in
        one period and bodies early in the next would spend the old period's room in the
        new one, on top of the new one's whole limit."""
        config, user = runtime.config, variant.request.user
        now = runtime.clock()
        budgets = applicable(config, team, user, now)
        tz = zone(config.timezone)
        adds_to = counters(team.name, user, now, tz)
        chosen: list[Decision] = []

        def choose(totals: Mapping[Counter, Totals]) -> Reservation:
            still_in_force(runtime)
            decision = decide(team, variant, budgets, totals, config.prices, tz)
            chosen.append(decision)
            sent = decision.variant
            reserved = entry.sent(sent.request, sent.estimate.cost_nanos, summary(sent.changes))
            mainline = sent.base.cost_nanos  # a Responses request's mainline model's part
            return Reservation(
                reserved, sent.estimate.usage, adds_to, project=project, mainline_nanos=mainline
            )

        read = tuple(dict.fromkeys(a.counter for a in budgets))
        pace = rates.plan(config, team, now)
        reservation = await runtime.ledger.reserve(read, choose, pace, guard)
        return chosen[-1], reservation.entry, reservation.paced


async def owned_files(runtime: Runtime, team: Team, named: tuple[str, ...]) -> None:
    """Every file in `named` must be one `team` uploaded through Tollgate: another team's
    (or one Tollgate never saw) is not found, as it is at `/v1/files/{id}`; the company
    key would otherwise read it for any team that knows its id."""
    teams = await runtime.ledger.teams_of(named)
    for file_id in named:
        if teams.get(file_id) != team.name:
            raise NotFound(
                f"No such File object: {file_id} (a file uploaded by your team through Tollgate).",
                param="file_id",
            )


async def rate_headers(runtime: Runtime, team: Team, asked: Entry) -> dict[str, str]:
    """The room of `team`'s rate limits now, for an answer that counted nothing: of the
    limits a request of the model `asked` names counts against (every limit when it names
    none yet), as the answer that counts it would say."""
    now = runtime.clock()
    pace = rates.plan(runtime.config, team, now)
    if pace is None:
        return {}
    try:
        counts = await runtime.ledger.rate_counts(pace)
    except LedgerError:
        return {}
    model = rates.image_model(asked.model_requested, asked.n_requested)
    rooms = pace.rooms(counts, model, asked.mainline_model)
    return rates.headers(rates.tightest(rooms), now)


async def budget_headers(runtime: Runtime, team: Team, user: str | None) -> dict[str, str]:
    """The room left in the tightest USD budget of `team` (and `user`) now, for an answer
    that reserved nothing: every answer says it."""
    budgets = [
        a
        for a in applicable(runtime.config, team, user, runtime.clock())
        if a.budget.metric == "usd"
    ]
    if not budgets:
        return {}
    try:
        totals = await runtime.ledger.totals(tuple(dict.fromkeys(a.counter for a in budgets)))
    except LedgerError:
        return {}
    left = room(budgets, totals)
    return {} if left is None else {"x-tollgate-budget-remaining-usd": usd_text(max(left, 0))}


async def free_headers(runtime: Runtime, team: Team) -> dict[str, str]:
    """What every answer of a free path says (a response's or a file's or a batch's own
    paths, an upload, a listing): it cost nothing, and the room left in the tightest USD
    budget of `team`, as an image request's answer says them."""
    return {"x-tollgate-cost-usd": "0", **await budget_headers(runtime, team, None)}


async def refuse(
    runtime: Runtime, entry: Entry, exc: RequestError, headers: dict[str, str]
) -> Response:
    """Record a request that is answered without going upstream, and answer it."""
    now = runtime.clock()
    settlement = Settlement(
        finished_at=now,
        outcome=refusal_outcome(exc),
        status=exc.status,
        error_code=exc.code,
        latency_ms=(now - entry.started_at) * 1000,
    )
    try:
        await runtime.ledger.record(entry, settlement)
    except LedgerError as ledger_exc:
        log.error("ledger record failed: %s", ledger_exc)
    observe(runtime, entry, settlement, ())
    return error_response(exc, {**headers, "x-tollgate-cost-usd": "0"})


async def never_forwarded(runtime: Runtime, request_id: str) -> None:
    """Settle at no cost the reservation `request_id`, answered 503 and never forwarded, if
    it was written after all; nothing when it was not."""
    settlement = Settlement(
        runtime.clock(), "client_error", 503, error_code=ServiceUnavailable.code
    )
    try:
        await settle_patiently(
            runtime.ledger, request_id, settlement, runtime.config.upstream.timeout_s
        )
    except NoReservation:
        pass  # never written: nothing to settle
    except LedgerError as exc:
        log.error("the reservation of %s, never forwarded, stays held: %s", request_id, exc)


def unavailable(
    runtime: Runtime, entry: Entry, exc: LedgerError, headers: dict[str, str]
) -> Response:
    """The ledger cannot take the reservation: nothing is forwarded unrecorded."""
    log.error("ledger unavailable: %s", exc)
    if isinstance(exc, LedgerConnectionLost):
        # Its reservation may have been written, its commit's answer lost with the
        # connection: settled at no cost, as it is never forwarded (else it would be charged
        # its bound, and its retry held behind it as a first attempt that ran).
        runtime.spawn(never_forwarded(runtime, entry.id))
    observe(runtime, entry, Settlement(runtime.clock(), "client_error", 503), ())
    refusal = ServiceUnavailable("Tollgate cannot record spend right now; retry shortly.")
    return error_response(refusal, headers)


def refusal_outcome(exc: RequestError) -> Outcome:
    if isinstance(exc, BudgetExceeded):
        return "rejected_budget"
    if isinstance(exc, PolicyViolation):
        return "rejected_policy"
    if isinstance(exc, RateLimited):
        return "rejected_rate"
    return "client_error"
