"""The ledger's shared parts: statements spelled by dialect, columns that match the schema,
and backends (with their drivers) loaded only when a ledger of their kind is opened."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from proxy.ledger import migrate_ledger, migrations, sqlite_batches
from proxy.ledger.base import BatchLine
from proxy.ledger.codecs import (
    ANSWER_COLUMNS,
    FIRST_COLUMNS,
    KEY_COLUMNS,
    LINE_COLUMNS,
    OBJECT_COLUMNS,
    REAL_COLUMNS,
    RESERVATION_COLUMNS,
    ROW_COLUMNS,
    TOTALS_COLUMNS,
)
from proxy.ledger.dialect import POSTGRES, SQLITE, Dialect
from proxy.ledger.kept import FirstAttempt, KeptAnswer
from proxy.ledger.sqlite_connections import ledger_clock
from proxy.ledger.statements import Statements, statements

SQLITE_MODULES = {"proxy.ledger.sqlite", "proxy.ledger.sqlite_connections"}
POSTGRES_MODULES = {"proxy.ledger.postgres", "proxy.ledger.postgres_pool"}
DRIVERS = {"aiosqlite", "asyncpg", "sqlite3", *SQLITE_MODULES, *POSTGRES_MODULES}


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running `statement`."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{statement}\nimport json, sys\nprint(json.dumps(list(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(done.stdout))


@pytest.mark.parametrize(
    "module",
    ["proxy.ledger", "proxy.ledger.base", "proxy.ledger.copy", "proxy.ledger.statements"],
)
def test_importing_the_ledger_loads_no_backend_nor_driver(module: str) -> None:
    assert loaded_after(f"import {module}") & DRIVERS == set()


@pytest.mark.parametrize(
    ("backend", "driver", "other"),
    [
        ("sqlite", "aiosqlite", {"asyncpg", *POSTGRES_MODULES}),
        ("sqlite_connections", "aiosqlite", {"asyncpg", *POSTGRES_MODULES}),
        ("postgres", "asyncpg", {"aiosqlite", *SQLITE_MODULES}),
        ("postgres_pool", "asyncpg", {"aiosqlite", *SQLITE_MODULES}),
    ],
)
def test_a_backend_loads_its_own_driver_and_not_the_other_backend(
    backend: str, driver: str, other: set[str]
) -> None:
    loaded = loaded_after(f"import proxy.ledger.{backend}")
    assert driver in loaded
    assert loaded & other == set()


def shared(dialect_statements: Statements) -> dict[str, str]:
    return {
        f.name: getattr(dialect_statements, f.name)
        for f in fields(Statements)
        if isinstance(getattr(dialect_statements, f.name), str)
    }


def test_postgresql_numbers_the_placeholders_sqlite_marks_with_question_marks() -> None:
    assert POSTGRES.text("a = ? AND b IN (?, ?)") == "a = $1 AND b IN ($2, $3)"
    assert SQLITE.text("a = ? AND b IN (?, ?)") == "a = ? AND b IN (?, ?)"


def spelled_as_sqlite(sql: str) -> str:
    """A PostgreSQL statement with what its dialect spells otherwise spelled as SQLite's."""
    spellings = (
        (POSTGRES.collate, SQLITE.collate),
        (POSTGRES.for_update, ""),
        (POSTGRES.clock, SQLITE.clock),
    )
    for theirs, ours in spellings:
        sql = sql.replace(theirs, ours)
    return re.sub(r"\$\d+", "?", sql)


@pytest.mark.parametrize("name", sorted(shared(statements(SQLITE))))
def test_each_statement_is_the_same_in_both_dialects_but_for_their_spelling(name: str) -> None:
    lite, pg = shared(statements(SQLITE))[name], shared(statements(POSTGRES))[name]
    numbers = [int(n) for n in re.findall(r"\$(\d+)", pg)]
    assert numbers == list(range(1, lite.count("?") + 1))
    if name == "rows":  # ties in the order each database keeps
        lite = lite.replace(f"ORDER BY {SQLITE.by_start}", f"ORDER BY {POSTGRES.by_start}")
    assert spelled_as_sqlite(pg) == spelled_as_sqlite(lite)


