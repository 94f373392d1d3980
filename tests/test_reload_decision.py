"""A reload that lands while a request is being decided: the request is decided under the
configuration in force when its reservation is written, never the one the reload replaced."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web.gateway import Gateway
from proxy.web.in_force import DECISIONS
from tests.batches_e2e import GENERATIONS, generations, upload
from tests.conftest import UPSTREAM_KEY, in_process, write_config
from tests.test_proxy_e2e import expected_cost

KEY = "tg_test_reload_decision_key"
ADMIN = "tg_admin_reload_decision"
SETTINGS = f"admin_token: {ADMIN}\n"
# One gpt-image-2 low 1024x1024 request with a 4-byte prompt is bounded at $0.0059.


def team(limit_usd: str, key: str = KEY, more: str = "") -> dict[str, str]:
    return {
        "night": f"name: night\nkeys:\n  - {{id: k, sha256: {key_hash(key)}}}\n"
        f"budgets:\n  - {{period: day, limit_usd: {limit_usd}}}\non_exhausted: reject\n{more}"
    }


class Reloads:
    """A reload of the configuration `teams` gives, answered while a request waits for its
    reservation's transaction (behind others, or a batch's plan on a thread): before its
    first `times` reservations (every one when None). The status of each reload."""

    def __init__(self, tmp_path: Path, teams: dict[str, str], times: int | None = 1) -> None:
        self.tmp_path, self.teams, self.times = tmp_path, teams, times
        self.statuses: list[int] = []

    def during_reservations(
        self, gateway: Gateway, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        ledger = gateway.current().ledger
        reserve = ledger.reserve

        async def reload_first(*args: Any, **kwargs: Any) -> Any:
            if self.times is None or len(self.statuses) < self.times:
                write_config(self.tmp_path, "http://simulated/v1", SETTINGS, teams=self.teams)
                answer = await asyncio.to_thread(
                    client.post, "/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}
                )
                self.statuses.append(answer.status_code)
            return await reserve(*args, **kwargs)

        monkeypatch.setattr(ledger, "reserve", reload_first)


def sdk(client: TestClient) -> openai.OpenAI:
    """The official client, which does not retry: whatever Tollgate answers, it sees."""
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0
    )


def generate(client: TestClient) -> Any:
    return sdk(client).images.generate(
        model="gpt-image-2", prompt="abcd", quality="low", size="1024x1024"
    )


def held(client: TestClient, key: str = KEY) -> tuple[str, str, str]:
    spent = client.get("/v1/tollgate/budget", headers={"authorization": f"Bearer {key}"})
    [day] = spent.json()["budgets"]
    return day["limit"], day["spent"], day["reserved"]


def forwarded(upstream: TestClient, path: str) -> int:
    arrived = upstream.get("/_sim/arrivals").json()["requests"]
    return sum(a["raw_path"] == path for a in arrived)


def test_a_budget_lowered_while_a_request_is_decided_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decided under the budget the reload replaced, the request went upstream past the
    budget in force; then it was answered 503 `configuration_reloaded`, which a client
    that does not retry saw for an operator's reload. Tollgate now decides it again itself
    under the new budget, which refuses it."""
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("1"))
    gateway = in_process(tmp_path)
    reloads = Reloads(tmp_path, team("0.001"))
    with TestClient(gateway) as client:
        reloads.during_reservations(gateway, client, monkeypatch)
        with pytest.raises(openai.RateLimitError) as refused:
            generate(client)
        assert refused.value.code == "budget_exceeded"
        assert reloads.statuses == [200]
        assert held(client) == ("0.001", "0", "0")


@pytest.mark.parametrize("change", ["kept", "revoked"])
def test_a_request_overtaken_by_a_reload_is_decided_again_under_the_new_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A reload that leaves the team's key and room (its budget only raised) lets the
    request through, forwarded and settled once; one that revokes its key refuses it as
    any unknown key, before anything is reserved or forwarded."""
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("1"))
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    gateway = in_process(tmp_path, simulator)
    rotated = "tg_test_reload_decision_rotated"
    reloads = Reloads(tmp_path, team("2", rotated if change == "revoked" else KEY))
    with TestClient(gateway) as client, TestClient(simulator) as upstream:
        reloads.during_reservations(gateway, client, monkeypatch)
        if change == "revoked":
            with pytest.raises(openai.AuthenticationError) as refused:
                generate(client)
            assert refused.value.code == "invalid_api_key"
            assert held(client, rotated) == ("2", "0", "0")
        else:
            answer = sdk(client).images.with_raw_response.generate(
                model="gpt-image-2", prompt="abcd", quality="low", size="1024x1024"
            )
            assert answer.http_response.status_code == 200
            limit, spent, reserved = held(client)
            assert (limit, reserved) == ("2", "0") and Decimal(spent) > 0
            assert answer.headers["x-tollgate-team"] == "night"
        assert reloads.statuses == [200]
        assert forwarded(upstream, GENERATIONS) == (change == "kept")


def test_a_request_overtaken_by_a_reload_on_every_attempt_is_answered_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decided again only so many times: a request that reloads keep overtaking is
    refused, nothing reserved nor forwarded, with the 503 the SDKs retry."""
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("1"))
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    gateway = in_process(tmp_path, simulator)
    reloads = Reloads(tmp_path, team("1"), times=None)
    with TestClient(gateway) as client, TestClient(simulator) as upstream:
        reloads.during_reservations(gateway, client, monkeypatch)
        with pytest.raises(openai.InternalServerError) as refused:
            generate(client)
        assert refused.value.status_code == 503
        assert refused.value.code == "configuration_reloaded"
        assert refused.value.response.headers["x-should-retry"] == "true"
        assert reloads.statuses == [200] * DECISIONS
        assert held(client) == ("1", "0", "0")
        assert forwarded(upstream, GENERATIONS) == 0


