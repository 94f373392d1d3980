"""What each output line of an ended batch is charged, as the ledger row it becomes.

`Rows.billed` reads one line of a batch's output file: a line OpenAI answered 200 is
charged from its `usage` at the model's batch rates (the dearer of the book in force and
the book the batch was reserved with), a `/v1/responses` line as the Responses door meters
a whole response; an error line is not billed; a line that cannot be read, or names a line
not in the file, is charged a bound, flagged. `Rows.at_bounds` and `whole_bound` charge lines
whose answers cannot be read at all; `within` holds the lines to the batch's reservation
and each user's to her share of it (`share_nanos`). Each row is booked when the batch
ended, to the counters of that day (`Rows.row`). The follower (`proxy.web.batch_follow`)
decides which of these a batch's end calls for, and settles the rows in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.core.errors import MalformedAnswer
from proxy.core.metering import usage_from_openai
from proxy.core.models import (
    Charge,
    Counter,
    Entry,
    Estimate,
    Outcome,
    Settlement,
    Usage,
    makes_images,
)
from proxy.core.periods import counters, zone
from proxy.core.pricing import PriceBook
from proxy.core.settings import Config
from proxy.core.settlement import MALFORMED_ANSWER, Bound, as_read, metered
from proxy.doors.batches import user_shares
from proxy.doors.response_meters import read_response
from proxy.ledger import BatchLine, BilledLine
from proxy.web.pipeline import new_request_ids

REPEATED_LINE = "batch_line_repeated"
"""The error code of a second answer to one line (OpenAI answers each once): charged as it
reads, flagged, for reconciliation."""
UNKNOWN_LINE = "batch_line_unknown"
"""The error code of an output line whose `custom_id` was not in the file priced: charged
the dearest line's bound, flagged."""