def test_the_columns_written_and_read_are_the_schemas(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        columns = {
            table: {(c[1], c[2]) for c in db.execute(f"PRAGMA table_info({table})")}
            for table in migrations.TABLES
        }
    requests = {name for name, _ in columns["requests"]}
    assert set(ROW_COLUMNS) | set(RESERVATION_COLUMNS) <= requests
    assert set(KEY_COLUMNS) | set(TOTALS_COLUMNS) == {name for name, _ in columns["budget_usage"]}
    reals = {name for found in columns.values() for name, kind in found if kind == "REAL"}
    assert reals == REAL_COLUMNS


@pytest.mark.parametrize(("dialect", "big"), [(SQLITE, "INTEGER"), (POSTGRES, "BIGINT")])
def test_step_4_adds_the_responses_columns_and_indexes_the_response_id(
    dialect: Dialect, big: str
) -> None:
    counts = [
        "context_images",
        "mainline_input_tokens",
        "mainline_cached_input_tokens",
        "mainline_output_tokens",
        "mainline_cost_nanos",
    ]
    assert list(migrations.steps(dialect)[3]) == [
        "ALTER TABLE requests ADD COLUMN mainline_model TEXT",
        *(f"ALTER TABLE requests ADD COLUMN {c} {big} NOT NULL DEFAULT 0" for c in counts),
        "ALTER TABLE requests ADD COLUMN response_id TEXT",
        "ALTER TABLE requests ADD COLUMN held INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS requests_response ON requests (response_id) "
        "WHERE response_id IS NOT NULL",
    ]


@pytest.mark.parametrize(
    ("dialect", "real", "big"),
    [(SQLITE, "REAL", "INTEGER"), (POSTGRES, "DOUBLE PRECISION", "BIGINT")],
)
def test_step_5_adds_files_batches_their_lines_and_the_custom_id(
    dialect: Dialect, real: str, big: str
) -> None:
    objects, lines, custom_id = migrations.steps(dialect)[4]
    assert objects.startswith("CREATE TABLE IF NOT EXISTS stored_objects (")
    assert f"created_at                   {real} NOT NULL" in objects
    assert f"mainline_cached_input_tokens {big} NOT NULL DEFAULT 0" in objects
    assert lines.startswith("CREATE TABLE IF NOT EXISTS batch_lines (")
    assert "PRIMARY KEY (file_id, custom_id)" in lines
    assert custom_id == "ALTER TABLE requests ADD COLUMN custom_id TEXT"


def test_the_object_and_line_columns_are_the_schemas(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        columns = {
            table: [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
            for table in ("stored_objects", "batch_lines")
        }
    assert columns == {"stored_objects": list(OBJECT_COLUMNS), "batch_lines": list(LINE_COLUMNS)}
    assert [f.name for f in fields(BatchLine)] == list(LINE_COLUMNS[1:])


def test_a_response_is_found_by_its_index(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        plan = db.execute(
            f"EXPLAIN QUERY PLAN {statements(SQLITE).response}", ("resp_1",)
        ).fetchall()
    assert "requests_response" in " ".join(str(step[-1]) for step in plan)


@pytest.mark.parametrize(
    ("dialect", "real", "big", "blob"),
    [(SQLITE, "REAL", "INTEGER", "BLOB"), (POSTGRES, "DOUBLE PRECISION", "BIGINT", "BYTEA")],
)
def test_step_6_adds_digests_indexed_by_team_and_a_table_of_kept_answers(
    dialect: Dialect, real: str, big: str, blob: str
) -> None:
    assert len(migrations.steps(dialect)) == migrations.SCHEMA_VERSION >= 6
    digest, key, by_content, by_key, answers, by_kept = migrations.steps(dialect)[5]
    assert digest == "ALTER TABLE requests ADD COLUMN content_digest TEXT"
    assert key == "ALTER TABLE requests ADD COLUMN idempotency_key TEXT"
    assert by_content.endswith(
        "ON requests (team, content_digest, started_at) WHERE content_digest IS NOT NULL"
    )
    assert by_key.endswith(
        "ON requests (team, idempotency_key, started_at) WHERE idempotency_key IS NOT NULL"
    )
    assert answers.startswith("CREATE TABLE IF NOT EXISTS kept_answers (")
    assert "request_id TEXT PRIMARY KEY" in answers
    assert f"body       {blob} NOT NULL" in answers
    assert f"size       {big} NOT NULL" in answers
    assert f"kept_at    {real} NOT NULL" in answers
    assert by_kept == "CREATE INDEX IF NOT EXISTS kept_answers_kept ON kept_answers (kept_at)"


@pytest.mark.parametrize(
    ("dialect", "real", "big"),
    [(SQLITE, "REAL", "INTEGER"), (POSTGRES, "DOUBLE PRECISION", "BIGINT")],
)
def test_step_7_adds_the_rate_counts_indexed_by_shared_limit(
    dialect: Dialect, real: str, big: str
) -> None:
    assert migrations.SCHEMA_VERSION >= 7
    table, by_group = migrations.steps(dialect)[6]
    assert table.startswith("CREATE TABLE IF NOT EXISTS rate_counts (")
    assert f"start   {real} NOT NULL" in table
    assert f"used    {big} NOT NULL DEFAULT 0" in table
    assert "PRIMARY KEY (slot, start)" in table
    assert by_group.endswith("ON rate_counts (grp, start) WHERE grp <> ''")


def test_the_kept_answer_columns_are_the_schemas(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        columns = [c[1] for c in db.execute("PRAGMA table_info(kept_answers)")]
    assert columns == list(ANSWER_COLUMNS)
    assert [f.name for f in fields(KeptAnswer)] == [c for c in ANSWER_COLUMNS if c != "size"]
    assert [f.name for f in fields(FirstAttempt)] == [
        "request_id", "started_at", "settled", "outcome", "status", "cost_nanos",
        "content_digest", "owner", "held", "made", "age_s",
    ]  # fmt: skip
    assert len(FIRST_COLUMNS) + 1 == len(fields(FirstAttempt))  # its age: read, not stored


@pytest.mark.parametrize(("dialect", "blob"), [(SQLITE, "BLOB"), (POSTGRES, "BYTEA")])
def test_step_8_keeps_live_streams_as_chunks(dialect: Dialect, blob: str) -> None:
    assert migrations.SCHEMA_VERSION >= 8
    live, chunks = migrations.steps(dialect)[7]
    assert live == "ALTER TABLE kept_answers ADD COLUMN live INTEGER NOT NULL DEFAULT 0"
    assert chunks.startswith("CREATE TABLE IF NOT EXISTS kept_chunks (")
    assert f"body       {blob} NOT NULL" in chunks
    assert "PRIMARY KEY (request_id, seq)" in chunks


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES])
def test_step_9_records_the_project_a_held_row_was_created_under(dialect: Dialect) -> None:
    assert migrations.SCHEMA_VERSION >= 9
    [project] = migrations.steps(dialect)[8]
    assert project == "ALTER TABLE requests ADD COLUMN project TEXT"  # NULL: not recorded


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES])
def test_step_10_records_the_project_a_file_or_batch_was_created_under(dialect: Dialect) -> None:
    assert migrations.SCHEMA_VERSION >= 10
    [project] = migrations.steps(dialect)[9]
    assert project == "ALTER TABLE stored_objects ADD COLUMN project TEXT"  # NULL: not recorded


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES])
def test_step_11_records_a_responses_batch_lines_mainline_model(dialect: Dialect) -> None:
    assert len(migrations.steps(dialect)) == migrations.SCHEMA_VERSION >= 11
    [mainline] = migrations.steps(dialect)[10]
    assert mainline == "ALTER TABLE batch_lines ADD COLUMN mainline TEXT"  # NULL: an image line


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES])
def test_step_12_indexes_the_stored_objects_by_team_and_kind(dialect: Dialect) -> None:
    assert len(migrations.steps(dialect)) == migrations.SCHEMA_VERSION >= 12
    [index] = migrations.steps(dialect)[11]
    assert index.endswith("ON stored_objects (team, kind)")


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES])
def test_step_13_adds_a_batch_settlements_progress_to_its_reservations_row(
    dialect: Dialect,
) -> None:
    assert len(migrations.steps(dialect)) == migrations.SCHEMA_VERSION >= 13
    assert migrations.steps(dialect)[12] == [
        "ALTER TABLE requests ADD COLUMN billing_by TEXT",
        "ALTER TABLE requests ADD COLUMN billed_lines INTEGER NOT NULL DEFAULT 0",
        f"ALTER TABLE requests ADD COLUMN billed_nanos {dialect.big} NOT NULL DEFAULT 0",
    ]


