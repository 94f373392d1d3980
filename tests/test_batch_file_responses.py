"""A batch file's `/v1/responses` lines (`proxy.doors.batches`, `batch_responses`), pure:
each checked and bounded as the Responses door does a direct request, at batch rates, and
checked again when the batch is created."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.core.errors import InvalidRequest, PolicyViolation
from proxy.core.models import Estimate
from proxy.core.pricing import MainlinePrices, PriceBook
from proxy.core.settings import Allow, Config
from proxy.doors.batches import bound_now
from proxy.doors.responses import ResponsesDoor
from proxy.ledger import codecs
from tests.conftest import team_named, two_teams
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


@pytest.mark.parametrize(
    ("name", "value"),
    [("previous_response_id", 0), ("previous_response_id", 0.0), ("previous_response_id", False),
     ("previous_response_id", ""), ("stream", 0), ("background", 0.0), ("stream", True)],
)  # fmt: skip
def test_what_a_batch_line_may_not_use_is_refused_in_any_value_but_null(
    config: Config, name: str, value: Any
) -> None:
    """`0` equals False in Python: it was let through, and forwarded as given."""
    batch, _ = read(config, line("a", **{name: value}) + b"\n")
    assert len(batch.problems) == 1 and f"'{name}' cannot be used in a batch" in batch.problems[0]


@pytest.mark.parametrize("name", ["previous_response_id", "stream", "background"])
def test_null_is_no_value_and_a_flag_may_be_false(config: Config, name: str) -> None:
    batch, _ = read(config, line("a", **{name: None}) + b"\n")
    assert batch.problems == []
    if name != "previous_response_id":
        batch, _ = read(config, line("a", **{name: False}) + b"\n")
        assert batch.problems == []


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


def test_a_line_without_the_image_tool_is_not_checked_at_create_for_an_image_model(
    config: Config, tmp_path: Path
) -> None:
    # The line makes no image: its upload checked and bounded the mainline model alone, and
    # so does the create, whatever the team's policy or the price book says of the image
    # model it never names (the default one).
    text = {k: v for k, v in body().items() if k not in ("tools", "max_tool_calls")}
    request = {"custom_id": "a", "method": "POST", "url": RESPONSES, "body": text}
    data = json.dumps(request).encode() + b"\n"
    mainline_only = two_teams(tmp_path, "allow:\n  models: [gpt-5.5]\n")
    team = team_named(mainline_only, "strict")
    batch, _ = read(mainline_only, data, "strict")
    assert batch.ok, batch.problems
    [priced] = batch.lines
    assert (priced.n, priced.mainline) == (0, "gpt-5.5")
    priced_at = Estimate(batch.usage, batch.bound_nanos)
    assert bound_now(team, mainline_only, batch.lines, priced_at) == priced_at
    image = config.prices.find(config.default_model)
    assert image is not None
    book = replace(
        config.prices,
        models={**config.prices.models, config.default_model: replace(image, batch_rates=None)},
    )
    closed = replace(config, prices=book)
    batch, _ = read(closed, data)
    assert batch.ok, batch.problems
    priced_at = Estimate(batch.usage, batch.bound_nanos)
    assert bound_now(team_named(closed), closed, batch.lines, priced_at) == priced_at


def test_a_tools_field_allow_params_refuses_since_the_upload_refuses_its_batch(
    config: Config,
) -> None:
    """The image tool's fields are kept with the line: a reload that narrows the tool's
    `output_format` (or leaves `input_fidelity` out of reach of an edit) refuses it at create."""
    tool = {**TOOL, "output_format": "webp"}
    batch, _ = read(config, line("a") + b"\n" + line("b", tools=[tool]) + b"\n")
    assert batch.ok, batch.problems
    priced_at = Estimate(batch.usage, batch.bound_nanos)
    team = team_named(config)
    assert bound_now(team, config, batch.lines, priced_at) == priced_at
    png_only = replace(team, allow=Allow(params={"output_format": frozenset({"png"})}))
    with pytest.raises(PolicyViolation) as refused:
        bound_now(png_only, config, batch.lines, priced_at)
    assert refused.value.message.splitlines()[1:] == [
        "line 2: Team design may not send output_format=webp (allow.params.output_format: png)."
    ]


def test_at_create_a_raised_rate_keeps_the_prompt_cache_writes_premium(config: Config) -> None:
    """The file's bounded usage is stored without the tokens it counts as written to the
    prompt cache (the ledger keeps no such column): checked again at create, its mainline
    part was priced at the input rate alone, below what the lines may bill once a rate
    was raised, and the lines were then capped at the reservation."""
    entry = config.prices.mainline["gpt-5.5"]
    assert entry.batch_rates is not None
    writes = replace(
        entry, rates={**entry.rates, "cache_write_input": entry.rates["text_input"] * 5 / 4}
    )
    billing = replace(config, prices=mainline_entry(config, writes))
    batch, _ = read(billing, line("a") + b"\n" + line("b") + b"\n")
    stored = codecs.usage_of(codecs.usage_values(batch.usage))  # as the ledger reads it back
    priced_at = Estimate(stored, batch.bound_nanos)
    same = bound_now(team_named(billing), billing, batch.lines, priced_at)
    assert same.cost_nanos == priced_at.cost_nanos
    dearer = replace(writes, batch_rates={k: v * 2 for k, v in entry.batch_rates.items()})
    raised = replace(config, prices=mainline_entry(config, dearer))
    fresh, _ = read(raised, line("a") + b"\n" + line("b") + b"\n")
    again = bound_now(team_named(raised), raised, batch.lines, priced_at)
    # What the file is bounded at now (each line rounded up on its own: a few nanos more).
    assert fresh.bound_nanos - 10 <= again.cost_nanos <= fresh.bound_nanos


def mainline_entry(config: Config, entry: MainlinePrices) -> PriceBook:
    return replace(config.prices, mainline={**config.prices.mainline, entry.name: entry})
