"""The ledger's interface and the rows it stores."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from proxy.core.errors import LedgerError
from proxy.core.models import Counter, Endpoint, Entry, Period, Settlement, Totals, Usage
from proxy.core.rates import Counts, Paced, Plan, Slot
from proxy.ledger.kept import FirstAttempt, KeptAnswer, KeptTail, RepeatGuard


@dataclass(frozen=True, slots=True)
class UserShare:
    """The part of a batch's reservation that the lines naming one user may cost: held in
    that user's counters (of the same windows as the team's) instead of the whole bound."""

    user: str
    nanos: int
    usage: Usage


@dataclass(frozen=True, slots=True)
class Reservation:
    """A request about to be forwarded: its row, its bound, the counters it adds to."""

    entry: Entry
    usage: Usage
    """The estimated usage, held in the counters until the request settles."""
    counters: tuple[Counter, ...]
    paced: Paced | None = None
    """What its rate limits counted, and the room they have left (when it has any)."""
    project: str | None = None
    """The OpenAI project it is sent under (None: none is sent), recorded on its row: a
    response it creates is found upstream only there."""
    mainline_nanos: int = 0
    """The part of the bound that is a Responses request's mainline model's, recorded on its
    row (`mainline_cost_nanos`): a reservation charged its bound (reclaimed) is split
    between its two models as OpenAI bills them, in reports and in `reconcile`."""
    shares: tuple[UserShare, ...] = ()
    """A batch whose lines name users: each user's share, held in that user's counters of
    the windows of the team's `counters` (which then name no user's). Its settlement, a
    reclaim or a resolution moves each share as it moves the bound, in proportion."""
    share_periods: tuple[Period, ...] = ()
    """The periods whose windows hold the users' `shares` (those of the team's per-user
    budgets): a user's counters of other periods, which no budget reads, are not written
    (a file naming 50,000 users wrote 200,000 counters). Empty: every period's."""
    written: Written | None = None
    """Its counters text and what it adds to each counter, worked out before its
    transaction (`codecs.written`, of this reservation): a batch's, which no totals
    change, off the event loop. None: worked out in the transaction."""


@dataclass(frozen=True, slots=True)
class Written:
    """What a reservation writes besides its row: its counters text
    (`codecs.reservation_text`) and each counter's deltas (`codecs.counter_rows` of its
    reserved bound and usage), in lock order."""

    text: str
    rows: tuple[tuple[Any, ...], ...]


Chooser = Callable[[Mapping[Counter, Totals]], Reservation]


OUTCOME_UNKNOWN = "outcome_unknown"
"""The error code of a reservation reclaimed before its request's outcome was known (its
process died, or it outlived every deadline): charged its bound, flagged."""
RECLAIMED = frozenset({OUTCOME_UNKNOWN, "abandoned"})
"""Error codes of reclaimed rows (`abandoned`: released at $0 before schema version 3); a
settlement arriving after the reclaim replaces what the reclaim charged."""


@dataclass(frozen=True, slots=True)
class Flagged:
    """A flagged row, as an operator reconciles it (`tollgate ledger flagged`)."""

    id: str
    team: str | None
    started_at: float
    estimated_nanos: int
    """The bound reserved for it."""
    cost_nanos: int
    """What it is charged now: the bound, or the operator's resolution."""
    outcome: str | None
    error_code: str | None
    upstream_request_id: str | None
    resolved_at: float | None = None
    resolution: str | None = None
    """The operator's note (empty when none was given); None while unresolved."""


@dataclass(frozen=True, slots=True)
class Owner:
    """A Tollgate process that holds reservations, and how long ago it last said it was alive."""

    id: str
    host: str
    pid: int
    silent_s: float = 0.0
    """Seconds since its last heartbeat, on the ledger's clock (`Ledger.heartbeat`): never
    one host's clock against another's."""


SILENT_S = 30.0
"""How long a process may go without a heartbeat (every 5 s) before it is taken for dead:
several missed heartbeats."""


