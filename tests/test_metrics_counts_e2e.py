"""How the request counters of /metrics move, through the official client: one downgraded
request is one downgrade of each knob it changed, however many steps down the ladder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.core.auth import key_hash
from tests.conftest import Simulator, Tollgate, start_tollgate, write_config

KEY = "tg_test_tokens_key_0003"


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("counts")
    # 500 image output tokens a day: a gpt-image-1 1024x1024 image fits only at low (272
    # tokens; medium takes 1,056, high 4,160).
    write_config(
        root,
        f"{simulator.url}/v1",
        teams={
            "tokens": f"""
                name: tokens
                keys:
                  - {{id: app, sha256: {key_hash(KEY)}}}
                budgets:
                  - {{period: day, image_output_tokens: 500}}
                on_exhausted: downgrade
            """,
        },
    )
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def test_a_quality_brought_down_two_steps_by_a_budget_is_one_downgrade(proxy: Tollgate) -> None:
    raw = proxy.client(KEY).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a lighthouse", quality="high", size="1024x1024"
    )
    assert raw.headers["x-tollgate-downgraded"] == "quality=high->low"
    labels = {"team": "tokens", "knob": "quality", "reason": "budget"}
    assert proxy.metric("tollgate_downgrades_total", **labels) == 1
    outcome = {"team": "tokens", "model": "gpt-image-1", "endpoint": "generations"}
    assert proxy.metric("tollgate_requests_total", **outcome, outcome="downgraded") == 1
