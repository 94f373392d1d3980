"""The ledger's values as columns and back, the same on every backend.

A request row is written from an `Entry`, its reservation's `Usage` and, once it
ends, a `Settlement`; it is read back as a `Row`. A reservation names the counters
it adds to in its row (`counters`, a JSON list of keys; a batch's also holds each user's
share, `reservation_text`), so that its settlement, a reclaim or a resolution adds to the
same ones. Every counter write also adds to the organization's counters of the same
periods, and touches its rows in one order, the lock order (see `with_organization`).
The tables themselves are in `migrations.py`: these columns are theirs, in the order the
statements list them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.core.models import Counter, Entry, Settlement, Usage
from proxy.ledger.base import (
    Aggregate,
    BatchLine,
    BilledLine,
    HeldEntry,
    Reservation,
    ResponseRow,
    Row,
    StoredObject,
    Written,
)
from proxy.ledger.kept import FirstAttempt, KeptAnswer

ENTRY_COLUMNS = (
    "id", "started_at", "endpoint", "team", "cost_center", "key_id", "user",
    "model_requested", "model", "quality_requested", "quality", "size_requested", "size",
    "n_requested", "n", "stream", "estimated_nanos", "downgrades", "mainline_model",
    "context_images", "custom_id", "content_digest", "idempotency_key",
)  # fmt: skip
USAGE_FIELDS = {
    "text_input_tokens": "text_input",
    "cached_text_input_tokens": "cached_text_input",
    "image_input_tokens": "image_input",
    "cached_image_input_tokens": "cached_image_input",
    "image_output_tokens": "image_output",
    "text_output_tokens": "text_output",
    "images": "images",
    "mainline_input_tokens": "mainline_input",
    "mainline_cached_input_tokens": "mainline_cached_input",
    "mainline_output_tokens": "mainline_output",
}
"""Each usage column and the `Usage` field it holds (`unclassified_*` are never stored:
pricing folds them into a known kind first)."""
USAGE_COLUMNS = tuple(USAGE_FIELDS)
SETTLEMENT_COLUMNS = (
    "finished_at", "outcome", "status", *USAGE_COLUMNS, "cost_nanos", "flagged",
    "upstream_request_id", "error_code", "latency_ms", "mainline_cost_nanos", "response_id",
)  # fmt: skip
ROW_COLUMNS = (*ENTRY_COLUMNS, *SETTLEMENT_COLUMNS, "state")
"""What a `Row` is read from (and a request never forwarded is written with)."""
RESERVATION_COLUMNS = (
    *ENTRY_COLUMNS, *USAGE_COLUMNS, "state", "reserved_nanos", "counters", "owner", "project",
    "mainline_cost_nanos",
)  # fmt: skip
KEY_COLUMNS = ("scope", "team", "user", "period", "start")
"""A `budget_usage` row's primary key: a counter's fields, in lock order."""
TOTALS_COLUMNS = (
    "spent_nanos", "reserved_nanos", "text_input_tokens", "image_input_tokens",
    "image_output_tokens", "total_tokens",
)  # fmt: skip
OBJECT_COLUMNS = (
    "id", "team", "kind", "purpose", "created_at", "lines", "bound_nanos", *USAGE_COLUMNS,
    "input_file_id", "project",
)  # fmt: skip
"""A `stored_objects` row: a `StoredObject`, its bound usage as the usage columns (and its
project as `project_value` writes it)."""
LINE_COLUMNS = (
    "file_id", "custom_id", "line", "endpoint", "model", "quality", "size", "n", "user",
    "bound_nanos", "mainline", "policy",
)  # fmt: skip
"""A `batch_lines` row: the file's id, then a `BatchLine`'s fields in their order."""
BILLED_COLUMNS = (*ROW_COLUMNS, "counters")
"""What a batch's billed line is written with: a settled row and the counters it added to."""
FOUND_BY = ("content_digest", "idempotency_key")
"""What a repeat finds its first attempt by (`FIRST_COLUMNS`' lookups)."""
BILL_COLUMNS = (*BILLED_COLUMNS, "project")
"""What a batch's billed line but its first is inserted with: its row and counters, and the
project of its batch (OpenAI bills each line to the project that created the batch)."""
BILL_FIRST_COLUMNS = tuple(c for c in BILLED_COLUMNS[1:] if c not in FOUND_BY)
"""What a batch's reservation row takes of its first billed line's: all but the id and what
a repeat of the batch's create finds it by, which stay the create's."""
FIRST_COLUMNS = (
    "id", "started_at", "state", "outcome", "status", "cost_nanos", "content_digest", "owner",
    "held", "response_id",
)  # fmt: skip
"""What a repeat reads of its first attempt's row (a `FirstAttempt`)."""
ANSWER_COLUMNS = (
    "request_id", "team", "status", "headers", "body", "stream", "size", "kept_at", "live",
)  # fmt: skip
"""A `kept_answers` row: a `KeptAnswer` (its headers as JSON text), and its size (its body's
and its chunks')."""
REAL_COLUMNS = frozenset(
    {
        "started_at", "finished_at", "latency_ms", "resolved_at", "start", "sent_at",
        "heartbeat_at", "created_at", "kept_at", "reserved_clock",
    }
)  # fmt: skip
"""The columns of every table that hold floating-point numbers."""

