"""The command line, run as users run it: `python -m proxy …` in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.core.auth import key_hash
from proxy.ledger import migrate_ledger, open_ledger
from tests import pg
from tests.conftest import write_config
from tests.test_ledger import DESIGN_DAY, SETTLED, ledger_url, take

EXAMPLES = Path(__file__).resolve().parent.parent / "policies"


def tollgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,  # only so that a hang fails: start-up on a loaded machine is slow
        env={**os.environ, **(env or {})},
    )


def new_ledger(root: Path) -> None:
    """The empty ledger of the configuration written in `root`, for commands that read one."""
    asyncio.run(migrate_ledger(f"sqlite:///{root / 'tollgate.db'}"))


def test_check_accepts_the_example_policies() -> None:
    done = tollgate("check", "--config", str(EXAMPLES))
    assert done.returncode == 0, done.stderr
    assert "ok (2 teams" in done.stdout


def test_check_names_what_passthrough_forwards_and_refuses_image_prefixes(
    tmp_path: Path,
) -> None:
    write_config(tmp_path, "http://127.0.0.1:9/v1", settings="""
passthrough:
  - /v1/models
  - {path: /v1/moderations, methods: [POST, GET]}
""")  # fmt: skip
    done = tollgate("check", "--config", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "passthrough /v1/models: GET, HEAD, unmetered" in done.stdout
    assert "passthrough /v1/moderations: GET, POST, unmetered" in done.stdout
    write_config(tmp_path, "http://127.0.0.1:9/v1", settings="passthrough: [/v1/images]\n")
    done = tollgate("check", "--config", str(tmp_path))
    assert done.returncode == 1
    assert "'/v1/images' would forward image requests unmetered" in done.stderr


def test_check_and_serve_print_every_problem_as_file_line_message(tmp_path: Path) -> None:
    write_config(tmp_path, "http://127.0.0.1:9/v1", teams={
        "broken": "name: broken\nkeys: []\nbudgets:\n  - {period: fortnight, limit_usd: 5}\n",
    })  # fmt: skip
    (tmp_path / "tollgate.yaml").write_text(
        (tmp_path / "tollgate.yaml").read_text() + "timout_s: 3\n"
    )
    for command in ("check", "serve"):
        done = tollgate(command, "--config", str(tmp_path))
        assert done.returncode == 1
        problems = done.stderr.strip().splitlines()
        assert any(
            p.startswith(f"{tmp_path}/tollgate.yaml:") and "timout_s" in p for p in problems
        ), problems
        assert any(
            p.startswith(f"{tmp_path}/teams/broken.yaml:4:") and "period" in p for p in problems
        ), problems


def test_check_reads_an_upper_case_team_file_and_names_a_dangling_one(tmp_path: Path) -> None:
    """A team file `tollgate check` passed over without a word: its team's keys got 401."""
    write_config(tmp_path, "http://127.0.0.1:9/v1")
    (tmp_path / "teams" / "design.yaml").rename(tmp_path / "teams" / "design.YAML")
    done = tollgate("check", "--config", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "ok (2 teams" in done.stdout, done.stdout
    (tmp_path / "teams" / "research.yaml").unlink()
    (tmp_path / "teams" / "research.yaml").symlink_to(tmp_path / "elsewhere" / "research.yaml")
    done = tollgate("check", "--config", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{tmp_path}/teams/research.yaml:1: not read as a team file: a symlink to nothing"
    ]


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("limits:\n  body_timeout_s: 1" + "0" * 400 + "\n", "9: limits.body_timeout_s: must be"),
        ("retries:\n  store_bytes: 1" + "0" * 5000 + "\n", "9: retries.store_bytes: must be"),
    ],
)
def test_check_says_where_a_number_too_large_is_written_rather_than_crash(
    tmp_path: Path, setting: str, line: str
) -> None:
    """Past a float (read as seconds), or past the digits Python reads, a number made
    `check` and `serve` end in a traceback."""
    write_config(tmp_path, "http://127.0.0.1:9/v1", setting)
    done = tollgate("check", "--config", str(tmp_path))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    [problem] = done.stderr.strip().splitlines()
    assert problem.startswith(f"{tmp_path}/tollgate.yaml:{line}"), problem


def test_serve_without_an_upstream_key_is_a_start_up_error(tmp_path: Path) -> None:
    write_config(tmp_path, "http://127.0.0.1:9/v1")
    settings = tmp_path / "tollgate.yaml"
    settings.write_text(
        "\n".join(
            "  api_key: ${NO_SUCH_VAR}" if line.strip().startswith("api_key:") else line
            for line in settings.read_text().splitlines()
        )
    )
    done = tollgate("serve", "--config", str(tmp_path), env={"NO_SUCH_VAR": ""})
    assert done.returncode == 1
    assert "upstream.api_key is not set" in done.stderr


def test_keys_new_prints_a_key_once_and_an_entry_holding_only_its_hash() -> None:
    done = tollgate("keys", "new", "design", "--label", "ci")
    assert done.returncode == 0
    secret = next(w for w in done.stdout.split() if w.startswith("tg_"))
    entry = next(line for line in done.stdout.splitlines() if "sha256" in line)
    parsed = yaml.safe_load(entry)
    assert parsed == [{"id": "ci", "sha256": key_hash(secret)}]
    assert secret not in entry


