"""Budgets end to end: the official openai client → Tollgate with budgets → the simulator."""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.conftest import (
    BACKENDS,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    backend_url,
    drop_ledger,
    start_tollgate,
    write_config,
)
from tests.test_proxy_e2e import expected_cost, png, wait_settled

ADMIN = "admin-secret-token"
KEYS = {
    name: f"tg_test_{name}_key"
    for name in (
        "frugal",
        "strict",
        "throttled",
        "tokens",
        "sizefirst",
        "fidelity",
        "legacy",
        "retro",
    )
}


def team(name: str, body: str) -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TEAMS = {
    # $0.10 a day: gpt-image-2 high 1024x1024 (~$0.21) must come down to medium (~$0.053).
    "frugal": team(
        "frugal",
        """
budgets:
  - {period: day, limit_usd: 0.10}
per_user:
  - {period: day, limit_usd: 0.06}
on_exhausted: downgrade
downgrade: {order: [quality, size, model], fallback_model: gpt-image-1-mini}
""",
    ),
    "strict": team(
        "strict",
        """
budgets:
  - {period: month, limit_usd: 0.05}
allow:
  models: [gpt-image-2, gpt-image-1-mini]
  max_n: 2
  endpoints: [generations]
on_exhausted: reject
""",
    ),
    "throttled": team(
        "throttled",
        """
budgets:
  - {period: month, limit_usd: 1.00}
allow: {max_quality: high}
throttle:
  - {above: 0.20, max_quality: medium}
  - {above: 0.40, max_quality: low}
on_exhausted: downgrade
""",
    ),
    "tokens": team(
        "tokens",
        """
budgets:
  - {period: month, image_output_tokens: 8000}
on_exhausted: reject
""",
    ),
    # $0.10 a day, size given up before quality: gpt-image-2 high at 2048x1152 ($0.17) fits
    # at no 16:9 size ($0.11 at 1280x720); medium fits at the size asked for ($0.042).
    "sizefirst": team(
        "sizefirst",
        """
budgets:
  - {period: day, limit_usd: 0.10}
downgrade: {order: [size, quality]}
""",
    ),
    # $0.06 a day: a gpt-image-1.5 edit at high fidelity (~$0.096 at low quality) fits only
    # on the fallback gpt-image-1-mini (~$0.023), which takes input_fidelity `low` only.
    "fidelity": team(
        "fidelity",
        """
budgets:
  - {period: day, limit_usd: 0.06}
on_exhausted: downgrade
downgrade: {order: [quality, size, model], fallback_model: gpt-image-1-mini}
""",
    ),
    # $0.10 a day, the model given up first: gpt-image-2 high (~$0.21) falls back to
    # dall-e-2 ($0.02), which answers URLs unless asked for base64.
    "retro": team(
        "retro",
        """
budgets:
  - {period: day, limit_usd: 0.10}
on_exhausted: downgrade
downgrade: {order: [model], fallback_model: dall-e-2}
""",
    ),
    # $0.03 a day: a dall-e-3 image ($0.04 at standard 1024x1024) fits only on the fallback
    # gpt-image-1-mini, which takes no `style` and answers no URL.
    "legacy": team(
        "legacy",
        """
budgets:
  - {period: day, limit_usd: 0.03}
on_exhausted: downgrade
downgrade: {order: [quality, size, model], fallback_model: gpt-image-1-mini}
""",
    ),
}


