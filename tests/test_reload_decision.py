"""A reload that lands while a request is being decided: the request is decided under the
configuration in force when its reservation is written, never the one the reload replaced."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from tests.batches_e2e import GENERATIONS, generations, upload
from tests.conftest import in_process, write_config

KEY = "tg_test_reload_decision_key"
ADMIN = "tg_admin_reload_decision"
SETTINGS = f"admin_token: {ADMIN}\n"
# One gpt-image-2 low 1024x1024 request with a 4-byte prompt is bounded at $0.0059.


def team(limit_usd: str) -> dict[str, str]:
    return {
        "night": f"name: night\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"
        f"budgets:\n  - {{period: day, limit_usd: {limit_usd}}}\non_exhausted: reject\n"
    }


def test_a_budget_lowered_while_a_request_is_decided_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload is answered while the request waits for its reservation's transaction
    (behind others, or a batch's plan on a thread): decided then under the budget the
    reload replaced, it went upstream past the budget in force."""
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("1"))
    gateway = in_process(tmp_path)
    reloads: list[int] = []
    with TestClient(gateway) as client:
        ledger = gateway.current().ledger
        reserve = ledger.reserve

        async def reload_first(*args: Any, **kwargs: Any) -> Any:
            if not reloads:
                write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("0.001"))
                answer = await asyncio.to_thread(
                    client.post, "/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}
                )
                reloads.append(answer.status_code)
            return await reserve(*args, **kwargs)

        monkeypatch.setattr(ledger, "reserve", reload_first)
        images = openai.OpenAI(
            base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=1
        )
        with pytest.raises(openai.RateLimitError) as refused:
            images.images.generate(
                model="gpt-image-2", prompt="abcd", quality="low", size="1024x1024"
            )
        assert refused.value.code == "budget_exceeded"
        assert reloads == [200]
        spent = client.get("/v1/tollgate/budget", headers={"authorization": f"Bearer {KEY}"})
        [day] = spent.json()["budgets"]
        assert (day["limit"], day["spent"], day["reserved"]) == ("0.001", "0", "0")


def test_a_budget_lowered_while_a_batch_create_is_decided_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch create's plan is made on a thread (seconds for a large file): a reload that
    lowered the budget meanwhile was answered before the batch was reserved under the old
    one."""
    write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("100"))
    gateway = in_process(tmp_path)
    reloads: list[int] = []
    with TestClient(gateway) as client:
        batches = openai.OpenAI(
            base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=1
        )
        uploaded = upload(batches, generations("gpt-image-2", 4))
        ledger = gateway.current().ledger
        reserve = ledger.reserve

        async def reload_first(*args: Any, **kwargs: Any) -> Any:
            if not reloads:
                write_config(tmp_path, "http://simulated/v1", SETTINGS, teams=team("0.001"))
                answer = await asyncio.to_thread(
                    client.post, "/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}
                )
                reloads.append(answer.status_code)
            return await reserve(*args, **kwargs)

        monkeypatch.setattr(ledger, "reserve", reload_first)
        with pytest.raises(openai.RateLimitError) as refused:
            batches.batches.create(
                input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
            )
        assert refused.value.code == "budget_exceeded"
        assert reloads == [200]
