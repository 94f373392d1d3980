"""Generated Responses API requests with the image_generation tool: the bound Tollgate
reserves for the body it forwards (its caps written in, each downgrade included) is never
below what the simulated upstream bills for it, mainline tokens and the tool's together,
priced at the simulator's rates and at Tollgate's price book; and so for each response of
a chain continued by `previous_response_id`, with the context Tollgate carries.

The simulator makes as many image calls as a `[[images:N]]` marker in the last user text
asks (at most 4 and `max_tool_calls`), so the generated texts carry such markers.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.core.errors import RequestError
from proxy.core.settings import Config, Team
from proxy.simulator.catalogue import MAINLINE_MODELS
from proxy.simulator.response_tokens import tokens_of
from proxy.simulator.responses import read_order
from tests.bound_oracle import (
    POLICIES,
    RESPONSES,
    build_config,
    examples,
    responses_bill,
    team_with,
)
from tests.test_bound_fuzz_images import picture, quality_for, size_for

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
IMAGE_MODELS = (
    "gpt-image-2.6-sunburst", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2", "gpt-image-1.5", "chatgpt-image-latest", "gpt-image-1", "gpt-image-1-mini",
)  # fmt: skip
# The simulator's mainline models: every one the price book lists (with a deployment's
# entries for those the built-in book lacks: `bound_oracle.DEPLOYMENT_MAINLINE`).
MAINLINES = tuple(MAINLINE_MODELS)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return build_config(tmp_path_factory.mktemp("bound-responses"))


words = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"),
    min_size=0,
    max_size=200,
) | st.sampled_from(("", "x" * 3000, "🦊" * 500))
markers = st.sampled_from(("", "[[images:0]]", "[[images:1]]", "[[images:2]]", "[[images:4]]"))


@st.composite
def user_texts(draw: st.DrawFn) -> str:
    return draw(words) + draw(markers) + draw(st.sampled_from(("", " [[fault:failed]]")))


@st.composite
def images(draw: st.DrawFn) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "input_image"}
    kind = draw(st.sampled_from(("data", "url", "file")))
    if kind == "data":
        side = draw(st.sampled_from((1, 64, 512, 1024, 2048)))
        other = draw(st.sampled_from((1, 64, 512, 1024, 2048)))
        encoded = base64.b64encode(picture(side, other, "PNG")).decode()
        part["image_url"] = f"data:image/png;base64,{encoded}"
    elif kind == "url":
        part["image_url"] = "https://example.com/a.png"
    else:
        part["file_id"] = "file-abc"
    detail = draw(st.sampled_from((None, "low", "high", "auto", "original")))
    if detail:
        part["detail"] = detail
    return part


@st.composite
def inputs(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(user_texts())
    items = []
    for _ in range(draw(st.integers(1, 4))):
        role = draw(st.sampled_from(("user", "user", "system", "developer", "assistant")))
        parts: list[dict[str, Any]] = [
            {"type": "input_text", "text": draw(user_texts())}
            for _ in range(draw(st.integers(0, 2)))
        ]
        if role == "user":
            parts += [draw(images()) for _ in range(draw(st.integers(0, 3)))]
        if not parts or (draw(st.booleans()) and len(parts) == 1 and "text" in parts[0]):
            items.append({"role": role, "content": parts[0]["text"] if parts else draw(words)})
        else:
            items.append({"role": role, "content": parts})
    return items


@st.composite
def tools(draw: st.DrawFn) -> dict[str, Any]:
    tool: dict[str, Any] = {"type": "image_generation"}
    model = draw(st.sampled_from(IMAGE_MODELS))
    picks: dict[str, st.SearchStrategy[Any]] = {
        "model": st.just(model),
        "quality": quality_for(model),
        "size": size_for(model),
        "partial_images": st.integers(0, 3),
        "input_fidelity": st.sampled_from(("high", "low")),
        "output_format": st.sampled_from(("webp", "jpeg")),
        "output_compression": st.integers(0, 100),
        "background": st.sampled_from(("transparent", "opaque", "auto")),
        "moderation": st.sampled_from(("auto", "low")),
        "action": st.sampled_from(("generate", "edit", "auto")),
        "input_image_mask": st.just({"image_url": "https://example.com/m.png"}),
    }
    for name, strategy in picks.items():
        if draw(st.integers(0, 2)):
            tool[name] = draw(strategy)
    if model.startswith("gpt-image-2") and "input_fidelity" in tool and draw(st.booleans()):
        del tool["input_fidelity"]
    return tool


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(MAINLINES)), "input": draw(inputs())}
    if draw(st.integers(0, 4)):
        body["tools"] = [draw(tools())]
    optional: dict[str, st.SearchStrategy[Any]] = {
        "instructions": words,
        "max_output_tokens": st.integers(16, 200) | st.integers(16, 300_000),
        "max_tool_calls": st.integers(1, 10),
        "tool_choice": st.sampled_from(("auto", "none", "required"))
        | st.just({"type": "image_generation"}),
        "stream": st.booleans(),
        "reasoning": st.sampled_from(("minimal", "low", "medium", "high")).map(
            lambda e: {"effort": e}
        ),
        "service_tier": st.sampled_from(("auto", "default", "flex")),
        "store": st.just(True),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


def forwarded(config: Config, team: Team, body: dict[str, Any], carried: tuple[int, int]) -> Any:
    """Every (fields forwarded, bound) Tollgate may send `body` as, `carried` the tokens and
    images of the response it continues; None when Tollgate refuses it."""
    from proxy.core.budgets import variants

    try:
        parsed = RESPONSES.parse("application/json", json.dumps(body).encode(), config, team)
        if carried != (0, 0):
            parsed = RESPONSES.carry(parsed, *carried)
        start = RESPONSES.admit(team, parsed, config)
    except RequestError:
        return None
    out = []
    for variant in variants(start, team, config.prices):
        data, _ = RESPONSES.encode(parsed, variant)
        bound = RESPONSES.bound(parsed, variant)
        out.append((json.loads(data), bound, ",".join(str(c) for c in variant.changes)))
    return out


def check(
    config: Config,
    team: Team,
    body: dict[str, Any],
    carried: tuple[int, int] = (0, 0),
    carried_sim: int = 0,
) -> int:
    """Assert every forwarded form's bound covers the simulator's bill; how many it took."""
    forms = forwarded(config, team, body, carried)
    accepted = 0
    for fields, bound, changes in forms or ():
        found = responses_bill(fields, config.prices, carried_sim)
        if found is None:
            continue
        billed, _ = found
        accepted += 1
        assert billed.nanos <= bound.cost_nanos, (
            f"bound {bound.cost_nanos} < billed {billed.nanos} (sim {billed.sim_nanos}, book "
            f"{billed.book_nanos}) for {json.dumps(fields)[:800]} [{changes}]: {billed.detail}; "
            f"reserved {bound.usage}"
        )
    return accepted


@given(body=bodies(), policy=POLICIES)
@examples(150)
def test_a_response_never_bills_above_its_bound(
    config: Config, body: dict[str, Any], policy: Any
) -> None:
    accepted = check(config, team_with(config, *policy), body)
    event(f"forms the simulator accepted: {min(accepted, 2)}")


@pytest.fixture(scope="module")
def regional(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return build_config(tmp_path_factory.mktemp("bound-regional"), "https://eu.api.openai.com/v1")


@given(body=bodies(), policy=POLICIES)
@examples(100)
def test_a_response_to_a_data_residency_endpoint_never_bills_above_its_bound(
    regional: Config, body: dict[str, Any], policy: Any
) -> None:
    """Its mainline and image models each at 110 % or not, by their own release dates."""
    assert regional.upstream.data_residency
    check(regional, team_with(regional, *policy), body)


@given(chain=st.lists(bodies(), min_size=2, max_size=4))
@examples(40)
def test_each_response_of_a_chain_never_bills_above_its_bound(
    config: Config, chain: list[dict[str, Any]]
) -> None:
    """Each continues the one before: Tollgate carries the previous response's mainline
    input and output tokens (as its ledger row settles them) and its images; the simulator
    bills those tokens again as input."""
    team = team_with(config, None)
    tokens = images_seen = sim_carried = 0
    for index, body in enumerate(chain):
        if index:
            body = {**body, "previous_response_id": "resp_previous"}
        # What Tollgate forwards as asked (its caps written in) is what ran upstream.
        forms = forwarded(config, team, body, (tokens, images_seen))
        if not forms:
            event(f"chain stopped at {index}")
            return
        check(config, team, body, (tokens, images_seen), sim_carried)
        fields = forms[0][0]
        try:
            order = read_order(fields)
        except Exception:
            event(f"chain stopped upstream at {index}")
            return
        ran = tokens_of(order, sim_carried)
        own_images = len(order.images) + (1 if _mask(fields) else 0)
        # The ledger row of the response: its settled mainline tokens, its images made,
        # and the images its own context carried.
        images_seen = images_seen + own_images + order.image_calls
        tokens = ran.mainline.input + ran.mainline.output
        sim_carried = tokens
    event(f"chain of {len(chain)}")


def _mask(fields: dict[str, Any]) -> bool:
    return any(t.get("input_image_mask") for t in fields.get("tools", []))


@pytest.mark.parametrize("model", ["gpt-5.5", "gpt-5.4"])
@pytest.mark.parametrize("continued", [False, True])
def test_a_long_context_response_never_bills_above_its_bound(
    config: Config, model: str, continued: bool
) -> None:
    """Past 272,000 input tokens the whole response is billed at the long-context rates:
    by its own text, or by the context it continues."""
    body: dict[str, Any] = {"model": model, "input": "a fox [[images:2]]"}
    body |= {"tools": [{"type": "image_generation"}], "max_output_tokens": 1000}
    body |= {"max_tool_calls": 2, "instructions": "" if continued else "x" * (4 * 272_000 + 8)}
    carried = (280_000, 3) if continued else (0, 0)
    if continued:
        body["previous_response_id"] = "resp_previous"
    assert check(config, team_with(config, None), body, carried, carried[0]) >= 1
    billed = responses_bill(forwarded(config, team_with(config, None), body, carried)[0][0],
                            config.prices, carried[0])  # fmt: skip
    assert billed is not None and billed[1].input > 272_000


@given(
    body=bodies(),
    fallback=st.sampled_from(("dall-e-3", "dall-e-2", "gpt-image-2", "gpt-image-1-mini")),
)
@examples(60)
def test_a_downgrade_of_the_image_tool_the_upstream_would_refuse_is_never_sent(
    config: Config, body: dict[str, Any], fallback: str
) -> None:
    """Every form of a body the simulator accepts as asked is accepted too: the tool was
    sent falling back to DALL·E (which it does not take), to gpt-image-2 with the
    `input_fidelity` that model refuses, and to gpt-image-1-mini at `high`."""
    forms = forwarded(config, team_with(config, fallback), body, (0, 0))
    if not forms or responses_bill(forms[0][0], config.prices) is None:
        return
    for fields, _, changes in forms[1:]:
        assert responses_bill(fields, config.prices) is not None, changes


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-1.5", "gpt-image-2.6-flare"])
def test_a_chain_of_edits_in_one_response_never_bills_above_its_bound(
    config: Config, model: str
) -> None:
    """Four calls of the tool in one response, the cheapest image each: every call after
    the first is also given the images the calls before it made (1 + 2 + 3 of them), which
    the request's own context (no image at all) does not bound."""
    tool = {"type": "image_generation", "model": model, "quality": "low", "size": "1024x1024"}
    if model == "gpt-image-1.5":
        tool["input_fidelity"] = "high"
    body = {"model": "gpt-5.4-nano", "input": "a fox, then give it a hat [[images:4]]"}
    body |= {"tools": [tool], "max_output_tokens": 16, "max_tool_calls": 4}
    assert check(config, team_with(config, None), body) >= 1
    made = tokens_of(read_order(body)).image_gen.image_input
    assert made == (1 + 2 + 3) * (65 + 129 + 4160)  # 1024x1024 (one tile), high fidelity