@pytest.mark.parametrize(
    "sql",
    [
        sqlite_batches.FORGET_ALL,
        sqlite_batches.FORGET_SOME,
        sqlite_batches.STILL_SETTLING,
        statements(SQLITE).forget_claimed,
    ],
)
def test_the_rows_of_a_batch_settled_a_chunk_at_a_time_are_found_by_its_response_id(
    tmp_path: Path, sql: str
) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for step in migrations.pending(0, migrations.SQLITE):
            db.execute(step)
        values = ("batch_abc", "token", "b1", 10)[: sql.count("?")]
        plan = " ".join(str(step[-1]) for step in db.execute(f"EXPLAIN QUERY PLAN {sql}", values))
    assert "USING INDEX requests_response (response_id=?)" in plan, plan


def test_whether_a_team_owns_any_object_is_one_lookup_in_its_index(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        sql = statements(SQLITE).owns_any
        plan = " ".join(
            str(step[-1]) for step in db.execute(f"EXPLAIN QUERY PLAN {sql}", ("design", "file"))
        )
    assert "USING COVERING INDEX stored_objects_team_time (team=? AND kind=?)" in plan, plan


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES])
def test_step_14_indexes_a_teams_objects_by_time(dialect: Dialect) -> None:
    assert len(migrations.steps(dialect)) == migrations.SCHEMA_VERSION >= 14
    made, dropped = migrations.steps(dialect)[13]
    assert made.endswith(f"ON stored_objects (team, kind, created_at, id{dialect.collate})")
    assert dropped == "DROP INDEX IF EXISTS stored_objects_team"


