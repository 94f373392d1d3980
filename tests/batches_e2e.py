"""What the Batch API end-to-end tests share: the oracle, the teams, batch files, and
the waits with deadlines.

Every line's cost is checked against an oracle that does not use Tollgate's meter: the
usage the simulator billed for that line (its billing record, with the batch id and the
line's `custom_id`), and the `usage` of the line in the output file, priced at the price
book's `batch:` rates by plain decimal arithmetic (USD per million tokens, rounded up to
the nano-dollar as a charge is).
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import openai
import pytest
from openai.types import Batch, FileObject
from PIL import Image

from proxy.config.prices import load_price_book
from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
    write_config,
)

BOOK = load_price_book()
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
ENDED = ("completed", "failed", "expired", "cancelled")
DAY = 86_400
KEYS = {name: f"tg_test_{name}_batches_key" for name in ("strict", "tight", "closed")}
T = TypeVar("T")


def team(name: str, body: str = "") -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TIGHT_LIMIT_USD = Decimal("0.10")
TEAMS = {
    "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "research": f"name: research\nkeys:\n  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
    "strict": team("strict", "allow:\n  max_quality: low\n  models: [gpt-image-2]\n"),
    "tight": team(
        "tight",
        f"budgets:\n  - {{period: month, limit_usd: {TIGHT_LIMIT_USD}}}\non_exhausted: reject\n",
    ),
    "closed": team("closed", "allow:\n  endpoints: [generations]\n"),
}
LOW: dict[str, Any] = {"quality": "low", "size": "1024x1024", "output_format": "webp"}


# -- the oracle ----------------------------------------------------------------------


def batch_cost(model: str, tokens: dict[str, int]) -> int:
    """Nano-dollars: `tokens` by kind at `model`'s batch rates (USD per 1M tokens), rounded
    up; a kind the entry gives no rate is priced at the dearest rate of its side."""
    entry = BOOK.find(model)
    assert entry is not None and entry.batch_rates is not None
    rates = {str(k): Decimal(v) for k, v in entry.batch_rates.items()}
    outputs = max(rates[k] for k in ("image_output", "text_output") if k in rates)
    total = Decimal(0)
    for kind, count in tokens.items():
        rate = rates.get(kind, outputs if kind.endswith("output") else None)
        assert rate is not None or count == 0, (model, kind)
        total += count * (rate or 0)
    return math.ceil(total * 1000)  # USD per 1M tokens → nano-dollars per token: × 1000


def record_tokens(record: dict[str, Any]) -> dict[str, int]:
    usage = record["usage"]
    return {k: usage[k] for k in ("text_input", "image_input", "image_output", "text_output")}


def output_tokens(usage: dict[str, Any]) -> dict[str, int]:
    """An output line's Images API `usage`, by kind (all output is image output unless the
    answer details text output)."""
    details = usage["input_tokens_details"]
    out = usage.get("output_tokens_details") or {}
    text_output = out.get("text_tokens", 0)
    return {
        "text_input": details["text_tokens"],
        "image_input": details["image_tokens"],
        "image_output": usage["output_tokens"] - text_output,
        "text_output": text_output,
    }


# -- waiting for conditions -----------------------------------------------------------


def ended(client: openai.OpenAI, batch_id: str) -> Batch:
    """The batch once it has ended, asked through `client`."""

    def done() -> Batch | None:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ENDED else None

    return wait_for(f"batch {batch_id} ended", done)


def batch_rows(proxy: Tollgate, batch_id: str) -> list[dict[str, Any]]:
    return proxy.query(
        f"SELECT * FROM requests WHERE response_id = '{batch_id}' ORDER BY custom_id"
    )


def settled_rows(proxy: Tollgate, batch_id: str) -> list[dict[str, Any]]:
    """The batch's rows once its reservation was settled (one row per billed line)."""

    def settled() -> list[dict[str, Any]] | None:
        rows = batch_rows(proxy, batch_id)
        return rows if rows and all(r["state"] == "settled" for r in rows) else None

    return wait_for(f"the rows of {batch_id} settled", settled)


def billed_lines(simulator: Simulator, batch_id: str) -> dict[str, dict[str, Any]]:
    """The simulator's billing record of the batch's lines, by `custom_id`."""
    return {
        r["custom_id"]: r
        for r in simulator.billing()
        if r.get("batch_id") == batch_id and r["billed"]
    }


def reserved_total(proxy: Tollgate) -> int:
    [found] = proxy.query("SELECT SUM(reserved_nanos) AS v FROM budget_usage")
    return int(found["v"] or 0)


def api_arrivals(simulator: Simulator) -> list[dict[str, Any]]:
    """The requests that reached the simulated API (not its `/_sim/` pages)."""
    found = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"]
    return [a for a in found if a["raw_path"].startswith("/v1/")]


