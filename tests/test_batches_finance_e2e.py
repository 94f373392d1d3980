"""The Batch API door end to end: reports and reconciliation of batch spend, and a
50,000-line file through a real process.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import httpx

from bench import batch_upload
from tests.batches_e2e import (
    DAY,
    EDITS,
    LOW,
    TEAMS,
    batch_cost,
    calm,
    check_settled,
    cli,
    create,
    ended,
    generations,
    line,
    png_bytes,
    proxy,
)
from tests.conftest import (
    DESIGN_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    nanos,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)

__all__ = ["calm", "proxy"]  # the shared fixtures


# -- 7. reports and reconciliation ----------------------------------------------------------


def test_reports_and_reconcile_show_batch_spend_as_openai_bills_it(tmp_path: Path) -> None:
    """A simulator of its own, so that the Costs export holds only these batches."""
    simulator = start_simulator()
    write_config(tmp_path, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    proxy = start_tollgate(tmp_path)
    try:
        simulator.configure(batch_delay_ms=300)
        sdk = proxy.client()
        reference = sdk.files.create(file=("cat.png", png_bytes()), purpose="vision")
        edit = {"model": "gpt-image-1.5", "prompt": "make it blue", **LOW}
        edits = [
            line(f"edit-{i}", {**edit, "images": [{"file_id": reference.id}]}, EDITS)
            for i in range(3)
        ]
        made = [
            create(sdk, generations("gpt-image-2", 5)),
            create(sdk, edits, EDITS),
            create(sdk, generations("gpt-image-1.5", 2)),
        ]
        batches = [ended(sdk, b.id) for b in made]
        expected: dict[str, int] = {}
        models = ["gpt-image-2", "gpt-image-1.5", "gpt-image-1.5"]
        for batch, model in zip(batches, models, strict=True):
            rows = check_settled(proxy, simulator, batch, model)
            expected[model] = expected.get(model, 0) + sum(r["cost_nanos"] for r in rows)

        report = json.loads(
            cli(proxy, "report", "--by", "endpoint,model", "--format", "json").stdout
        )
        shown = {r["model"]: r for r in report["rows"] if r["endpoint"] == "batches"}
        assert {m: nanos(r["cost_usd"]) for m, r in shown.items()} == expected
        assert shown["gpt-image-2"]["requests"] == 5 and shown["gpt-image-1.5"]["requests"] == 5

        today = int(time.time()) // DAY * DAY
        page = httpx.get(
            f"{simulator.url}/v1/organization/costs",
            params={"start_time": today - DAY, "end_time": today + DAY,
                    "group_by[]": "line_item", "limit": 31},
            headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        ).json()  # fmt: skip
        items = [r for b in page["data"] for r in b["results"]]
        assert items and all(r["line_item"].startswith("batch api | ") for r in items), items
        billed: dict[str, Decimal] = {}
        for item in items:
            model = item["line_item"].removeprefix("batch api | ").rsplit(" ", 1)[0]
            billed[model] = billed.get(model, Decimal(0)) + Decimal(str(item["amount"]["value"]))
        for model, cost in expected.items():  # each row rounded up to the nano-dollar
            assert abs(billed[model] * 10**9 - cost) <= 10, (model, billed[model], cost)
        costs = tmp_path / "costs.json"
        costs.write_text(json.dumps(page))
        done = cli(proxy, "reconcile", "--costs", str(costs), "--format", "json")
        assert done.returncode == 0, done.stdout
        result = json.loads(done.stdout)
        lines = {x["model"]: x for x in result["lines"]}
        assert set(lines) == set(expected)
        for model, cost in expected.items():
            assert lines[model]["status"] == "ok"
            # reconcile shows micro-dollars: the same on both sides
            assert abs(nanos(lines[model]["tollgate_usd"]) - cost) <= 500, lines[model]
            assert Decimal(lines[model]["difference_usd"]) == 0, lines[model]
    finally:
        proxy.stop()
        stop(simulator.process)


# -- 8. a 50,000-line file ---------------------------------------------------------------


def test_a_50000_line_file_is_priced_and_forwarded_through_a_real_process(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """Priced line by line and forwarded whole; its upload time and the process's peak
    resident memory are printed (bench/batch_upload.py measures the same, best of three)."""
    found = batch_upload.measure(proxy.url, DESIGN_KEY, proxy.process.pid, 50_000)
    print(f"\n{batch_upload.report(found)}")
    [stored] = proxy.query(
        "SELECT * FROM stored_objects WHERE kind = 'file' AND purpose = 'batch' "
        "ORDER BY created_at DESC LIMIT 1"
    )
    assert stored["lines"] == 50_000
    [priced] = proxy.query(
        f"SELECT COUNT(*) AS n, SUM(bound_nanos) AS bound FROM batch_lines "
        f"WHERE file_id = '{stored['id']}'"
    )
    assert (priced["n"], priced["bound"]) == (50_000, stored["bound_nanos"])
    assert stored["bound_nanos"] >= 50_000 * batch_cost("gpt-image-2", {"image_output": 196})
    content = httpx.get(
        f"{simulator.url}/v1/files/{stored['id']}/content",
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        timeout=60,
    )
    forwarded = content.content.splitlines()
    assert len(forwarded) == 50_000
    assert json.loads(forwarded[-1])["custom_id"] == "line-49999"
