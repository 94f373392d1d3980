"""The Batch API door end to end through the official openai client: each billed line at
batch rates, bad files refused before upload, a batch reserved whole or refused.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.batches_e2e import (
    EDITS,
    GENERATIONS,
    KEYS,
    LOW,
    TIGHT_LIMIT_USD,
    arrivals,
    batch_rows,
    calm,
    check_settled,
    cli,
    create,
    data_url,
    ended,
    generations,
    jsonl,
    line,
    png_bytes,
    proxy,
    reserved_total,
    settled_spend,
    upload,
    upstream_files,
)
from tests.conftest import DESIGN_KEY, RESEARCH_KEY, Simulator, Tollgate, nanos

__all__ = ["calm", "proxy"]  # the shared fixtures


# -- 1. exact cost, per billed line, at batch rates ------------------------------------


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-1.5", "gpt-image-1-mini"])
def test_a_generations_batch_settles_one_row_per_line_at_batch_rates(
    proxy: Tollgate, simulator: Simulator, model: str
) -> None:
    sdk = proxy.client()
    uploaded = sdk.files.with_raw_response.create(
        file=("in.jsonl", jsonl(generations(model, 4))), purpose="batch"
    )
    assert uploaded.headers["x-tollgate-team"] == "design"
    file = uploaded.parse()
    raw = sdk.batches.with_raw_response.create(
        input_file_id=file.id, endpoint=GENERATIONS, completion_window="24h"
    )
    created = raw.parse()
    [stored] = proxy.query(f"SELECT * FROM stored_objects WHERE id = '{file.id}'")
    assert nanos(raw.headers["x-tollgate-reserved-usd"]) == stored["bound_nanos"] > 0
    batch = ended(sdk, created.id)
    assert batch.status == "completed"
    rows = check_settled(proxy, simulator, batch, model)
    assert len(rows) == 4
    assert sum(r["n"] for r in rows) == 6
    assert sum(r["cost_nanos"] for r in rows) <= stored["bound_nanos"]
    assert reserved_total(proxy) == 0


def test_long_custom_ids_find_their_lines_in_the_output_file(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A custom_id is how an output line names its line. One that JSON writes in more than
    1,024 bytes (200 CJK characters escaped, or a long URL) was emptied with the images
    when the output file was read, so every line was settled as an unknown one: the
    dearest line's bound, flagged, under another line's id."""
    names = ["k" * 1100 + "-1", "短" * 200, "🙂" * 4096]
    lines = [
        line(name, {"model": "gpt-image-2", "prompt": "a lighthouse", **LOW, "n": 1 + i})
        for i, name in enumerate(names)
    ]
    sdk = proxy.client()
    batch = ended(sdk, create(sdk, lines).id)
    rows = check_settled(proxy, simulator, batch, "gpt-image-2")
    assert sorted(r["custom_id"] for r in rows) == sorted(names)
    assert [r["n"] for r in sorted(rows, key=lambda r: names.index(r["custom_id"]))] == [1, 2, 3]


