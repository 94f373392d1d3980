"""Versioned schema migrations of both ledger backends: ordered SQL steps, one list each.

Step `i` (counting from 1) takes a ledger from version `i - 1` to `i`; the version
reached is kept in `schema_version`. Each backend runs its pending steps in one
transaction, so a ledger is never left half-way between two versions.

    1  the requests, processes, budget_usage and alerts_sent tables
    2  real organization counters: one `budget_usage` row per period (scope
       'organization', team '' and user ''), kept up to date in the same transaction
       as the team rows it sums, instead of a sum over the team rows at read time.
       A reservation then locks one known row to check the organization's budgets
       (see `postgres.py`); the step fills it from the team rows already there.
    3  `resolved_at` and `resolution` on requests: an operator's correction of a flagged
       row's cost (`tollgate ledger resolve`), which keeps the row flagged and says when
       and why it was resolved; and an index of the flagged rows by start.
    4  the Responses API on requests: the mainline model, its tokens (`mainline_*_tokens`)
       and its part of the cost (`mainline_cost_nanos`), the images a response's context
       carried (`context_images`), OpenAI's response id (`response_id`, indexed: a
       response is looked up by it), and `held`: a background response's reservation,
       kept until it ends (never reclaimed at its bound; adopted by a live process).
    5  the Batch API: `stored_objects`, the files and batches forwarded for a team (only
       that team may see or use them; a batch input file with its line count, the sum of
       its lines' bounds and of their bounded usage), `batch_lines`, each line of a batch
       input file as priced at upload (by file and `custom_id`), and `custom_id` on
       requests: the line a batch's billed row stands for.
    6  repeats (README, "Retries never pay twice"): `content_digest` and `idempotency_key`
       on requests, each indexed with its team and start (only the rows that have one), so
       that a repeat finds its first attempt in one index lookup; and `kept_answers`, the
       answers kept for the repeats of their request within the retry window (status,
       headers as JSON text, body, whether it was a stream, its size), indexed by when
       they were kept, which is the order they are forgotten in.
    7  rate limits (README, "Rate limits"): `rate_counts`, what each scope used of each
       limit in each window (`slot`, `start`), added to when a request is reserved; a
       team's count against a shared organization limit also holds the limit's key
       (`grp`, indexed with the window) and the team's promise of it.
    8  live streams (README, "Retries never pay twice"): `live` on kept_answers (a stream
       still kept as it goes, until it ends) and `kept_chunks`, its events so far, by
       request and order (`seq`), which a repeat follows while the first streams; a kept
       answer's `size` counts its chunks, which are forgotten with it.
    9  `project` on requests: the OpenAI project a held background response or batch was
       created under (`Ledger.hold`), where its follower reads it after a restart even if
       the team's `openai_project` changed meanwhile; '' when it was sent without one,
       NULL when it was not recorded (rows held before this version, which are followed
       under the team's project at the time).
   10  `project` on stored_objects: the OpenAI project a file or batch was created under
       (a batch's output and error files: the batch's), where it is read, cancelled and
       deleted even after the team's `openai_project` changed (OpenAI answers 404 for it
       in any other). From this version every forwarded request also records on its row
       the project it was sent under (`Reservation.project`), so a response settled at
       once is found in its project too. '' and NULL as in version 9: NULL (objects
       recorded before this version, rows neither written since nor held since version 9)
       is read under the team's project at the time.
   11  `mainline` on batch_lines: a `/v1/responses` line's mainline model (its `model` is
       then its image tool's), which its settlement prices at batch rates; NULL for an
       image line.
   12  an index of `stored_objects` by team and kind: a listing asks whether its team
       owns any file or batch at all (`Ledger.owns_any`) before it reads the upstream,
       which otherwise scanned every team's objects.
   13  a batch's settlement in short transactions (README, "The Batch API"):
       `billing_by`, `billed_lines` and `billed_nanos` on requests. While the SQLite ledger
       writes a finished batch's billed lines a few thousand a transaction, its
       reservation's row names the settlement writing them (`billing_by`, a token of that
       call), how many it has written and what they cost; each line's row names the call
       that wrote it. What a reservation in flight holds is then its bound less what its
       lines written cost (`holding`), and its counters move in the settlement's last
       transaction (`sqlite_batches`). Unused on PostgreSQL, which settles a batch in one
       transaction (NULL and 0 there), but in a SQLite ledger copied while a settlement
       was under way: the settlement there deletes the lines it had written.
   14  the index of `stored_objects` by team and kind also by time and id
       (`stored_objects_team_time`, replacing step 12's): a listing that jumps past other
       teams' objects reads the team's next ones in that order (`Ledger.objects_past`),
       which otherwise sorted all of the team's objects of the kind at each jump.
   15  `policy` on batch_lines: what the team's `allow` rules read of a line beyond its
       other columns (its fields as given, whether it gives input images), so that a
       batch's create checks every line against the rules in force then, `allow.params`
       included; NULL for a line stored before this version (checked on its columns).
   16  `reserved_clock` on requests: the ledger's clock (`Dialect.clock`) when the row was
       reserved, which the age past which a reservation is reclaimed whatever its owner,
       and a repeat's wait for its first attempt, are judged by: `started_at` is the wall
       clock of the replica that wrote it, and a replica whose clock was behind had its
       oldest live requests reclaimed early. NULL for a row reserved before this version
       (judged by `started_at`, as before) and for a row never reserved.

The embedded SQLite ledger applies its steps when it opens. A PostgreSQL ledger shared
by several replicas is initialised when it opens only while it is empty (none of `TABLES`
exists: there is no data to migrate, and the migration lock makes replicas starting
together take turns); a schema behind is migrated on purpose (`tollgate ledger migrate`),
and a replica refuses to serve on a schema older than its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.ledger import dialect
from proxy.ledger.codecs import TOTALS_COLUMNS, USAGE_COLUMNS
from proxy.ledger.dialect import Dialect

TOTALS = ", ".join(TOTALS_COLUMNS)
SUMMED = ", ".join(f"SUM({c})" for c in TOTALS_COLUMNS)


def _requests(d: Dialect) -> str:
    # One column list for both backends: copies and audit exports keep the same order.
    real, big = d.real, d.big
    return f"""
