"""The SQL both ledger backends run, written once and spelled by a `Dialect`.

`statements(SQLITE)` and `statements(POSTGRES)` hold the same statements with the
same parameters in the same order; a backend decides only how to run them (on which
connection, in which transaction, in how many round trips). The reads that exist
for one backend's mechanics alone (SQLite's checkpoints, PostgreSQL's locks and
batched counter writes) stay in that backend's module.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from proxy.ledger.base import OUTCOME_UNKNOWN, Flagged, GroupColumn
from proxy.ledger.codecs import (
    ANSWER_COLUMNS,
    BILL_COLUMNS,
    BILL_FIRST_COLUMNS,
    ENTRY_COLUMNS,
    FIRST_COLUMNS,
    KEY_COLUMNS,
    LINE_COLUMNS,
    OBJECT_COLUMNS,
    RESERVATION_COLUMNS,
    ROW_COLUMNS,
    SETTLEMENT_COLUMNS,
    TOTALS_COLUMNS,
    USAGE_COLUMNS,
)
from proxy.ledger.dialect import Dialect

COPIED_TABLES = ("requests", "budget_usage", "alerts_sent", "stored_objects", "batch_lines")
"""What a copy moves: every table but the live-process registry, the schema's version and
the answers kept for repeats (a cache for the retry window) and the rate-limit counts (of
a minute or a day, gone by the time a copy is put to use)."""
COPY_BATCH = 5000
"""Rows a copy reads and writes at a time."""
EXPORT_BATCH = 1000
"""Rows the audit export reads at a time."""

# How each group column is read: what was sent, else (rejections) what was requested.
GROUP_SQL: dict[GroupColumn, str] = {
    "team": "team",
    "cost_center": "cost_center",
    "user": '"user"',
    "key_id": "key_id",
    "model": "COALESCE(model, model_requested)",
    "quality": "COALESCE(quality, quality_requested)",
    "size": "COALESCE(size, size_requested)",
    "endpoint": "endpoint",
    "outcome": "outcome",
    "mainline_model": "mainline_model",
    "project": "project",
}
MAINLINE_INPUT = "mainline_input_tokens + mainline_cached_input_tokens"
SUMS = (
    "COUNT(*)",
    "SUM(images)",
    f"SUM(text_input_tokens + cached_text_input_tokens + {MAINLINE_INPUT})",
    "SUM(image_input_tokens + cached_image_input_tokens)",
    "SUM(image_output_tokens)",
    "SUM(cost_nanos)",
    f"SUM({MAINLINE_INPUT})",
    # An operator's resolution sets a row's cost, not its parts: the mainline part is never
    # more than the whole.
    "SUM(CASE WHEN mainline_cost_nanos < cost_nanos THEN mainline_cost_nanos ELSE cost_nanos END)",
)
"""`Aggregate`'s sums, in its order: text input counts a Responses request's mainline input
too, and the last two are the mainline model's part of the text input and of the cost."""
COUNTED = "NOT (scope = 'organization' AND period = 'total' AND start = 0)"
"""Counters but the zero row migrations create, which an empty ledger holds."""
RECLAIM_SET = (
    "state = 'settled', cost_nanos = reserved_nanos, reserved_nanos = 0, "
    f"outcome = 'upstream_error', error_code = '{OUTCOME_UNKNOWN}', flagged = 1, "
    "billing_by = NULL, billed_lines = 0, billed_nanos = 0"
)
"""What a reclaim sets on a reservation (its `finished_at` aside): charged its bound, in
place of any line a chunked settlement wrote (`forget_claimed`)."""


def names(columns: Sequence[str]) -> str:
    """Column names as both databases read them (`user` is a reserved word in PostgreSQL)."""
    return ", ".join('"user"' if c == "user" else c for c in columns)


def marks(count: int) -> str:
    return ", ".join("?" * count)


KEYS = names(KEY_COLUMNS)
TOTALS = names(TOTALS_COLUMNS)


