"""Batches for `/v1/responses` end to end through the official openai client, against real
processes: each line checked and bounded as a direct `POST /v1/responses` is, at batch
rates; the batch reserved whole or refused; each billed line settled as the Responses door
meters a response, at batch rates, equal to what the simulator billed.

The oracle prices the simulator's billing record of each line (the mainline model's
tokens and the image tool's, apart) at the price book's `batch:` rates by plain decimal
arithmetic, each part rounded up to the nano-dollar as a charge is.
"""

from __future__ import annotations

import json
import math
import signal
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.batches_e2e import (
    BOOK,
    DAY,
    KEYS,
    TEAMS,
    arrivals,
    batch_cost,
    batch_rows,
    billed_lines,
    calm,
    cli,
    ended,
    line,
    png_bytes,
    proxy,
    record_tokens,
    reserved_total,
    settled_rows,
    upload,
    upstream_files,
)
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    nanos,
    start_simulator,
    start_tollgate,
    stop,
    wait_for,
    write_config,
)

__all__ = ["calm", "proxy"]  # the shared fixtures

RESPONSES = "/v1/responses"
FLARE_2_6 = "gpt-image-2.6-flare"  # no batch rates in the price book
TOOL = {"type": "image_generation", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}


def body(prompt: str, mainline: str = "gpt-5.5", **extra: Any) -> dict[str, Any]:
    return {
        "model": mainline,
        "input": prompt,
        "tools": [TOOL],
        "max_output_tokens": 2000,
        "max_tool_calls": 2,
        **extra,
    }


def responses_lines(count: int, mainline: str = "gpt-5.5") -> list[dict[str, Any]]:
    marks = ["", " [[images:2]]", " [[images:0]]"]
    return [
        line(f"r-{i:02d}", body(f"a lighthouse, take {i}{marks[i % 3]}", mainline), RESPONSES)
        for i in range(count)
    ]


def mainline_cost(mainline: str, record: dict[str, Any]) -> int:
    """Nano-dollars: a line's mainline tokens at the mainline model's batch rates."""
    entry = BOOK.find_mainline(mainline)
    assert entry is not None and entry.batch_rates is not None
    rates = {k: Decimal(v) for k, v in entry.batch_rates.items()}
    main = record["mainline"]
    total = (
        (main["input"] - main["cached_input"]) * rates["text_input"]
        + main["cached_input"] * rates["cached_text_input"]
        + main["output"] * rates["text_output"]
    )
    return math.ceil(total * 1000)


def check_lines(
    proxy: Tollgate, simulator: Simulator, batch_id: str, mainline: str = "gpt-5.5"
) -> list[dict[str, Any]]:
    """One settled row per billed line, each the oracle's price of what the simulator
    billed for it, booked when the batch ended; the reservation released."""
    rows = settled_rows(proxy, batch_id)
    records = billed_lines(simulator, batch_id)
    assert records and sorted(r["custom_id"] for r in rows) == sorted(records)
    for row in rows:
        record = records[row["custom_id"]]
        assert (record["endpoint"], record["mainline_model"]) == ("responses", mainline)
        main = mainline_cost(mainline, record)
        tool = batch_cost("gpt-image-2", record_tokens(record))
        assert row["cost_nanos"] == main + tool > 0, row["custom_id"]
        assert row["mainline_cost_nanos"] == main
        assert (row["endpoint"], row["model"], row["mainline_model"]) == (
            "batches",
            "gpt-image-2",
            mainline,
        )
        assert (row["state"], row["flagged"], row["held"]) == ("settled", 0, 0)
        assert row["mainline_output_tokens"] == record["mainline"]["output"]
        assert row["image_output_tokens"] == record["usage"]["image_output"]
        assert row["started_at"] == int(record["time"])
    return rows


def test_a_responses_batch_settles_each_line_at_batch_rates_as_the_simulator_bills_it(
    proxy: Tollgate, simulator: Simulator
) -> None:
    sdk = proxy.client()
    file = upload(sdk, responses_lines(6))
    forwarded = [json.loads(x) for x in sdk.files.content(file.id).text.splitlines()]
    assert {x["url"] for x in forwarded} == {RESPONSES}
    first = forwarded[0]["body"]
    assert first["service_tier"] == "default"  # as the direct door sends it
    assert (first["max_output_tokens"], first["tools"][0]["model"]) == (2000, "gpt-image-2")
    raw = sdk.batches.with_raw_response.create(
        input_file_id=file.id, endpoint=RESPONSES, completion_window="24h"
    )
    [stored] = proxy.query(f"SELECT * FROM stored_objects WHERE id = '{file.id}'")
    assert nanos(raw.headers["x-tollgate-reserved-usd"]) == stored["bound_nanos"] > 0
    batch = ended(sdk, raw.parse().id)
    assert (batch.status, batch.endpoint) == ("completed", RESPONSES)
    rows = check_lines(proxy, simulator, batch.id)
    assert len(rows) == 6 and sum(r["n"] for r in rows) == 6 * 2  # max_tool_calls each
    assert sum(r["cost_nanos"] for r in rows) <= stored["bound_nanos"]
    assert reserved_total(proxy) == 0


