"""What each output line of an ended batch is charged, as the ledger row it becomes.

`billed_line` reads one line of a batch's output file: a line OpenAI answered 200 is
charged from its `usage` at the model's batch rates (the dearer of the book in force and
the book the batch was reserved with), a `/v1/responses` line as the Responses door meters
a whole response; an error line is not billed; a line that cannot be read, or names a line
not in the file, is charged a bound, flagged. `at_bounds` and `whole_bound` charge lines
whose answers cannot be read at all; `within` holds the lines to the batch's reservation
and each user's to her share of it (`share_nanos`). Each row is booked when the batch
ended, to the counters of that day (`line_row`). The follower (`proxy.web.batch_follow`)
decides which of these a batch's end calls for, and settles the rows in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from proxy.core.errors import MalformedAnswer
from proxy.core.metering import usage_from_openai
from proxy.core.models import Charge, Entry, Estimate, Outcome, Settlement, Usage
from proxy.core.periods import counters, zone
from proxy.core.pricing import PriceBook
from proxy.core.settlement import MALFORMED_ANSWER, Bound, metered
from proxy.doors.batches import user_shares
from proxy.doors.response_meters import read_response
from proxy.ledger import BatchLine, BilledLine
from proxy.web.pipeline import new_request_id
from proxy.web.runtime import Runtime

UNKNOWN_LINE = "batch_line_unknown"
"""The error code of an output line whose `custom_id` was not in the file priced: charged
the dearest line's bound, flagged."""


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


def within(
    billed: list[BilledLine], reserved_nanos: int, shares: Mapping[str, int] | None = None
) -> list[BilledLine]:
    """`billed`, each line's cost capped at what is left of the batch's reservation after
    the lines before it, and at what is left of its user's share (`shares`, the nanos each
    user's counters hold: `proxy.doors.batches.user_shares`); a capped line is flagged, for
    reconciliation. A batch is priced at the rates in force when it is created; a reload
    that raised a rate while it ran would otherwise settle it at the new one, past what was
    reserved and past a hard limit (the team's, or a user's)."""
    left, found = reserved_nanos, []
    users = dict(shares or {})
    for line in billed:
        settled = line.settlement
        user = line.entry.user
        cap = min(left, users[user]) if user in users else left
        if settled.cost_nanos > cap:
            settled = replace(settled, cost_nanos=cap, flagged=True)
            line = replace(line, settlement=settled)
        left -= settled.cost_nanos
        if user in users:
            users[user] -= settled.cost_nanos
        found.append(line)
    return found


def share_nanos(
    runtime: Runtime, lines: Mapping[str, BatchLine], reservation: Entry
) -> dict[str, int] | None:
    """What each user's counters hold of a batch's reservation (as its create reserved it),
    for a team with per-user budgets; None for a team without them, whose users' lines are
    held to the reservation alone (a create holds no share for them: `proxy.web.batches`)."""
    team = runtime.config.team_named(reservation.team)
    if team is None or not team.per_user:
        return None
    bound = Estimate(Usage(), reservation.estimated_nanos)
    return {user: e.cost_nanos for user, e in user_shares(lines.values(), bound).items()}


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
