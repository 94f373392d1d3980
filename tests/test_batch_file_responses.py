"""A batch file's `/v1/responses` lines (`proxy.doors.batches`, `batch_responses`), pure:
each checked and bounded as the Responses door does a direct request, at batch rates, and
checked again when the batch is created."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from proxy.core.errors import InvalidRequest
from proxy.core.models import Estimate
from proxy.core.settings import Config
from proxy.doors.batches import bound_now
from proxy.doors.responses import ResponsesDoor
from tests.conftest import team_named
from tests.test_batch_file import config, read

__all__ = ["config"]  # the shared fixture

RESPONSES = "/v1/responses"
TOOL = {"type": "image_generation", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-5.5",
        "input": "a lighthouse",
        "tools": [TOOL],
        "max_output_tokens": 1000,
        "max_tool_calls": 2,
        **extra,
    }


def line(custom_id: str, **extra: Any) -> bytes:
    request = {"custom_id": custom_id, "method": "POST", "url": RESPONSES, "body": body(**extra)}
    return json.dumps(request).encode()


def test_a_line_is_bounded_as_the_direct_door_bounds_it_at_batch_rates(config: Config) -> None:
    batch, out = read(config, line("a") + b"\n")
    assert batch.ok and batch.endpoint == "responses", batch.problems
    [priced] = batch.lines
    assert (priced.model, priced.mainline, priced.n) == ("gpt-image-2", "gpt-5.5", 2)
    door = ResponsesDoor()
    raw = json.dumps(body(), separators=(",", ":")).encode()
    parsed = door.parse("application/json", raw, config, team_named(config))
    direct = door.admit(team_named(config), parsed, config)
    batched = door.admit(team_named(config), parsed, config, batch=True)
    assert priced.bound_nanos == batched.estimate.cost_nanos
    assert batched.estimate.usage == direct.estimate.usage  # the same tokens, cheaper
    assert direct.estimate.cost_nanos // 2 <= priced.bound_nanos < direct.estimate.cost_nanos
    sent = json.loads(out)
    assert sent["url"] == RESPONSES and sent["body"]["service_tier"] == "default"


def test_a_line_is_capped_and_held_to_the_teams_policy_as_directly(config: Config) -> None:
    batch, out = read(config, line("a", max_tool_calls=None) + b"\n")
    assert batch.ok, batch.problems
    sent = json.loads(out)["body"]
    assert sent["max_tool_calls"] == team_named(config).responses.max_tool_calls  # written in
    strict, _ = read(config, line("a") + b"\n", "strict")  # allow.models: gpt-image-2
    assert strict.problems == [
        "line 1: Team strict may not use model 'gpt-5.5' (allow.models: gpt-image-2)."
    ]


def test_a_mainline_model_without_batch_rates_is_refused(config: Config) -> None:
    entry = config.prices.mainline["gpt-5.5"]
    book = replace(
        config.prices,
        mainline={**config.prices.mainline, "gpt-5.5": replace(entry, batch_rates=None)},
    )
    closed = replace(config, prices=book)
    batch, _ = read(closed, line("a") + b"\n")
    assert batch.problems == [
        "line 1: Model 'gpt-5.5' is not accepted by the Batch API (Tollgate's price book "
        "gives it no batch rates)."
    ]


def test_checked_again_at_create_a_raised_mainline_rate_raises_the_bound(config: Config) -> None:
    batch, _ = read(config, line("a") + b"\n" + line("b") + b"\n")
    priced_at = Estimate(batch.usage, batch.bound_nanos)
    assert bound_now(team_named(config), config, batch.lines, priced_at) == priced_at
    entry = config.prices.mainline["gpt-5.5"]
    assert entry.batch_rates is not None
    dearer = {k: v * 3 for k, v in entry.batch_rates.items()}
    book = replace(
        config.prices,
        mainline={**config.prices.mainline, "gpt-5.5": replace(entry, batch_rates=dearer)},
    )
    again = bound_now(team_named(config), replace(config, prices=book), batch.lines, priced_at)
    assert again.cost_nanos > priced_at.cost_nanos
    gone = replace(config.prices, mainline={})
    with pytest.raises(InvalidRequest, match=r"line 2: model 'gpt-5\.5' is not accepted"):
        bound_now(team_named(config), replace(config, prices=gone), batch.lines, priced_at)