def test_schema_is_a_json_schema_that_accepts_the_example_team_files() -> None:
    done = tollgate("schema")
    schema = json.loads(done.stdout)
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for path in (EXAMPLES / "teams").glob("*.yaml"):
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text())))


def lost_request(url: str) -> None:
    """A ledger holding one request reclaimed at its bound ($0.5) and one settled."""

    async def seed() -> None:
        ledger = await open_ledger(url)
        try:
            await ledger.reserve([], take("tg_req_lost", started_at=1_700_000_000.0))
            await ledger.reserve([], take("tg_req_fine", started_at=1_700_000_001.0))
            await ledger.settle("tg_req_fine", SETTLED)
            await ledger.reclaim(1_700_000_100.0, started_before=1_700_000_000.5)
        finally:
            await ledger.close()

    asyncio.run(seed())


def spent(url: str) -> int:
    async def read() -> int:
        ledger = await open_ledger(url)
        try:
            return (await ledger.totals([DESIGN_DAY]))[DESIGN_DAY].spent_nanos
        finally:
            await ledger.close()

    return asyncio.run(read())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_ledger_flagged_lists_and_resolve_sets_the_true_cost(tmp_path: Path, backend: str) -> None:
    url = ledger_url(backend, tmp_path)
    try:
        lost_request(url)
        listed = tollgate("ledger", "flagged", "--ledger", url, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)["flagged"]
        assert row == {
            "id": "tg_req_lost", "team": "design", "started_utc": "2023-11-14T22:13:20+00:00",
            "reserved_usd": "0.5", "charged_usd": "0.5", "outcome": "upstream_error",
            "error_code": "outcome_unknown", "upstream_request_id": None,
            "resolved_utc": None, "resolution": None,
        }  # fmt: skip
        table = tollgate("ledger", "flagged", "--ledger", url, "--from", "2023-11-14")
        assert "tg_req_lost" in table.stdout and "1 unresolved, charged $0.5" in table.stdout
        assert "tg_req_lost" not in tollgate("ledger", "flagged", "--ledger", url, "--from",
                                             "2023-11-15").stdout  # fmt: skip
        assert spent(url) == 500_000_000 + 210_765_000

        done = tollgate(
            "ledger", "resolve", "tg_req_lost", "--ledger", url, "--cost", "0.0196",
            "--note", "costs API 2023-11-14",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "charged $0.5 -> $0.0196" in done.stdout
        assert spent(url) == 19_600_000 + 210_765_000
        [row] = json.loads(
            tollgate("ledger", "flagged", "--ledger", url, "--format", "json").stdout
        )["flagged"]
        assert (row["charged_usd"], row["resolution"]) == ("0.0196", "costs API 2023-11-14")
        assert row["resolved_utc"] is not None
        unresolved = tollgate("ledger", "flagged", "--ledger", url, "--unresolved")
        assert "tg_req_lost" not in unresolved.stdout

        assert (
            tollgate("ledger", "resolve", "tg_req_lost", "--ledger", url, "--free").returncode == 0
        )
        assert spent(url) == 210_765_000
        refused = tollgate("ledger", "resolve", "tg_req_fine", "--ledger", url, "--free")
        assert refused.returncode == 1 and "is not flagged" in refused.stderr
        wrong = tollgate("ledger", "resolve", "tg_req_lost", "--ledger", url, "--cost", "lots")
        assert wrong.returncode == 2 and "not an amount in USD" in wrong.stderr
        # Past what a 64-bit column holds, it was a traceback (exit 1, a ledger error).
        for huge in ("1e30", "9223372036.854775808", "1000000000.000000001"):
            wrong = tollgate("ledger", "resolve", "tg_req_lost", "--ledger", url, "--cost", huge)
            assert wrong.returncode == 2 and "more than $1,000,000,000" in wrong.stderr
        assert spent(url) == 210_765_000
    finally:
        if backend == "postgresql":
            pg.drop_schema(url)


ONE_DAY_COSTS = json.dumps(
    {
        "object": "page",
        "data": [{"object": "bucket", "start_time": 1730419200, "end_time": 1730505600,
                  "results": []}],
        "has_more": False,
    }
)  # fmt: skip
"""A Costs API answer for one day (2024-11-01 UTC) without spend: a bucket all the same."""


# What the commands that only read configuration and ledger leave unimported: the server's
# stack (its import took longer than all the rest of `tollgate budgets` with 1,000 teams),
# and jsonschema, which only words the errors of a file found invalid.
UNNEEDED = ("aiohttp", "starlette", "uvicorn", "httpx", "proxy.web", "jsonschema")
LOADED = "loaded:"


def loaded_by(*script: str, unneeded: tuple[str, ...] = UNNEEDED) -> list[str]:
    """The modules of `unneeded` (and their submodules) a fresh interpreter holds after
    `script`'s lines."""
    probe = (
        f"import sys; print({LOADED!r}, sorted(m for m in sys.modules "
        f"if any(m == p or m.startswith(p + '.') for p in {unneeded!r})))"
    )
    run = subprocess.run(
        [sys.executable, "-c", "\n".join([*script, probe])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    last = run.stdout.splitlines()[-1]
    assert last.startswith(LOADED), run.stdout
    return list(yaml.safe_load(last.removeprefix(LOADED)))


@pytest.mark.parametrize("command", [["budgets"], ["report"], ["ledger", "flagged"]], ids=" ".join)
def test_a_postgresql_url_that_is_no_url_is_refused_without_a_traceback_or_its_password(
    tmp_path: Path, command: list[str]
) -> None:
    """An unclosed IPv6 bracket (`@[::1/db`) was urlsplit's ValueError, printed as a
    traceback."""
    write_config(tmp_path, "http://127.0.0.1:9")
    url = "postgresql://tollgate:pg-s3cret@[::1/tollgate"
    done = tollgate(*command, "--config", str(tmp_path), "--ledger", url)
    assert done.returncode == 1, done.stderr
    assert "cannot read the ledger URL postgresql://***: Invalid IPv6 URL" in done.stderr
    assert "Traceback" not in done.stderr and "s3cret" not in done.stdout + done.stderr
    migrated = tollgate("ledger", "migrate", "--ledger", url)
    assert migrated.returncode == 1 and "Traceback" not in migrated.stderr, migrated.stderr
    assert "s3cret" not in migrated.stdout + migrated.stderr


def test_ledger_migrate_never_prints_the_ledgers_password() -> None:
    url = pg.new_schema()
    try:
        # The test server trusts its clients: the password is read, and not needed.
        with_password = url + "&password=pg-s3cret"
        for _ in range(2):  # migrated, then up to date
            done = tollgate("ledger", "migrate", "--ledger", with_password)
            assert done.returncode == 0, done.stderr
            assert "s3cret" not in done.stdout + done.stderr
            assert "password=***" in done.stdout
    finally:
        pg.drop_schema(url)


@pytest.mark.parametrize(
    "command",
    [
        ["budgets"],
        ["budgets", "--format", "json"],
        ["check"],
        ["schema"],
        ["report", "--by", "team"],
        ["reconcile", "--costs", "COSTS"],
        ["ledger", "flagged"],
        ["ledger", "migrate"],
        ["keys", "new", "design"],
    ],
    ids=" ".join,
)
def test_commands_that_only_read_leave_the_server_stack_unimported(
    tmp_path: Path, command: list[str]
) -> None:
    write_config(tmp_path, "http://127.0.0.1:9")
    new_ledger(tmp_path)
    costs = tmp_path / "costs.json"
    costs.write_text(ONE_DAY_COSTS)
    argv = [str(costs) if arg == "COSTS" else arg for arg in command]
    if command[0] not in ("schema", "keys"):
        argv += ["--config", str(tmp_path)]
    assert loaded_by("from proxy.cli import main", f"assert main({argv!r}) == 0") == []


# What `tollgate budgets` reads is the configuration, the ledger's counters and open
# batches: the other commands' modules, and what only the request path needs (the doors,
# multipart bodies, image dimensions), are imported by the commands that use them.
NOT_FOR_BUDGETS = (
    *UNNEEDED,
    "proxy.doors",
    "proxy.core.multipart",
    "proxy.core.dimensions",
    "python_multipart",
    "PIL",
    "proxy.finance.costs_api",
    "proxy.finance.reconcile",
    "proxy.finance.projects",
    "proxy.finance.reports",
    "proxy.finance.reports_query",
    "proxy.ledger.copy",
)


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_budgets_imports_only_what_it_reads(tmp_path: Path, fmt: str) -> None:
    write_config(tmp_path, "http://127.0.0.1:9")
    new_ledger(tmp_path)
    argv = ["budgets", "--config", str(tmp_path), "--format", fmt]
    run = f"assert main({argv!r}) == 0"
    assert loaded_by("from proxy.cli import main", run, unneeded=NOT_FOR_BUDGETS) == []


def test_budgets_leaves_the_cyclic_collector_as_it_found_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tollgate budgets` turns the collector off while it runs: a program that calls it
    in process gets it back as it was."""
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9")
    new_ledger(tmp_path)
    assert gc.isenabled()
    assert main(["budgets", "--config", str(tmp_path)]) == 0
    assert gc.isenabled()
    gc.disable()
    try:
        assert main(["budgets", "--config", str(tmp_path)]) == 0
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert "SCOPE" in capsys.readouterr().out


def test_the_parser_imports_no_command() -> None:
    """`tollgate --help`, and any command's parsing, import argparse and the CLI alone."""
    loaded = loaded_by(
        "from proxy.cli import build_parser",
        "build_parser().parse_args(['budgets'])",
        unneeded=("proxy", "asyncio", "yaml", "zoneinfo"),
    )
    outside = [m for m in loaded if m != "proxy.cli" and not m.startswith("proxy.cli.")]
    assert outside == ["proxy", "proxy.core", "proxy.core.errors"]


def test_the_probe_sees_the_server_stack() -> None:
    loaded = loaded_by("import proxy.cli", "import proxy.web.server")
    assert {"aiohttp", "starlette", "uvicorn", "httpx", "proxy.web.server"} <= set(loaded)


@pytest.mark.parametrize(
    ("costs", "says"),
    [
        (None, "cannot read the costs file"),
        ("not json{", "is not JSON"),
        ("", "holds no page"),
        ("[]", "holds no page"),
        ("\n\n", "holds no page"),
        ("[1]", "page 1: not an object"),
        ('{"data": 5}', "'data' is not a list"),
        ('{"error": {"message": "Incorrect API key provided"}}', "page 1: no 'data'"),
        ('{"data": [{"results": []}]}', "no numeric 'start_time'"),
        ('{"data": [{"start_time": 0, "results": [{"amount": {"value": "x"}}]}]}', "amount"),
        ('{"data": [{"start_time": 1e20, "results": []}]}', "not a unix time"),
        ('{"data": [{"start_time": NaN, "results": []}]}', "no numeric 'start_time'"),
        ('{"data": [{"start_time": 0, "results": [{"amount": {"value": "1e999999999"}}]}]}',
         "not a number of US dollars"),
        ('{"data": [{"start_time": 0, "results": [{"amount": {"value": 5, "currency": "eur"}}]}]}',
         "not in US dollars"),
        ('{"data": [{"start_time": 0, "end_time": 604800, "results": []}]}', "bucket_width=1d"),
        ('[{"data": [{"start_time": 0, "results": [{"amount": {"value": 1}}]}]},'
         ' {"data": [{"start_time": 0, "results": [{"amount": {"value": 1}}]}]}]',
         "page 2 repeats the bucket of 1970-01-01"),
        ('{"data": [{"start_time": 43200, "end_time": 129600, "results": []}]}',
         "across a UTC midnight"),
        ('[{"data": [{"start_time": 0, "end_time": 86400, "results": [{"amount": {"value": 1}}]}]},'
         ' {"data": [{"start_time": 43200, "end_time": 86400,'
         ' "results": [{"amount": {"value": 1}}]}]}]',
         "page 2 has a bucket from 43200 that overlaps one of page 1 until 86400"),
    ],
    ids=["missing", "not-json", "empty", "no-pages", "blank-lines", "not-a-page", "data",
         "an-error", "bucket", "amount", "year-3e12", "nan-start", "amount-too-large", "euros",
         "a-week", "repeated", "across-midnight", "overlapping"],
)  # fmt: skip
def test_reconcile_exits_2_naming_a_costs_file_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], costs: str | None, says: str
) -> None:
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    path = tmp_path / "costs.json"
    if costs is not None:
        path.write_text(costs)
    # Exit 1 means a day is off; a file that says nothing must not read as one.
    assert main(["reconcile", "--config", str(tmp_path), "--costs", str(path)]) == 2
    assert says in capsys.readouterr().err


def test_reconcile_by_model_exits_2_on_costs_not_grouped_by_line_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenAI's own example export (`GET /v1/organization/costs` without `group_by`): its
    amounts name no model, so none can be compared; it read as every day matching, its
    spend left out under a line item without a name."""
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    result = {"object": "organization.costs.result", "amount": {"value": 0.06, "currency": "usd"},
              "line_item": None, "project_id": None}  # fmt: skip
    bucket = {"object": "bucket", "start_time": 1730419200, "end_time": 1730505600,
              "results": [result]}  # fmt: skip
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"object": "page", "data": [bucket], "has_more": False}))
    argv = ["reconcile", "--config", str(tmp_path), "--costs", str(path)]
    assert main(argv) == 2
    assert "not grouped by line item" in capsys.readouterr().err
    assert main([*argv, "--by", "project"]) == 2
    assert "not grouped by project" in capsys.readouterr().err


def test_reconcile_refuses_a_saved_export_cut_before_its_last_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first page of an answer saved alone (`limit` 7 of a month): the days after it
    were never compared, and the reconciliation said every day matched."""
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    result = {"object": "organization.costs.result", "amount": {"value": 0, "currency": "usd"},
              "line_item": "gpt-image-2, image output", "project_id": None}  # fmt: skip
    bucket = {"object": "bucket", "start_time": 1730419200, "end_time": 1730505600,
              "results": [result]}  # fmt: skip
    page = {"object": "page", "data": [bucket], "has_more": True, "next_page": "page_AAA"}
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(page))
    argv = ["reconcile", "--config", str(tmp_path), "--costs", str(path)]
    assert main(argv) == 2
    assert "its last page (page 1) says it has more" in capsys.readouterr().err
    path.write_text(json.dumps({**page, "has_more": False, "next_page": None}))
    assert main(argv) == 0


def test_reconcile_exits_2_on_a_date_that_is_not_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    (tmp_path / "costs.json").write_text('{"object": "page", "data": []}')
    argv = ["reconcile", "--config", str(tmp_path), "--costs", str(tmp_path / "costs.json")]
    assert main([*argv, "--from", "2026-13-01"]) == 2
    assert "'2026-13-01' is not a date" in capsys.readouterr().err
    assert main([*argv, "--to", "9999-12-31"]) == 2
    assert "after the last day reconciled" in capsys.readouterr().err


def test_report_exits_2_naming_an_output_it_cannot_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    output = tmp_path / "no such folder" / "report.csv"
    argv = ["report", "--config", str(tmp_path), "--format", "csv", "--output", str(output)]
    assert main(argv) == 2
    assert f"cannot write {output}" in capsys.readouterr().err


@pytest.mark.parametrize("label", ["ci-${USER}", "a${b"])
def test_keys_new_refuses_a_label_the_team_file_would_not_read_back(
    capsys: pytest.CaptureFixture[str], label: str
) -> None:
    """`${USER}` in a label became the user's name once the entry was pasted (every string
    of a team file is expanded), and a lone `${` is refused by `check`."""
    from proxy.cli import main

    assert main(["keys", "new", "design", "--label", label]) == 2
    captured = capsys.readouterr()
    assert "tg_" not in captured.out
    assert "a key id may not hold '${'" in captured.err


@pytest.mark.parametrize(
    "label",
    [
        "laptop",
        "my: laptop",
        "a, b",
        "{x}",
        "#1",
        "123",
        "0100",
        "1:30",
        "yes",
        "null",
        'it\'s "q"',
    ],
)
def test_keys_new_prints_an_entry_that_reads_back_as_the_label_and_hash(
    capsys: pytest.CaptureFixture[str], label: str
) -> None:
    from proxy.cli import main

    assert main(["keys", "new", "design", "--label", label]) == 0
    out = capsys.readouterr().out
    secret = next(w for w in out.split() if w.startswith("tg_"))
    entry = yaml.safe_load(out[out.index("  - {") :])
    assert entry == [{"id": label, "sha256": key_hash(secret)}]


@pytest.mark.parametrize(
    "args",
    [("--by", "team"), ("--statement", "2026-11")],
    ids=["report", "statement"],
)
def test_csv_lines_end_so_that_cut_and_awk_read_the_last_column_as_written(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    output = tmp_path / "out.csv"
    argv = ["report", "--config", str(tmp_path), *args, "--format", "csv"]
    assert main([*argv, "--output", str(output)]) == 0
    header = output.read_bytes().split(b"\n")[0]
    # What `head -1 | awk -F, '{print $NF}'` prints: the last name, nothing after it.
    assert header.split(b",")[-1] in (b"cost_usd", b"value")


@pytest.mark.parametrize("args", [("report", "--by", "team"), ("schema",)], ids=" ".join)
def test_a_reader_that_stops_reading_gets_no_traceback(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    read, write = os.pipe()
    os.close(read)  # `tollgate … | head -0`: the reader is gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *args]
            + (["--config", str(tmp_path)] if args[0] == "report" else []),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert done.stderr == ""
    assert done.returncode == 1


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["reconcile", "--costs", "c.json", "--tolerance", "abc"], "not an amount in USD"),
        (["reconcile", "--costs", "c.json", "--tolerance", "-1"], "0 or more"),
        (["reconcile", "--costs", "c.json", "--tolerance", "NaN"], "0 or more"),
        (["serve", "--port", "99999"], "use 0 to 65535"),
        (["serve", "--workers", "0"], "not at least 1"),
        (["simulate-upstream", "--port", "http"], "not a port number"),
    ],
    ids=["tolerance-text", "tolerance-negative", "tolerance-nan", "port", "workers", "sim-port"],
)
def test_a_flag_out_of_its_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    from proxy.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "--by", "team", "--by", "model"],
        ["report", "--from", "2026-11-01", "--from", "2026-12-01"],
        ["report", "--format", "csv", "--format", "json"],
    ],
    ids=["by", "from", "format"],
)
def test_a_report_flag_given_twice_is_a_usage_error_not_the_last_one_alone(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """`--by team --by model` answered by model alone, read as the grouping asked for;
    the admin API refuses a parameter given twice, and so does the command."""
    from proxy.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"argument {argv[1]}: given more than once" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["reconcile", "--to", "2026-11-30", "--costs", "c.json", "--to", "2026-11-03"],
        ["reconcile", "--from", "2026-11-01", "--from", "2026-11-20", "--costs", "c.json"],
        ["reconcile", "--costs", "a.json", "--costs", "b.json"],
        ["reconcile", "--by", "project", "--by", "model", "--costs", "c.json"],
        ["reconcile", "--tolerance", "5", "--costs", "c.json", "--tolerance", "0.01"],
        ["ledger", "flagged", "--from", "2026-11-01", "--from", "2026-11-20"],
        ["ledger", "flagged", "--to", "2026-11-30", "--to", "2026-11-03"],
    ],
    ids=["to", "from", "costs", "by", "tolerance", "flagged-from", "flagged-to"],
)
def test_a_reconcile_or_flagged_flag_given_twice_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """As for `report`: `--to 2026-11-30 … --to 2026-11-03` compared three days of the month
    and said they matched, the days asked for first never seen."""
    from proxy.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    flag = next(arg for arg in argv if arg.startswith("--") and argv.count(arg) == 2)
    assert f"argument {flag}: given more than once" in capsys.readouterr().err


def test_check_counts_one_team_and_one_budget_in_the_singular(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1", teams={"solo": TEAM_WITH_ONE_BUDGET})
    assert main(["check", "--config", str(tmp_path)]) == 0
    assert f"{tmp_path}: ok (1 team, 1 budget)" in capsys.readouterr().out


TEAM_WITH_ONE_BUDGET = f"""
name: solo
keys:
  - {{id: k, sha256: {key_hash("tg_solo_key_0001")}}}
budgets:
  - {{period: day, limit_usd: 1}}
"""


@pytest.mark.parametrize(
    "command",
    [
        ["budgets"],
        ["report", "--by", "team"],
        ["report", "--audit"],
        ["reconcile", "--costs", "COSTS"],
        ["ledger", "flagged"],
        ["ledger", "resolve", "tg_req_x", "--free"],
        ["ledger", "copy", "--to", "sqlite:///TARGET"],
    ],
    ids=" ".join,
)
def test_commands_that_read_the_ledger_refuse_one_that_does_not_exist(
    tmp_path: Path, command: list[str]
) -> None:
    """A mistyped `--ledger` path used to be created as an empty ledger, and reported as a
    history with nothing spent (exit 0). It is refused as a bad argument, nothing created."""
    write_config(tmp_path, "http://127.0.0.1:9")
    costs = tmp_path / "costs.json"
    costs.write_text(ONE_DAY_COSTS)
    typo = tmp_path / "typo" / "tollgate.db"
    empty = tmp_path / "empty.db"
    empty.touch()  # a file, but no ledger in it
    for ledger in (typo, empty):
        argv = [str(costs) if arg == "COSTS" else arg for arg in command]
        argv = [
            f"sqlite:///{tmp_path / 'target.db'}" if a == "sqlite:///TARGET" else a for a in argv
        ]
        where = (
            ["--from", f"sqlite:///{ledger}"]
            if command[1:2] == ["copy"]
            else ["--config", str(tmp_path), "--ledger", f"sqlite:///{ledger}"]
        )
        done = tollgate(*argv, *where)
        assert done.returncode == 2, done.stderr
        assert f"no ledger at {ledger}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert not typo.parent.exists() and empty.stat().st_size == 0
    assert not (tmp_path / "tollgate.db").exists() and not (tmp_path / "target.db").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["budgets"],
        ["report", "--by", "team"],
        ["reconcile", "--costs", "COSTS"],
        ["ledger", "flagged"],
        ["ledger", "copy", "--to", "sqlite:///TARGET"],
    ],
    ids=" ".join,
)
def test_commands_that_read_the_ledger_leave_an_empty_postgresql_database_empty(
    tmp_path: Path, command: list[str]
) -> None:
    """A URL naming a database (or a search path) that holds no ledger was initialised by
    the read, and reported as a history with nothing spent. Refused as on SQLite."""
    write_config(tmp_path, "http://127.0.0.1:9")
    costs = tmp_path / "costs.json"
    costs.write_text(ONE_DAY_COSTS)
    url = pg.new_schema()
    try:
        argv = [str(costs) if arg == "COSTS" else arg for arg in command]
        argv = [f"sqlite:///{tmp_path / 't.db'}" if a == "sqlite:///TARGET" else a for a in argv]
        where = (
            ["--from", url]
            if command[1:2] == ["copy"]
            else ["--config", str(tmp_path), "--ledger", url]
        )
        done = tollgate(*argv, *where)
        assert done.returncode == 2, done.stderr
        assert "no ledger in the PostgreSQL database" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        tables = pg.fetch(
            url, "SELECT count(*) AS n FROM pg_tables WHERE schemaname = current_schema()"
        )
        assert tables == [{"n": 0}]
        assert not (tmp_path / "t.db").exists()
    finally:
        pg.drop_schema(url)
    migrated = pg.migrated_schema()
    try:
        done = tollgate("budgets", "--config", str(tmp_path), "--ledger", migrated)
        assert done.returncode == 0, done.stderr
    finally:
        pg.drop_schema(migrated)


def test_serve_and_migrate_create_the_ledger_the_readers_then_read(tmp_path: Path) -> None:
    write_config(tmp_path, "http://127.0.0.1:9")
    url = f"sqlite:///{tmp_path / 'new' / 'tollgate.db'}"
    done = tollgate("ledger", "migrate", "--config", str(tmp_path), "--ledger", url)
    assert done.returncode == 0, done.stderr
    done = tollgate("budgets", "--config", str(tmp_path), "--ledger", url)
    assert done.returncode == 0, done.stderr


def test_budgets_table_shows_money_tokens_and_periods_that_never_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table's cells, column by column: dollars with their sign, tokens with their
    kind, the period's end in the configuration's time zone (or `never`), and the open
    batches below."""
    from proxy import cli
    from proxy.cli import finance
    from proxy.core.periods import Window
    from proxy.core.status import BudgetStatus
    from proxy.ledger import OpenBatch

    write_config(tmp_path, "http://127.0.0.1:9", settings="timezone: Europe/Paris\n")
    new_ledger(tmp_path)
    month = Window("month", 1_764_543_600.0, 1_767_222_000.0)  # Dec 2025 in Paris
    found = [
        BudgetStatus("organization", "", "", "month", "usd", 100_000_000_000, 2_500_000_000,
                     500_000_000, month),
        BudgetStatus("team", "design", "", "month", "image_output_tokens", 1000, 250, 0, month),
        BudgetStatus("team", "design", "", "total", "usd", 10_000_000_000, 10_500_000_000, 0,
                     Window("total", 0.0, None)),
    ]  # fmt: skip
    batches = [OpenBatch("batch_1", "design", 500_000_000, 0.0)]

    async def read(*_: object) -> tuple[list[BudgetStatus], list[OpenBatch]]:
        return found, batches

    monkeypatch.setattr(finance, "read_budgets", read)
    assert cli.main(["budgets", "--config", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (
        "SCOPE         TEAM    PERIOD  LIMIT                  SPENT  RESERVED  REMAINING  USED"
        "    PERIOD ENDS     \n"
        "organization  -       month   $100                   $2.5   $0.5      $97        2.5%"
        "    2026-01-01 00:00\n"
        "team          design  month   1000 image_output tok  250    0         750        25.0%"
        "   2026-01-01 00:00\n"
        "team          design  total   $10                    $10.5  $0        $0         105.0%"
        "  never           \n"
        "\nOpen batches (their reservations are in RESERVED above):\n"
        "  batch_1  design  $0.5\n"
    )


def test_check_accepts_auto_among_the_allowed_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`auto` is written `auto` in `allow.sizes`: without it, a request of size `auto` is
    refused (the model would choose a size that may not be listed)."""
    from proxy.cli import main
    from proxy.config import load_config

    team = TEAM_WITH_ONE_BUDGET + "allow:\n  sizes: [auto, 1024x1024]\n"
    write_config(tmp_path, "http://127.0.0.1:9/v1", teams={"solo": team})
    assert main(["check", "--config", str(tmp_path)]) == 0
    assert "ok (1 team" in capsys.readouterr().out
    assert load_config(tmp_path).teams[0].allow.sizes == {"auto", "1024x1024"}


@pytest.mark.parametrize(
    ("by", "said"), [(",,,", "empty field"), ("team,", "empty field"), ("team,team", "twice")]
)
def test_report_refuses_an_empty_or_repeated_grouping(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], by: str, said: str
) -> None:
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    assert main(["report", "--config", str(tmp_path), "--by", by]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tollgate report: ") and said in err
    assert main(["report", "--config", str(tmp_path), "--by", "team,model"]) == 0


def test_reconcile_refuses_a_costs_file_without_a_bucket_for_a_day_reconciled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The Costs API answers one bucket per day asked, even one without spend: a page of no
    bucket (`"data": []`) covers no day, and once read as every day matching."""
    from proxy.cli import main

    write_config(tmp_path, "http://127.0.0.1:9/v1")
    new_ledger(tmp_path)
    path = tmp_path / "costs.json"
    argv = ["reconcile", "--config", str(tmp_path), "--costs", str(path)]
    path.write_text('{"object": "page", "data": [], "has_more": false}')
    for extra in ([], ["--from", "2024-11-01", "--to", "2024-11-03"]):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tollgate reconcile: the costs file holds no daily bucket"), err
    # Buckets for November 1st and 3rd (2024, UTC), without spend.
    buckets = [
        {"object": "bucket", "start_time": start, "end_time": start + 86_400, "results": []}
        for start in (1730419200, 1730592000)
    ]
    path.write_text(json.dumps({"object": "page", "data": buckets, "has_more": False}))
    assert main(argv) == 2
    assert "has no bucket for 1 of the days reconciled (2024-11-01..2024-11-03): 2024-11-02." in (
        capsys.readouterr().err
    )
    assert main([*argv, "--from", "2024-10-30", "--to", "2024-11-05"]) == 2
    err = capsys.readouterr().err
    assert "no bucket for 5 of the days reconciled" in err
    assert "2024-10-30..2024-10-31, 2024-11-02, 2024-11-04..2024-11-05." in err
    assert main([*argv, "--to", "2024-11-01"]) == 0
    assert main([*argv, "--from", "2024-11-03", "--by", "project"]) == 0
    assert main([*argv, "--by", "project"]) == 2
    capsys.readouterr()


ORG_MONTH = """
    organization:
      budgets:
        - {period: month, limit_usd: 100}
"""


READERS = [
    ["budgets", "--format", "json"],
    ["report", "--by", "team"],
    ["report", "--audit"],
    ["reconcile", "--costs", "COSTS"],
    ["reconcile", "--costs", "COSTS", "--by", "project"],
    ["ledger", "flagged"],
]
"""The commands that only show the ledger."""


def reading(command: list[str], root: Path, ledger: Path) -> list[str]:
    """`command`'s arguments for the configuration in `root` and the SQLite ledger `ledger`
    (a saved Costs API answer of one day written in `root` for `COSTS`)."""
    costs = root / "costs.json"
    costs.write_text(ONE_DAY_COSTS)
    argv = [str(costs) if arg == "COSTS" else arg for arg in command]
    return [*argv, "--config", str(root), "--ledger", f"sqlite:///{ledger}"]


def shown(command: list[str], done: subprocess.CompletedProcess[str]) -> None:
    """`command` ran to its end: exit 0, and for `budgets` the organization's budget."""
    assert done.returncode == 0, done.stderr
    if command[0] == "budgets":
        assert [b["scope"] for b in json.loads(done.stdout)["budgets"]] == ["organization"]


@pytest.mark.parametrize("command", READERS, ids=" ".join)
def test_commands_that_only_read_run_while_a_writer_holds_the_ledgers_write_lock(
    tmp_path: Path, command: list[str]
) -> None:
    """A display command took SQLite's write lock to check the schema (`BEGIN IMMEDIATE`):
    it waited behind the proxy's writers, up to 30 s and then failed, and held them while
    it had the lock. With the schema current it only reads."""
    write_config(tmp_path, "http://127.0.0.1:9", settings=ORG_MONTH)
    new_ledger(tmp_path)
    with contextlib.closing(
        sqlite3.connect(tmp_path / "tollgate.db", isolation_level=None)
    ) as writer:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE schema_version SET version = version")  # a write under way
        done = tollgate(*reading(command, tmp_path, tmp_path / "tollgate.db"))
        writer.execute("ROLLBACK")
    shown(command, done)


def read_only_for_commands() -> list[str]:
    """The prefix that runs a command as a user whose file permissions apply: root's
    override of them dropped (`setpriv`), else nothing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("run as root without setpriv: file permissions cannot be made to apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("writer", [False, True], ids=["closed", "open in a writer"])
@pytest.mark.parametrize("command", READERS, ids=" ".join)
def test_commands_that_only_read_read_a_ledger_their_user_may_only_read(
    tmp_path: Path, command: list[str], writer: bool
) -> None:
    """Finance may read the ledger without being able to write it (a read-only file in a
    directory it cannot write): the commands that show it failed there ("attempt to write
    a readonly database", or "unable to open database file" for a report's own
    connections), whether the proxy had the file open (its `-wal` and `-shm` beside it)
    or not."""
    write_config(tmp_path, "http://127.0.0.1:9", settings=ORG_MONTH)
    folder = tmp_path / "ledger"
    folder.mkdir()
    path = folder / "tollgate.db"
    asyncio.run(migrate_ledger(f"sqlite:///{path}"))
    argv = reading(command, tmp_path, path)
    with contextlib.ExitStack() as stack:
        if writer:
            holder = stack.enter_context(contextlib.closing(sqlite3.connect(path)))
            holder.execute("PRAGMA journal_mode = WAL")
            holder.execute("SELECT count(*) FROM schema_version").fetchone()
            assert (folder / "tollgate.db-shm").exists()
        before = sorted(os.listdir(folder))
        for name in before:
            (folder / name).chmod(0o444)
        folder.chmod(0o555)
        stack.callback(folder.chmod, 0o755)
        done = subprocess.run(
            [*read_only_for_commands(), sys.executable, "-m", "proxy", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        shown(command, done)
        assert sorted(os.listdir(folder)) == before


READ_WHILE_WRITTEN = """
import asyncio, sys
from proxy.core.errors import LedgerError
from proxy.ledger import reading_ledger


async def main() -> None:
    try:
        async with reading_ledger(sys.argv[1]) as ledger:
            print("open", flush=True)
            sys.stdin.readline()  # a proxy starts meanwhile, and writes
            await ledger.flagged(0.0, float("inf"))
    except LedgerError as exc:
        print("refused:", exc)
    else:
        print("read")


asyncio.run(main())
"""


def test_a_ledger_read_as_a_snapshot_is_refused_once_a_proxy_writes_it(tmp_path: Path) -> None:
    """A ledger in a directory its user cannot write, with no process holding it, is read
    as an immutable snapshot: a proxy that starts (as a user who may write there) while a
    command reads it writes to a WAL the snapshot never sees. The command says so (the
    ledger changed while it was read) instead of showing what it held before."""
    folder = tmp_path / "ledger"
    folder.mkdir()
    path = folder / "tollgate.db"
    asyncio.run(migrate_ledger(f"sqlite:///{path}"))
    for name in os.listdir(folder):
        (folder / name).chmod(0o444)
    folder.chmod(0o555)
    try:
        with subprocess.Popen(
            [*read_only_for_commands(), sys.executable, "-c", READ_WHILE_WRITTEN,
             f"sqlite:///{path}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ) as reader:  # fmt: skip
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline() == "open\n"
            folder.chmod(0o755)
            (folder / "tollgate.db").chmod(0o644)
            with contextlib.closing(sqlite3.connect(path)) as writer:
                writer.execute("UPDATE schema_version SET version = version")
                writer.commit()
                said, _ = reader.communicate("go\n", timeout=60)
    finally:
        folder.chmod(0o755)
    assert said.startswith("refused:"), said


@pytest.mark.parametrize("command", READERS, ids=" ".join)
def test_commands_that_only_read_read_a_ledger_whose_path_holds_uri_characters(
    tmp_path: Path, command: list[str]
) -> None:
    """A report's own connections opened `file:PATH?mode=ro` with the path as written: in a
    directory named `q#1` the URI ended at the `#`, so a report opened (and created) `q`
    read-write and failed on its missing tables with a traceback."""
    write_config(tmp_path, "http://127.0.0.1:9", settings=ORG_MONTH)
    folder = tmp_path / "q#1?x=%41"
    folder.mkdir()
    path = folder / "tollgate.db"
    asyncio.run(migrate_ledger(f"sqlite:///{path}"))
    shown(command, tollgate(*reading(command, tmp_path, path)))
    assert sorted(os.listdir(tmp_path)) == ["costs.json", folder.name, "teams", "tollgate.yaml"]