def this_host() -> str:
    """Where this process's pid means something: the host's name, and the pid namespace
    the pid is read in. Containers on the host network share the host's name but not its
    pids: by the name alone, a live process in another one, whose pid is no process here,
    was judged dead at once, and its reservations in flight charged their bound."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # no /proc: one namespace
        return socket.gethostname()
    return f"{socket.gethostname()} {namespace}"


@dataclass(frozen=True, slots=True)
class Row:
    """A ledger row as read back."""

    entry: Entry
    settlement: Settlement | None
    """None while the request is in flight (its estimate is reserved)."""


@dataclass(frozen=True, slots=True)
class ResponseRow:
    """A Responses API response forwarded through Tollgate, as its row knows it: who
    created it (only that team may read, cancel, delete or continue it) and the context a
    `previous_response_id` naming it carries into the next response's bound."""

    response_id: str
    request_id: str
    team: str
    input_tokens: int
    """Its mainline input tokens, cached ones included (while it is in flight: the bound)."""
    output_tokens: int
    """Its mainline output tokens (while it is in flight: the bound)."""
    images: int
    """The images it produced (while it is in flight: the most it may produce)."""
    context_images: int
    """The images its own context carried (see `Entry.context_images`)."""
    held: bool
    """A background response whose reservation is held until it ends (see `Ledger.hold`)."""
    project: str | None = None
    """The OpenAI project it was created under (None: none was sent), where OpenAI keeps it
    and so where it is read, cancelled and deleted."""
    project_known: bool = True
    """False for a row written before schema version 10 that did not record its project
    (only held rows did, from version 9): the team's project now is the best guess left."""
    in_flight: bool = False
    """Its reservation is not settled yet: held, or a stream still being read."""


@dataclass(frozen=True, slots=True)
class HeldEntry:
    """A held reservation as a process that adopted it reads it (`Ledger.held_entry`):
    what it needs to settle it, and where to read its object upstream."""

    entry: Entry
    usage: Usage
    """Its reserved usage."""
    project: str | None
    """The OpenAI project it was created under (`Ledger.hold`), None when it was sent
    without one: OpenAI finds a response or batch only in the project that created it."""
    project_known: bool = True
    """False for a reservation held before schema version 9, which did not record its
    project: the team's project now is the best guess left."""


ObjectKind = Literal["file", "batch"]


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A file or batch forwarded through Tollgate: only its team may see or use it."""

    id: str
    team: str
    kind: ObjectKind
    purpose: str | None = None
    """A file's purpose (`batch`, `vision`, `user_data`, `batch_output`)."""
    created_at: float = 0.0
    lines: int = 0
    """A batch input file: its lines (a batch: those of its input file)."""
    bound_nanos: int = 0
    """A batch input file: the sum of its lines' bounds at batch rates."""
    bound_usage: Usage = field(default_factory=Usage)
    """A batch input file: the sum of its lines' bounded usage (for token budgets)."""
    input_file_id: str | None = None
    """A batch: its input file."""
    project: str | None = None
    """The OpenAI project it was created under (None: none was sent), where OpenAI keeps it
    and so where it is read, cancelled and deleted (a batch's output and error files: the
    batch's)."""
    project_known: bool = True
    """False for an object recorded before schema version 10, which did not record its
    project: the team's project now is the best guess left."""


@dataclass(frozen=True, slots=True)
class OpenBatch:
    """A batch in flight: what its reservation holds."""

    batch_id: str
    team: str
    reserved_nanos: int
    started_at: float


