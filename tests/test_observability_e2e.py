"""Metrics, rules and the dashboard on a real Prometheus scraping a real Tollgate.

The simulated upstream, Tollgate and Prometheus run as processes on 127.0.0.1;
a workload for two teams (allowed, downgraded, refused and failed requests) goes
through the official `openai` client; then every expression of the dashboard and
of the rule files is asked of Prometheus's HTTP API and must return data, and the
spend Prometheus saw must equal the ledger's.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.core.auth import key_hash
from proxy.core.models import Entry, Settlement, Usage
from proxy.metrics import Metrics
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    free_port,
    serving,
    start_tollgate,
    write_config,
)
from tests.test_alerts import Receiver
from tests.test_dashboards import (
    RESPONSES_ROW,
    RULE_FILES,
    dashboard_expressions,
    instant,
    row_expressions,
    rule_expressions,
)

PACER_KEY = "tg_test_pacer_key_0003"
TEAMS = {
    # Tight month budget: a policy clamp (max_quality), then the throttle, then budget
    # downgrades to the fallback model, then 429.
    "design": f"""
        name: design
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
        budgets:
          - {{period: month, limit_usd: 0.2, alert_at: [0.5, 0.8]}}
          - {{period: total, limit_usd: 5}}
        allow:
          max_quality: medium
          max_n: 2
        throttle:
          - {{above: 0.5, max_quality: low}}
        on_exhausted: downgrade
        downgrade:
          order: [quality, size, model]
          fallback_model: gpt-image-1-mini
    """,
    # A tiny total budget and no downgrades: 429 once it is spent.
    "research": f"""
        name: research
        keys:
          - {{id: notebook, sha256: {key_hash(RESEARCH_KEY)}}}
        budgets:
          - {{period: total, limit_usd: 0.03, alert_at: [0.5]}}
        on_exhausted: reject
    """,
    # Two requests a day: one answered, one OpenAI refuses (429), then Tollgate refuses.
    "pacer": f"""
        name: pacer
        keys:
          - {{id: pace, sha256: {key_hash(PACER_KEY)}}}
        budgets:
          - {{period: total, limit_usd: 5}}
        rate_limits:
          - {{per: day, requests: 2}}
    """,
}


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = answer.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def by_team(self, expr: str) -> dict[str, float]:
        return {r["metric"].get("team", ""): float(r["value"][1]) for r in self.query(expr)}


def start_prometheus(root: Path, target: str) -> Prometheus:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `bash tests/run` installs Debian's prometheus package"
    port = free_port()
    rules = "\n".join(f"  - {path}" for path in RULE_FILES)
    config = root / "prometheus.yml"
    config.write_text(
        textwrap.dedent(f"""
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: tollgate
            static_configs:
              - targets: ["{target}"]
        rule_files:
        """)
        + rules
        + "\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return Prometheus(url, process)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("prometheus did not come up")


@dataclass
class Observed:
    tollgate: Tollgate
    prometheus: Prometheus
    receiver: Receiver
    outcomes: Counter[str]
    """Of design's and research's requests."""
    paced: Counter[str]
    """Of pacer's: rate limits, Tollgate's and OpenAI's."""
    downgraded_headers: list[str]
    responses: bool
    """Whether Tollgate has a Responses door: the workload then has Responses requests."""

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values()) + sum(self.paced.values())


def outcome(send: Callable[[], Any]) -> str:
    """The outcome the client saw of one request `send` makes through the SDK's raw
    response (`downgraded:<header>` for a downgrade)."""
    try:
        raw = send()
    except openai.RateLimitError:
        return "rejected_budget"
    except openai.PermissionDeniedError:
        return "rejected_policy"
    except openai.InternalServerError:
        return "upstream_error"
    return (
        "downgraded:" + raw.headers["x-tollgate-downgraded"]
        if raw.headers.get("x-tollgate-downgraded")
        else "ok"
    )


def generate(client: openai.OpenAI, prompt: str, quality: str, **extra: Any) -> str:
    """One generation; the outcome the client saw."""
    return outcome(
        lambda: client.images.with_raw_response.generate(
            model="gpt-image-2", prompt=prompt, quality=quality, size="1024x1024", **extra
        )
    )


def respond(client: openai.OpenAI, prompt: str) -> str | None:
    """One Responses API request with the image tool, its bounds set (so no `responses:`
    policy has to inject them); the outcome the client saw, or None when Tollgate has no
    Responses door (`/v1/responses` is then an unknown path: 404, counted nowhere)."""
    tool: Any = {"type": "image_generation", "model": "gpt-image-2", "quality": "low",
                 "size": "1024x1024"}  # fmt: skip

    def send() -> Any:
        return client.responses.with_raw_response.create(
            model="gpt-4.1", input=prompt, tools=[tool], max_tool_calls=1, max_output_tokens=256
        )

    try:
        return outcome(send)
    except openai.NotFoundError:
        return None