def test_a_line_without_usage_is_charged_its_bound_and_a_failed_one_what_it_billed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    sdk = proxy.client()
    lines = [
        line("plain", body("a fox"), RESPONSES),
        line("nousage", body("a fox [[fault:nousage]]"), RESPONSES),
        line("failed", body("a fox [[fault:failed]]"), RESPONSES),
    ]
    batch = ended(sdk, sdk.batches.create(
        input_file_id=upload(sdk, lines).id, endpoint=RESPONSES, completion_window="24h"
    ).id)  # fmt: skip
    by_id = {r["custom_id"]: r for r in settled_rows(proxy, batch.id)}
    assert by_id["plain"]["flagged"] == 0
    blind = by_id["nousage"]
    assert blind["flagged"] == 1 and blind["cost_nanos"] == blind["estimated_nanos"] > 0
    assert blind["cost_nanos"] > by_id["plain"]["cost_nanos"]
    failed = by_id["failed"]  # its image calls ran: billed its usage, as directly
    record = billed_lines(simulator, batch.id)["failed"]
    cost = mainline_cost("gpt-5.5", record) + batch_cost("gpt-image-2", record_tokens(record))
    assert (failed["outcome"], failed["error_code"]) == ("upstream_error", "response_failed")
    assert failed["cost_nanos"] == cost > 0 and failed["flagged"] == 0
    assert reserved_total(proxy) == 0


def test_every_line_the_direct_door_or_a_batch_refuses_is_listed_before_upload(
    proxy: Tollgate, simulator: Simulator
) -> None:
    good = line("good", body("a fox"), RESPONSES)
    refused = {
        "stream": body("x", stream=True),
        "background": body("x", background=True),
        "previous_response_id": body("x", previous_response_id="resp_abc"),
        "Unknown parameter: 'colour'": body("x", colour="red"),
        "'conversation'": body("x", conversation="conv_1"),
        "priority": body("x", service_tier="priority"),
        "'web_search'": body("x", tools=[{"type": "web_search"}]),
        "not accepted by the Batch API": body(
            "x", tools=[{**TOOL, "model": "gpt-image-2.6-flare"}]
        ),
        "gpt-9": body("x", mainline="gpt-9"),
    }
    lines = [good] + [line(f"bad-{i}", b, RESPONSES) for i, b in enumerate(refused.values())]
    before, files = arrivals(simulator, "POST", "/v1/files"), upstream_files(simulator)
    with pytest.raises(openai.BadRequestError) as caught:
        upload(proxy.client(), lines)
    assert arrivals(simulator, "POST", "/v1/files") == before
    assert upstream_files(simulator) == files
    listed = [x for x in caught.value.message.splitlines() if x.startswith("line ")]
    assert len(listed) == len(refused), caught.value.message
    for number, (text, reason) in enumerate(zip(listed, refused, strict=True), start=2):
        assert text.startswith(f"line {number}: ") and reason in text, text
    theirs = proxy.client(RESEARCH_KEY).files.create(file=("a.png", png_bytes()), purpose="vision")
    image = {"type": "input_image", "file_id": theirs.id}
    named = body("x", input=[{"role": "user", "content": [image]}])
    with pytest.raises(openai.BadRequestError) as caught:
        upload(proxy.client(), [good, line("theirs", named, RESPONSES)])
    assert f"line 2: no such File object: {theirs.id}" in caught.value.message
    mixed = [good, line("image", {"model": "gpt-image-2", "prompt": "x"})]
    with pytest.raises(openai.BadRequestError, match="one endpoint"):
        upload(proxy.client(), mixed)
    file = upload(proxy.client(), [good])
    with pytest.raises(openai.BadRequestError, match="/v1/responses"):
        proxy.client().batches.create(
            input_file_id=file.id, endpoint="/v1/images/generations", completion_window="24h"
        )


