"""Every concrete example of the product specification, used as its reader would use it:
its YAML snippets copied into a policies directory as written, its commands run as
written, its requests sent through the official `openai` client (or raw httpx where the
client cannot send them), and each statement it makes about the answer checked.
"""

from __future__ import annotations

import calendar
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    Tollgate,
    free_port,
    output,
    start,
    start_simulator,
    stop,
)
from tests.test_cli import tollgate as cli

ADMIN = "tg-spec-examples-admin"

# §3, as written (the first two snippets).
SETTINGS_EXAMPLE = """\
# policies/tollgate.yaml
upstream:
  base_url: https://api.openai.com/v1
  api_key: ${OPENAI_API_KEY}
  timeout_s: 300
ledger: sqlite:///tollgate.db
timezone: UTC                 # period boundaries (day/week/month)
admin_token: ${TOLLGATE_ADMIN_TOKEN}
prices: builtin               # or a path to a price-book YAML (§5)
default_model: gpt-image-2    # used when a request names no model
organization:                 # optional company-wide caps over all teams
  budgets:
    - {period: month, limit_usd: 20000}
"""
DESIGN_EXAMPLE = """\
# policies/teams/design.yaml
name: design
cost_center: CC-1042          # carried into finance reports
keys:
  - {id: web-app, sha256: 9f86d081884c7d65...}
budgets:
  - {period: month, limit_usd: 800, alert_at: [0.5, 0.8, 0.95]}
  - {period: day, limit_usd: 60}
  - {period: month, image_output_tokens: 20000000}   # token caps work too
per_user:                     # applies to each distinct `user` value
  - {period: day, limit_usd: 5}
allow:
  models: [gpt-image-2, gpt-image-1.5, gpt-image-1-mini]
  max_quality: high           # higher requests are clamped (a downgrade)
  max_n: 4                    # more is a policy rejection
  endpoints: [generations, edits]
  params:                     # optional: allowed values of any request field
    moderation: [auto]
throttle:                     # graduated: as spend rises, cap quality
  - {above: 0.80, max_quality: medium}
  - {above: 0.95, max_quality: low}
on_exhausted: downgrade       # downgrade | reject
downgrade:
  order: [quality, size, model]
  fallback_model: gpt-image-1-mini
"""
# §13, the team half and the organization half of its snippet.
TEAM_RATE_LIMITS = """\
rate_limits:
  - {per: minute, images: 20}                      # n images count as n
  - {per: minute, requests: 60}
  - {per: day, tokens: 2000000, model: gpt-image-2}
  - {per: minute, share: 0.25}                     # 25 % of each organization limit of the same `per`, guaranteed
"""  # noqa: E501 (as SPEC writes it)
ORGANIZATION_RATE_LIMITS = """\
  rate_limits:
    - {per: minute, images: 250, model: gpt-image-2}   # OpenAI's limit for the tier
"""
ERROR_KEYS = {"message", "type", "param", "code"}
REPORT_COLUMNS = [
    "requests",
    "images",
    "text_input_tokens",
    "image_input_tokens",
    "image_output_tokens",
    "cost_usd",
]
BY_FIELDS = "team,cost_center,user,key,model,quality,size,endpoint,outcome,day,month"


def new_key(label: str) -> tuple[str, str]:
    """`tollgate keys new design --label LABEL`: the secret and the entry's hash."""
    done = cli("keys", "new", "design", "--label", label)
    assert done.returncode == 0, done.stderr
    secret = next(w for w in done.stdout.split() if w.startswith("tg_"))
    entry = yaml.safe_load(next(line for line in done.stdout.splitlines() if "sha256" in line))
    assert entry[0]["id"] == label
    return secret, str(entry[0]["sha256"])


def policies(root: Path, digest: str, rate_limits: bool = False) -> Path:
    """SPEC §3's two files in `root` (the team's hash pasted from `keys new`), with §13's
    rate limits added when asked."""
    (root / "teams").mkdir(parents=True, exist_ok=True)
    settings = SETTINGS_EXAMPLE
    team = DESIGN_EXAMPLE.replace("9f86d081884c7d65...", digest)
    if rate_limits:
        settings = settings.replace("all teams\n", "all teams\n" + ORGANIZATION_RATE_LIMITS)
        team += TEAM_RATE_LIMITS
    (root / "tollgate.yaml").write_text(settings)
    (root / "teams" / "design.yaml").write_text(team)
    return root


