"""Finance reports end to end: a known workload through Tollgate with the official client,
then every report format, the statement, the audit export and reconciliation checked
against numbers computed here from the simulated upstream's own billing record."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    key_hash,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)
from tests.test_proxy_e2e import expected_cost

ADMIN = "admin-token-for-reports"
TEAMS = {
    "design": f"""
        name: design
        cost_center: CC-1042
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
        budgets:
          - {{period: month, limit_usd: 800}}
        allow:
          models: [gpt-image-2, gpt-image-1.5, gpt-image-1-mini]
    """,
    "research": f"""
        name: research
        cost_center: CC-2077
        keys:
          - {{id: notebook, sha256: {key_hash(RESEARCH_KEY)}}}
        budgets:
          - {{period: month, limit_usd: 0.05}}
        on_exhausted: reject
    """,
}


@dataclass
class Expected:
    """Sums per (team, model), from the upstream's billing record and published rates."""

    groups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    users: dict[tuple[str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))

    def add(self, team: str, model: str, record: dict[str, Any] | None, user: str) -> None:
        g = self.groups.setdefault(
            (team, model),
            {"requests": 0, "images": 0, "text_input_tokens": 0, "image_input_tokens": 0,
             "image_output_tokens": 0, "cost_usd": Decimal(0)},
        )  # fmt: skip
        g["requests"] += 1
        if record is not None:
            usage = record["usage"]
            g["images"] += record["images"]
            g["text_input_tokens"] += usage["text_input"]
            g["image_input_tokens"] += usage["image_input"]
            g["image_output_tokens"] += usage["image_output"]
            g["cost_usd"] += expected_cost(record)
            self.users[team, user] += expected_cost(record)

    def total(self) -> Decimal:
        return sum((g["cost_usd"] for g in self.groups.values()), Decimal(0))