def test_a_request_decided_again_counts_once_against_its_rate_limits_and_its_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt a reload overtook wrote nothing: the request it becomes counts once
    against the team's two requests a minute (a second request passes, a third is
    refused), and a repeat of it (same Idempotency-Key) is answered from it, never sent
    again."""
    limits = "rate_limits:\n  - {per: minute, requests: 2}\n"
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("1", more=limits))
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    gateway = in_process(tmp_path, simulator, clock=lambda: 1_800_000_000.0)  # mid-minute
    reloads = Reloads(tmp_path, team("2", more=limits))
    keyed = {"idempotency-key": "night-1"}
    with TestClient(gateway) as client, TestClient(simulator) as upstream:
        reloads.during_reservations(gateway, client, monkeypatch)
        images = sdk(client).images.with_raw_response
        first = images.generate(prompt="abcd", quality="low", extra_headers=keyed)
        assert reloads.statuses == [200]
        again = images.generate(prompt="abcd", quality="low", extra_headers=keyed)
        first_id = first.headers["x-tollgate-request-id"]
        assert again.headers["x-tollgate-replay-of"] == first_id
        images.generate(prompt="another", quality="low")
        with pytest.raises(openai.RateLimitError) as refused:
            images.generate(prompt="a third", quality="low")
        assert refused.value.code == "rate_limit_exceeded"
        assert forwarded(upstream, GENERATIONS) == 2


def test_a_budget_lowered_while_a_batch_create_is_decided_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch create's plan is made on a thread (seconds for a large file): a reload that
    lowered the budget meanwhile was answered before the batch was reserved under the old
    one. The create is decided again under the new budget, which refuses it."""
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("100"))
    gateway = in_process(tmp_path)
    reloads = Reloads(tmp_path, team("0.001"))
    with TestClient(gateway) as client:
        uploaded = upload(sdk(client), generations("gpt-image-2", 4))
        reloads.during_reservations(gateway, client, monkeypatch)
        with pytest.raises(openai.RateLimitError) as refused:
            sdk(client).batches.create(
                input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
            )
        assert refused.value.code == "budget_exceeded"
        assert reloads.statuses == [200]


def test_a_batch_create_overtaken_by_a_reload_on_every_attempt_is_answered_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("100"))
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    gateway = in_process(tmp_path, simulator)
    reloads = Reloads(tmp_path, team("100"), times=None)
    with TestClient(gateway) as client, TestClient(simulator) as upstream:
        uploaded = upload(sdk(client), generations("gpt-image-2", 4))
        reloads.during_reservations(gateway, client, monkeypatch)
        with pytest.raises(openai.InternalServerError) as refused:
            sdk(client).batches.create(
                input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
            )
        assert refused.value.code == "configuration_reloaded"
        assert reloads.statuses == [200] * DECISIONS
        assert held(client) == ("100", "0", "0")
        assert forwarded(upstream, "/v1/batches") == 0


DOWNGRADES = {
    # gpt-image-2 high 1024x1024 (about $0.21) fits $0.10 only as medium (about $0.053).
    "quality": ("1024x1024", "[quality, size, model]", "quality=high->medium"),
    # High at 2048x1152 ($0.17) fits $0.12 only at a smaller 16:9 size ($0.11 at 1280x720).
    "size": ("2048x1152", "[size]", "size=2048x1152->1280x720"),
    # High on the fallback gpt-image-1-mini (about $0.036) fits $0.10.
    "model": ("1024x1024", "[model]", "model=gpt-image-2->gpt-image-1-mini"),
}
LOWERED = {"quality": "0.10", "size": "0.12", "model": "0.10"}


@pytest.mark.parametrize("knob", DOWNGRADES)
def test_a_budget_lowered_while_a_request_is_decided_downgrades_it_to_what_fits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, knob: str
) -> None:
    """Decided again under a budget lowered below what the request asks, a team that
    downgrades sends the most faithful form that fits (quality, size, model: the team's
    `downgrade.order`), says what changed, and is charged what that form costs, as a
    request arriving after the reload would be."""
    size, order, changed = DOWNGRADES[knob]
    rules = f"downgrade: {{order: {order}, fallback_model: gpt-image-1-mini}}\n"
    downgrading = "on_exhausted: reject\n", "on_exhausted: downgrade\n"
    teams = {
        limit: {"night": team(limit, more=rules)["night"].replace(*downgrading)}
        for limit in ("1", LOWERED[knob])
    }
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=teams["1"])
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    gateway = in_process(tmp_path, simulator)
    reloads = Reloads(tmp_path, teams[LOWERED[knob]])
    with TestClient(gateway) as client, TestClient(simulator) as upstream:
        reloads.during_reservations(gateway, client, monkeypatch)
        answer = sdk(client).images.with_raw_response.generate(
            model="gpt-image-2", prompt="abcd", quality="high", size=size
        )
        assert reloads.statuses == [200]
        assert answer.headers["x-tollgate-downgraded"] == changed
        [sent] = upstream.get("/_sim/billing").json()["requests"]
        asked = {"model": "gpt-image-2", "quality": "high", "size": size}
        for name, value in asked.items():
            downgraded = f"{name}={value}->" in changed
            assert (sent[name] == value) != downgraded, (name, sent[name])
        cost = answer.headers["x-tollgate-cost-usd"]
        assert Decimal(cost) == expected_cost(sent) <= Decimal(LOWERED[knob])
        limit, spent, reserved = held(client)
        assert (Decimal(limit), spent, reserved) == (Decimal(LOWERED[knob]), cost, "0")
        assert forwarded(upstream, GENERATIONS) == 1