CREATE TABLE IF NOT EXISTS requests (
    id                        TEXT PRIMARY KEY,
    upstream_request_id       TEXT,
    started_at                {real} NOT NULL,
    finished_at               {real},
    team                      TEXT,
    cost_center               TEXT,
    key_id                    TEXT,
    "user"                    TEXT,
    endpoint                  TEXT,
    model_requested           TEXT,
    model                     TEXT,
    quality_requested         TEXT,
    quality                   TEXT,
    size_requested            TEXT,
    size                      TEXT,
    n_requested               INTEGER,
    n                         INTEGER,
    stream                    INTEGER NOT NULL DEFAULT 0,
    state                     TEXT NOT NULL,
    outcome                   TEXT,
    status                    INTEGER,
    error_code                TEXT,
    downgrades                TEXT NOT NULL DEFAULT '',
    text_input_tokens         {big} NOT NULL DEFAULT 0,
    cached_text_input_tokens  {big} NOT NULL DEFAULT 0,
    image_input_tokens        {big} NOT NULL DEFAULT 0,
    cached_image_input_tokens {big} NOT NULL DEFAULT 0,
    image_output_tokens       {big} NOT NULL DEFAULT 0,
    text_output_tokens        {big} NOT NULL DEFAULT 0,
    images                    {big} NOT NULL DEFAULT 0,
    estimated_nanos           {big} NOT NULL DEFAULT 0,
    reserved_nanos            {big} NOT NULL DEFAULT 0,
    cost_nanos                {big} NOT NULL DEFAULT 0,
    flagged                   INTEGER NOT NULL DEFAULT 0,
    latency_ms                {real},
    counters                  TEXT NOT NULL DEFAULT '[]',
    owner                     TEXT
)"""


TABLES = (
    "schema_version", "requests", "processes", "budget_usage", "alerts_sent",
    "stored_objects", "batch_lines", "kept_answers", "rate_counts", "kept_chunks",
)  # fmt: skip
"""Every table of a ledger: a database with none of them is empty."""


def _tables(d: Dialect) -> list[str]:
    real, big = d.real, d.big
    return [
        _requests(d),
        "CREATE INDEX IF NOT EXISTS requests_started ON requests (started_at)",
        "CREATE INDEX IF NOT EXISTS requests_team_started ON requests (team, started_at)",
        "CREATE INDEX IF NOT EXISTS requests_reserved ON requests (state) WHERE state = 'reserved'",
        f"""CREATE TABLE IF NOT EXISTS processes (
    owner        TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    heartbeat_at {real} NOT NULL
)""",
        f"""CREATE TABLE IF NOT EXISTS budget_usage (
    scope               TEXT NOT NULL,
    team                TEXT NOT NULL,
    "user"              TEXT NOT NULL,
    period              TEXT NOT NULL,
    start               {real} NOT NULL,
    spent_nanos         {big} NOT NULL DEFAULT 0,
    reserved_nanos      {big} NOT NULL DEFAULT 0,
    text_input_tokens   {big} NOT NULL DEFAULT 0,
    image_input_tokens  {big} NOT NULL DEFAULT 0,
    image_output_tokens {big} NOT NULL DEFAULT 0,
    total_tokens        {big} NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, team, "user", period, start)
)""",
        f"""CREATE TABLE IF NOT EXISTS alerts_sent (
    key     TEXT PRIMARY KEY,
    sent_at {real} NOT NULL
)""",
    ]


ORGANIZATION_ROWS = [
    f'INSERT INTO budget_usage (scope, team, "user", period, start, {TOTALS}) '
    f"SELECT 'organization', '', '', period, start, {SUMMED} FROM budget_usage "
    "WHERE scope = 'team' GROUP BY period, start",
    # The row every counter write locks first (see postgres.py): it must always exist.
    'INSERT INTO budget_usage (scope, team, "user", period, start) '
    "SELECT 'organization', '', '', 'total', 0 WHERE NOT EXISTS (SELECT 1 FROM budget_usage "
    "WHERE scope = 'organization' AND period = 'total' AND start = 0)",
]


def _resolutions(d: Dialect) -> list[str]:
    return [
        f"ALTER TABLE requests ADD COLUMN resolved_at {d.real}",
        "ALTER TABLE requests ADD COLUMN resolution TEXT",
        "CREATE INDEX IF NOT EXISTS requests_flagged ON requests (started_at) WHERE flagged = 1",
    ]


RESPONSES_COUNTS = (
    "context_images",
    "mainline_input_tokens",
    "mainline_cached_input_tokens",
    "mainline_output_tokens",
    "mainline_cost_nanos",
)


def _responses(d: Dialect) -> list[str]:
    return [
        "ALTER TABLE requests ADD COLUMN mainline_model TEXT",
        *(
            f"ALTER TABLE requests ADD COLUMN {c} {d.big} NOT NULL DEFAULT 0"
            for c in RESPONSES_COUNTS
        ),
        "ALTER TABLE requests ADD COLUMN response_id TEXT",
        "ALTER TABLE requests ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS requests_response ON requests (response_id) "
        "WHERE response_id IS NOT NULL",
    ]


def _batches(d: Dialect) -> list[str]:
    real, big = d.real, d.big
    # A batch input file's bounded usage as the requests' usage columns: one codec for both.
    usage = ",\n".join(f"    {c:<29}{big} NOT NULL DEFAULT 0" for c in USAGE_COLUMNS)
    return [
        f"""CREATE TABLE IF NOT EXISTS stored_objects (
    id                           TEXT PRIMARY KEY,
    team                         TEXT NOT NULL,
    kind                         TEXT NOT NULL,
    purpose                      TEXT,
    created_at                   {real} NOT NULL,
    lines                        INTEGER NOT NULL DEFAULT 0,
    bound_nanos                  {big} NOT NULL DEFAULT 0,
{usage},
    input_file_id                TEXT
)""",
        f"""CREATE TABLE IF NOT EXISTS batch_lines (
    file_id     TEXT NOT NULL,
    custom_id   TEXT NOT NULL,
    line        INTEGER NOT NULL,
    endpoint    TEXT NOT NULL,
    model       TEXT NOT NULL,
    quality     TEXT NOT NULL,
    size        TEXT NOT NULL,
    n           INTEGER NOT NULL,
    "user"      TEXT,
    bound_nanos {big} NOT NULL,
    PRIMARY KEY (file_id, custom_id)
)""",
        "ALTER TABLE requests ADD COLUMN custom_id TEXT",
    ]


def _repeats(d: Dialect) -> list[str]:
    real, big = d.real, d.big
    return [
        "ALTER TABLE requests ADD COLUMN content_digest TEXT",
        "ALTER TABLE requests ADD COLUMN idempotency_key TEXT",
        "CREATE INDEX IF NOT EXISTS requests_content ON requests "
        "(team, content_digest, started_at) WHERE content_digest IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS requests_idempotency ON requests "
        "(team, idempotency_key, started_at) WHERE idempotency_key IS NOT NULL",
        f"""CREATE TABLE IF NOT EXISTS kept_answers (
    request_id TEXT PRIMARY KEY,
    team       TEXT NOT NULL,
    status     INTEGER NOT NULL,
    headers    TEXT NOT NULL,
    body       {d.blob} NOT NULL,
    stream     INTEGER NOT NULL DEFAULT 0,
    size       {big} NOT NULL,
    kept_at    {real} NOT NULL
)""",
        "CREATE INDEX IF NOT EXISTS kept_answers_kept ON kept_answers (kept_at)",
    ]


def _rates(d: Dialect) -> list[str]:
    real, big = d.real, d.big
    return [
        f"""CREATE TABLE IF NOT EXISTS rate_counts (
    slot    TEXT NOT NULL,
    start   {real} NOT NULL,
    used    {big} NOT NULL DEFAULT 0,
    team    TEXT NOT NULL DEFAULT '',
    grp     TEXT NOT NULL DEFAULT '',
    promise {big} NOT NULL DEFAULT 0,
    PRIMARY KEY (slot, start)
)""",
        "CREATE INDEX IF NOT EXISTS rate_counts_group ON rate_counts (grp, start) WHERE grp <> ''",
    ]


def _live_streams(d: Dialect) -> list[str]:
    return [
        "ALTER TABLE kept_answers ADD COLUMN live INTEGER NOT NULL DEFAULT 0",
        f"""CREATE TABLE IF NOT EXISTS kept_chunks (
    request_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    body       {d.blob} NOT NULL,
    PRIMARY KEY (request_id, seq)
)""",
    ]


HELD_PROJECTS = ["ALTER TABLE requests ADD COLUMN project TEXT"]
OBJECT_PROJECTS = ["ALTER TABLE stored_objects ADD COLUMN project TEXT"]
LINE_MAINLINES = ["ALTER TABLE batch_lines ADD COLUMN mainline TEXT"]
LINE_POLICIES = ["ALTER TABLE batch_lines ADD COLUMN policy TEXT"]
OBJECTS_BY_TEAM = ["CREATE INDEX IF NOT EXISTS stored_objects_team ON stored_objects (team, kind)"]


def _batch_progress(d: Dialect) -> list[str]:
    return [
        "ALTER TABLE requests ADD COLUMN billing_by TEXT",
        "ALTER TABLE requests ADD COLUMN billed_lines INTEGER NOT NULL DEFAULT 0",
        f"ALTER TABLE requests ADD COLUMN billed_nanos {d.big} NOT NULL DEFAULT 0",
    ]


def _objects_by_time(d: Dialect) -> list[str]:
    return [
        "CREATE INDEX IF NOT EXISTS stored_objects_team_time "
        f"ON stored_objects (team, kind, created_at, id{d.collate})",
        "DROP INDEX IF EXISTS stored_objects_team",
    ]


def _reserved_clock(d: Dialect) -> list[str]:
    return [f"ALTER TABLE requests ADD COLUMN reserved_clock {d.real}"]


def steps(d: Dialect) -> Sequence[Sequence[str]]:
    """The migrations in `d`'s spelling: one list of statements per version."""
    return (
        _tables(d), ORGANIZATION_ROWS, _resolutions(d), _responses(d), _batches(d), _repeats(d),
        _rates(d), _live_streams(d), HELD_PROJECTS, OBJECT_PROJECTS, LINE_MAINLINES,
        OBJECTS_BY_TEAM, _batch_progress(d), _objects_by_time(d), LINE_POLICIES,
        _reserved_clock(d),
    )  # fmt: skip


SQLITE = steps(dialect.SQLITE)
POSTGRES = steps(dialect.POSTGRES)

SCHEMA_VERSION = len(SQLITE)
"""The version this Tollgate reads and writes."""


def pending(found: int, steps: Sequence[Sequence[str]]) -> list[str]:
    """The statements that take a ledger at version `found` to the latest."""
    return [sql for step in steps[found:] for sql in step]