@dataclass(frozen=True, slots=True)
class Holding:
    """A reservation in flight (a request, a background response, a batch): what it holds,
    and for which models and project. OpenAI may already have billed it."""

    team: str
    model: str | None
    mainline_model: str | None
    project: str | None
    """As stored: `codecs.project_read`."""
    started_at: float
    reserved_nanos: int
    mainline_nanos: int
    """Of `reserved_nanos`, a Responses request's mainline model's part."""


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One line of a batch input file, as Tollgate priced it at upload."""

    custom_id: str
    line: int
    """Its line number in the file, from 1."""
    endpoint: Endpoint
    model: str
    quality: str
    size: str
    n: int
    user: str | None
    bound_nanos: int
    mainline: str | None = None
    """A `/v1/responses` line's mainline model (`model` is then its image tool's); None for
    an image line."""
    policy: str | None = None
    """What the team's `allow` rules read of the line beyond these fields, as
    `proxy.doors.batches.policy_text` writes it: its batch's create checks the line again
    under the rules in force then. None for a line stored before the ledger kept it."""


@dataclass(frozen=True, slots=True)
class BilledLine:
    """A billed line of an ended batch, as its settlement writes it: its row and the
    counters its cost goes to (those of the day the batch ended)."""

    entry: Entry
    settlement: Settlement
    counters: tuple[Counter, ...]


GroupColumn = Literal[
    "team", "cost_center", "user", "key_id", "model", "quality", "size", "endpoint", "outcome",
    "mainline_model", "project",
]  # fmt: skip
"""What a report may group settled rows by (model/quality/size: as sent, else as requested;
`mainline_model`: a Responses request's, None for the Images API; `project`: the OpenAI
project it was sent under as stored, `codecs.project_read`)."""


@dataclass(frozen=True, slots=True)
class Aggregate:
    """Sums over one group of settled rows (see `Ledger.summarize`)."""

    keys: tuple[Any, ...]
    """The group's values of the requested columns, then its time bucket if one was asked."""
    requests: int = 0
    images: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    cost_nanos: int = 0
    mainline_text_input_tokens: int = 0
    """Of `text_input_tokens`, a Responses request's mainline model's (cached included)."""
    mainline_cost_nanos: int = 0
    """Of `cost_nanos`, a Responses request's mainline model's part."""


Batch = tuple[list[str], list[tuple[Any, ...]]]
"""Rows of one table as stored: its column names, then rows of values in their order."""


@dataclass(frozen=True, slots=True)
class Contents:
    """What a ledger holds, as counted (a copy is counted back on its target)."""

    requests: int
    counters: int
    """Budget counters (team, user and organization), but the zero row every ledger has."""
    alerts: int
    cost_nanos: int
    """What its requests cost, in all."""
    objects: int = 0
    """Files and batches recorded (see `Ledger.own`)."""

    def refuse_to_merge(self, name: str) -> None:
        """LedgerError unless the ledger `name` is empty: a copy never merges two histories."""
        held = {
            "requests": self.requests,
            "alerts": self.alerts,
            "counters": self.counters,
            "files and batches": self.objects,
        }
        if any(held.values()):
            found = ", ".join(f"{count} {what}" for what, count in held.items() if count)
            raise LedgerError(
                f"{name} is not empty ({found}): ledger copy does not merge histories; "
                "copy into a fresh database (or drop its Tollgate tables) and run it again"
            )