ORGANIZATION_TOTAL = Counter("organization", "", "", "total", 0.0)
"""Written by every reservation, settlement and release: the first row each one locks."""
NO_TOKENS = (0, 0, 0, 0)


Deltas = tuple[int, int, tuple[int, ...]]
"""What a write adds to each counter it touches (negative: takes back): to its spent and
reserved nanos, and to its text input, image input, image output and total tokens."""


entry_values: Callable[[Entry], tuple[Any, ...]] = operator.attrgetter(*ENTRY_COLUMNS)
"""An entry's values in `ENTRY_COLUMNS` order (one C call; both drivers store the flag
`stream` as the integer its column holds)."""


usage_values: Callable[[Usage], tuple[int, ...]] = operator.attrgetter(*USAGE_FIELDS.values())
"""A usage's values in `USAGE_COLUMNS` order."""


def usage_of(values: Sequence[Any]) -> Usage:
    """The usage read in `USAGE_COLUMNS` order."""
    return Usage(**{f: int(v) for f, v in zip(USAGE_FIELDS.values(), values, strict=True)})


def settlement_values(s: Settlement) -> tuple[Any, ...]:
    return (
        s.finished_at, s.outcome, s.status, *usage_values(s.usage), s.cost_nanos,
        int(s.flagged), s.upstream_request_id, s.error_code, s.latency_ms,
        s.mainline_cost_nanos, s.response_id,
    )  # fmt: skip


NO_PROJECT = ""
"""The `project` of a row or object created without one (NULL: not recorded; a row
written before schema version 10 and not held, or held before version 9; an object
recorded before version 10)."""


def project_value(project: str | None) -> str:
    """The `project` column of a row or object created under `project` (None: none was
    sent)."""
    return NO_PROJECT if project is None else project


def project_read(value: str | None) -> tuple[str | None, bool]:
    """A `project` column read back: (the project, None for none sent; whether it was
    recorded at all)."""
    return value or None, value is not None


def reservation_values(
    entry: Entry,
    usage: Usage,
    counters_text: str,
    owner: str | None,
    project: str | None,
    mainline_nanos: int = 0,
) -> tuple[Any, ...]:
    """A reservation's row in `RESERVATION_COLUMNS` order: it holds its estimate, the
    project it is sent under (`project_value`) and the mainline model's part of its bound
    (what a reclaim charges that model; a settlement replaces it)."""
    return (
        *entry_values(entry),
        *usage_values(usage),
        "reserved",
        entry.estimated_nanos,
        counters_text,
        owner,
        project_value(project),
        mainline_nanos,
    )


def record_values(entry: Entry, settlement: Settlement) -> tuple[Any, ...]:
    """A request never forwarded, in `ROW_COLUMNS` order: settled at once."""
    return (*entry_values(entry), *settlement_values(settlement), "settled")


