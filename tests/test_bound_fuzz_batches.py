"""Generated batch input files: each line's bound at the Batch API's rates (what Tollgate
reserves for it) is never below what the simulated Batch API bills for the line as
Tollgate forwards it (the file written out again from its parse), at the batch rate."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from proxy.core.settings import Config
from proxy.doors.batches import BatchFile
from proxy.simulator.batch_lines import read_input, run_line
from tests.bound_oracle import build_config, examples, image_billed, team_with
from tests.test_bound_fuzz_images import options, prompts, references

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
URLS = {"generations": "/v1/images/generations", "edits": "/v1/images/edits"}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return build_config(tmp_path_factory.mktemp("bound-batches"))


@st.composite
def line_bodies(draw: st.DrawFn, endpoint: str) -> dict[str, Any]:
    body = {**draw(options(stream_allowed=False)), "prompt": draw(prompts)}
    if endpoint == "edits":
        body["images"] = draw(st.lists(references, min_size=1, max_size=4))
        fidelity = draw(st.sampled_from((None, "low", "high")))
        if fidelity:
            body["input_fidelity"] = fidelity
    return body


@st.composite
def files(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    """An endpoint and 1-2 line bodies of one model (a batch has one)."""
    endpoint = draw(st.sampled_from(tuple(URLS)))
    first = draw(line_bodies(endpoint))
    rest = draw(st.lists(line_bodies(endpoint), max_size=1))
    model = first.get("model")
    same = [{**b, **({"model": model} if model else {})} for b in rest]
    if not model:
        same = [{k: v for k, v in b.items() if k != "model"} for b in same]
    return endpoint, [first, *same]


@given(file=files())
@examples(60)
def test_a_batch_line_never_bills_above_its_bound(
    config: Config, file: tuple[str, list[dict[str, Any]]]
) -> None:
    endpoint, bodies = file
    url = URLS[endpoint]
    text = "".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}) + "\n"
        for i, body in enumerate(bodies)
    ).encode()
    batch = BatchFile(team_with(config, None), config)
    forwarded = batch.feed(text) + batch.finish()
    if not batch.ok:
        event("Tollgate refused the file")
        return
    read = read_input(forwarded, url)
    if isinstance(read, list):
        event("the simulated Batch API refused the file")
        return
    bounds = {line.custom_id: line.bound_nanos for line in batch.lines}
    billed_lines = 0
    for line in read.lines:
        result = run_line(line)
        if result.order is None or result.tokens is None:
            continue
        billed_lines += 1
        billed = image_billed(result.order, result.tokens, config.prices, batch=True)
        bound = bounds[line.custom_id]
        assert billed.nanos <= bound, (
            f"bound {bound} < billed {billed.nanos} (sim {billed.sim_nanos}, book "
            f"{billed.book_nanos}) for line {line.custom_id} of {forwarded[:800]!r}: "
            f"{billed.detail}"
        )
    event(f"lines billed: {min(billed_lines, 2)}")


@pytest.mark.parametrize("model", ["gpt-image-1.5", "gpt-image-2", "gpt-image-1-mini"])
def test_a_batch_edit_line_of_ten_images_never_bills_above_its_bound(
    config: Config, model: str
) -> None:
    """Ten images from four reference images and a long prompt, at the cheapest quality:
    the input, which the simulated Batch API bills for each image, dwarfs the output."""
    body = {"model": model, "prompt": "keep the fox, " * 500, "n": 10, "quality": "low"}
    body |= {"size": "1024x1024", "images": [{"image_url": "https://example.com/a.png"}] * 4}
    if model == "gpt-image-1.5":
        body["input_fidelity"] = "high"
    line = {"custom_id": "r0", "method": "POST", "url": URLS["edits"], "body": body}
    batch = BatchFile(team_with(config, None), config)
    forwarded = batch.feed(json.dumps(line).encode() + b"\n") + batch.finish()
    assert batch.ok
    read = read_input(forwarded, URLS["edits"])
    assert not isinstance(read, list)
    (ran,) = (run_line(line) for line in read.lines)
    assert ran.order is not None and ran.tokens is not None
    billed = image_billed(ran.order, ran.tokens, config.prices, batch=True)
    (bound,) = (line.bound_nanos for line in batch.lines)
    assert billed.nanos <= bound, f"bound {bound} < billed {billed.nanos}: {billed.detail}"