@pytest.fixture(scope="module")
def observed(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    root = tmp_path_factory.mktemp("observed")
    receiver = Receiver()
    write_config(
        root,
        f"{simulator.url}/v1",
        settings=f"""
        organization:
          budgets:
            - {{period: month, limit_usd: 100}}
        alerts:
          webhooks: [{receiver.url}]
          timeout_s: 2
        """,
        teams=TEAMS,
    )
    tollgate = start_tollgate(root)
    prometheus = start_prometheus(root, tollgate.url.removeprefix("http://"))
    try:
        outcomes: Counter[str] = Counter()
        headers: list[str] = []
        design, research = tollgate.client(DESIGN_KEY), tollgate.client(RESEARCH_KEY)
        outcomes[generate(design, "too many", "low", n=4)] += 1
        # A few Responses requests while design's budget has room (a Tollgate without the
        # door answers the first with 404 and the Responses row is proven on its own).
        answered = respond(design, "a lighthouse")
        responses = answered is not None
        if answered is not None:
            outcomes[answered.split(":")[0]] += 1
            outcomes[str(respond(design, "a harbour")).split(":")[0]] += 1
        outcomes[generate(research, "a storm [[fault:500]]", "low")] += 1
        for i in range(60):
            seen = generate(design, f"design {i}", "high" if i == 0 else "medium")
            if seen.startswith("downgraded:"):
                headers.append(seen.removeprefix("downgraded:"))
                seen = "downgraded"
            outcomes[seen] += 1
            if seen == "rejected_budget":
                break
        for i in range(20):
            seen = generate(research, f"research {i}", "low")
            outcomes[seen] += 1
            if seen == "rejected_budget":
                break
        paced = pace(tollgate.client(PACER_KEY))
        yield Observed(tollgate, prometheus, receiver, outcomes, paced, headers, responses)
    finally:
        prometheus.process.terminate()
        prometheus.process.wait(timeout=15)
        tollgate.stop()
        receiver.close()


def pace(client: openai.OpenAI) -> Counter[str]:
    """Pacer's three requests against its limit of two a day: answered, refused by OpenAI
    (429, counted against the limit all the same), refused by Tollgate's rate limit."""
    seen: Counter[str] = Counter()
    for prompt in ("a breeze", "a squall [[fault:429]]", "a gale"):
        try:
            client.images.generate(
                model="gpt-image-2", prompt=prompt, quality="low", size="1024x1024"
            )
            seen["ok"] += 1
        except openai.RateLimitError as exc:
            # OpenAI's answers carry its request id; Tollgate's refusals only Tollgate's.
            seen["429" if "x-request-id" in exc.response.headers else "rejected_rate"] += 1
    return seen


def wait_for_data(prometheus: Prometheus, exprs: list[str], timeout: float) -> list[str]:
    """The expressions that still return no data after `timeout` seconds."""
    missing = list(dict.fromkeys(exprs))
    deadline = time.monotonic() + timeout
    while missing and time.monotonic() < deadline:
        missing = [e for e in missing if not prometheus.query(instant(e))]
        if missing:
            time.sleep(0.5)
    return missing


def ledger_spend(root: Path) -> dict[str, tuple[int, int]]:
    """team -> (requests, sum of cost_nanos), read from the SQLite file."""
    with sqlite3.connect(root / "tollgate.db") as db:
        rows = db.execute("SELECT team, COUNT(*), SUM(cost_nanos) FROM requests GROUP BY team")
        return {team: (count, cost) for team, count, cost in rows}


def test_the_workload_was_allowed_downgraded_and_refused_for_both_teams(
    observed: Observed,
) -> None:
    o = observed.outcomes
    assert o["ok"] and o["downgraded"] and o["upstream_error"] == 1
    assert o["rejected_policy"] == 1
    assert o["rejected_budget"] == 2  # each team ran out once
    assert any("quality=high->medium" in h for h in observed.downgraded_headers)
    assert any("quality=medium->low" in h for h in observed.downgraded_headers)  # throttle
    assert observed.paced == {"ok": 1, "429": 1, "rejected_rate": 1}


def test_every_dashboard_and_rule_expression_returns_data_from_prometheus(
    observed: Observed,
) -> None:
    sent = observed.sent
    prometheus = observed.prometheus
    # Wait until Prometheus has scraped the end of the workload.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if prometheus.by_team("sum(tollgate_requests_total)").get("") == sent:
            break
        time.sleep(0.5)
    assert prometheus.by_team("sum(tollgate_requests_total)") == {"": sent}
    # Without a Responses door there is no Responses traffic to show: the row's queries are
    # proven on a scrape of Responses metrics instead (the test below).
    responses_row = [] if observed.responses else row_expressions(RESPONSES_ROW)
    expected = [e for e in dashboard_expressions() if e not in responses_row]
    missing = wait_for_data(prometheus, [*expected, *rule_expressions()], 30)
    assert missing == []
    rules = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
    assert {r["health"] for g in rules for r in g["rules"]} == {"ok"}


def test_spend_per_team_in_prometheus_equals_the_ledger(observed: Observed) -> None:
    prometheus = observed.prometheus
    ledger = ledger_spend(observed.tollgate.root)
    sent = observed.sent
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if prometheus.by_team("sum(tollgate_requests_total)").get("") == sent:
            break
        time.sleep(0.5)
    counted = prometheus.by_team("sum by (team) (tollgate_requests_total)")
    assert counted == {team: float(n) for team, (n, _) in ledger.items()}
    spent = prometheus.by_team("sum by (team) (tollgate_cost_usd_total)")
    gauges = prometheus.by_team('tollgate_budget_spent_usd{scope="team", period="total"}')
    for team, (_, nanos) in ledger.items():
        assert spent[team] == pytest.approx(nanos / 10**9, rel=1e-9, abs=1e-12)
        assert gauges[team] == pytest.approx(nanos / 10**9, rel=1e-12, abs=1e-12)
    utilization = prometheus.by_team(
        'tollgate_budget_utilization_ratio{scope="team", period="total", team="research"}'
    )
    assert utilization["research"] == pytest.approx(ledger["research"][1] / (0.03 * 10**9))


def test_budget_alerts_reached_the_webhook_once_per_threshold(observed: Observed) -> None:
    deadline = time.monotonic() + 60
    while len(observed.receiver.messages) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a duplicate would come in late: this wait can only miss one, not fail
    sent = sorted((m["team"], m["period"], m["threshold"]) for m in observed.receiver.messages)
    assert sent == [("design", "month", "0.5"), ("design", "month", "0.8"),
                    ("research", "total", "0.5")]  # fmt: skip


def test_promtool_accepts_a_real_scrape(observed: Observed) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `bash tests/run` installs Debian's prometheus package"
    text = httpx.get(f"{observed.tollgate.url}/metrics").text
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "user=" not in text


def test_counters_sum_every_worker(simulator: Simulator, tmp_path: Path) -> None:
    write_config(tmp_path, f"{simulator.url}/v1")
    tollgate = start_tollgate(tmp_path, "--workers", "2")
    try:
        client = tollgate.client(DESIGN_KEY)
        sent = 24
        for i in range(sent):
            client.images.generate(
                model="gpt-image-2", prompt=f"w {i}", quality="low", size="1024x1024"
            )
        totals = []
        for _ in range(8):
            text = httpx.get(f"{tollgate.url}/metrics", headers={"connection": "close"}).text
            totals.append(
                sum(
                    s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                    if s.name == "tollgate_requests_total"
                )
            )
        assert totals == [sent] * 8
    finally:
        tollgate.stop()


def responses_metrics() -> Metrics:
    """Metrics of Responses API traffic as the pipeline counts it: hand-built settled
    requests (gpt-5.5 and gpt-4.1 calling the image tool; one refused for its budget)."""
    metrics = Metrics(CollectorRegistry())
    for team, mainline, image, outcome, cost, mainline_cost in (
        ("design", "gpt-5.5", "gpt-image-2", "ok", 19_230_000, 13_150_000),
        ("design", "gpt-5.5", "gpt-image-2", "ok", 19_230_000, 13_150_000),
        ("research", "gpt-4.1", "gpt-image-1-mini", "ok", 3_000_000, 1_000_000),
        ("research", "gpt-4.1", "gpt-image-1-mini", "rejected_budget", 0, 0),
    ):
        entry = Entry("tg_req", 0.0, "responses", team=team, model=image, quality="low",
                      size="1024x1024", mainline_model=mainline)  # fmt: skip
        usage = Usage(image_output=196, images=1, mainline_input=900, mainline_output=80)
        settlement = Settlement(1.0, outcome, 200 if cost else 429, usage if cost else Usage(),
                                cost, mainline_cost_nanos=mainline_cost)  # fmt: skip
        metrics.started()
        metrics.finished(entry, settlement, ())
    return metrics


def test_the_responses_row_returns_data_from_a_prometheus_scraping_responses_metrics(
    tmp_path: Path,
) -> None:
    metrics = responses_metrics()

    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    with serving(Starlette(routes=[Route("/metrics", scrape)])) as url:
        prometheus = start_prometheus(tmp_path, url.removeprefix("http://"))
        try:
            row = row_expressions(RESPONSES_ROW)
            assert wait_for_data(prometheus, row, 30) == []
            parts = prometheus.query("sum by (part) (tollgate_responses_cost_usd_total)")
            assert {r["metric"]["part"]: float(r["value"][1]) for r in parts} == {
                "mainline": pytest.approx(0.0273, rel=1e-12),
                "image_tool": pytest.approx(0.01416, rel=1e-12),
            }
            by_team_model = prometheus.query(instant(row[0]))
            assert {(r["metric"]["team"], r["metric"]["model"]) for r in by_team_model} == {
                ("design", "gpt-5.5"), ("design", "gpt-image-2"),
                ("research", "gpt-4.1"), ("research", "gpt-image-1-mini"),
            }  # fmt: skip
            outcomes = prometheus.query(instant(row[-1]))
            assert {r["metric"]["outcome"] for r in outcomes} == {"ok", "rejected_budget"}
        finally:
            prometheus.process.terminate()
            prometheus.process.wait(timeout=15)
