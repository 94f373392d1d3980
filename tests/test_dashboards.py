"""The files in dashboards/: the Grafana board, the Prometheus rules, provisioning, compose.

What each query returns on a real Prometheus is proven in test_observability_e2e.py;
here, what can be read from the files alone.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.models import Change, Entry, Settlement, Usage
from proxy.core.periods import Window
from proxy.core.settings import RateLimit
from proxy.core.status import BudgetStatus, RateStatus
from proxy.metrics import Metrics

DASHBOARDS = Path(__file__).parent.parent / "dashboards"
BOARD = DASHBOARDS / "tollgate.json"
RULE_FILES = sorted((DASHBOARDS / "prometheus").glob("*rules.yml"))
# Names of series: Tollgate's metrics, and recorded series (`level:metric:operations`).
SERIES = re.compile(r"\b(tollgate_[a-z_]+|[a-z_]+:[a-z0-9_:]+)\b")
RESPONSES_ROW = "Responses API"
RATE_LIMITS_ROW = "Rate limits"
LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")
THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*[0-9.]+\s*$")


def board() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(BOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in board()["panels"] if p["type"] != "row"]


def row_expressions(title: str) -> list[str]:
    """The expressions of the panels under the row called `title` (up to the next row)."""
    found: list[str] = []
    inside = False
    for panel in board()["panels"]:
        if panel["type"] == "row":
            inside = panel["title"] == title
        elif inside:
            found.extend(t["expr"] for t in panel["targets"])
    return found


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the board: its panels' targets and its variables' queries."""
    found = [t["expr"] for p in panels() for t in p["targets"]]
    for variable in board()["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["definition"])
    return found


def rules() -> list[dict[str, Any]]:
    return [
        r for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
    ]


def rule_expressions() -> list[str]:
    """Recording rules' expressions, and each alert's expression without its threshold (what
    must return data; the comparison only filters it)."""
    return [THRESHOLD.sub("", r["expr"].strip()) for r in rules()]


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def exported() -> set[str]:
    """Every sample name Tollgate's /metrics can carry."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    entry = Entry("r", 0.0, "generations", team="t", model="m", quality="low", size="s",
                  estimated_nanos=2)  # fmt: skip
    usage = Usage(1, 1, 1, 1, 1, 0, 1)
    metrics.started()
    change = Change("quality", "a", "b", "policy")
    metrics.finished(entry, Settlement(1, "ok", 200, usage, 1), (change,))
    responses = Entry("r2", 0.0, "responses", team="t", model="m", mainline_model="l")
    metrics.started()
    metrics.finished(responses, Settlement(1, "ok", 200, Usage(mainline_input=1), 3, 1), ())
    metrics.upstream("m", "generations", 1)
    budget = BudgetStatus("team", "t", "", "month", "usd", 10, 1, 1, Window("month", 0, 1),
                          (Decimal("0.5"),))  # fmt: skip
    metrics.rate_limited("t", "minute", "images")
    metrics.started()
    metrics.finished(entry, Settlement(1, "upstream_error", 429), ())  # OpenAI's own 429
    rate = RateStatus("team", "t", RateLimit("minute", "images", 2), 1, 1, 60.0)
    text = metrics.exposition([budget], [rate]).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def series(expr: str) -> set[str]:
    return set(SERIES.findall(expr))


def instant(expr: str) -> str:
    """`expr` with Grafana's variables replaced, ready for Prometheus's query API (a
    variable's `label_values(metric, label)` becomes the query Grafana sends for it)."""
    expr = LABEL_VALUES.sub(r"group by (\2) (\1)", expr)
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m")
        .replace("$team", ".*")
    )


@pytest.mark.parametrize("expr", dashboard_expressions())
def test_every_dashboard_query_reads_only_exported_metrics_or_recorded_series(expr: str) -> None:
    names = series(expr)
    assert names, expr
    assert names <= exported() | recorded(), names - exported() - recorded()


@pytest.mark.parametrize("expr", rule_expressions())
def test_every_rule_reads_only_exported_metrics_or_recorded_series(expr: str) -> None:
    assert series(expr) <= exported() | recorded()


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    variables = {v["name"]: v for v in board()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["team"]["datasource"]["uid"] == "${datasource}"
    assert panels()
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_queries_of_team_labelled_metrics_follow_the_team_variable() -> None:
    untagged = ("tollgate_upstream_request_duration_seconds", "tollgate_inflight_requests")
    for panel in panels():
        for target in panel["targets"]:
            if not any(name in target["expr"] for name in untagged):
                assert 'team=~"$team"' in target["expr"], panel["title"]


def test_the_board_has_the_panels_operators_need() -> None:
    titles = " / ".join(p["title"].lower() for p in panels())
    for words in (
        "spend by team", "budget utilization", "projected end-of-period", "burn rate",
        "images by model, quality and size", "cost per image", "downgrades", "rejections",
        "tokens by kind", "reserved vs actual", "latency percentiles", "error rate", "in-flight",
        "responses api spend by team and model", "mainline vs image tool",
        "responses api requests by outcome", "rate-limit usage", "rate-limit refusals",
        "rate-limit windows", "openai 429s",
    ):  # fmt: skip
        assert words in titles


def test_the_responses_row_reads_only_the_responses_apis_series() -> None:
    """The cost counter has no endpoint label: the row's spend comes from the Responses
    API's own cost counter, its requests from the `responses` endpoint's."""
    exprs = row_expressions(RESPONSES_ROW)
    assert len(exprs) == 4
    for expr in exprs:
        names = series(expr)
        if names == {"tollgate_requests_total"}:
            assert 'endpoint="responses"' in expr
        else:
            assert names == {"tollgate_responses_cost_usd_total"}, expr
    assert any("sum by (team, model)" in e for e in exprs)
    assert any("sum by (part)" in e for e in exprs)
    assert any("sum by (outcome)" in e and "tollgate_requests_total" in e for e in exprs)


def test_utilization_panels_draw_the_alert_thresholds() -> None:
    alerting = sorted(
        Decimal(THRESHOLD.search(r["expr"]).group(0).split()[-1])  # type: ignore[union-attr]
        for r in rules()
        if r.get("alert", "").startswith("TollgateBudget") and "utilization_ratio" in r["expr"]
        and "projected" not in r["expr"]
    )  # fmt: skip
    assert alerting == [Decimal("0.8"), Decimal("0.95"), Decimal("1")]
    utilization = [p for p in panels() if p["title"].startswith("Budget utilization")]
    assert len(utilization) == 2
    for panel in utilization:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [Decimal(str(s["value"])) for s in steps[1:]] == alerting


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_accepts_the_rule_file(path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `bash tests/run` installs Debian's prometheus package"
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_alert_on_budgets_burn_rate_errors_and_rejections() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts == {
        "TollgateBudget80Percent",
        "TollgateBudget95Percent",
        "TollgateBudgetExhausted",
        "TollgateMonthlyBudgetBurnRate",
        "TollgateUpstreamErrorRate",
        "TollgateRejectionSpike",
        "TollgateRateLimitRefusals",
    }


def test_the_rate_limit_alert_counts_refusals_per_team_over_five_minutes() -> None:
    rule = next(r for r in rules() if r.get("alert") == "TollgateRateLimitRefusals")
    assert rule["expr"] == "sum by (team) (increase(tollgate_rate_limited_total[5m])) > 10"


def test_the_rate_limits_row_reads_the_rate_limit_series() -> None:
    names = set().union(*(series(e) for e in row_expressions(RATE_LIMITS_ROW)))
    assert names == {
        "tollgate_rate_limit_used",
        "tollgate_rate_limit_limit",
        "tollgate_rate_limited_total",
        "tollgate_upstream_rate_limited_total",
    }


def test_the_compose_file_runs_tollgate_prometheus_and_grafana_with_files_that_exist() -> None:
    compose = yaml.safe_load((DASHBOARDS / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"tollgate", "prometheus", "grafana"}
    assert "--simulate" in services["tollgate"]["command"]
    assert (DASHBOARDS / services["tollgate"]["build"]["context"] / "Dockerfile").exists()
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DASHBOARDS / source).exists(), volume
    prometheus = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["tollgate:8080"]


def test_grafana_provisioning_has_the_datasource_and_a_provider_for_the_board() -> None:
    provisioning = DASHBOARDS / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "tollgate.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DASHBOARDS / "docker-compose.yml").read_text())
    assert f"./tollgate.json:{path}/tollgate.json:ro" in compose["services"]["grafana"]["volumes"]
    assert board()["schemaVersion"] >= 39
    assert board()["uid"] == "tollgate-overview"