@dataclass
class World:
    simulator: Simulator
    tollgate: Tollgate
    expected: Expected

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", *args, "--config", str(self.tollgate.root)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"OPENAI_ADMIN_KEY": UPSTREAM_KEY, "PATH": "/usr/bin:/bin"},
        )

    def admin(self, **params: str) -> httpx.Response:
        return httpx.get(
            f"{self.tollgate.url}/admin/report",
            params=params,
            headers={"authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )


def generate(client: openai.OpenAI, **params: Any) -> Any:
    return client.images.with_raw_response.generate(prompt="a lighthouse", **params)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    simulator = start_simulator()
    root = tmp_path_factory.mktemp("reports")
    write_config(
        root, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\ntimezone: UTC\n", teams=TEAMS
    )
    tollgate = start_tollgate(root)
    expected = Expected()
    design, research = tollgate.client(DESIGN_KEY), tollgate.client(RESEARCH_KEY)
    size = "1024x1024"
    workload = [
        (design, "design", "alice", {"model": "gpt-image-2", "quality": "low", "size": size}),
        (
            design,
            "design",
            "alice",
            {"model": "gpt-image-2", "quality": "medium", "size": "1536x1024"},
        ),
        (design, "design", "bob", {"model": "gpt-image-1.5", "quality": "medium", "size": size}),
        (
            design,
            "design",
            "alice",
            {"model": "gpt-image-1-mini", "quality": "low", "size": size, "n": 2},
        ),
        (research, "research", "carol", {"model": "gpt-image-2", "quality": "low", "size": size}),
    ]
    try:
        for client, team, user, params in workload:
            raw = generate(client, user=user, **params)
            record = simulator.record(raw.headers["x-request-id"])
            expected.add(team, params["model"], record, user)
        with pytest.raises(openai.PermissionDeniedError):
            generate(design, user="bob", model="gpt-image-1", quality="low", size="1024x1024")
        expected.add("design", "gpt-image-1", None, "bob")
        expected.outcomes["rejected_policy"] += 1
        with pytest.raises(openai.RateLimitError):
            generate(research, user="carol", model="gpt-image-2", quality="high", size="2048x2048")
        expected.add("research", "gpt-image-2", None, "carol")
        expected.outcomes["rejected_budget"] += 1
        expected.outcomes["ok"] += len(workload)
        deadline = time.monotonic() + 60
        while any(r["state"] != "settled" for r in tollgate.rows()):
            assert time.monotonic() < deadline, "rows never settled"
            time.sleep(0.05)
        yield World(simulator, tollgate, expected)
    finally:
        tollgate.stop()
        stop(simulator.process)


def by_team_model(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (r["team"], r["model"]): {
            "requests": int(r["requests"]),
            "images": int(r["images"]),
            "text_input_tokens": int(r["text_input_tokens"]),
            "image_input_tokens": int(r["image_input_tokens"]),
            "image_output_tokens": int(r["image_output_tokens"]),
            "cost_usd": Decimal(r["cost_usd"]),
        }
        for r in rows
    }


def test_json_report_by_team_and_model_matches_the_upstream_billing_record(world: World) -> None:
    done = world.cli("report", "--by", "team,model", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"from", "to", "rows", "total"}
    assert by_team_model(report["rows"]) == world.expected.groups
    assert Decimal(report["total"]["cost_usd"]) == world.expected.total()
    assert report["total"]["requests"] == 7
    assert all(isinstance(r["cost_usd"], str) for r in report["rows"])


def test_csv_report_has_a_header_decimal_strings_and_the_same_numbers(
    world: World, tmp_path: Path
) -> None:
    out = tmp_path / "report.csv"
    done = world.cli("report", "--by", "team,model", "--format", "csv", "--output", str(out))
    assert done.returncode == 0, done.stderr
    raw = out.read_bytes()
    assert raw.startswith(b"team,model,")  # plain UTF-8: no byte-order mark
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    assert list(rows[0]) == [
        "team", "model", "requests", "images", "text_input_tokens", "image_input_tokens",
        "image_output_tokens", "cost_usd",
    ]  # fmt: skip
    assert by_team_model(rows) == world.expected.groups
    assert not any("e" in r["cost_usd"].lower() for r in rows)
    cut = subprocess.run(
        ["cut", "-d,", "-f1", str(out)], capture_output=True, text=True, check=True
    )
    assert cut.stdout.splitlines()[0] == "team"


def test_every_csv_has_a_byte_order_mark_only_with_excel(world: World) -> None:
    month = time.strftime("%Y-%m", time.gmtime())
    for args, first in (
        (("report", "--by", "team", "--format", "csv"), "team"),
        (("report", "--statement", month, "--format", "csv"), "cost_center"),
        (("report", "--audit", "--format", "csv"), "id"),
    ):
        plain = world.cli(*args)
        assert plain.returncode == 0, plain.stderr
        assert next(csv.DictReader(io.StringIO(plain.stdout))).keys() >= {first}
        assert not plain.stdout.startswith("\ufeff")
        excel = world.cli(*args, "--excel")
        assert excel.returncode == 0, excel.stderr
        assert excel.stdout == "\ufeff" + plain.stdout
    for params in ({"by": "team"}, {"statement": month}, {"audit": "1"}):
        plain_answer = world.admin(**params, format="csv")
        excel_answer = world.admin(**params, format="csv", excel="1")
        assert plain_answer.status_code == excel_answer.status_code == 200
        assert not plain_answer.content.startswith(b"\xef\xbb\xbf")
        assert excel_answer.content == b"\xef\xbb\xbf" + plain_answer.content
    refused = world.cli("report", "--format", "json", "--excel")
    assert refused.returncode == 2 and "CSV only" in refused.stderr
    assert world.admin(format="json", excel="1").status_code == 400


def test_table_report_shows_the_total(world: World) -> None:
    done = world.cli("report", "--by", "team")
    assert done.returncode == 0, done.stderr
    total = format(world.expected.total().normalize(), "f")
    assert total in done.stdout.splitlines()[-1]


def test_admin_report_answers_the_same_as_the_cli(world: World) -> None:
    answer = world.admin(by="team,model", format="json")
    assert answer.status_code == 200, answer.text
    assert answer.json() == json.loads(
        world.cli("report", "--by", "team,model", "--format", "json").stdout
    )
    refused = httpx.get(f"{world.tollgate.url}/admin/report", params={"by": "team"})
    assert refused.status_code == 401
    bad = world.admin(by="colour")
    assert bad.status_code == 400 and "colour" in bad.json()["error"]["message"]


def test_admin_report_parameters_left_empty_are_the_defaults(world: World) -> None:
    # `GET /admin/report?from=&to=&by=&format=`: what an HTTP client sends for a
    # parameter it has no value for (httpx writes None as an empty value).
    empty = world.admin(**{"from": "", "to": "", "by": "", "format": ""})
    assert empty.status_code == 200, empty.text
    assert empty.headers["content-type"] == world.admin().headers["content-type"]
    assert empty.json() == world.admin(format="json").json()


def test_report_by_outcome_counts_rejections_and_by_day_is_a_local_date(world: World) -> None:
    rows = world.admin(by="outcome,day", format="json").json()["rows"]
    counts = {r["outcome"]: r["requests"] for r in rows}
    assert counts == dict(world.expected.outcomes)
    assert all(r["cost_usd"] == "0" for r in rows if r["outcome"].startswith("rejected"))
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert {r["day"] for r in rows} == {today}


@pytest.mark.parametrize(
    ("flag", "value"), [("from", "2020-01-01"), ("to", "2020-01-31"), ("by", "team")]
)
def test_a_statement_with_a_period_or_grouping_is_refused_not_answered_for_its_month(
    world: World, flag: str, value: str
) -> None:
    """`--statement` is its month: another period or grouping given with it would be
    answered with the month's numbers, read as those asked for."""
    month = time.strftime("%Y-%m", time.gmtime())
    done = world.cli("report", "--statement", month, f"--{flag}", value)
    assert done.returncode == 2 and f"--{flag}" in done.stderr, done.stderr
    answer = world.admin(statement=month, **{flag: value})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == flag


def test_statement_json_and_csv_carry_budgets_rejections_and_users(world: World) -> None:
    month = time.strftime("%Y-%m", time.gmtime())
    done = world.cli("report", "--statement", month, "--format", "json")
    assert done.returncode == 0, done.stderr
    statement = json.loads(done.stdout)
    teams = {t["team"]: t for c in statement["cost_centers"] for t in c["teams"]}
    centers = {c["cost_center"] for c in statement["cost_centers"]}
    assert centers == {"CC-1042", "CC-2077"}
    design, research = teams["design"], teams["research"]
    assert design["budget_usd"] == "800" and research["budget_usd"] == "0.05"
    assert design["rejections"] == 1 and research["rejections"] == 1
    assert design["outcomes"]["rejected_policy"] == 1
    assert research["outcomes"]["rejected_budget"] == 1
    for name in ("design", "research"):
        spent = sum((g["cost_usd"] for (t, _), g in world.expected.groups.items() if t == name),
                    Decimal(0))  # fmt: skip
        assert Decimal(teams[name]["total"]["cost_usd"]) == spent
        assert sum(Decimal(d["cost_usd"]) for d in teams[name]["daily"]) == spent
        models = sum(Decimal(m["cost_usd"]) for m in teams[name]["by_model"])
        assert models == spent
    top = design["top_users"][0]
    assert (top["user"], Decimal(top["cost_usd"])) == max(
        ((u, c) for (t, u), c in world.expected.users.items() if t == "design"),
        key=lambda uc: uc[1],
    )
    assert Decimal(statement["total"]["cost_usd"]) == world.expected.total()
    csv_text = world.cli("report", "--statement", month, "--format", "csv").stdout
    lines = list(csv.DictReader(io.StringIO(csv_text)))
    totals = {
        r["team"]: Decimal(r["value"])
        for r in lines
        if r["section"] == "total" and r["metric"] == "cost_usd"
    }
    assert totals == {n: Decimal(t["total"]["cost_usd"]) for n, t in teams.items()}


def test_statement_html_is_self_contained_and_renders_in_chromium(
    world: World, tmp_path: Path
) -> None:
    month = time.strftime("%Y-%m", time.gmtime())
    page = tmp_path / "statement.html"
    done = world.cli("report", "--statement", month, "--format", "html", "--output", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "<svg" in text and "@media print" in text and "CC-1042" in text
    assert format(world.expected.total().normalize(), "f") in text
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (tests/run installs it)")
    shot = tmp_path / "statement.png"
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 20_000
    keep = Path("/tmp/tollgate-statement.png")
    shutil.copy(shot, keep)


def test_audit_export_streams_every_row_as_json_lines_and_csv(world: World) -> None:
    done = world.cli("report", "--audit", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    ledger = world.tollgate.rows()
    assert [r["id"] for r in rows] == [
        r["id"] for r in sorted(ledger, key=lambda r: (r["started_at"], r["id"]))
    ]
    assert sum(Decimal(r["cost_usd"]) for r in rows) == world.expected.total()
    streamed = world.admin(audit="1", format="csv")
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(streamed.text)))
    assert len(table) == len(ledger)
    assert {r["outcome"] for r in table} >= {"ok", "rejected_budget", "rejected_policy"}


def reconcile(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return world.cli("reconcile", *args)


def test_reconcile_live_is_clean_when_every_request_went_through_tollgate(world: World) -> None:
    done = reconcile(world, "--admin-key-env", "OPENAI_ADMIN_KEY", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["off_days"] == []
    models = {line["model"] for line in result["lines"]}
    assert models == {m for (_, m), g in world.expected.groups.items() if g["cost_usd"]}
    assert "matches" in reconcile(world, "--admin-key-env", "OPENAI_ADMIN_KEY").stdout


def test_reconcile_from_a_file_refuses_a_day_it_has_no_bucket_for(
    world: World, tmp_path: Path
) -> None:
    """The Costs API answers a bucket for every day asked, even one without spend: a day
    the file has none for was never saved, and is neither a match nor a difference (exit 2,
    not 1). Once, a missing day read as `OFF` when the ledger had spend on it, and as a
    match when it had none."""
    today = int(time.time()) // 86_400 * 86_400
    page = httpx.get(
        f"{world.simulator.url}/v1/organization/costs",
        params={"start_time": today - 86_400, "end_time": today + 86_400,
                "group_by[]": "line_item", "limit": 31},
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
    ).json()  # fmt: skip
    clean = tmp_path / "costs.json"
    clean.write_text(json.dumps(page))
    assert reconcile(world, "--costs", str(clean)).returncode == 0
    page["data"] = [b for b in page["data"] if b["start_time"] != today]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(page))
    day = time.strftime("%Y-%m-%d", time.gmtime())
    done = reconcile(world, "--costs", str(missing), "--to", day)
    assert done.returncode == 2, done.stdout
    assert "has no bucket for 1 of the days reconciled" in done.stderr
    assert done.stderr.count(day) == 2 and done.stdout == ""  # the range, and the day
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(today - 86_400))
    done = reconcile(world, "--costs", str(missing), "--to", yesterday)
    assert done.returncode == 0, done.stdout + done.stderr
    page["data"] = []
    missing.write_text(json.dumps(page))
    done = reconcile(world, "--costs", str(missing))
    assert done.returncode == 2 and "holds no daily bucket" in done.stderr


def test_reconcile_shows_traffic_that_bypassed_tollgate_as_a_positive_difference(
    world: World,
) -> None:
    direct = openai.OpenAI(base_url=f"{world.simulator.url}/v1", api_key=UPSTREAM_KEY)
    direct.images.generate(
        model="gpt-image-1.5", prompt="behind finance's back", quality="high", size="1024x1024"
    )
    done = reconcile(world, "--admin-key-env", "OPENAI_ADMIN_KEY")
    assert done.returncode == 1, done.stdout
    assert "bypassed Tollgate" in done.stdout
    result = json.loads(
        reconcile(world, "--admin-key-env", "OPENAI_ADMIN_KEY", "--format", "json").stdout
    )
    off = [line for line in result["lines"] if line["status"] == "off"]
    assert [line["model"] for line in off] == ["gpt-image-1.5"]
    assert Decimal(off[0]["difference_usd"]) > 0
    bypassed = expected_cost(world.simulator.billing()[-1])
    assert abs(Decimal(off[0]["difference_usd"]) - bypassed) < Decimal("0.000001")