def row(values: Sequence[Any]) -> Row:
    """A row read in `ROW_COLUMNS` order."""
    e = dict(zip(ENTRY_COLUMNS, values[: len(ENTRY_COLUMNS)], strict=True))
    s = dict(zip(SETTLEMENT_COLUMNS, values[len(ENTRY_COLUMNS) : -1], strict=True))
    e["stream"] = bool(e["stream"])
    entry = Entry(**e)
    if values[-1] == "reserved":
        return Row(entry, None)
    usage = usage_of([s[c] for c in USAGE_COLUMNS])
    settlement = Settlement(
        finished_at=s["finished_at"],
        outcome=s["outcome"],
        status=s["status"],
        usage=usage,
        cost_nanos=s["cost_nanos"],
        flagged=bool(s["flagged"]),
        upstream_request_id=s["upstream_request_id"],
        error_code=s["error_code"],
        latency_ms=s["latency_ms"] or 0.0,
        mainline_cost_nanos=s["mainline_cost_nanos"],
        response_id=s["response_id"],
    )
    return Row(entry, settlement)


def held_entry(values: Sequence[Any]) -> HeldEntry:
    """A held reservation's entry, reserved usage and project, read by the `held_entry`
    statement."""
    e = dict(zip(ENTRY_COLUMNS, values[: len(ENTRY_COLUMNS)], strict=True))
    e["stream"] = bool(e["stream"])
    *usage, project = values[len(ENTRY_COLUMNS) :]
    return HeldEntry(Entry(**e), usage_of(usage), *project_read(project))


def response_row(response_id: str, values: Sequence[Any]) -> ResponseRow:
    """The response `response_id` from its row, read by the `response` statement."""
    team, request_id, input_tokens, output_tokens, images, context_images, held, project, busy = (
        values
    )
    return ResponseRow(
        response_id,
        request_id,
        team or "",
        int(input_tokens),
        int(output_tokens),
        int(images),
        int(context_images),
        bool(held),
        *project_read(project),
        in_flight=bool(busy),
    )


# -- repeats ---------------------------------------------------------------------------


def first_attempt(values: Sequence[Any]) -> FirstAttempt:
    """A first attempt read in `FIRST_COLUMNS` order, then its age on the ledger's clock."""
    request_id, started_at, state, outcome, status, cost, digest, owner, held, made, age = values
    return FirstAttempt(
        request_id,
        float(started_at),
        state == "settled",
        outcome,
        status,
        int(cost),
        digest,
        owner,
        bool(held) and state == "reserved",
        made,
        None if age is None else float(age),
    )


def answer_values(answer: KeptAnswer) -> tuple[Any, ...]:
    """A kept answer's row in `ANSWER_COLUMNS` order."""
    headers = json.dumps([list(pair) for pair in answer.headers])
    return (
        answer.request_id, answer.team, answer.status, headers, answer.body,
        int(answer.stream), len(answer.body), float(answer.kept_at), int(answer.live),
    )  # fmt: skip


def kept_head(values: Sequence[Any], chunks: Sequence[Sequence[Any]]) -> KeptAnswer:
    """A kept answer read without its body (`kept_head`), its chunks as its body."""
    return kept_answer((*values[:4], b"", *values[4:]), chunks)


def kept_answer(values: Sequence[Any], chunks: Sequence[Sequence[Any]] = ()) -> KeptAnswer:
    """A kept answer read in `ANSWER_COLUMNS` order (its size left out), its body followed
    by its `chunks` read as (seq, body) rows."""
    request_id, team, status, headers, body, stream, kept_at, live = values
    pairs = tuple((str(name), str(value)) for name, value in json.loads(headers))
    whole = bytes(body) + b"".join(bytes(c[1]) for c in chunks)
    return KeptAnswer(
        request_id, team, int(status), pairs, whole, bool(stream), kept_at, bool(live)
    )


# -- files and batches --------------------------------------------------------------


def object_values(obj: StoredObject) -> tuple[Any, ...]:
    """An object's row in `OBJECT_COLUMNS` order."""
    # An object whose project is not known stays so (NULL), rather than passing for one
    # created without a project.
    project = project_value(obj.project) if obj.project_known else None
    return (
        obj.id, obj.team, obj.kind, obj.purpose, float(obj.created_at), obj.lines,
        obj.bound_nanos, *usage_values(obj.bound_usage), obj.input_file_id, project,
    )  # fmt: skip


