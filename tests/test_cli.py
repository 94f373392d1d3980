"""The command line, run as users run it: `python -m proxy …` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from proxy.auth import key_hash
from tests.conftest import write_config

EXAMPLES = Path(__file__).resolve().parent.parent / "policies"


def tollgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, **(env or {})},
    )


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
  - {path: /v1/files, methods: [POST, GET]}
""")  # fmt: skip
    done = tollgate("check", "--config", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "passthrough /v1/models: GET, HEAD, unmetered" in done.stdout
    assert "passthrough /v1/files: GET, POST, unmetered" in done.stdout
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