def test_a_retried_create_gets_the_first_batch_and_never_a_second(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """An SDK retry of `POST /v1/batches` (its first timed out, say) is answered with the
    batch the first created: one batch runs, one reservation, the retry a $0 replay."""
    sdk = proxy.client()
    file = upload(sdk, generations("gpt-image-2", 2))
    asked = {"input_file_id": file.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    before = arrivals(simulator, "POST", "/v1/batches")
    headers = {"authorization": f"Bearer {DESIGN_KEY}"}
    first = httpx.post(
        f"{proxy.url}/v1/batches", json=asked, headers={**headers, "x-stainless-retry-count": "0"}
    )
    retry = httpx.post(
        f"{proxy.url}/v1/batches", json=asked, headers={**headers, "x-stainless-retry-count": "1"}
    )
    assert first.status_code == retry.status_code == 200, retry.text
    assert retry.json()["id"] == first.json()["id"]
    assert retry.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
    assert retry.headers["x-tollgate-cost-usd"] == "0"
    assert arrivals(simulator, "POST", "/v1/batches") == before + 1
    replay = proxy.row(retry.headers["x-tollgate-request-id"])
    assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0)
    batch = ended(sdk, first.json()["id"])
    assert len(check_settled(proxy, simulator, batch, "gpt-image-2")) == 2
    assert reserved_total(proxy) == 0


def test_an_edits_batch_names_a_vision_file_of_the_team_and_a_data_url(
    proxy: Tollgate, simulator: Simulator
) -> None:
    sdk = proxy.client()
    reference = sdk.files.create(file=("cat.png", png_bytes()), purpose="vision")
    assert reference.id in upstream_files(simulator)
    body = {"model": "gpt-image-1.5", "prompt": "make it blue", **LOW}
    lines = [
        line("by-file", {**body, "images": [{"file_id": reference.id}]}, EDITS),
        line("by-url", {**body, "images": [{"image_url": data_url()}]}, EDITS),
        line("both", {**body, "images": [{"file_id": reference.id}, {"image_url": data_url()}]},
             EDITS),
    ]  # fmt: skip
    batch = ended(sdk, create(sdk, lines, EDITS).id)
    assert batch.status == "completed"
    rows = check_settled(proxy, simulator, batch, "gpt-image-1.5")
    by_id = {r["custom_id"]: r for r in rows}
    assert by_id["both"]["image_input_tokens"] > by_id["by-url"]["image_input_tokens"] > 0
    assert reserved_total(proxy) == 0


# -- 2. a file with a bad line never reaches the upstream --------------------------------


def refused_upload(
    proxy: Tollgate, simulator: Simulator, key: str, lines: list[dict[str, Any]] | list[str]
) -> openai.APIStatusError:
    """The error Tollgate answered to uploading `lines`, having forwarded nothing."""
    before, files = arrivals(simulator, "POST", "/v1/files"), upstream_files(simulator)
    with pytest.raises(openai.APIStatusError) as caught:
        upload(proxy.client(key), lines)
    assert arrivals(simulator, "POST", "/v1/files") == before
    assert upstream_files(simulator) == files
    return caught.value


def test_a_file_with_bad_lines_is_refused_with_every_bad_line_before_upload(
    proxy: Tollgate, simulator: Simulator
) -> None:
    good = generations("gpt-image-2", 1)[0]
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(line("size", {"model": "gpt-image-2", "prompt": "x", "size": "1000x1000"})),
        json.dumps(line("no-prompt", {"model": "gpt-image-2", **LOW})),
        json.dumps(line("sunburst-2.6", {"model": "gpt-image-2.6-sunburst", "prompt": "x", **LOW})),
        json.dumps(line("unpriced", {"model": "gpt-image-9", "prompt": "x"})),
        json.dumps(line("edit", {"model": "gpt-image-2", "prompt": "x"}, EDITS)),
        json.dumps(line("stream", {"model": "gpt-image-2", "prompt": "x", "stream": True})),
        json.dumps({**good, "custom_id": good["custom_id"]}),
    ]
    error = refused_upload(proxy, simulator, DESIGN_KEY, lines)
    assert isinstance(error, openai.BadRequestError)
    assert error.status_code == 400 and error.param == "file"  # type: ignore[attr-defined]
    message = error.message
    assert "8 problem(s)" in message, message
    reasons = {
        2: "",
        3: "size",
        4: "prompt",
        5: "not accepted by the Batch API",
        6: "gpt-image-9",
        7: "one endpoint",
        8: "stream",
        9: "used by an earlier line",
    }
    listed = [x for x in message.splitlines() if x.startswith("line ")]
    assert [int(x.split(":")[0].removeprefix("line ")) for x in listed] == list(reasons)
    for text, (number, reason) in zip(listed, reasons.items(), strict=True):
        assert text.startswith(f"line {number}: ") and reason in text, text
    assert "line 1:" not in message


def test_lines_beyond_the_teams_allow_policy_are_refused_by_line(
    proxy: Tollgate, simulator: Simulator
) -> None:
    lines = [
        line("fine", {"model": "gpt-image-2", "prompt": "a", **LOW}),
        line("high", {"model": "gpt-image-2", "prompt": "b", **LOW, "quality": "high"}),
        line("other-model", {"model": "gpt-image-1.5", "prompt": "c", **LOW}),
        line("fine-too", {"model": "gpt-image-2", "prompt": "d", **LOW}),
    ]
    error = refused_upload(proxy, simulator, KEYS["strict"], lines)
    listed = [x for x in error.message.splitlines() if x.startswith("line ")]
    assert [x.split(":")[0] for x in listed] == ["line 2", "line 3"], error.message
    assert "quality" in listed[0] and "strict" in listed[0]
    assert "gpt-image-1.5" in listed[1]
    allowed = upload(proxy.client(KEYS["strict"]), [lines[0], lines[3]])
    assert allowed.id in upstream_files(simulator)


def test_a_team_without_the_batches_endpoint_cannot_upload_a_batch_file(
    proxy: Tollgate, simulator: Simulator
) -> None:
    error = refused_upload(proxy, simulator, KEYS["closed"], generations("gpt-image-2", 1))
    assert isinstance(error, openai.PermissionDeniedError)
    assert error.code == "policy_violation" and "batches" in error.message