def stored_object(values: Sequence[Any]) -> StoredObject:
    """An object read in `OBJECT_COLUMNS` order."""
    usage = usage_of(values[7:-2])
    id_, team, kind, purpose, created_at, lines, bound = values[:7]
    input_file_id, project = values[-2:]
    return StoredObject(
        id_, team, kind, purpose, created_at, int(lines), int(bound), usage, input_file_id,
        *project_read(project),
    )  # fmt: skip


_line_fields: Callable[[BatchLine], tuple[Any, ...]] = operator.attrgetter(*LINE_COLUMNS[1:])


def line_values(file_id: str, lines: Iterable[BatchLine]) -> list[tuple[Any, ...]]:
    """The `batch_lines` rows of the file `file_id`'s `lines`, in `LINE_COLUMNS` order."""
    return [(file_id, *_line_fields(line)) for line in lines]


def batch_lines(found: Iterable[Sequence[Any]]) -> dict[str, BatchLine]:
    """Lines read in `LINE_COLUMNS` order (the file's id left out), by `custom_id`."""
    return {r[0]: BatchLine(*r) for r in found}


@dataclass(frozen=True, slots=True)
class Billed:
    """A batch's billed lines as its settlement writes them, worked out before its
    transaction (which then holds locks only for the writes)."""

    rows: list[tuple[Any, ...]]
    """Each line's row, in `BILLED_COLUMNS` order."""
    sums: dict[tuple[Any, ...], list[int]]
    """What the lines add to each counter (its key: its deltas in `TOTALS_COLUMNS` order)."""


THREAD_LINES = 100
"""Billed lines past which `billed` runs on a thread (`billed_off_loop`): a 50,000-line
batch's texts and sums kept the event loop for seconds."""


async def billed_off_loop(lines: Sequence[BilledLine]) -> Billed:
    """`billed(lines)`, on a thread past `THREAD_LINES` lines, so that the loop serves
    meanwhile."""
    if len(lines) > THREAD_LINES:
        return await asyncio.to_thread(billed, lines)
    return billed(lines)


def billed(lines: Sequence[BilledLine]) -> Billed:
    """The rows of a batch's billed `lines` and what they add to their counters, summed per
    counter: one write per counter, whatever the number of lines."""
    texts: dict[tuple[Counter, ...], str] = {}
    rows = []
    # Summed per counters first: lines of one batch mostly share their counters.
    per_counters: dict[tuple[Counter, ...], list[int]] = {}
    for line in lines:
        text = texts.get(line.counters)
        if text is None:
            text = texts[line.counters] = counters_text(line.counters)
        rows.append((*record_values(line.entry, line.settlement), text))
        total = per_counters.setdefault(line.counters, [0, 0, 0, 0, 0])
        total[0] += line.settlement.cost_nanos
        for i, value in enumerate(token_deltas(line.settlement.usage, 1), 1):
            total[i] += value
    # Each line's counters are plain (no user's share): the keys its text names are those
    # of its counters, without reading the text back (a batch naming 50,000 users has
    # 50,000 texts).
    sums: dict[tuple[Any, ...], list[int]] = {}
    for counters, (spent, *tokens) in per_counters.items():
        deltas = (spent, 0, *tokens)
        for counter in with_organization(counters):
            _add(sums, counter_key(counter), deltas)
    return Billed(rows, sums)


def with_batch_id(rows: list[tuple[Any, ...]], batch_id: str | None) -> list[tuple[Any, ...]]:
    """`rows` (`BILLED_COLUMNS`), those whose settlement named no response id given the
    batch's (`batch_id`, the id its reservation was held with)."""
    at = BILLED_COLUMNS.index("response_id")
    if batch_id is None or all(r[at] is not None for r in rows):
        return rows
    return [r if r[at] is not None else (*r[:at], batch_id, *r[at + 1 :]) for r in rows]


def batch_settled(
    lines: Billed, reserved_text: str, bound: int, held: Usage
) -> list[tuple[Any, ...]]:
    """What settling a batch adds to each counter it touches, one row per counter in lock
    order (its key, then its deltas in `TOTALS_COLUMNS` order): its billed `lines`' sums,
    and its reservation's bound and usage taken out of the reservation's counters."""
    sums = {key: list(deltas) for key, deltas in lines.sums.items()}
    _sum(sums, reserved_text, 0, -bound, token_deltas(held, -1))
    return [(*key, *sums[key]) for key in sorted(sums)]