def test_a_responses_batch_whose_bound_does_not_fit_the_budget_is_refused(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """`tight` may spend $0.10 a month: 2 lines of up to 20,000 gpt-5.5 output tokens each
    ($0.30 at batch rates) do not fit, and nothing reaches the upstream."""
    sdk = proxy.client(KEYS["tight"])
    lines = [line(f"long-{i}", body("x", max_output_tokens=20_000), RESPONSES) for i in range(2)]
    file = upload(sdk, lines)
    [stored] = proxy.query(f"SELECT * FROM stored_objects WHERE id = '{file.id}'")
    assert stored["bound_nanos"] > 10**8
    before = arrivals(simulator, "POST", "/v1/batches")
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.batches.create(input_file_id=file.id, endpoint=RESPONSES, completion_window="24h")
    assert (caught.value.code, caught.value.type) == ("budget_exceeded", "insufficient_quota")
    assert arrivals(simulator, "POST", "/v1/batches") == before
    assert reserved_total(proxy) == 0


def test_a_restart_mid_batch_resumes_following_and_settles_it_once(
    simulator: Simulator, tmp_path: Path
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(batch_delay_ms=4000)  # running while Tollgate restarts
    try:
        sdk = first.client()
        file = upload(sdk, responses_lines(4))
        created = sdk.batches.create(
            input_file_id=file.id, endpoint=RESPONSES, completion_window="24h"
        )
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    [held] = batch_rows(first, created.id)
    assert (held["state"], held["held"]) == ("reserved", 1)
    second = start_tollgate(tmp_path)
    try:
        batch = ended(second.client(), created.id)
        assert batch.status == "completed"
        rows = check_lines(second, simulator, batch.id)
        assert len(rows) == 4 and len(batch_rows(second, batch.id)) == 4
        assert reserved_total(second) == 0
    finally:
        second.stop()


def test_reconcile_matches_a_responses_batch_with_the_costs_export(tmp_path: Path) -> None:
    """A simulator of its own, so that the Costs export holds only this batch."""
    simulator = start_simulator()
    write_config(tmp_path, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    tollgate = start_tollgate(tmp_path)
    try:
        simulator.configure(batch_delay_ms=300)
        sdk = tollgate.client(DESIGN_KEY)
        created = sdk.batches.create(
            input_file_id=upload(sdk, responses_lines(3)).id,
            endpoint=RESPONSES,
            completion_window="24h",
        )
        rows = check_lines(tollgate, simulator, ended(sdk, created.id).id)
        today = int(time.time()) // DAY * DAY
        page = httpx.get(
            f"{simulator.url}/v1/organization/costs",
            params={"start_time": today - DAY, "end_time": today + DAY,
                    "group_by[]": "line_item", "limit": 31},
            headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        ).json()  # fmt: skip
        items = [r["line_item"] for b in page["data"] for r in b["results"]]
        assert items and all(i.startswith("batch api | ") for i in items), items
        costs = tmp_path / "costs.json"
        costs.write_text(json.dumps(page))
        done = cli(tollgate, "reconcile", "--costs", str(costs), "--format", "json")
        assert done.returncode == 0, done.stdout
        found = {x["model"]: x for x in json.loads(done.stdout)["lines"]}
        assert set(found) == {"gpt-5.5", "gpt-image-2"}
        expected = {
            "gpt-5.5": sum(r["mainline_cost_nanos"] for r in rows),
            "gpt-image-2": sum(r["cost_nanos"] - r["mainline_cost_nanos"] for r in rows),
        }
        for model, cost in expected.items():
            assert found[model]["status"] == "ok", found[model]
            assert abs(nanos(found[model]["tollgate_usd"]) - cost) <= 500, found[model]
    finally:
        tollgate.stop()
        stop(simulator.process)


def test_both_parts_of_a_responses_batchs_cost_count_as_responses_spend(
    proxy: Tollgate,
) -> None:
    sdk = proxy.client()

    def spend() -> dict[str, float]:
        return {
            part: proxy.metric(
                "tollgate_responses_cost_usd_total", team="design", model=model, part=part
            )
            for part, model in (("mainline", "gpt-5.5"), ("image_tool", "gpt-image-2"))
        }

    before = spend()
    file = upload(sdk, responses_lines(3))
    batch = sdk.batches.create(input_file_id=file.id, endpoint=RESPONSES, completion_window="24h")
    rows = settled_rows(proxy, ended(sdk, batch.id).id)
    mainline = sum(r["mainline_cost_nanos"] for r in rows) / 10**9
    tool = sum(r["cost_nanos"] - r["mainline_cost_nanos"] for r in rows) / 10**9
    assert mainline > 0 and tool > 0
    expected = {"mainline": mainline, "image_tool": tool}

    def counted() -> dict[str, float] | None:
        moved = {part: value - before[part] for part, value in spend().items()}
        return moved if moved == pytest.approx(expected) else None

    wait_for("the batch's Responses spend counted by part", counted)


def test_a_responses_line_that_makes_no_image_is_recorded_under_no_image_model(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """A line without the image tool, or with `tool_choice: none`, runs its mainline model
    alone: its row names no image model (it used to name the default one, gpt-image-2, and
    count there as a request that made no image)."""
    sdk = proxy.client()
    plain = {"model": "gpt-5.5", "input": "a haiku about rain", "max_output_tokens": 400}
    lines = [
        line("no-tool", plain, RESPONSES),
        line("tool-none", {**body("a haiku about snow"), "tool_choice": "none"}, RESPONSES),
    ]
    file = upload(sdk, lines)
    batch = sdk.batches.create(input_file_id=file.id, endpoint=RESPONSES, completion_window="24h")
    rows = {r["custom_id"]: r for r in settled_rows(proxy, ended(sdk, batch.id).id)}
    records = billed_lines(simulator, batch.id)
    assert set(rows) == set(records) == {"no-tool", "tool-none"}
    for custom_id, row in rows.items():
        assert records[custom_id]["images"] == 0
        main = mainline_cost("gpt-5.5", records[custom_id])
        assert row["cost_nanos"] == row["mainline_cost_nanos"] == main > 0, custom_id
        assert (row["model"], row["model_requested"], row["quality"], row["size"]) == (
            (None,) * 4
        ), custom_id
        assert (row["endpoint"], row["mainline_model"], row["flagged"]) == (
            "batches",
            "gpt-5.5",
            0,
        )