def arrivals(simulator: Simulator, method: str, path: str) -> int:
    return sum(1 for a in api_arrivals(simulator) if (a["method"], a["raw_path"]) == (method, path))


def upstream_files(simulator: Simulator) -> set[str]:
    page = httpx.get(
        f"{simulator.url}/v1/files",
        params={"limit": 10_000},
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
    ).json()
    return {f["id"] for f in page["data"]}


# -- batch files ------------------------------------------------------------------------


def line(custom_id: str, body: dict[str, Any], url: str = GENERATIONS) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]] | list[str]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def upload(client: openai.OpenAI, lines: list[dict[str, Any]] | list[str]) -> FileObject:
    return client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")


def create(
    client: openai.OpenAI, lines: list[dict[str, Any]], endpoint: Any = GENERATIONS
) -> Batch:
    uploaded = upload(client, lines)
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h"
    )


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes()).decode()


def generations(model: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        line(f"{model}-{i:02d}", {"model": model, "prompt": f"a lighthouse, take {i}", **LOW,
                                  "n": 1 + i % 2, **extra})
        for i in range(count)
    ]  # fmt: skip


def check_settled(
    proxy: Tollgate,
    simulator: Simulator,
    batch: Batch,
    model: str,
    team_name: str = "design",
    reader: openai.OpenAI | None = None,
) -> list[dict[str, Any]]:
    """One settled row per billed line, each the oracle's price of that line's usage, booked
    when the batch ended; the reservation released. The output file is read through the
    team's key, or `reader`."""
    rows = settled_rows(proxy, batch.id)
    records = billed_lines(simulator, batch.id)
    assert records, "the simulator billed no line"
    assert sorted(r["custom_id"] for r in rows) == sorted(records)
    end = {
        "completed": batch.completed_at,
        "cancelled": batch.cancelled_at,
        "expired": batch.expired_at,
        "failed": batch.failed_at,
    }[batch.status]
    assert end is not None
    for row in rows:
        record = records[row["custom_id"]]
        assert row["cost_nanos"] == batch_cost(model, record_tokens(record)) > 0
        assert (row["endpoint"], row["model"], row["team"]) == ("batches", model, team_name)
        assert (row["state"], row["flagged"], row["held"], row["reserved_nanos"]) == (
            "settled", 0, 0, 0,
        )  # fmt: skip
        assert row["image_output_tokens"] == record["usage"]["image_output"]
        assert row["started_at"] == end == int(record["time"])  # booked on the batch's end
        assert row["started_at"] // DAY == record["time"] // DAY  # the UTC day OpenAI books
        assert row["upstream_request_id"] == record["id"]
    if batch.output_file_id is not None:
        content = reader or proxy.client(DESIGN_KEY if team_name == "design" else KEYS[team_name])
        text = content.files.content(batch.output_file_id).text
        outputs = [json.loads(x) for x in text.splitlines()]
        by_id = {r["custom_id"]: r for r in rows}
        for out in outputs:
            usage = out["response"]["body"]["usage"]
            assert by_id[out["custom_id"]]["cost_nanos"] == batch_cost(model, output_tokens(usage))
        assert {o["custom_id"] for o in outputs} == set(by_id)
    return rows


def settled_spend(
    proxy: Tollgate, simulator: Simulator, batch: Batch, model: str, team_name: str = "design"
) -> int:
    """What an ended batch was settled at: its billed lines as `check_settled` proves them,
    or, when no line was billed, one row at no cost (the reservation, released)."""
    if billed_lines(simulator, batch.id):
        return sum(
            r["cost_nanos"] for r in check_settled(proxy, simulator, batch, model, team_name)
        )
    [row] = settled_rows(proxy, batch.id)
    assert (row["cost_nanos"], row["custom_id"]) == (0, None)
    assert row["error_code"] == f"batch_{batch.status}"
    return 0


def cli(proxy: Tollgate, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args, "--config", str(proxy.root)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OPENAI_ADMIN_KEY": UPSTREAM_KEY, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode in (0, 1), done.stderr
    return done


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """A Tollgate of the test module's own, in front of the simulator, with `TEAMS` (a
    module imports this fixture, and `calm`, and lists them in its `__all__`)."""
    root = tmp_path_factory.mktemp("batches")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def calm(simulator: Simulator) -> Iterator[None]:
    """Short batches, a day's window, no latency or faults, creates answered at once."""
    knobs = {
        "batch_delay_ms": 400,
        "batch_window_ms": DAY * 1000,
        "batch_read_ms": 0,
        "batch_answer_ms": 0,
        "batch_answer_status": 0,
        "batch_fail_status": 0,
    }
    simulator.configure(latency_ms=0, fault=None, **knobs)
    yield
    simulator.configure(latency_ms=0, fault=None, **knobs)