def serve(root: Path, *extra: str, env: dict[str, str] | None = None) -> Tollgate:
    port = free_port()
    process = start(
        ["serve", "--config", str(root), "--port", str(port), *extra],
        f"http://127.0.0.1:{port}/healthz",
        env={"TOLLGATE_ADMIN_TOKEN": ADMIN, **(env or {})},
    )
    return Tollgate(f"http://127.0.0.1:{port}", root, process)


def headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-tollgate-")}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "teal").save(buffer, "PNG")
    return buffer.getvalue()


def refused(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    return caught.value


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tollgate, str]]:
    """`tollgate serve --simulate` on SPEC's policies, and the team key `keys new` made."""
    secret, digest = new_key("web-app")
    root = policies(tmp_path_factory.mktemp("policies"), digest)
    proxy = serve(root, "--simulate")
    yield proxy, secret
    proxy.stop()


def client(example: tuple[Tollgate, str]) -> openai.OpenAI:
    proxy, secret = example
    return proxy.client(secret)


# -- §2 Command line ------------------------------------------------------------------


def test_check_refuses_the_design_example_as_written_naming_file_and_line(
    tmp_path: Path,
) -> None:
    policies(tmp_path, "9f86d081884c7d65...")
    done = cli("check", "--config", str(tmp_path), env={"OPENAI_API_KEY": "sk-x"})
    assert done.returncode == 1
    problems = (done.stdout + done.stderr).strip().splitlines()
    assert problems and all(re.match(r"^\S+:\d+: ", p) for p in problems), problems
    assert any(p.startswith(f"{tmp_path / 'teams' / 'design.yaml'}:5: ") for p in problems)