@pytest.fixture(scope="module", params=BACKENDS)
def proxy(
    request: pytest.FixtureRequest, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("budgets")
    write_config(root, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n", teams=TEAMS)
    tollgate = start_tollgate(root, ledger_url=backend_url(request.param))
    yield tollgate
    tollgate.stop()
    drop_ledger(tollgate.ledger_url)


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """A fresh ledger of each backend: None for the SQLite default, else a PostgreSQL URL."""
    url = backend_url(request.param)
    yield url
    drop_ledger(url)


def client(proxy: Tollgate, name: str, **options: Any) -> openai.OpenAI:
    return proxy.client(KEYS[name], **options)


def usd(header: str) -> Decimal:
    return Decimal(header)


def test_a_request_that_fits_goes_through_with_the_room_left(
    proxy: Tollgate, simulator: Simulator
) -> None:
    raw = client(proxy, "throttled").images.with_raw_response.generate(
        model="gpt-image-2", prompt="fits", quality="low", size="1024x1024"
    )
    cost = expected_cost(simulator.record(raw.headers["x-request-id"]))
    assert usd(raw.headers["x-tollgate-cost-usd"]) == cost
    assert usd(raw.headers["x-tollgate-budget-remaining-usd"]) == Decimal("1.00") - cost
    assert "x-tollgate-downgraded" not in raw.headers


def test_a_request_over_budget_is_downgraded_and_the_upstream_gets_the_cheaper_body(
    proxy: Tollgate, simulator: Simulator
) -> None:
    raw = client(proxy, "frugal").images.with_raw_response.generate(
        model="gpt-image-2", prompt="a castle", quality="high", size="1024x1024"
    )
    assert raw.headers["x-tollgate-downgraded"] == "quality=high->medium"
    record = simulator.record(raw.headers["x-request-id"])
    assert record["params"]["quality"] == "medium" and record["quality"] == "medium"
    row = wait_settled(proxy, raw.headers["x-tollgate-request-id"])
    assert row["outcome"] == "downgraded"
    assert (row["quality_requested"], row["quality"]) == ("high", "medium")
    assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(record)


def test_a_size_given_up_first_is_given_back_once_the_quality_comes_down(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Under `order: [size, quality]` the image went out at medium and 1280x720, the
    smallest 16:9 size, though medium fitted at the 2048x1152 asked for."""
    raw = client(proxy, "sizefirst").images.with_raw_response.generate(
        model="gpt-image-2", prompt="a harbour", quality="high", size="2048x1152"
    )
    assert raw.headers["x-tollgate-downgraded"] == "quality=high->medium"
    record = simulator.record(raw.headers["x-request-id"])
    assert (record["params"]["quality"], record["params"]["size"]) == ("medium", "2048x1152")
    assert usd(raw.headers["x-tollgate-cost-usd"]) == expected_cost(record)


def test_an_edit_at_high_fidelity_never_falls_back_to_a_model_that_refuses_it(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """gpt-image-1-mini takes `input_fidelity` `low` only: the edit was sent to it at
    `high`, and the team got OpenAI's 400 instead of Tollgate's 429."""
    before = len(simulator.billing())
    image = ("a.png", png(1024, 1024), "image/png")
    with pytest.raises(openai.RateLimitError) as caught:
        client(proxy, "fidelity", max_retries=0).images.edit(
            model="gpt-image-1.5", prompt="a fox", image=image, input_fidelity="high"
        )
    assert caught.value.code == "budget_exceeded"
    assert len(simulator.billing()) == before  # nothing was sent upstream


@pytest.mark.parametrize("option", [{"style": "vivid"}, {"response_format": "url"}])
def test_a_dalle_request_never_falls_back_to_a_gpt_model_with_what_only_dalle_takes(
    proxy: Tollgate, simulator: Simulator, option: dict[str, str]
) -> None:
    """GPT image models refuse `style` and answer no URL: a dall-e-3 request naming either
    was sent to the fallback gpt-image-1-mini with it, and the team got OpenAI's 400."""
    before = len(simulator.billing())
    with pytest.raises(openai.RateLimitError) as caught:
        client(proxy, "legacy", max_retries=0).images.generate(
            model="dall-e-3", prompt="a fox", quality="hd", size="1024x1024", **option
        )
    assert caught.value.code == "budget_exceeded"
    assert len(simulator.billing()) == before  # nothing was sent upstream
    answer = client(proxy, "legacy").images.with_raw_response.generate(
        model="dall-e-3", prompt="a fox", size="1024x1024", response_format="b64_json"
    )
    assert answer.headers["x-tollgate-downgraded"].startswith("model=dall-e-3->gpt-image-1-mini")


def test_a_fallback_to_dall_e_still_answers_the_base64_a_gpt_model_answers(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A GPT image model always answers `b64_json`; DALL·E answers URLs unless asked for
    base64: a request sent on to dall-e-2 as it was got a URL (an hour-long link to the
    image) where its client reads `b64_json`, and found None there."""
    raw = client(proxy, "retro").images.with_raw_response.generate(
        model="gpt-image-2", prompt="a fox", quality="high", size="1024x1024"
    )
    assert raw.headers["x-tollgate-downgraded"].startswith("model=gpt-image-2->dall-e-2")
    [image] = raw.parse().data or []
    assert image.b64_json and image.url is None
    record = simulator.record(raw.headers["x-request-id"])
    assert record["params"]["response_format"] == "b64_json"
    asked = client(proxy, "retro").images.generate(
        model="gpt-image-2", prompt="a fox", quality="high", response_format="url"
    )
    assert asked.data and asked.data[0].url  # a client that asks for URLs gets them


def test_a_rejection_is_429_budget_exceeded_and_the_sdk_tries_once(
    proxy: Tollgate, simulator: Simulator
) -> None:
    before = len(simulator.billing())
    rows_before = len(proxy.rows())
    sdk = client(proxy, "strict", max_retries=2)  # the SDK's default: it would retry a 429
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.images.generate(model="gpt-image-2", prompt="x", quality="high", size="1024x1024")
    error = caught.value
    assert error.code == "budget_exceeded" and error.type == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    message = error.message
    assert "team strict's month budget" in message and "limit $0.05" in message
    assert re.search(r"limit \$0\.05, spent \$\d", message), message  # its limit and spent
    assert "cheapest" in message
    assert len(proxy.rows()) == rows_before + 1  # exactly one attempt reached Tollgate
    assert proxy.rows()[-1]["outcome"] == "rejected_budget"
    assert len(simulator.billing()) == before  # the upstream was never called


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda c: c.images.generate(model="gpt-image-1.5", prompt="x", quality="low"), "model"),
        (lambda c: c.images.generate(model="gpt-image-2", prompt="x", quality="low", n=3), "n"),
        (
            lambda c: c.images.edit(
                model="gpt-image-2", prompt="x", image=("a.png", b"\x89PNG", "image/png")
            ),
            None,
        ),
    ],
)
def test_policy_violations_are_403(proxy: Tollgate, call: Any, param: str | None) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        call(client(proxy, "strict"))
    assert caught.value.code == "policy_violation"
    body: Any = caught.value.body
    assert body["param"] == param
    assert proxy.rows()[-1]["outcome"] == "rejected_policy"
    # Like every answer, a refusal says the room left in the tightest USD budget.
    left = usd(caught.value.response.headers["x-tollgate-budget-remaining-usd"])
    assert 0 <= left <= Decimal("0.05")


def test_a_bad_request_says_the_room_left_in_the_tightest_budget_too(proxy: Tollgate) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(proxy, "frugal").images.generate(
            model="gpt-image-2", prompt="x", size="999x999", user="bob"
        )
    # bob's own $0.06 a day is tighter than the team's $0.10.
    left = usd(caught.value.response.headers["x-tollgate-budget-remaining-usd"])
    assert 0 <= left <= Decimal("0.06")


def test_per_user_caps_apply_to_each_user(proxy: Tollgate) -> None:
    sdk = client(proxy, "frugal")
    first = sdk.images.with_raw_response.generate(
        model="gpt-image-1-mini", prompt="a", quality="medium", size="1024x1024", user="alice"
    )
    assert "x-tollgate-downgraded" not in first.headers
    # alice's $0.06 day is nearly used: her next medium image comes down to low, bob's does not.
    second = sdk.images.with_raw_response.generate(
        model="gpt-image-2", prompt="b", quality="medium", size="1024x1024", user="alice"
    )
    assert second.headers["x-tollgate-downgraded"].startswith("quality=medium->")
    bob = sdk.images.with_raw_response.generate(
        model="gpt-image-2", prompt="b", quality="low", size="1024x1024", user="bob"
    )
    assert "x-tollgate-downgraded" not in bob.headers


def test_token_caps_are_budgets_too(proxy: Tollgate) -> None:
    sdk = client(proxy, "tokens")
    sdk.images.generate(model="gpt-image-2", prompt="x", quality="high", size="1024x1024")
    with pytest.raises(openai.RateLimitError) as caught:  # 7024 + 7024 > 8000 output tokens
        sdk.images.generate(model="gpt-image-2", prompt="x", quality="high", size="1024x1024")
    # Plain numbers, as the team file writes the limit: a script finds `8000` in it.
    assert "limit 8000 image output tokens, spent or reserved " in caught.value.message


def test_throttle_tiers_cap_quality_as_spend_rises(proxy: Tollgate) -> None:
    sdk = client(proxy, "throttled")
    # Above 20 % of the $1 month budget, quality is capped at medium; above 40 % at low.
    spent = Decimal(0)
    headers: list[str] = []
    while spent < Decimal("0.45"):
        raw = sdk.images.with_raw_response.generate(
            model="gpt-image-2", prompt="x", quality="high", size="1024x1024"
        )
        spent += usd(raw.headers["x-tollgate-cost-usd"])
        headers.append(raw.headers.get("x-tollgate-downgraded", ""))
    assert headers[0] == ""
    assert "quality=high->medium" in headers
    assert headers[-1] == "quality=high->low"


def test_admin_budgets_show_limit_spent_and_remaining(proxy: Tollgate) -> None:
    answer = httpx.get(
        f"{proxy.url}/admin/budgets", headers={"authorization": f"Bearer {ADMIN}"}
    ).json()
    by_team = {(b["team"], b["period"]): b for b in answer["budgets"]}
    strict = by_team[("strict", "month")]
    assert strict["limit"] == "0.05"
    assert Decimal(strict["remaining"]) == Decimal(strict["limit"]) - Decimal(strict["spent"])
    assert strict["period_end"] > answer["as_of"]
    denied = httpx.get(f"{proxy.url}/admin/budgets", headers={"authorization": "Bearer no"})
    assert denied.status_code == 401
    ledger = ["--ledger", proxy.ledger_url] if proxy.ledger_url else []
    cli = subprocess.run(
        [sys.executable, "-m", "proxy", "budgets", "--config", str(proxy.root), *ledger,
         "--format", "json"],
        capture_output=True, text=True, check=True, env={**os.environ},
    )  # fmt: skip
    assert '"team": "strict"' in cli.stdout


def test_reload_swaps_the_configuration_and_refuses_an_invalid_one(
    proxy: Tollgate,
) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    team_file = proxy.root / "teams" / "strict.yaml"
    original = team_file.read_text()
    try:
        team_file.write_text(original.replace("limit_usd: 0.05", "limit_usd: 5"))
        answer = httpx.post(f"{proxy.url}/admin/reload", headers=headers)
        assert answer.status_code == 200 and "strict" in answer.json()["teams"]
        ok = client(proxy, "strict").images.generate(
            model="gpt-image-2", prompt="x", quality="high", size="1024x1024"
        )
        assert ok.data
        team_file.write_text(original.replace("limit_usd: 0.05", "limit_usd: lots"))
        refused = httpx.post(f"{proxy.url}/admin/reload", headers=headers)
        assert refused.status_code == 400
        assert "strict.yaml" in refused.json()["error"]["message"]
        still = client(proxy, "strict").images.generate(
            model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
        )  # the $5 budget is still in force
        assert still.data
        team_file.write_text(original)
        proxy.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                client(proxy, "strict").images.generate(
                    model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
                )
            except openai.RateLimitError:
                break  # back to $0.05, already spent: the spend survived both reloads
            time.sleep(0.1)
        else:
            pytest.fail("SIGHUP did not reload the configuration")
    finally:
        team_file.write_text(original)


def test_a_budget_added_by_a_reload_counts_the_spend_already_made(proxy: Tollgate) -> None:
    headers = {"authorization": f"Bearer {ADMIN}"}
    raw = client(proxy, "throttled").images.with_raw_response.generate(
        model="gpt-image-2", prompt="x", quality="low", size="1024x1024"
    )
    wait_settled(proxy, raw.headers["x-tollgate-request-id"])
    team_file = proxy.root / "teams" / "throttled.yaml"
    original = team_file.read_text()
    try:
        added = "  - {period: day, limit_usd: 50}\n  - {period: month, limit_usd: 1.00}"
        team_file.write_text(original.replace("  - {period: month, limit_usd: 1.00}", added))
        assert httpx.post(f"{proxy.url}/admin/reload", headers=headers).status_code == 200
        answer = httpx.get(f"{proxy.url}/admin/budgets", headers=headers).json()
        by_period = {b["period"]: b for b in answer["budgets"] if b["team"] == "throttled"}
        # The day's spend so far, though no budget read that counter when it was made.
        assert Decimal(by_period["day"]["spent"]) == Decimal(by_period["month"]["spent"]) > 0
    finally:
        team_file.write_text(original)
        httpx.post(f"{proxy.url}/admin/reload", headers=headers)


# -- concurrency: the hard-limit guarantee -------------------------------------------


STORM_KEY = "tg_test_storm_key"
PROMPT = "abcd"  # estimate and usage differ by 3 text tokens only


def storm_config(root: Path, simulator: Simulator, limit: Decimal) -> None:
    write_config(root, f"{simulator.url}/v1", teams={"storm": f"""
name: storm
keys:
  - {{id: k, sha256: {key_hash(STORM_KEY)}}}
budgets:
  - {{period: month, limit_usd: {limit}}}
on_exhausted: reject
"""})  # fmt: skip


async def fire(url: str, count: int) -> list[int]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(i: int) -> int:
            try:
                answer = await http.post(
                    f"{url}/v1/images/generations",
                    headers={"authorization": f"Bearer {STORM_KEY}"},
                    json={"model": "gpt-image-2", "prompt": PROMPT, "quality": "low",
                          "size": "1024x1024"},
                )  # fmt: skip
                return answer.status_code
            except httpx.HTTPError:
                return 0

        return await asyncio.gather(*(one(i) for i in range(count)))


ONE = Decimal(196 * 30 + 4 * 5) / 10**6  # the bound of one request: 196 output, 4 text tokens


@pytest.mark.parametrize("workers", [1, 2])
def test_a_storm_never_overspends_and_leaves_no_room_unused(
    simulator: Simulator, tmp_path: Path, workers: int, ledger_url: str | None
) -> None:
    fits = 37
    limit = ONE * fits
    storm_config(tmp_path, simulator, limit)
    simulator.configure(latency_ms=200)
    proxy = start_tollgate(tmp_path, "--workers", str(workers), ledger_url=ledger_url)
    try:
        statuses = asyncio.run(fire(proxy.url, 200))
    finally:
        simulator.configure(latency_ms=0)
        proxy.stop()
    assert statuses.count(200) == fits, collections.Counter(statuses)
    assert statuses.count(429) == 200 - fits, collections.Counter(statuses)
    [spent] = proxy.query("SELECT SUM(cost_nanos) AS v FROM requests")[0].values()
    [reserved] = proxy.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")[0].values()
    assert Decimal(spent) / 10**9 <= limit
    assert limit - Decimal(spent) / 10**9 < ONE  # used to within one request of the limit
    assert reserved == 0


def reserved_rows(proxy: Tollgate) -> int:
    found = proxy.query("SELECT COUNT(*) AS n FROM requests WHERE state = 'reserved'")
    return int(found[0]["n"])


def test_kill_9_mid_storm_never_hands_billed_room_out_again(
    simulator: Simulator, tmp_path: Path, ledger_url: str | None
) -> None:
    """The requests a killed Tollgate had in flight were sent, and the simulator (like
    OpenAI) bills what it accepted: after a restart they count as spent at their bound, so
    the ledger holds at least what was billed, never more than the limit, and their room is
    not given to new requests."""
    fits = 8
    limit = ONE * fits
    storm_config(tmp_path, simulator, limit)
    seen = {r["id"] for r in simulator.billing()}
    simulator.configure(latency_ms=2000)
    proxy = start_tollgate(tmp_path, ledger_url=ledger_url)
    try:
        loop = asyncio.new_event_loop()
        storm = loop.create_task(fire(proxy.url, 40))

        # Kill once the whole budget is reserved and every request that fits has reached
        # the simulator (which answers after 2 s): all of them are in flight.
        def arrived() -> int:
            return sum(1 for r in simulator.billing() if r["id"] not in seen)

        # Arrivals first: a reservation ends only with its answer, 2 s after its arrival, so
        # rows still reserved once all have arrived were reserved when the kill came.
        def in_flight() -> bool:
            return arrived() == fits and reserved_rows(proxy) == fits

        deadline = time.monotonic() + 60
        while not (ready := in_flight()) and time.monotonic() < deadline:
            loop.run_until_complete(asyncio.sleep(0.02))
        assert ready, (arrived(), reserved_rows(proxy))
        proxy.process.send_signal(signal.SIGKILL)
        proxy.process.wait()
        loop.run_until_complete(storm)
        loop.close()
        restarted = start_tollgate(tmp_path, ledger_url=ledger_url)
    finally:
        simulator.configure(latency_ms=0)
    try:
        assert asyncio.run(fire(restarted.url, 10)) == [429] * 10  # no room was freed
        assert reserved_rows(restarted) == 0
        assert restarted.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")[0]["v"] == 0
        billed = sum(
            (expected_cost(r) for r in simulator.billing() if r["id"] not in seen and r["billed"]),
            Decimal(0),
        )
        assert billed > 0
        [spent] = restarted.query("SELECT SUM(cost_nanos) AS v FROM requests")[0].values()
        assert billed <= Decimal(spent) / 10**9 <= limit
        counted = restarted.query(
            "SELECT spent_nanos FROM budget_usage WHERE scope = 'team' AND period = 'month'"
        )[0]["spent_nanos"]
        assert counted == spent
        lost = restarted.query(
            "SELECT cost_nanos, estimated_nanos, flagged, outcome FROM requests "
            "WHERE error_code = 'outcome_unknown'"
        )
        assert len(lost) == fits
        for row in lost:
            assert row["cost_nanos"] == row["estimated_nanos"] > 0
            assert (row["flagged"], row["outcome"]) == (1, "upstream_error")
    finally:
        restarted.stop()


def test_the_upstream_key_is_used_for_budgeted_requests_too(
    proxy: Tollgate, simulator: Simulator
) -> None:
    raw = client(proxy, "throttled").images.with_raw_response.generate(
        model="gpt-image-2", prompt="k", quality="low", size="1024x1024"
    )
    assert simulator.record(raw.headers["x-request-id"])["authorization"] == (
        f"Bearer {UPSTREAM_KEY}"
    )


def test_reload_reaches_every_worker(simulator: Simulator, tmp_path: Path) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n", teams=TEAMS)
    proxy = start_tollgate(tmp_path, "--workers", "2")
    try:
        sdk = client(proxy, "strict")

        def allowed() -> bool:
            try:
                sdk.images.generate(model="gpt-image-2", prompt="x", quality="high")
            except openai.RateLimitError:
                return False
            return True

        assert not allowed()  # $0.21 never fits in $0.05
        team_file = tmp_path / "teams" / "strict.yaml"
        team_file.write_text(team_file.read_text().replace("limit_usd: 0.05", "limit_usd: 50"))
        # The answer waits for both workers to be replaced: new processes, slow to start on
        # a loaded machine (httpx's default of 5 s was not always enough).
        answer = httpx.post(
            f"{proxy.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}, timeout=90
        )
        assert answer.status_code == 200
        # The supervisor replaces the workers one by one; then every worker has the new budget.
        deadline = time.monotonic() + 30
        streak = 0
        while streak < 8 and time.monotonic() < deadline:
            streak = streak + 1 if allowed() else 0
            time.sleep(0.05)
        assert streak == 8
    finally:
        proxy.stop()