@dataclass
class Rows:
    """How the rows of one batch's billed lines are built, what they read taken once: the
    configuration in force (its price book, zone and teams), the reservation, when the
    batch ended, its id and the book it was reserved with. Request ids are made `expected`
    at a time (`new_request_ids`), and each user's counters are named from one set of
    windows: a 50,000-line batch is one pass, which its settlement runs on a thread
    (`charged`)."""

    config: Config
    reservation: Entry
    ended_at: float
    batch_id: str
    reserved_under: PriceBook | None = None
    expected: int = 1
    """How many rows it is expected to build: request ids are made that many at a time."""
    _ids: list[str] = field(default_factory=list, init=False, repr=False)
    _counters: dict[str | None, tuple[Counter, ...]] = field(
        default_factory=dict, init=False, repr=False
    )

    def billed(self, lines: Mapping[str, BatchLine], raw: bytes) -> BilledLine | None:
        """The row of one output line that OpenAI answered 200; None for an error line.
        Charged at the book in force, or at `reserved_under` (the book its batch was
        reserved with) where that is dearer.

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
            prices, reserved_under = self.config.prices, self.reserved_under
            charge, code, outcome = line_charge(prices, line, body)
            if reserved_under is not None and reserved_under is not prices:
                then = line_charge(reserved_under, line, body)
                if then[0].cost_nanos > charge.cost_nanos:
                    charge, code, outcome = then
            return self.row(line, charge, code, answered, outcome)
        return self.row(line, charge, code, answered)

    def at_bounds(self, lines: Iterable[BatchLine], code: str) -> list[BilledLine]:
        """Each of `lines`, whose billed answer cannot be read, charged its bound, flagged
        `code`, for `tollgate ledger resolve`."""
        return [
            self.row(line, Charge(Usage(images=line.n), line.bound_nanos, True), code, {})
            for line in lines
        ]

    def row(
        self,
        line: BatchLine,
        charge: Charge,
        code: str | None,
        response: dict[str, Any],
        outcome: Outcome = "ok",
    ) -> BilledLine:
        """The row of billed line `line`, charged `charge`, booked when the batch ended."""
        reservation, ended_at = self.reservation, self.ended_at
        # A `/v1/responses` line without the image tool (or with `tool_choice: none`) makes
        # no image: recorded under no image model, as the Responses door records one.
        images = makes_images(line.mainline, line.n)
        model, quality, size = (line.model, line.quality, line.size) if images else (None,) * 3
        entry = Entry(
            self.request_id(), ended_at, "batches", reservation.team, reservation.cost_center,
            reservation.key_id, line.user, model, model, quality, quality, size, size,
            line.n, line.n, False, line.bound_nanos,
            mainline_model=line.mainline, custom_id=line.custom_id,
        )  # fmt: skip
        settled = Settlement(
            finished_at=ended_at,
            outcome=outcome,
            status=200,
            usage=charge.usage,
            cost_nanos=charge.cost_nanos,
            mainline_cost_nanos=charge.mainline_nanos,
            flagged=charge.flagged,
            upstream_request_id=response.get("request_id"),
            error_code=code,
            response_id=self.batch_id,
        )
        return BilledLine(entry, settled, self.counters(line.user))

    def request_id(self) -> str:
        if not self._ids:
            self._ids = new_request_ids(self.expected)
        return self._ids.pop()

    def counters(self, user: str | None) -> tuple[Counter, ...]:
        """The counters a line of `user` adds to, those of when the batch ended
        (`periods.counters`): the windows worked out once, then named for each user."""
        found = self._counters.get(user)
        if found is not None:
            return found
        team = self.reservation.team or ""
        named = next((c for c in self._counters.values() if c and c[-1].scope == "user"), None)
        if not user or named is None:
            found = counters(team, user, self.ended_at, zone(self.config.timezone))
        else:
            found = tuple(
                Counter("user", team, user, c.period, c.start) if c.scope == "user" else c
                for c in named
            )
        self._counters[user] = found
        return found


def charged(
    rows: Rows,
    lines: Mapping[str, BatchLine],
    output: Sequence[bytes],
    unread: str | None,
    completed: int = 0,
) -> list[BilledLine]:
    """The rows of a batch's `output` lines, in one pass (on a thread, by its settlement):
    a second answer to one line flagged `REPEATED_LINE`; when the rest of the output cannot
    be read (`unread`: `MALFORMED_ANSWER`, every line it did not answer; any other code,
    every line), each of those lines charged its bound, flagged `unread`. An output that
    answers fewer lines than the batch says `completed` (billed) is short of lines OpenAI
    billed, which are not known: read as one that cannot be read past its end. Held to the
    reservation, and each user's lines to her share (`within`)."""
    rows.expected = len(output) + (len(lines) if unread else 0)
    billed: list[BilledLine] = []
    read: set[str | None] = set()
    for raw in output:
        line = rows.billed(lines, raw)
        if line is None:
            continue
        if line.entry.custom_id in read and not line.settlement.flagged:
            settled = replace(line.settlement, flagged=True, error_code=REPEATED_LINE)
            line = replace(line, settlement=settled)
        read.add(line.entry.custom_id)
        billed.append(line)
    if unread is None and len(read) < completed:
        unread = MALFORMED_ANSWER
    if unread == MALFORMED_ANSWER:
        billed += rows.at_bounds([li for li in lines.values() if li.custom_id not in read], unread)
    elif unread is not None:
        billed = rows.at_bounds(lines.values(), unread)
    reservation = rows.reservation
    return within(billed, reservation.estimated_nanos, share_nanos(rows.config, lines, reservation))


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
    if model is None or not model.accepts_batch or usage is None:
        # No batch rates to price it at (the model gone from the book, or no longer taken
        # by the Batch API since a reload), or no usage to price: its bound, flagged.
        return Charge(Usage(images=images), line.bound_nanos, True), None, "ok"
    # Metered as the Images door meters a direct answer: as it reads, flagged
    # `usage_over_bound` when that costs more than the line was priced at upload.
    bound = Bound(model.for_batch(), line.n, line.quality, line.size, line.bound_nanos, Usage())
    verdict = as_read(bound, model.for_batch().charge(replace(usage, images=images)))
    return verdict.charge, verdict.error_code, verdict.outcome


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


def whole_bound(config: Config, reservation: Entry, outcome: Settlement) -> BilledLine:
    """The one row of a batch whose lines are not on record, what they billed unread: its
    whole reservation charged, flagged, as `outcome` says otherwise."""
    ended_at = outcome.finished_at
    settled = replace(
        outcome,
        usage=Usage(images=reservation.n or 0),
        cost_nanos=reservation.estimated_nanos,
        flagged=True,
    )
    tz = zone(config.timezone)
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
    config: Config, lines: Mapping[str, BatchLine], reservation: Entry
) -> dict[str, int] | None:
    """What each user's counters hold of a batch's reservation (as its create reserved it),
    for a team with per-user budgets; None for a team without them, whose users' lines are
    held to the reservation alone (a create holds no share for them: `proxy.web.batches`)."""
    team = config.team_named(reservation.team)
    if team is None or not team.per_user:
        return None
    bound = Estimate(Usage(), reservation.estimated_nanos)
    return {user: e.cost_nanos for user, e in user_shares(lines.values(), bound).items()}