def add_to_counters(source: str) -> str:
    """Add the totals of each row of `source` (a counter's key, then what it adds to each
    of `TOTALS_COLUMNS`) to that counter, creating its row if it has none yet."""
    return (
        f"INSERT INTO budget_usage ({KEYS}, {TOTALS}) {source} ON CONFLICT ({KEYS}) "
        "DO UPDATE SET "
        + ", ".join(f"{c} = budget_usage.{c} + excluded.{c}" for c in TOTALS_COLUMNS)
    )


@dataclass(frozen=True, slots=True)
class Statements:
    """The statements of one dialect (see `statements`); `?` in the docs is a parameter."""

    dialect: Dialect
    insert_reservation: str
    """A reservation's row: `reservation_values`; its `reserved_clock` the ledger's clock."""
    record: str
    """A request never forwarded: `record_values`."""
    settle: str
    """`settlement_values`, then the id: the row settled."""
    settle_reserved: str
    """`settle`, when the row is still the reservation."""
    settling: str
    """What a settlement replaces: state, error code, resolution time, cost, reservation,
    counters text and usage of the row of id `?`."""
    reclaim: str
    """(finished at, id): a reservation charged its bound (`RECLAIM_SET`)."""
    forget_claimed: str
    """(id, id): the lines a chunked settlement of the batch reservation `id` wrote
    (`sqlite_batches`), deleted as it is reclaimed: its bound is charged in their place."""
    flagged: str
    """(start, end): the settled flagged rows started then, as `Flagged`."""
    resolving: str
    """What a resolution replaces: state, flagged, cost, counters text and usage of the
    row of id `?`."""
    resolve: str
    """(cost, resolved at, note, id)."""
    resolve_free: str
    """`resolve`, taking back the row's usage too."""
    heartbeat: str
    """(owner, host, pid): beaten now, on the ledger's clock (`Dialect.clock`)."""
    owners: str
    """Every process (owner, host, pid, seconds since its last heartbeat on the ledger's
    clock), and the owners of reservations that are none of them (host '', 0, 0)."""
    unregister: str
    """(owner,)."""
    rows: str
    """(since,): rows in `ROW_COLUMNS` order."""
    claim_alert: str
    """(key, now): writes a row only the first time."""
    export: str
    """(start, end): whole rows, in the export's order."""
    export_first: str
    """(start, end, limit): the first batch of `export`."""
    export_next: str
    """(at, at, after id, end, limit): the batch after the row (at, after id)."""
    export_columns: str
    """No row: the columns of `export`, in its order."""
    contents: str
    """How many requests, counters and alerts a ledger holds, and the requests' cost."""
    hold: str
    """(response id, project, id): a background response's id and the project it was created
    under ('' for none) on its row, and its reservation held (a row no longer in flight
    gets the id and project only)."""
    claimed_by: str
    """(response id, id): a row other than `id` naming that response id: the reservation
    that holds that batch (or one of its billed lines)."""
    seeking: str
    """(error code, id): a batch create in flight whose answer was lost, marked as looking
    for the batch it may have made (`unanswered` leaves it out)."""
    unanswered: str
    """(team, id, before): when each batch create of the team but `id` that was started
    before then and still waits for its answer (reserved, not held, not `seeking`) started."""
    name_response: str
    """(response id, project, id): the id of the response a reservation in flight is and
    the project it was created under, on its row; its reservation is not held."""
    held: str
    """(owner,): (id, response id) of the held reservations of `owner`."""
    open_batches: str
    """(): the batches held in flight: (batch id, team, reserved nanos, started at)."""
    holding: str
    """(before,): the `Holding` fields of every reservation in flight started before: what
    it holds still (`HELD`), its mainline part no more than that."""
    response: str
    """(response id,): the `ResponseRow` fields but the response id, of its latest row (its
    project as stored: `codecs.project_read`)."""
    held_entry: str
    """(id,): the entry, reserved usage and project of a held reservation (`ENTRY_COLUMNS`,
    then `USAGE_COLUMNS`, then `project`)."""
    lost_batches: str
    """(since,): the entry, usage and project of each batch create started since then that
    was charged its bound, flagged, for a lost answer (`LOST_CODES`) or a stopped process,
    unresolved, whose row names the batch found for it since (`held_entry`'s columns, then
    the batch's id)."""
    own: str
    """`object_values`: an object recorded, unless its id is already (then nothing)."""
    owner_of: str
    """(id,): the team an object was recorded for."""
    owns_any: str
    """(team, kind): a row when the team has an object of that kind."""
    insert_line: str
    """A batch input file's line, in `LINE_COLUMNS` order."""
    stored: str
    """(id,): an object in `OBJECT_COLUMNS` order."""
    batch_lines: str
    """(file id,): its lines in `LINE_COLUMNS` order but the file's id, by line number."""
    settling_batch: str
    """(id,): state, reserved nanos, counters text, response id, project and usage of a
    batch's reservation, locked."""
    bill_first: str
    """A billed line's row (`BILL_FIRST_COLUMNS` values), then the id: the batch's
    reservation becomes its first billed line's row, still found by a repeat of its create."""
    bill: str
    """A batch's other billed lines: rows in `BILL_COLUMNS` order."""
    forget_billed: str
    """(batch id, token, id): the rows of the lines that the calls of a chunked settlement
    of the batch reservation `id` wrote (`sqlite_batches`), but those of the call of
    `token` ('' for none) and the reservation's own: a settlement that stopped half-way
    leaves them, and the call that settles the batch writes its own."""
    billed_done: str
    """(id,): a batch reservation's row no longer names a chunked settlement."""
    still_settling: str
    """(id,): the batch reservation whose chunked settlement (`sqlite_batches`) wrote the
    row `id` and has not ended (no row: none; a ledger copied half-way, on PostgreSQL too)."""
    first_by_content: str
    """(team, content digest, since): the latest row with that content started since then,
    not a replay, in `FIRST_COLUMNS` order, then its age on the ledger's clock."""
    first_by_key: str
    """(team, idempotency key, since): `first_by_content`, by idempotency key."""
    keep_answer: str
    """A kept answer's row, in `ANSWER_COLUMNS` order."""
    forget_answer: str
    """(request id,): the answer kept for it, which a new one replaces."""
    make_room: str
    """(bytes,): forget kept answers until what is left sums to `bytes` at most: those of
    the team keeping the most bytes first, oldest first (one team's flood of answers
    forgets its own before any other team's)."""
    make_room_chunks: str
    """(bytes,): the chunks of the answers `make_room` forgets; run before it."""
    kept_answer: str
    """(request id,): its kept answer in `ANSWER_COLUMNS` order, its size left out."""
    kept_head: str
    """(request id,): `kept_answer`, its body left out too."""
    kept_chunks: str
    """(request id, after): (seq, body) of its chunks after the `after`th, in order."""
    grow_stream: str
    """(bytes, now, request id, bytes, store bytes): a live stream grows by `bytes`, kept at
    `now`, unless it would outgrow the store (then no row is updated)."""
    keep_chunk: str
    """(request id, seq, body): a live stream's chunk."""
    still_kept: str
    """(request id,): a row when an answer is kept for it."""
    end_stream: str
    """(request id,): a live stream ended."""
    forget_chunks: str
    """(request id,): the chunks kept for it."""
    forget_answers: str
    """(kept before,): the answers kept before then."""
    forget_chunks_before: str
    """(kept before,): the chunks of the answers kept before then; run before
    `forget_answers`."""

    def teams_of(self, object_ids: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        """(id, team) of the objects `object_ids` recorded."""
        among = self.dialect.one_of("id", len(object_ids))
        sql = f"SELECT id, team FROM stored_objects WHERE {among}"
        return self.dialect.text(sql), self.dialect.values(object_ids)

    def objects_past(
        self,
        team: str,
        kind: str,
        project: str,
        purpose: str | None,
        newest: bool,
        edge: float,
        limit: int,
    ) -> tuple[str, tuple[Any, ...]]:
        """Up to `limit` of `team`'s objects of `kind` created under `project` (the column's
        value; NULL rows too, read under the team's project) and of `purpose` when given:
        recorded at or before `edge` newest first when `newest`, else at or after it
        oldest first; ties by id."""
        way, cmp = ("DESC", "<=") if newest else ("ASC", ">=")
        sql = (
            f"SELECT {names(OBJECT_COLUMNS)} FROM stored_objects WHERE team = ? AND kind = ? "
            "AND (project = ? OR project IS NULL)"
            + (" AND purpose = ?" if purpose is not None else "")
            + f" AND created_at {cmp} ? "
            f"ORDER BY created_at {way}, id{self.dialect.collate} {way} LIMIT ?"
        )
        values = (team, kind, project, *((purpose,) if purpose is not None else ()), edge, limit)
        return self.dialect.text(sql), values

    def stale(
        self, now: float, started_before: float, older_than_s: float, owners: Sequence[str]
    ) -> tuple[str, tuple[Any, ...]]:
        """The reservations a reclaim settles (id, bound, counters text), in id order:
        those started before `started_before`, those reserved more than `older_than_s` ago
        on the ledger's clock (a row reserved before the ledger recorded its clock: started
        before `now` less `older_than_s`), and those held by one of `owners`."""
        d = self.dialect
        owned = d.one_of("owner", len(owners))
        sql = (
            "SELECT id, reserved_nanos, counters FROM requests WHERE state = 'reserved' "
            f"AND held = 0 AND (started_at < ? OR reserved_clock < {d.clock} - ? "
            f"OR (reserved_clock IS NULL AND started_at < ?) OR {owned}) ORDER BY id"
            f"{d.for_update}"
        )
        values = (float(started_before), float(older_than_s), float(now - older_than_s))
        return d.text(sql), (*values, *d.values(owners))

    def adopt(self, owner: str, owners: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        """Make `owner` the owner of the held reservations of `owners` and of no owner.

        One statement: on PostgreSQL a second adopter waits for the first's row locks, then
        finds those rows no longer match (their owner changed), so no row is adopted twice."""
        owned = self.dialect.one_of("owner", len(owners))
        sql = (
            "UPDATE requests SET owner = ? WHERE state = 'reserved' AND held = 1 "
            f"AND (owner IS NULL OR {owned})"
        )
        return self.dialect.text(sql), (owner, *self.dialect.values(owners))

    def forget(self, owners: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
        """Forget the processes `owners`."""
        sql = f"DELETE FROM processes WHERE {self.dialect.one_of('owner', len(owners))}"
        return self.dialect.text(sql), self.dialect.values(owners)

    def summary(self, by: Sequence[GroupColumn], bucket_seconds: int | None) -> tuple[str, int]:
        """(start, end): sums of the settled rows started then, grouped by `by` and the
        time bucket if one is asked; and how many keys lead each row.

        The grouping happens in SQL (one pass over the period's rows), so a report over a
        million rows returns a few hundred groups. Days and months are local to the
        configured timezone, which SQLite knows nothing of: the caller asks for fixed-width
        UTC buckets (`bucket_seconds`, a divisor of a day chosen so that every local
        midnight in the period falls on a bucket edge) and folds the buckets into local
        days in Python."""
        keys = [GROUP_SQL[c] for c in by]
        if bucket_seconds is not None:
            keys.append(self.dialect.bucket(bucket_seconds))
        group = f" GROUP BY {', '.join(str(i + 1) for i in range(len(keys)))}" if keys else ""
        sql = (
            f"SELECT {', '.join([*keys, *SUMS])} FROM requests "
            f"WHERE state = 'settled' AND started_at >= ? AND started_at < ?{group}"
        )
        return self.dialect.text(sql), len(keys)


def settle_sql(where: str) -> str:
    # A response id the row was held with stays, should the settlement not repeat it.
    assignments = ", ".join(
        "response_id = COALESCE(?, response_id)" if c == "response_id" else f"{c} = ?"
        for c in SETTLEMENT_COLUMNS
    )
    return (
        f"UPDATE requests SET {assignments}, state = 'settled', reserved_nanos = 0, held = 0 "
        f"{where}"
    )


@functools.cache
def statements(dialect: Dialect) -> Statements:
    """Every shared statement in `dialect`'s spelling."""
    texts = {**_writes(dialect), **_reads(dialect)}
    return Statements(dialect, **{name: dialect.text(sql) for name, sql in texts.items()})


def _writes(d: Dialect) -> dict[str, str]:
    usage = ", ".join(USAGE_COLUMNS)
    resolve = "UPDATE requests SET cost_nanos = ?, resolved_at = ?, resolution = ?"
    # Forgotten in order until what is left fits: the answers of the team that keeps the
    # most bytes first, oldest first, then the next team's. One team's many answers push
    # out its own, never those of a team that keeps fewer; for one team, what is left is
    # the longest run of its newest that fits.
    crowded = (
        "SELECT request_id FROM (SELECT request_id, SUM(size) OVER (ORDER BY team_bytes DESC, "
        f"team{d.collate}, kept_at, request_id{d.collate} ROWS UNBOUNDED PRECEDING) - size "
        "AS before FROM (SELECT request_id, team, size, kept_at, SUM(size) OVER "
        "(PARTITION BY team) AS team_bytes FROM kept_answers) AS per_team) AS ordered "
        "WHERE before < (SELECT COALESCE(SUM(size), 0) FROM kept_answers) - ?"
    )
    return {
        "insert_reservation": f"INSERT INTO requests ({names(RESERVATION_COLUMNS)}, "
        f"reserved_clock) VALUES ({marks(len(RESERVATION_COLUMNS))}, {d.clock})",
        "record": f"INSERT INTO requests ({names(ROW_COLUMNS)}) VALUES ({marks(len(ROW_COLUMNS))})",
        "settle": settle_sql("WHERE id = ?"),
        "settle_reserved": settle_sql("WHERE id = ? AND state = 'reserved'"),
        "settling": "SELECT state, error_code, resolved_at, cost_nanos, reserved_nanos, "
        f"counters, {usage} FROM requests WHERE id = ?{d.for_update}",
        "reclaim": f"UPDATE requests SET {RECLAIM_SET}, finished_at = ? WHERE id = ?",
        "forget_claimed": "DELETE FROM requests WHERE response_id = (SELECT response_id "
        "FROM requests WHERE id = ? AND billing_by IS NOT NULL) AND billing_by IS NOT NULL "
        "AND id <> ?",
        "resolving": f"SELECT state, flagged, cost_nanos, counters, {usage} FROM requests "
        f"WHERE id = ?{d.for_update}",
        "resolve": f"{resolve} WHERE id = ?",
        "resolve_free": f"{resolve}, {', '.join(f'{c} = 0' for c in USAGE_COLUMNS)} WHERE id = ?",
        "heartbeat": "INSERT INTO processes (owner, host, pid, heartbeat_at) "
        f"VALUES (?, ?, ?, {d.clock}) "
        "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        "unregister": "DELETE FROM processes WHERE owner = ?",
        "claim_alert": "INSERT INTO alerts_sent (key, sent_at) VALUES (?, ?) "
        "ON CONFLICT DO NOTHING",
        "name_response": "UPDATE requests SET response_id = ?, project = ? WHERE id = ?",
        "seeking": "UPDATE requests SET error_code = ? WHERE id = ? AND state = 'reserved'",
        "hold": "UPDATE requests SET response_id = ?, project = ?, "
        "held = CASE WHEN state = 'reserved' THEN 1 ELSE 0 END WHERE id = ?",
        "own": f"INSERT INTO stored_objects ({names(OBJECT_COLUMNS)}) "
        f"VALUES ({marks(len(OBJECT_COLUMNS))}) ON CONFLICT (id) DO NOTHING",
        "insert_line": f"INSERT INTO batch_lines ({names(LINE_COLUMNS)}) "
        f"VALUES ({marks(len(LINE_COLUMNS))})",
        "settling_batch": f"SELECT state, reserved_nanos, counters, response_id, project, {usage} "
        f"FROM requests WHERE id = ?{d.for_update}",
        "bill_first": "UPDATE requests SET "
        + ", ".join(f"{names([c])} = ?" for c in BILL_FIRST_COLUMNS)
        + ", reserved_nanos = 0, held = 0 WHERE id = ? AND state = 'reserved'",
        "bill": f"INSERT INTO requests ({names(BILL_COLUMNS)}) VALUES ({marks(len(BILL_COLUMNS))})",
        "forget_billed": "DELETE FROM requests WHERE response_id = ? AND billing_by IS NOT NULL "
        "AND billing_by <> ? AND id <> ?",
        "billed_done": "UPDATE requests SET billing_by = NULL, billed_lines = 0, "
        "billed_nanos = 0 WHERE id = ?",
        "still_settling": "SELECT b.id FROM requests AS r JOIN requests AS b "
        "ON b.response_id = r.response_id WHERE r.id = ? AND r.billing_by IS NOT NULL "
        "AND b.state = 'reserved' AND b.billing_by IS NOT NULL",
        "keep_answer": f"INSERT INTO kept_answers ({names(ANSWER_COLUMNS)}) "
        f"VALUES ({marks(len(ANSWER_COLUMNS))})",
        "forget_answer": "DELETE FROM kept_answers WHERE request_id = ?",
        "make_room": f"DELETE FROM kept_answers WHERE request_id IN ({crowded})",
        "make_room_chunks": f"DELETE FROM kept_chunks WHERE request_id IN ({crowded})",
        "grow_stream": "UPDATE kept_answers SET size = size + ?, kept_at = ? "
        "WHERE request_id = ? AND live = 1 AND size + ? <= ?",
        "keep_chunk": "INSERT INTO kept_chunks (request_id, seq, body) VALUES (?, ?, ?)",
        "end_stream": "UPDATE kept_answers SET live = 0 WHERE request_id = ? AND live = 1",
        "forget_chunks": "DELETE FROM kept_chunks WHERE request_id = ?",
        "forget_answers": "DELETE FROM kept_answers WHERE kept_at < ?",
        "forget_chunks_before": "DELETE FROM kept_chunks WHERE request_id IN "
        "(SELECT request_id FROM kept_answers WHERE kept_at < ?)",
    }


LOST_CODES = (
    "upstream_unavailable", "upstream_timeout", "deadline_exceeded", "outcome_unknown",
    "batch_maybe_created",
)  # fmt: skip
"""The error codes of a batch create charged its bound because its answer was lost (a
reclaim's `outcome_unknown` too: its process stopped) or may have made a batch."""
HEADLESS = ("size", "body")
"""What `kept_head` leaves out of a kept answer's row."""
HELD = "reserved_nanos - billed_nanos"
"""What a reservation in flight still holds: its bound, less what the lines of a batch
settled a chunk at a time cost so far (0 but while one is written)."""


def _reads(d: Dialect) -> dict[str, str]:
    by_id = f"ORDER BY started_at, id{d.collate}"
    export = f"SELECT * FROM requests WHERE started_at >= ? AND started_at < ? {by_id}"
    return {
        "flagged": f"SELECT {', '.join(f.name for f in fields(Flagged))} FROM requests "
        f"WHERE flagged = 1 AND state = 'settled' AND started_at >= ? AND started_at < ? {by_id}",
        "owners": f"SELECT owner, host, pid, {d.clock} - heartbeat_at FROM processes UNION "
        "SELECT DISTINCT owner, '', 0, 0 FROM requests WHERE state = 'reserved' "
        "AND owner IS NOT NULL AND owner NOT IN (SELECT owner FROM processes)",
        "rows": f"SELECT {names(ROW_COLUMNS)} FROM requests WHERE started_at >= ? "
        f"ORDER BY {d.by_start}",
        "export": export,
        "export_first": f"{export} LIMIT ?",
        "export_columns": "SELECT * FROM requests LIMIT 0",
        "export_next": "SELECT * FROM requests WHERE started_at >= ? "
        f"AND (started_at > ? OR id{d.collate} > ?) AND started_at < ? {by_id} LIMIT ?",
        "open_batches": "SELECT response_id, team, reserved_nanos, started_at FROM requests "
        "WHERE state = 'reserved' AND held = 1 AND endpoint = 'batches' ORDER BY started_at",
        # What a batch's lines written so far cost is on settled rows already (a settlement
        # a chunk at a time, `sqlite_batches`): the reservation holds the rest of its bound.
        "holding": "SELECT team, model, mainline_model, project, started_at, "
        f"{HELD}, CASE WHEN mainline_cost_nanos < {HELD} THEN mainline_cost_nanos "
        f"ELSE {HELD} END FROM requests WHERE state = 'reserved' AND started_at < ? {by_id}",
        "held": "SELECT id, response_id FROM requests "
        f"WHERE state = 'reserved' AND held = 1 AND owner = ? {by_id}",
        "response": "SELECT team, id, mainline_input_tokens + mainline_cached_input_tokens, "
        "mainline_output_tokens, images, context_images, held, project, "
        "CASE WHEN state = 'reserved' THEN 1 ELSE 0 END FROM requests "
        f"WHERE response_id = ? ORDER BY started_at DESC, id{d.collate} DESC LIMIT 1",
        "held_entry": f"SELECT {names(ENTRY_COLUMNS)}, {names(USAGE_COLUMNS)}, project "
        "FROM requests "
        "WHERE id = ? AND state = 'reserved' AND held = 1",
        # On the flagged rows' index: a day's flagged rows, whatever the day's traffic.
        "lost_batches": f"SELECT {names(ENTRY_COLUMNS)}, {names(USAGE_COLUMNS)}, project, "
        "response_id FROM requests WHERE flagged = 1 AND started_at >= ? "
        "AND endpoint = 'batches' AND state = 'settled' AND resolved_at IS NULL "
        "AND response_id IS NOT NULL AND custom_id IS NULL AND COALESCE(status, -1) <> 0 "
        f"AND error_code IN ({', '.join(repr(c) for c in LOST_CODES)}) {by_id}",
        "contents": "SELECT (SELECT count(*) FROM requests), "
        f"(SELECT count(*) FROM budget_usage WHERE {COUNTED}), "
        "(SELECT count(*) FROM alerts_sent), (SELECT coalesce(sum(cost_nanos), 0) FROM requests), "
        "(SELECT count(*) FROM stored_objects)",
        "owner_of": "SELECT team FROM stored_objects WHERE id = ?",
        "claimed_by": "SELECT id FROM requests WHERE response_id = ? AND id <> ? LIMIT 1",
        "unanswered": "SELECT started_at FROM requests WHERE endpoint = 'batches' "
        "AND team = ? AND id <> ? AND started_at < ? AND state = 'reserved' AND held = 0 "
        "AND response_id IS NULL AND error_code IS NULL",
        "owns_any": "SELECT 1 FROM stored_objects WHERE team = ? AND kind = ? LIMIT 1",
        "stored": f"SELECT {names(OBJECT_COLUMNS)} FROM stored_objects WHERE id = ?",
        "batch_lines": f"SELECT {names(LINE_COLUMNS[1:])} FROM batch_lines WHERE file_id = ? "
        "ORDER BY line",
        "first_by_content": _first(d, "content_digest"),
        "first_by_key": _first(d, "idempotency_key"),
        "kept_answer": f"SELECT {names([c for c in ANSWER_COLUMNS if c != 'size'])} "
        "FROM kept_answers WHERE request_id = ?",
        "kept_head": f"SELECT {names([c for c in ANSWER_COLUMNS if c not in HEADLESS])} "
        "FROM kept_answers WHERE request_id = ?",
        "kept_chunks": "SELECT seq, body FROM kept_chunks WHERE request_id = ? AND seq > ? "
        "ORDER BY seq",
        "still_kept": "SELECT 1 FROM kept_answers WHERE request_id = ?",
    }


def _first(d: Dialect, column: str) -> str:
    """The latest row of a team with `column` = ?, started since ?, not a replay, with its
    age on the ledger's clock: one lookup in the index of (team, `column`, started_at), read
    from its newest end."""
    return (
        f"SELECT {names(FIRST_COLUMNS)}, {d.clock} - reserved_clock FROM requests "
        f"WHERE team = ? AND {column} = ? "
        "AND started_at >= ? AND (outcome IS NULL OR outcome <> 'replayed') "
        "ORDER BY started_at DESC LIMIT 1"
    )