def test_a_line_naming_another_teams_file_is_refused(proxy: Tollgate, simulator: Simulator) -> None:
    theirs = proxy.client(RESEARCH_KEY).files.create(file=("a.png", png_bytes()), purpose="vision")
    mine = proxy.client().files.create(file=("b.png", png_bytes()), purpose="vision")
    body = {"model": "gpt-image-2", "prompt": "make it blue", **LOW}
    lines = [
        line("mine", {**body, "images": [{"file_id": mine.id}]}, EDITS),
        line("theirs", {**body, "images": [{"file_id": theirs.id}]}, EDITS),
        line("unknown", {**body, "images": [{"file_id": "file-doesnotexist000000"}]}, EDITS),
    ]
    error = refused_upload(proxy, simulator, DESIGN_KEY, lines)
    assert isinstance(error, openai.BadRequestError)
    listed = [x for x in error.message.splitlines() if x.startswith("line ")]
    assert [x.split(":")[0] for x in listed] == ["line 2", "line 3"], error.message
    assert theirs.id in listed[0] and "file-doesnotexist000000" in listed[1]


# -- 3. a batch is reserved whole, or refused --------------------------------------------


def team_budget(proxy: Tollgate, name: str) -> dict[str, Any]:
    found = json.loads(cli(proxy, "budgets", "--format", "json").stdout)["budgets"]
    [budget] = [b for b in found if b["team"] == name and b["metric"] == "usd"]
    return budget  # type: ignore[no-any-return]


def test_a_batch_over_the_budget_is_refused_and_one_that_fits_reserves_its_bound(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """`tight` may spend $0.10 a month: 40 low lines ($0.003 each at batch rates) do not
    fit; 20 do, and leave no room for a medium image ($0.053 at the Images API's rates)."""
    sdk = proxy.client(KEYS["tight"])
    too_big = upload(sdk, generations("gpt-image-2", 40, n=1))
    before = arrivals(simulator, "POST", "/v1/batches")
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.batches.create(input_file_id=too_big.id, endpoint=GENERATIONS, completion_window="24h")
    error = caught.value
    assert (error.code, error.type) == ("budget_exceeded", "insufficient_quota")
    assert "tight" in error.message and "month" in error.message, error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert arrivals(simulator, "POST", "/v1/batches") == before
    assert reserved_total(proxy) == 0

    simulator.configure(batch_delay_ms=20_000)  # its lines run from 2 s, one each 0.8 s
    fits = upload(sdk, generations("gpt-image-2", 20, n=1))
    [stored] = proxy.query(f"SELECT * FROM stored_objects WHERE id = '{fits.id}'")
    raw = sdk.batches.with_raw_response.create(
        input_file_id=fits.id, endpoint=GENERATIONS, completion_window="24h"
    )
    created = raw.parse()
    bound = nanos(raw.headers["x-tollgate-reserved-usd"])
    assert bound == stored["bound_nanos"]
    limit = int(TIGHT_LIMIT_USD * 10**9)
    assert nanos(raw.headers["x-tollgate-budget-remaining-usd"]) == limit - bound
    budget = team_budget(proxy, "tight")  # `tollgate budgets` while it runs
    assert nanos(budget["reserved"]) == bound and nanos(budget["spent"]) == 0
    [held] = batch_rows(proxy, created.id)
    assert (held["state"], held["held"], held["estimated_nanos"]) == ("reserved", 1, bound)

    medium = {"model": "gpt-image-2", "quality": "medium", "size": "1024x1024"}
    images_before = arrivals(simulator, "POST", "/v1/images/generations")
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.images.generate(prompt="a lighthouse", **medium)  # type: ignore[arg-type]
    assert caught.value.code == "budget_exceeded"
    assert arrivals(simulator, "POST", "/v1/images/generations") == images_before

    assert sdk.batches.cancel(created.id).status == "cancelling"
    batch = ended(sdk, created.id)
    assert batch.status == "cancelled"
    spent = settled_spend(proxy, simulator, batch, "gpt-image-2", "tight")
    assert spent < limit // 2  # few lines, if any, ran before the cancel
    assert reserved_total(proxy) == 0
    assert nanos(team_budget(proxy, "tight")["reserved"]) == 0
    image = sdk.images.with_raw_response.generate(prompt="a lighthouse", **medium)  # type: ignore[arg-type]
    assert nanos(image.headers["x-tollgate-cost-usd"]) > 0  # the room is back