def _sum(
    sums: dict[tuple[Any, ...], list[int]],
    text: str,
    spent: int,
    reserved: int,
    tokens: Sequence[int],
) -> None:
    """Add deltas to each counter of `text` (a row's counters text) in `sums`."""
    for row in counter_rows(text, (spent, reserved, tuple(tokens))):
        _add(sums, row[:5], row[5:])


def _add(
    sums: dict[tuple[Any, ...], list[int]], key: tuple[Any, ...], deltas: Sequence[int]
) -> None:
    """Add `deltas` to the counter `key` of `sums`."""
    total = sums.get(key)
    if total is None:
        sums[key] = list(deltas)
        return
    for i, value in enumerate(deltas):
        total[i] += value


def aggregates(found: Iterable[Sequence[Any]], width: int) -> list[Aggregate]:
    """Rows of a summary (`width` keys, then its sums) as Aggregates; PostgreSQL's sums
    of BIGINT are NUMERIC, read as ints like SQLite's."""
    return [
        Aggregate(tuple(r[:width]), *(int(v or 0) for v in tuple(r)[width:]))
        for r in found
        if r[width]  # an empty period still answers one all-NULL row when ungrouped
    ]


# -- counters -----------------------------------------------------------------


def counter_key(c: Counter) -> tuple[Any, ...]:
    """A counter's `budget_usage` key, in `KEY_COLUMNS` order."""
    return (c.scope, c.team, c.user, c.period, c.start)


@functools.lru_cache(maxsize=4096)
def counters_text(counters: tuple[Counter, ...]) -> str:
    """How a reservation keeps its counters in its row (for its settlement and reclaim).
    Every request of a team and user in a minute has the same counters: written once
    (hashing them costs a third of writing them)."""
    return json.dumps([counter_key(c) for c in counters])


def reservation_text(reservation: Reservation) -> str:
    """A reservation's counters text: `counters_text`, then, for a batch whose lines name
    users (`Reservation.shares`), one last item holding its bound, its usage's token
    deltas and each user's share of them: [user, nanos, *tokens], and the periods whose
    windows hold them (`Reservation.share_periods`). Each user's counters are those of the
    windows of the team's (of those periods), so a batch naming thousands of users writes
    each of them once."""
    if not reservation.shares:
        return counters_text(reservation.counters)
    shares: dict[str, Any] = {
        "bound": reservation.entry.estimated_nanos,
        "tokens": token_deltas(reservation.usage, 1),
        "users": [[s.user, s.nanos, *token_deltas(s.usage, 1)] for s in reservation.shares],
    }
    if reservation.share_periods:
        shares["periods"] = list(reservation.share_periods)
    return json.dumps([*(counter_key(c) for c in reservation.counters), shares])


def written(reservation: Reservation) -> Written:
    """What `reservation` writes besides its row (`Written`): worked out ahead of its
    transaction for a batch naming thousands of users, whose text and rows are most of
    what its transaction would otherwise do."""
    text = reservation_text(reservation)
    rows = counter_rows(text, reserved(reservation.entry, reservation.usage))
    return Written(text, tuple(rows))