def test_check_accepts_the_examples_with_the_hash_keys_new_prints(tmp_path: Path) -> None:
    _, digest = new_key("web-app")
    policies(tmp_path, digest, rate_limits=True)
    done = cli("check", "--config", str(tmp_path), env={"OPENAI_API_KEY": "sk-x"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_single_yaml_file_with_the_same_keys_also_works(tmp_path: Path) -> None:
    _, digest = new_key("web-app")
    team = yaml.safe_load(DESIGN_EXAMPLE.replace("9f86d081884c7d65...", digest))
    single = tmp_path / "tollgate.yaml"
    single.write_text(SETTINGS_EXAMPLE + yaml.safe_dump({"teams": [team]}))
    done = cli("check", "--config", str(single), env={"OPENAI_API_KEY": "sk-x"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_period_and_every_budget_metric_is_accepted(tmp_path: Path) -> None:
    _, digest = new_key("web-app")
    policies(tmp_path, digest)
    team = tmp_path / "teams" / "design.yaml"
    extra = "".join(
        f"  - {{period: {period}, {metric}: 1000}}\n"
        for period, metric in [
            ("week", "limit_usd"),
            ("total", "text_input_tokens"),
            ("week", "image_input_tokens"),
            ("day", "total_tokens"),
        ]
    )
    team.write_text(team.read_text().replace("budgets:\n", "budgets:\n" + extra))
    done = cli("check", "--config", str(tmp_path), env={"OPENAI_API_KEY": "sk-x"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_defaults_to_tollgate_config_then_policies(tmp_path: Path) -> None:
    _, digest = new_key("web-app")
    policies(tmp_path / "elsewhere", digest)
    done = cli("check", env={"TOLLGATE_CONFIG": str(tmp_path / "elsewhere")})
    assert done.returncode == 0, done.stderr
    here = subprocess_in(tmp_path / "elsewhere" / "..", "check")
    assert here.returncode == 1  # no ./policies here


def subprocess_in(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` run in `cwd`, without `$TOLLGATE_CONFIG`."""
    environment = {k: v for k, v in os.environ.items() if k != "TOLLGATE_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**environment, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


def test_serve_without_simulate_and_no_openai_key_is_a_clear_start_up_error(
    tmp_path: Path,
) -> None:
    _, digest = new_key("web-app")
    policies(tmp_path, digest)
    done = cli("serve", "--config", str(tmp_path), "--port", "9", env={"OPENAI_API_KEY": ""})
    assert done.returncode != 0
    assert "OPENAI_API_KEY" in done.stderr and "Traceback" not in done.stderr


def test_serve_simulate_prints_the_url_and_how_to_call_it(
    example: tuple[Tollgate, str],
) -> None:
    proxy, _ = example
    printed = output(proxy.process)
    assert f"{proxy.url}/v1" in printed
    assert "OPENAI_BASE_URL=" in printed and "OPENAI_API_KEY=" in printed


def test_schema_prints_a_json_schema() -> None:
    done = cli("schema")
    assert done.returncode == 0
    assert "$schema" in json.loads(done.stdout)


# -- §4 HTTP interface: headers --------------------------------------------------------


def test_every_proxied_response_carries_team_request_id_cost_and_remaining(
    example: tuple[Tollgate, str],
) -> None:
    answer = client(example).images.with_raw_response.generate(
        model="gpt-image-2", prompt="a lighthouse", quality="low", size="1024x1024"
    )
    found = headers(answer.http_response)
    assert found["x-tollgate-team"] == "design"
    assert found["x-tollgate-request-id"]
    assert re.fullmatch(r"\d+(\.\d+)?", found["x-tollgate-cost-usd"])
    assert re.fullmatch(r"\d+(\.\d+)?", found["x-tollgate-budget-remaining-usd"])
    assert "x-tollgate-downgraded" not in found
    assert answer.http_response.headers["x-request-id"]
    image = answer.parse().data
    assert image and image[0].b64_json


def test_a_request_without_model_gets_default_model_named_in_x_tollgate_model(
    example: tuple[Tollgate, str],
) -> None:
    answer = client(example).images.with_raw_response.generate(
        prompt="a lighthouse", quality="low", size="1024x1024"
    )
    assert answer.http_response.headers["x-tollgate-model"] == "gpt-image-2"


def test_a_stream_carries_the_reserved_estimate_in_its_headers(
    example: tuple[Tollgate, str],
) -> None:
    with client(example).images.with_streaming_response.generate(
        model="gpt-image-2",
        prompt="a lighthouse",
        quality="low",
        size="1024x1024",
        stream=True,
        partial_images=1,
    ) as answer:
        found = headers(answer.http_response)
        events = [line for line in answer.iter_lines() if line.startswith("event:")]
    assert float(found["x-tollgate-reserved-usd"]) > 0
    assert events[-1] == "event: image_generation.completed"


def test_an_edit_takes_several_images_as_repeated_image_fields(
    example: tuple[Tollgate, str],
) -> None:
    answer = client(example).images.with_raw_response.edit(
        model="gpt-image-2",
        image=[("a.png", png(), "image/png"), ("b.png", png(), "image/png")],
        prompt="a lighthouse",
        quality="low",
        size="1024x1024",
    )
    assert answer.http_response.status_code == 200
    assert float(answer.http_response.headers["x-tollgate-cost-usd"]) > 0


def test_an_edit_takes_json_images_by_url(example: tuple[Tollgate, str]) -> None:
    proxy, secret = example
    answer = httpx.post(
        f"{proxy.url}/v1/images/edits",
        headers={"Authorization": f"Bearer {secret}"},
        json={
            "model": "gpt-image-2",
            "prompt": "a lighthouse",
            "quality": "low",
            "size": "1024x1024",
            "images": [{"image_url": "https://example.com/a.png"}],
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


# -- §4 HTTP interface: Tollgate's own answers ----------------------------------------


def test_error_row_unknown_key_is_401_invalid_api_key(example: tuple[Tollgate, str]) -> None:
    proxy, _ = example
    error = refused(lambda: proxy.client("tg_not_a_key").images.generate(prompt="x"))
    assert error.status_code == 401
    assert (error.type, error.code) == ("invalid_request_error", "invalid_api_key")


def test_error_row_missing_key_is_401_invalid_api_key(example: tuple[Tollgate, str]) -> None:
    proxy, _ = example
    answer = httpx.post(f"{proxy.url}/v1/images/generations", json={"prompt": "x"})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "dall-e-3"}, "model"),
        ({"model": "gpt-image-2", "n": 5}, "n"),
        ({"model": "gpt-image-2", "moderation": "low"}, "moderation"),
    ],
)
def test_error_row_policy_violation_is_403_naming_the_rule(
    example: tuple[Tollgate, str], fields: dict[str, Any], param: str
) -> None:
    error = refused(lambda: client(example).images.generate(prompt="x", **fields))
    assert error.status_code == 403
    assert (error.type, error.code) == ("invalid_request_error", "policy_violation")
    assert "allow." in error.message


def test_error_row_endpoint_not_allowed_is_403_policy_violation(
    example: tuple[Tollgate, str],
) -> None:
    error = refused(
        lambda: client(example).images.with_raw_response.create_variation(
            image=("a.png", png(), "image/png")
        )
    )
    assert (error.status_code, error.code) == (403, "policy_violation")
    assert "allow.endpoints" in error.message


def test_error_row_missing_prompt_is_400_invalid_request(example: tuple[Tollgate, str]) -> None:
    proxy, secret = example
    answer = httpx.post(
        f"{proxy.url}/v1/images/generations",
        headers={"Authorization": f"Bearer {secret}"},
        json={"model": "gpt-image-2"},
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")


def test_error_row_size_the_model_does_not_accept_is_400_invalid_request(
    example: tuple[Tollgate, str],
) -> None:
    error = refused(
        lambda: client(example).images.generate(model="gpt-image-2", prompt="x", size="1000x1000")
    )
    assert (error.status_code, error.code, error.param) == (400, "invalid_request", "size")


def test_error_row_model_outside_the_price_book_is_400_unpriced_model(
    tmp_path: Path,
) -> None:
    secret, digest = new_key("web-app")
    policies(tmp_path, digest)
    team = tmp_path / "teams" / "design.yaml"
    # Without `allow`, every priced model is allowed: what is asked for is the price book's.
    text = team.read_text()
    team.write_text(text[: text.index("allow:")] + text[text.index("throttle:") :])
    proxy = serve(tmp_path, "--simulate")
    try:
        error = refused(
            lambda: proxy.client(secret).images.generate(model="gpt-image-9", prompt="x")
        )
    finally:
        proxy.stop()
    assert (error.status_code, error.type, error.code) == (
        400,
        "invalid_request_error",
        "unpriced_model",
    )


def test_error_row_body_over_the_limit_is_413_request_too_large(
    example: tuple[Tollgate, str],
) -> None:
    error = refused(
        lambda: client(example).images.generate(model="gpt-image-2", prompt="x" * (1 << 20))
    )
    assert (error.status_code, error.code) == (413, "request_too_large")


def test_other_v1_paths_answer_404_in_openai_shape(example: tuple[Tollgate, str]) -> None:
    proxy, secret = example
    answer = httpx.get(f"{proxy.url}/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 404
    assert set(answer.json()["error"]) == ERROR_KEYS


def test_error_row_no_budget_room_is_429_budget_exceeded_and_no_retry(
    tmp_path: Path,
) -> None:
    secret, digest = new_key("web-app")
    policies(tmp_path, digest)
    team = tmp_path / "teams" / "design.yaml"
    team.write_text(
        team.read_text()
        .replace("{period: day, limit_usd: 60}", "{period: day, limit_usd: 0.001}")
        .replace("on_exhausted: downgrade", "on_exhausted: reject")
    )
    proxy = serve(tmp_path, "--simulate")
    try:
        error = refused(
            lambda: proxy.client(secret).images.generate(
                model="gpt-image-2", prompt="x", quality="high", size="1024x1024"
            )
        )
    finally:
        proxy.stop()
    assert (error.status_code, error.type, error.code) == (
        429,
        "insufficient_quota",
        "budget_exceeded",
    )
    assert error.response.headers["x-should-retry"] == "false"
    assert "day" in error.message and "0.001" in error.message


def test_error_row_upstream_unreachable_is_502_upstream_unavailable(tmp_path: Path) -> None:
    secret, digest = new_key("web-app")
    policies(tmp_path, digest)
    settings = tmp_path / "tollgate.yaml"
    closed = free_port()
    settings.write_text(
        settings.read_text().replace("https://api.openai.com/v1", f"http://127.0.0.1:{closed}/v1")
    )
    proxy = serve(tmp_path, env={"OPENAI_API_KEY": "sk-x"})
    try:
        error = refused(
            lambda: proxy.client(secret).images.generate(
                model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
            )
        )
    finally:
        proxy.stop()
    assert (error.status_code, error.type, error.code) == (
        502,
        "api_error",
        "upstream_unavailable",
    )


def test_error_row_upstream_timed_out_is_504_upstream_timeout(tmp_path: Path) -> None:
    slow = start_simulator("--latency-ms", "5000")
    secret, digest = new_key("web-app")
    policies(tmp_path, digest)
    settings = tmp_path / "tollgate.yaml"
    settings.write_text(
        settings.read_text()
        .replace("https://api.openai.com/v1", f"{slow.url}/v1")
        .replace("timeout_s: 300", "timeout_s: 1")
    )
    proxy = serve(tmp_path, env={"OPENAI_API_KEY": "sk-upstream-real-key-for-tests"})
    try:
        error = refused(
            lambda: proxy.client(secret).images.generate(
                model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
            )
        )
    finally:
        proxy.stop()
        stop(slow.process)
    assert (error.status_code, error.type, error.code) == (504, "api_error", "upstream_timeout")


# -- §6 Budgets and decisions ----------------------------------------------------------


def test_a_user_out_of_room_is_downgraded_and_told_in_x_tollgate_downgraded(
    example: tuple[Tollgate, str],
) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    found: dict[str, str] = {}
    for _ in range(12):  # 0.80 USD each against the user's 5 USD a day
        answer = client(example).images.with_raw_response.generate(
            model="gpt-image-2", prompt="x", quality="high", size="3840x2160", n=2, user=user
        )
        found = headers(answer.http_response)
        if "x-tollgate-downgraded" in found:
            break
    assert re.fullmatch(r"quality=high->(medium|low)", found["x-tollgate-downgraded"]), found
    proxy, _ = example
    assert (
        proxy.metric("tollgate_downgrades_total", team="design", knob="quality", reason="budget")
        >= 1
    )


# -- §12 Retries never pay twice -------------------------------------------------------


def test_a_repeat_with_the_same_idempotency_key_is_a_free_replay(
    example: tuple[Tollgate, str],
) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = client(example).images.with_raw_response.generate(
        model="gpt-image-2", prompt="once", quality="low", size="1024x1024", extra_headers=key
    )
    again = client(example).images.with_raw_response.generate(
        model="gpt-image-2", prompt="once", quality="low", size="1024x1024", extra_headers=key
    )
    first_id = first.http_response.headers["x-tollgate-request-id"]
    assert again.http_response.headers["x-tollgate-replay-of"] == first_id
    assert again.http_response.headers["x-tollgate-cost-usd"] == "0"
    proxy, _ = example
    replay = proxy.row(again.http_response.headers["x-tollgate-request-id"])
    assert replay["outcome"] == "replayed"
    error = refused(
        lambda: client(example).images.generate(
            model="gpt-image-2", prompt="other", quality="low", size="1024x1024", extra_headers=key
        )
    )
    assert (error.status_code, error.code) == (409, "idempotency_conflict")


# -- §4 Operations endpoints, §2 budgets / report / reconcile, §7, §8 ------------------


def test_healthz_and_readyz(example: tuple[Tollgate, str]) -> None:
    proxy, _ = example
    assert httpx.get(f"{proxy.url}/healthz").status_code == 200
    assert httpx.get(f"{proxy.url}/readyz").status_code == 200


def test_admin_api_needs_the_admin_token_and_answers_budgets_report_reload(
    example: tuple[Tollgate, str],
) -> None:
    proxy, _ = example
    assert httpx.get(f"{proxy.url}/admin/budgets").status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    budgets = httpx.get(f"{proxy.url}/admin/budgets", headers=admin)
    assert budgets.status_code == 200 and budgets.json()["budgets"]
    today = datetime.now(UTC).date().isoformat()
    report = httpx.get(
        f"{proxy.url}/admin/report",
        params={"from": today, "to": today, "by": "team", "format": "csv"},
        headers=admin,
    )
    assert report.status_code == 200
    assert report.text.splitlines()[0] == ",".join(["team", *REPORT_COLUMNS])
    assert httpx.post(f"{proxy.url}/admin/reload", headers=admin).status_code == 200


def test_reload_refuses_an_invalid_configuration_and_keeps_the_old(tmp_path: Path) -> None:
    secret, digest = new_key("web-app")
    policies(tmp_path, digest)
    proxy = serve(tmp_path, "--simulate")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    team = tmp_path / "teams" / "design.yaml"
    try:
        team.write_text(team.read_text().replace("max_n: 4", "max_nn: 4"))
        answer = httpx.post(f"{proxy.url}/admin/reload", headers=admin)
        assert answer.status_code == 400
        assert "design.yaml:" in answer.json()["error"]["message"]
        proxy.process.send_signal(signal.SIGHUP)
        error = refused(
            lambda: proxy.client(secret).images.generate(model="gpt-image-2", prompt="x", n=5)
        )
        assert error.code == "policy_violation"
    finally:
        proxy.stop()


def test_budgets_table_and_json_and_self_service_share_one_shape(
    example: tuple[Tollgate, str],
) -> None:
    proxy, secret = example
    client(example).images.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    root = str(proxy.root)
    table = cli("budgets", "--config", root)
    assert table.returncode == 0 and "organization" in table.stdout
    listed = json.loads(cli("budgets", "--config", root, "--format", "json").stdout)["budgets"]
    fields = {
        "scope",
        "period",
        "metric",
        "limit",
        "spent",
        "reserved",
        "remaining",
        "utilization",
        "period_end",
    }
    assert all(fields <= set(b) for b in listed)
    own = httpx.get(
        f"{proxy.url}/v1/tollgate/budget", headers={"Authorization": f"Bearer {secret}"}
    ).json()
    assert own["team"] == "design" and "rate_limits" in own
    assert {b["scope"] for b in own["budgets"]} >= {"organization", "team"}
    assert all(fields <= set(b) for b in own["budgets"])


def test_report_by_team_model_quality_json_has_rows_and_total(
    example: tuple[Tollgate, str],
) -> None:
    proxy, _ = example
    client(example).images.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    done = cli(
        "report", "--config", str(proxy.root), "--by", "team,model,quality", "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"from", "to", "rows", "total"}
    assert report["rows"]
    for row in report["rows"]:
        assert set(row) == {"team", "model", "quality", *REPORT_COLUMNS}
        assert isinstance(row["cost_usd"], str)
    assert set(REPORT_COLUMNS) <= set(report["total"])


def test_report_csv_has_the_same_columns_without_bom_and_excel_adds_one(
    example: tuple[Tollgate, str], tmp_path: Path
) -> None:
    proxy, _ = example
    client(example).images.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    done = cli("report", "--config", str(proxy.root), "--by", BY_FIELDS, "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert not done.stdout.startswith("\ufeff")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert rows and list(rows[0]) == [*BY_FIELDS.split(","), *REPORT_COLUMNS]
    excel = tmp_path / "report.csv"
    done = cli(
        "report",
        "--config",
        str(proxy.root),
        "--format",
        "csv",
        "--excel",
        "--output",
        str(excel),
    )
    assert done.returncode == 0, done.stderr
    assert excel.read_bytes().startswith(b"\xef\xbb\xbf")


def test_report_statement_for_a_month_as_html_to_a_file(
    example: tuple[Tollgate, str], tmp_path: Path
) -> None:
    proxy, _ = example
    month = datetime.now(UTC).strftime("%Y-%m")
    written = tmp_path / "statement.html"
    done = cli(
        "report",
        "--config",
        str(proxy.root),
        "--statement",
        month,
        "--format",
        "html",
        "--output",
        str(written),
    )
    assert done.returncode == 0, done.stderr
    assert "<html" in written.read_text().lower()


def test_reconcile_exits_0_when_costs_match_and_1_when_a_day_differs(
    example: tuple[Tollgate, str], tmp_path: Path
) -> None:
    proxy, _ = example
    client(example).images.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    today = datetime.now(UTC).date()
    day = today.isoformat()
    report = json.loads(
        cli(
            "report",
            "--config",
            str(proxy.root),
            "--by",
            "model",
            "--format",
            "json",
            "--from",
            day,
            "--to",
            day,
        ).stdout
    )
    start_s = calendar.timegm(today.timetuple())

    def costs(extra: float) -> Path:
        results = [
            {
                "object": "organization.costs.result",
                "amount": {"value": float(row["cost_usd"]) + extra, "currency": "usd"},
                "line_item": f"{row['model']}, image output",
                "project_id": None,
            }
            for row in report["rows"]
            if row["model"] and row["cost_usd"] != "0"
        ]
        page = {
            "object": "page",
            "data": [
                {
                    "object": "bucket",
                    "start_time": start_s,
                    "end_time": start_s + 86400,
                    "results": results,
                }
            ],
            "has_more": False,
            "next_page": None,
        }
        path = tmp_path / f"costs-{extra}.json"
        path.write_text(json.dumps(page))
        return path

    args = ["reconcile", "--config", str(proxy.root), "--from", day, "--to", day]
    matching = cli(*args, "--costs", str(costs(0.0)))
    assert matching.returncode == 0, matching.stdout + matching.stderr
    differing = cli(*args, "--costs", str(costs(1.0)))
    assert differing.returncode == 1, differing.stdout + differing.stderr


def test_ledger_rows_hold_the_fields_and_outcomes_spec_names(
    example: tuple[Tollgate, str],
) -> None:
    proxy, _ = example
    ok = client(example).images.with_raw_response.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    refused(lambda: client(example).images.generate(model="dall-e-3", prompt="x"))
    row = proxy.row(ok.http_response.headers["x-tollgate-request-id"])
    assert row["outcome"] == "ok" and row["team"] == "design"
    assert ok.http_response.headers["x-request-id"] in row.values()
    outcomes = {r["outcome"] for r in proxy.rows()}
    assert {"ok", "rejected_policy"} <= outcomes
    allowed = {
        "ok",
        "downgraded",
        "rejected_budget",
        "rejected_policy",
        "upstream_error",
        "client_error",
        "replayed",
    }
    assert outcomes <= allowed, outcomes


METRICS = {
    "tollgate_requests_total": ("counter", {"team", "model", "endpoint", "outcome"}),
    "tollgate_tokens_total": ("counter", {"team", "model", "kind"}),
    "tollgate_cost_usd_total": ("counter", {"team", "model", "quality"}),
    "tollgate_images_total": ("counter", {"team", "model", "quality", "size"}),
    "tollgate_budget_limit_usd": ("gauge", {"scope", "team", "period"}),
    "tollgate_budget_spent_usd": ("gauge", {"scope", "team", "period"}),
    "tollgate_budget_reserved_usd": ("gauge", {"scope", "team", "period"}),
    "tollgate_budget_utilization_ratio": ("gauge", {"scope", "team", "period"}),
    "tollgate_upstream_request_duration_seconds": ("histogram", {"model", "endpoint"}),
    "tollgate_inflight_requests": ("gauge", set()),
}


def test_metrics_names_types_and_labels_are_the_contract(
    example: tuple[Tollgate, str],
) -> None:
    proxy, _ = example
    client(example).images.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    text = httpx.get(f"{proxy.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in METRICS.items():
        family = families[name.removesuffix("_total")]
        assert family.type == kind, name
        samples = [s for s in family.samples if s.name in (name, f"{name}_count")]
        assert samples, name
        assert all(set(s.labels) == labels for s in samples), name
    scopes = {s.labels["scope"] for s in families["tollgate_budget_limit_usd"].samples}
    assert scopes == {"organization", "team"}
    kinds = {s.labels["kind"] for s in families["tollgate_tokens"].samples}
    assert {"text_input", "image_output"} <= kinds
    downgrades = families["tollgate_downgrades"]
    assert downgrades.type == "counter"
    assert all(set(s.labels) == {"team", "knob", "reason"} for s in downgrades.samples)


# -- §13 Sharing one OpenAI organization -----------------------------------------------


def test_rate_limits_example_refuses_the_21st_image_of_a_minute(tmp_path: Path) -> None:
    secret, digest = new_key("web-app")
    policies(tmp_path, digest, rate_limits=True)
    proxy = serve(tmp_path, "--simulate")
    try:
        team = proxy.client(secret)
        for _ in range(5):
            team.images.generate(
                model="gpt-image-2", prompt="x", quality="low", size="1024x1024", n=4
            )
        error = refused(
            lambda: team.images.generate(
                model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
            )
        )
        own = httpx.get(
            f"{proxy.url}/v1/tollgate/budget", headers={"Authorization": f"Bearer {secret}"}
        ).json()
    finally:
        proxy.stop()
    assert (error.status_code, error.type, error.code) == (
        429,
        "requests",
        "rate_limit_exceeded",
    )
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-tollgate-ratelimit-remaining-images"] == "0"
    fields = {"per", "metric", "limit", "used", "remaining", "resets_at"}
    assert own["rate_limits"] and all(fields <= set(r) for r in own["rate_limits"])


def test_python_dash_m_proxy_and_the_tollgate_script_both_answer_help() -> None:
    assert cli("--help").returncode == 0
    script = Path(sys.executable).parent / "tollgate"
    assert script.exists()


def test_ledger_migrate_on_the_example_ledger(example: tuple[Tollgate, str]) -> None:
    proxy, _ = example
    done = cli("ledger", "migrate", "--config", str(proxy.root))
    assert done.returncode == 0, done.stderr
    assert (proxy.root / "tollgate.db").exists()  # sqlite:///tollgate.db: next to the config


def test_allow_endpoints_refuses_the_responses_door_to_the_design_team(
    example: tuple[Tollgate, str],
) -> None:
    error = refused(
        lambda: client(example).responses.create(
            model="gpt-5.5", input="a lighthouse", tools=[{"type": "image_generation"}]
        )
    )
    assert (error.status_code, error.code) == (403, "policy_violation")
    assert "allow.endpoints" in error.message


def test_allow_endpoints_refuses_the_batch_door_to_the_design_team(
    example: tuple[Tollgate, str],
) -> None:
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/images/generations",
        "body": {"model": "gpt-image-2", "prompt": "x", "quality": "low", "size": "1024x1024"},
    }
    error = refused(
        lambda: client(example).files.create(
            file=("batch.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch"
        )
    )
    assert (error.status_code, error.code) == (403, "policy_violation")


def test_responses_names_an_injected_max_tool_calls_as_unset_to_a_value(tmp_path: Path) -> None:
    secret, digest = new_key("web-app")
    policies(tmp_path, digest)
    team = tmp_path / "teams" / "design.yaml"
    # Without `allow`, every endpoint is allowed, the Responses API's among them.
    text = team.read_text()
    team.write_text(text[: text.index("allow:")] + text[text.index("throttle:") :])
    proxy = serve(tmp_path, "--simulate")
    try:
        answer = proxy.client(secret).responses.with_raw_response.create(
            model="gpt-5.5",
            input="a lighthouse",
            tools=[{"type": "image_generation", "quality": "low", "size": "1024x1024"}],
        )
        row = proxy.row(answer.http_response.headers["x-tollgate-request-id"])
    finally:
        proxy.stop()
    downgraded = answer.http_response.headers["x-tollgate-downgraded"]
    assert re.search(r"(^|; )max_tool_calls=unset->\d+(;|$)", downgraded), downgraded
    assert row["endpoint"] == "responses" and row["model"] == "gpt-image-2"
    assert row["mainline_model"] == "gpt-5.5"