class Ledger(Protocol):
    async def reserve(
        self,
        read: Sequence[Counter],
        choose: Chooser,
        pace: Plan | None = None,
        guard: RepeatGuard | None = None,
    ) -> Reservation:
        """Atomically: read the totals of `read`, let `choose` decide on them, and store its
        reservation (the row, and its bound added to its counters). With `pace`, the
        request as chosen must also fit its rate limits (`Plan.admit`, on the counts read
        in the same transaction), and their counts are added to. With `guard` (a repeat),
        the latest attempt of its request must still be the one it went past, read in the
        same transaction, after every reservation before it (else RepeatArrived). Whatever
        `choose`, `pace` or `guard` raises aborts the transaction and propagates."""

    async def rate_counts(self, plan: Plan) -> Counts:
        """The counts a plan reads, now (for what the room of a team's limits is)."""

    async def rate_windows(self, slots: Sequence[Slot]) -> dict[Slot, int]:
        """What each of `slots` counted (those never added to are left out), in one read
        however many: the rate gauges read every limit's current window at each scrape."""

    async def forget_counts(self, before: float) -> int:
        """Forget the rate counts of windows that started before `before`."""

    async def settle(self, request_id: str, settlement: Settlement) -> None:
        """Replace the reservation of `request_id` by its final outcome and cost, in the row
        and in its counters. A reservation reclaimed meanwhile (see `reclaim`) has its bound
        replaced by this cost, unless an operator resolved it; a request settled already
        is left as it is (a retry whose first attempt committed unseen)."""

    async def totals(self, counters: Sequence[Counter]) -> dict[Counter, Totals]:
        """The current totals of `counters` (organization counters sum every team's)."""

    async def record(self, entry: Entry, settlement: Settlement) -> None:
        """Store a request that was never forwarded (rejected, invalid)."""

    async def reclaim(
        self,
        now: float,
        *,
        started_before: float = 0.0,
        older_than_s: float = math.inf,
        owners: Sequence[str] = (),
    ) -> int:
        """Settle at their bound the reservations of dead `owners`, any reserved more than
        `older_than_s` ago on the ledger's clock (`Dialect.clock`: every replica's judged
        alike, whatever its own wall clock; one reserved before the ledger recorded its
        clock, by its `started_at` against `now`), and any started before `started_before`
        (the rows' own `started_at`, written by their process's clock). Their outcome is
        unknown and OpenAI may have billed them. Each is charged its reserved cost and usage
        (moved from reserved to spent in its counters), outcome `upstream_error`, error code
        `outcome_unknown`, flagged; never freed. Returns how many."""

    async def flagged(self, start: float, end: float) -> list[Flagged]:
        """The settled flagged rows started in [start, end), oldest first."""

    async def resolve(self, request_id: str, cost_nanos: int, now: float, note: str = "") -> int:
        """Set the true cost of the flagged row `request_id` (a cost of 0: nothing was
        billed, so its usage is taken back too), adjusting its counters by the difference in
        the same transaction; the row stays flagged, with `resolved_at` and the note.
        Returns the cost it had before. LedgerError if it is unknown, in flight or not
        flagged."""

    async def register(self, owner: Owner) -> None:
        """Mark the reservations this process makes as its own, and say it is alive."""

    async def heartbeat(self) -> None:
        """Say this process is still alive, at the ledger's time: the database server's
        clock on PostgreSQL, the machine's time since it booted on SQLite (which every
        process sharing the file reads alike). The clock of the process is never used: two
        hosts' clocks apart by more than a process may stay silent judged each other dead."""

    async def owners(self) -> list[Owner]:
        """Every process known to hold reservations, with how long it has been silent
        (`Owner.silent_s`, on the ledger's clock); an owner never seen alive has host ''."""

    async def unregister(self) -> None:
        """This process stops cleanly: forget it."""

    async def rows(self, since: float = 0.0) -> list[Row]:
        """Every row started at or after `since`, oldest first."""

    async def summarize(
        self,
        start: float,
        end: float,
        by: Sequence[GroupColumn],
        bucket_seconds: int | None = None,
    ) -> list[Aggregate]:
        """Sums of the settled rows started in [start, end), grouped by `by` and, with
        `bucket_seconds`, by `floor(started_at / bucket_seconds)` (appended to the keys).
        Rows in flight (reserved) are not spend yet and are left out."""

    def export(self, start: float, end: float) -> AsyncGenerator[dict[str, Any], None]:
        """Every row (settled or in flight) started in [start, end), oldest first, as
        column -> value; streamed in batches, in constant memory."""

    async def export_columns(self) -> list[str]:
        """The columns of a row `export` yields, in its order (a header for no rows)."""

    async def hold(self, request_id: str, response_id: str, project: str | None = None) -> None:
        """Keep the reservation of `request_id`, a background response `response_id` that
        has not ended, until it is settled: `reclaim` never settles it at its bound; when its
        process stops, `adopt` hands it to a live one, which follows it to its end. Records
        `response_id` and `project`, the OpenAI project it was created under (None: none was
        sent), on the row, so that it is followed under that project whatever the team's is
        by then (on a row no longer in flight, only that: a reclaimed reservation stays
        charged at its bound until its settlement replaces it). LedgerError if there is no
        request `request_id`."""

    async def claim(self, request_id: str, batch_id: str, project: str | None = None) -> bool:
        """Hold the reservation of `request_id` for the batch `batch_id` (as `hold`) unless
        another row already names that batch: a batch is followed, and charged, by one
        reservation only. Whether it was claimed (atomically: two reservations claiming one
        batch at once, on any worker or replica, never both get it). LedgerError if there is
        no request `request_id`."""

    async def lost_batches(self, since: float) -> list[tuple[HeldEntry, str]]:
        """Each batch create started since `since` that was charged its bound, flagged,
        because its answer was lost or its process stopped, still unresolved, and whose row
        names the batch found for it since (`claim` on a settled row): its entry, usage and
        project, and the batch's id, for a follower to resolve it to its lines' cost."""

    async def seeking(self, request_id: str, code: str) -> None:
        """Mark the batch create `request_id`, in flight, as one whose answer was lost and
        that looks for the batch it may have made (`code` on its row until it is settled):
        `unanswered` no longer counts it."""

    async def unanswered(self, team: str, request_id: str, before: float) -> list[float]:
        """When each batch create of `team` but `request_id` that started before `before`
        and still waits for its upstream's answer started: a batch the upstream lists may
        be one of theirs, not yet held."""

    async def name_response(
        self, request_id: str, response_id: str, project: str | None = None
    ) -> None:
        """Record on the row of `request_id`, in flight, the response `response_id` it is
        and the OpenAI project it was created under, as soon as a stream names it: its
        team may read, cancel or delete it while it runs (`response`). Its reservation is
        not held (`hold` is for responses no one is reading). LedgerError if there is no
        request `request_id`."""

    async def first_attempt(
        self, team: str, since: float, *, content: str | None = None, key: str | None = None
    ) -> FirstAttempt | None:
        """The latest request of `team` started at or after `since` with the content digest
        `content` (or, given `key`, with that idempotency key, whatever its content), not
        itself a replay; None when there is none."""

    async def keep_answer(self, answer: KeptAnswer, store_bytes: int) -> bool:
        """Keep `answer` for the repeats of its request, the kept answers' bodies staying
        within `store_bytes` in all: the oldest are forgotten first; an answer larger than
        `store_bytes` is not kept (False). One transaction."""

    async def kept_answer(self, request_id: str) -> KeptAnswer | None:
        """The answer kept for `request_id`, if one is (a stream: every chunk kept so far)."""

    async def append_chunk(
        self, request_id: str, seq: int, chunk: bytes, now: float, store_bytes: int
    ) -> bool:
        """Add `chunk`, the `seq`th (from 0), to the live stream kept for `request_id` (kept
        by `keep_answer` with `live`), the kept answers staying within `store_bytes` as
        `keep_answer` keeps them: the stream, kept at `now` from then on, is the newest and
        forgotten last. False, and the stream forgotten, when it is no longer kept or would
        outgrow `store_bytes`. One transaction."""

    async def end_stream(self, request_id: str) -> bool:
        """The live stream kept for `request_id` ended: its chunks are its whole answer.
        False when it is no longer kept."""

    async def forget_answer(self, request_id: str) -> None:
        """Forget the answer kept for `request_id` and its chunks (a live stream that broke
        off: its repeats then end theirs)."""

    async def kept_tail(self, request_id: str, after: int) -> KeptTail | None:
        """The answer kept for `request_id` with, as its body, its chunks after the
        `after`th (after -1: its whole body so far, a whole answer's included); None when
        none is kept. Whether it is still `live` is read before its chunks: a stream read
        as ended is read to its end."""

    async def forget_answers(self, kept_before: float) -> int:
        """Forget the answers kept before `kept_before` (past the retry window), and their
        chunks."""

    async def open_batches(self) -> list[OpenBatch]:
        """Every batch in flight (held), oldest first, with what it holds reserved."""

    async def holding(self, before: float) -> list[Holding]:
        """Every reservation in flight started before `before`, oldest first."""

    async def held(self) -> list[tuple[str, str]]:
        """(request id, response id) of every held reservation this process owns (none
        before it is `register`ed)."""

    async def adopt(self, owners: Sequence[str]) -> int:
        """Make the held reservations of the (stopped) processes `owners`, and those of no
        process, this process's own, so it follows them, atomically: of two processes
        adopting together, each row goes to one. Returns how many (0 before this process is
        `register`ed: it has no id to own them by)."""

    async def held_entry(self, request_id: str) -> HeldEntry | None:
        """The entry, reserved usage and project of the held reservation `request_id` (None
        when it is not one): what a process that adopted it needs to follow and settle it."""

    async def response(self, response_id: str) -> ResponseRow | None:
        """The row of the response `response_id` (settled, or in flight and held), or
        None when Tollgate never forwarded it."""

    async def own(self, obj: StoredObject, lines: Sequence[BatchLine] = ()) -> None:
        """Record that `obj` belongs to its team, with a batch input file's priced `lines`,
        in one transaction (a 50,000-line file included). An id recorded already keeps its
        first owner (LedgerError if another team's)."""

    async def stored(self, object_id: str) -> StoredObject | None:
        """The object `object_id` as recorded, or None when Tollgate never forwarded it."""

    async def teams_of(self, object_ids: Sequence[str]) -> dict[str, str]:
        """The team of each of `object_ids` Tollgate forwarded (to filter a listing)."""

    async def owns_any(self, team: str, kind: ObjectKind) -> bool:
        """Whether `team` has any object of `kind` recorded (a listing of a team without
        one reads nothing upstream)."""

    async def objects_past(
        self,
        team: str,
        kind: ObjectKind,
        project: str | None,
        purpose: str | None,
        newest: bool,
        edge: float,
        limit: int,
    ) -> list[StoredObject]:
        """Up to `limit` of `team`'s objects of `kind` that OpenAI lists under `project` (the
        team's project now: those created under it, and those recorded before their
        project was), of `purpose` when given, in the ledger's order (`created_at`, then
        id): newest first when `newest`, recorded at or before `edge` (the ledger's time);
        else oldest first, at or after it. A listing jumps to them past a run of other
        teams' objects (`proxy.web.files.jump`)."""

    async def batch_lines(self, file_id: str) -> dict[str, BatchLine]:
        """The priced lines of the batch input file `file_id`, by `custom_id`."""

    async def settle_batch(
        self, request_id: str, lines: Sequence[BilledLine], outcome: Settlement
    ) -> int:
        """Settle the (held) reservation `request_id` of a batch that ended by the rows of
        its billed `lines`, in one transaction: the reservation's bound and usage leave its
        counters (each user's share from hers), and each line's cost and usage is added to
        its own `counters` (summed per counter first: one write per counter, whatever the
        number of lines). The reservation's row becomes the first line's row, so a batch's
        rows are its billed lines; with no billed line it is settled as `outcome` says (cost
        0). A reservation settled already is left as it is (returns 0). Returns the rows
        written."""

    async def claim_alert(self, key: str, now: float) -> bool:
        """Remember that the budget alert `key` was sent: True only the first time, for
        every worker and replica (the claim and the check are one atomic step)."""

    async def ping(self) -> None:
        """Raise LedgerError when the ledger cannot be reached."""

    async def close(self) -> None: ...


class Backend(Ledger, Protocol):
    """A ledger as opened: the Ledger, and its whole history read out or written in (the
    live-process registry aside), whatever the database."""

    def dump(self, table: str) -> AsyncIterator[Batch]:
        """The rows of `table` as stored, a batch at a time, in constant memory."""

    async def restore(self, tables: AsyncIterable[tuple[str, Batch]]) -> None:
        """Write the rows of `tables` (each batch with its table's name) into this empty
        ledger, in one transaction: it holds all of them or, on any error, none. LedgerError
        if it holds anything already (see `Contents.refuse_to_merge`)."""

    async def contents(self) -> Contents:
        """What this ledger holds."""