def counter_rows(text: str, deltas: Deltas, spent_before: int = 0) -> list[tuple[Any, ...]]:
    """What a write of `deltas` adds to each counter of a row's counters `text`, one row
    per counter in lock order: its key, then its spent, reserved and token deltas. A user's
    share (`reservation_text`) gets the deltas in proportion to its part of the bound and
    of each token count: exactly its share when the bound is reserved, released or charged
    whole. Her spent is her part of what the row charges after the write less her part of
    what it charged before (`spent_before`), each rounded down: however many times a row is
    resolved, she holds her part of its last cost, never a nano less than nothing (a
    resolution at 1 nano then at $0 left her -1 nano when each change was rounded down)."""
    spent, held, tokens = deltas
    if not shared(text):
        return [(*key, spent, held, *tokens) for key in written_keys(text)]
    *keys, shares = json.loads(text)
    plain = [Counter(*key) for key in keys]
    found: dict[tuple[Any, ...], list[int]] = {
        counter_key(c): [spent, held, *tokens] for c in with_organization(plain)
    }
    bound, whole = shares["bound"], shares["tokens"]
    periods = shares.get("periods")  # absent: every period's windows
    windows = [
        (c.team, c.period, c.start)
        for c in plain
        if c.scope == "team" and (periods is None or c.period in periods)
    ]
    after = spent_before + spent
    users = [
        (
            user,
            _part(after, nanos, bound) - _part(spent_before, nanos, bound),
            _part(held, nanos, bound),
            *map(_part, tokens, part, whole),
        )
        for user, nanos, *part in shares["users"]
    ]
    if len({u[0] for u in users}) == len(users) and all(k[0] != "user" for k in found):
        # Each user named once, and no counter of the team's a user's: every key is new,
        # and after the others' in lock order (scope "user" last), built in that order.
        users.sort()
        windows.sort()
        rows = [(*key, *found[key]) for key in found]
        for team in dict.fromkeys(w[0] for w in windows):
            own = [(p, s) for t, p, s in windows if t == team]
            rows += [("user", team, u[0], p, s, *u[1:]) for u in users for p, s in own]
        return rows
    for user, *added in users:
        for team, period, start in windows:
            total = found.setdefault(("user", team, user, period, start), [0] * len(added))
            for i, value in enumerate(added):
                total[i] += value
    return [(*key, *found[key]) for key in sorted(found)]


def shared(text: str) -> bool:
    """Whether a row's counters text holds users' shares (`reservation_text`)."""
    return text.endswith("}]")


def _part(delta: int, part: int, whole: int) -> int:
    """`delta` in the proportion `part` is of `whole` (exactly `part` when `delta` is
    `whole`, `-part` when it is `-whole`)."""
    return delta * part // whole if whole else 0


def counters_of(text: str) -> list[Counter]:
    return [Counter(*item) for item in json.loads(text)]


def with_organization(counters: Iterable[Counter]) -> list[Counter]:
    """`counters` plus the organization counter of each team counter's window, once each,
    in lock order (scope, team, user, period, start).

    The organization's counters are real rows that every team's writes update too
    (schema version 2), so reading one is reading one row."""
    found = set(counters)
    found |= {
        Counter("organization", "", "", c.period, c.start) for c in found if c.scope == "team"
    }
    return sorted(found, key=counter_key)


@functools.lru_cache(maxsize=4096)
def written_keys(text: str) -> tuple[tuple[Any, ...], ...]:
    """The budget_usage keys a reservation's writes touch, in lock order, from its row's
    `counters` text. Every request of a team, user and period writes the same ones, so
    they are worked out once (a string's hash is cached; a tuple of Counters' is not)."""
    return tuple(counter_key(c) for c in with_organization(counters_of(text)))


# -- what writes add to counters -------------------------------------------------


def token_deltas(usage: Usage, sign: int) -> tuple[int, int, int, int]:
    """What `usage` adds to a counter's token columns (negative to take it back): the text
    and image columns count the image model's kinds, `total_tokens` every token (a
    Responses API mainline model's included)."""
    return (
        sign * (usage.text_input + usage.cached_text_input),
        sign * (usage.image_input + usage.cached_image_input),
        sign * usage.image_output,
        sign * usage.total_tokens,
    )


def settled_tokens(actual: Usage, reserved: Usage) -> tuple[int, ...]:
    """What a settlement adds to a counter's token columns: the usage metered, less the
    estimate its reservation added."""
    added, taken_back = token_deltas(actual, 1), token_deltas(reserved, -1)
    return tuple(a + b for a, b in zip(added, taken_back, strict=True))


def reserved(entry: Entry, usage: Usage) -> Deltas:
    """A reservation holds its estimate and its estimated usage."""
    return 0, entry.estimated_nanos, token_deltas(usage, 1)


def settled(settlement: Settlement, release: int, charged: int, held: Usage) -> Deltas:
    """A settlement charges its cost in place of what was `charged` (nothing, or the bound
    a reclaim charged), releases what was reserved (`release`), and counts its usage in
    place of the estimate the reservation added (`held`)."""
    tokens = settled_tokens(settlement.usage, held)
    return settlement.cost_nanos - charged, -release, tokens


def reclaimed(bound: int) -> Deltas:
    """Reserved becomes spent; the estimated usage it holds stays counted."""
    return bound, -bound, NO_TOKENS