@pytest.mark.parametrize("newest", [True, False])
@pytest.mark.parametrize("purpose", [None, "vision"])
def test_a_listings_jump_reads_the_teams_objects_in_its_index_order(
    tmp_path: Path, newest: bool, purpose: str | None
) -> None:
    """`objects_past` walks the index from the edge on and stops at its limit: no sort."""
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        sql, values = statements(SQLITE).objects_past(
            "design", "file", "", purpose, newest, 100.0, 41
        )
        plan = " ".join(str(step[-1]) for step in db.execute(f"EXPLAIN QUERY PLAN {sql}", values))
    assert "INDEX stored_objects_team_time (team=? AND kind=? AND created_at" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


async def test_step_14_keeps_what_a_ledger_holds(tmp_path: Path) -> None:
    """A ledger of step 13 with objects migrated: the old index gone, the new one there."""
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as db:
        for sql in migrations.pending(0, migrations.SQLITE[:13]):
            db.execute(sql)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (13)")
        db.execute(
            "INSERT INTO stored_objects (id, team, kind, created_at) "
            "VALUES ('file-a', 'design', 'file', 5)"
        )
    assert await migrate_ledger(f"sqlite:///{path}") == (13, migrations.SCHEMA_VERSION)
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "stored_objects_team_time" in indexes and "stored_objects_team" not in indexes
        assert db.execute("SELECT id FROM stored_objects").fetchall() == [("file-a",)]


def test_a_repeat_reads_a_live_streams_chunks_in_order_from_its_key(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        sql = statements(SQLITE).kept_chunks
        plan = " ".join(
            str(step[-1]) for step in db.execute(f"EXPLAIN QUERY PLAN {sql}", ("r1", -1))
        )
    assert "(request_id=? AND seq>?)" in plan and "SEARCH kept_chunks" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


@pytest.mark.parametrize(
    ("name", "index"),
    [("first_by_content", "requests_content"), ("first_by_key", "requests_idempotency")],
)
def test_a_first_attempt_is_one_lookup_in_its_index(name: str, index: str, tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.create_function("ledger_clock", 0, ledger_clock)  # as the ledger's connections do
        for sql in migrations.pending(0, migrations.SQLITE):
            db.execute(sql)
        sql = getattr(statements(SQLITE), name)
        plan = " ".join(
            str(step[-1])
            for step in db.execute(f"EXPLAIN QUERY PLAN {sql}", ("design", "d", 900.0))
        )
    assert f"SEARCH requests USING INDEX {index} (team=? AND" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # read in order from the index: no sort
