"""`GET /v1/tollgate/budget` end to end: each team reads its own budgets and rate limits
with its own key, in the shape of `tollgate budgets --format json`, after requests through
the official `openai` client; another team's numbers are never in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.conftest import Simulator, Tollgate, start_tollgate, write_config
from tests.test_proxy_e2e import wait_settled

KEYS = {name: f"tg_test_{name}_key_0042" for name in ("design", "research", "quiet")}
BUDGET = "/v1/tollgate/budget"


def team(name: str, body: str = "") -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TEAMS = {
    "design": team(
        "design",
        """
budgets:
  - {period: month, limit_usd: 5}
  - {period: day, image_output_tokens: 900000}
per_user:
  - {period: day, limit_usd: 1}
rate_limits:
  - {per: day, images: 100}
  - {per: minute, requests: 50}
  - {per: day, share: 0.25}
""",
    ),
    "research": team(
        "research",
        """
budgets:
  - {period: day, limit_usd: 2}
rate_limits:
  - {per: day, requests: 10, model: gpt-image-2}
""",
    ),
    "quiet": team("quiet"),
}
SETTINGS = """
organization:
  budgets:
    - {period: month, limit_usd: 100}
  rate_limits:
    - {per: day, images: 1000, model: gpt-image-2}
"""


@pytest.fixture(scope="module")
def tollgate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("self_service")
    write_config(root, f"{simulator.url}/v1", settings=SETTINGS, teams=TEAMS)
    started = start_tollgate(root)
    yield started
    started.stop()


def own(tollgate: Tollgate, name: str) -> httpx.Response:
    return httpx.get(
        f"{tollgate.url}{BUDGET}", headers={"authorization": f"Bearer {KEYS[name]}"}, timeout=30
    )


def cli_budgets(tollgate: Tollgate) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "budgets", "--config", str(tollgate.root),
         "--format", "json"],
        capture_output=True, text=True, check=True, env={**os.environ}, cwd=tollgate.root,
    )  # fmt: skip
    found: list[dict[str, Any]] = json.loads(done.stdout)["budgets"]
    return found


def generate(tollgate: Tollgate, name: str, n: int = 1) -> None:
    client = tollgate.client(KEYS[name])
    raw = client.images.with_raw_response.generate(
        model="gpt-image-2", prompt=f"{name} lighthouse", quality="low", size="1024x1024", n=n
    )
    wait_settled(tollgate, raw.headers["x-tollgate-request-id"])


def limits(answer: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["scope"], r["per"], r["metric"]): r for r in answer["rate_limits"]}


def test_each_team_reads_its_own_numbers_which_agree_with_the_cli_and_move_with_requests(
    tollgate: Tollgate,
) -> None:
    before = {name: own(tollgate, name).json() for name in ("design", "research")}
    generate(tollgate, "design")
    generate(tollgate, "design")
    generate(tollgate, "research", n=2)
    cli = cli_budgets(tollgate)
    for name in ("design", "research"):
        answer = own(tollgate, name)
        assert answer.status_code == 200
        assert answer.headers["x-tollgate-team"] == name
        body = answer.json()
        assert set(body) == {"team", "budgets", "rate_limits"}
        assert body["team"] == name
        # The organization's budgets and the team's own, exactly as the CLI shows them.
        expected = [b for b in cli if b["scope"] == "organization" or b["team"] == name]
        assert body["budgets"] == expected
        assert {b["team"] for b in body["budgets"]} == {None, name}
        assert all(b["scope"] != "user" for b in body["budgets"])
        spent = [b for b in body["budgets"] if b["team"] == name and b["metric"] == "usd"]
        assert spent and float(spent[0]["spent"]) > 0
        assert before[name]["budgets"] != body["budgets"]

    design = limits(own(tollgate, "design").json())
    assert set(design) == {
        ("team", "day", "images"), ("team", "minute", "requests"),
        ("organization", "day", "images"),
    }  # fmt: skip
    images = design[("team", "day", "images")]
    assert (images["limit"], images["used"], images["remaining"]) == (100, 2, 98)
    assert (images["model"], images["share"]) == (None, None)
    assert limits(before["design"])[("team", "day", "images")]["used"] == 0
    requests = design[("team", "minute", "requests")]
    assert requests["limit"] == 50 and requests["resets_at"] - time.time() <= 60
    org = design[("organization", "day", "images")]
    # Every team's images count on the organization's limit; design keeps its share (250).
    assert (org["model"], org["limit"], org["used"]) == ("gpt-image-2", 1000, 4)
    assert (org["share"], org["share_used"], org["remaining"]) == (250, 2, 996)
    assert org["resets_at"] == images["resets_at"]
    assert org["resets_at"] == next(b for b in cli if b["period"] == "day")["period_end"]

    research_answer = own(tollgate, "research")
    research = limits(research_answer.json())
    assert set(research) == {("team", "day", "requests"), ("organization", "day", "images")}
    mine = research[("team", "day", "requests")]
    assert (mine["model"], mine["used"], mine["remaining"]) == ("gpt-image-2", 1, 9)
    # Design's unused promise (250 - 2) is kept from research's room.
    assert research[("organization", "day", "images")]["remaining"] == 1000 - 4 - 248
    assert research_answer.headers["x-tollgate-ratelimit-remaining-requests"] == "9"
    assert research_answer.headers["x-tollgate-ratelimit-remaining-images"] == "748"
    assert research_answer.headers["x-tollgate-ratelimit-limit-requests"] == "10"


def test_another_teams_numbers_are_never_in_the_answer(tollgate: Tollgate) -> None:
    answer = own(tollgate, "research").text
    assert "design" not in answer
    assert "design" not in str(own(tollgate, "research").headers)


def test_a_team_without_budgets_or_limits_sees_the_organizations_only(
    tollgate: Tollgate,
) -> None:
    body = own(tollgate, "quiet").json()
    assert body["team"] == "quiet"
    assert [(b["scope"], b["period"], b["limit"]) for b in body["budgets"]] == [
        ("organization", "month", "100")
    ]
    # No limit of its own: only the organization's, which every team's requests count on.
    assert [(r["scope"], r["share"]) for r in body["rate_limits"]] == [("organization", None)]


def test_the_sdk_reads_it_with_a_team_key(tollgate: Tollgate) -> None:
    client = tollgate.client(KEYS["research"])
    body = client.get("/tollgate/budget", cast_to=object)
    assert isinstance(body, dict) and body["team"] == "research"


@pytest.mark.parametrize("authorization", [None, "Bearer tg_not_a_key_of_anyone", "Basic x"])
def test_a_missing_or_unknown_key_is_refused_401_in_openais_shape(
    tollgate: Tollgate, authorization: str | None
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    answer = httpx.get(f"{tollgate.url}{BUDGET}", headers=headers, timeout=30)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "x-tollgate-team" not in answer.headers
    with pytest.raises(openai.AuthenticationError):
        tollgate.client("tg_not_a_key_of_anyone").get("/tollgate/budget", cast_to=object)


def test_only_get_is_answered_and_nothing_under_v1_tollgate_is_forwarded(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    headers = {"authorization": f"Bearer {KEYS['design']}"}
    posted = httpx.post(f"{tollgate.url}{BUDGET}", headers=headers, timeout=30)
    assert posted.status_code == 405
    assert posted.headers["allow"] == "GET, HEAD"
    head = httpx.head(f"{tollgate.url}{BUDGET}", headers=headers, timeout=30)
    assert head.status_code == 200 and head.headers["x-tollgate-team"] == "design"
    billed = len(simulator.billing())
    for path in ("/v1/tollgate/other", "/v1/Tollgate/budget", "/v1/tollgate/budget/"):
        answer = httpx.get(f"{tollgate.url}{path}", headers=headers, timeout=30)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "not_found"
    assert len(simulator.billing()) == billed
