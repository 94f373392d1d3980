"""The Batch API door end to end: the official openai client → Tollgate → the simulator.

Every line's cost is checked against an oracle that does not use Tollgate's meter: the
usage the simulator billed for that line (its billing record, with the batch id and the
line's `custom_id`), and the `usage` of the line in the output file, priced at the price
book's `batch:` rates by plain decimal arithmetic (USD per million tokens, rounded up to
the nano-dollar as a charge is).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from openai.types import Batch, FileObject
from PIL import Image

from bench import batch_upload
from proxy.config.prices import load_price_book
from proxy.core.auth import key_hash
from tests import pg
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    drop_ledger,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)

BOOK = load_price_book()
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
ENDED = ("completed", "failed", "expired", "cancelled")
DEADLINE_S = 60.0
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


def nanos(header: str) -> int:
    return int(Decimal(header) * 10**9)


# -- waiting for conditions -----------------------------------------------------------


def wait_for(what: str, found: Callable[[], T | None], timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


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
    proxy: Tollgate, simulator: Simulator, batch: Batch, model: str, team_name: str = "design"
) -> list[dict[str, Any]]:
    """One settled row per billed line, each the oracle's price of that line's usage, booked
    when the batch ended; the reservation released."""
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
        content = proxy.client(DESIGN_KEY if team_name == "design" else KEYS[team_name])
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


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("batches")
    write_config(root, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def calm(simulator: Simulator) -> Iterator[None]:
    """Short batches, a day's window, no latency or faults."""
    simulator.configure(latency_ms=0, fault=None, batch_delay_ms=400, batch_window_ms=DAY * 1000)
    yield
    simulator.configure(latency_ms=0, fault=None, batch_delay_ms=400, batch_window_ms=DAY * 1000)


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


# -- 4. failed lines, cancelled and expired batches --------------------------------------


def test_lines_that_fail_upstream_are_not_billed(proxy: Tollgate, simulator: Simulator) -> None:
    sdk = proxy.client()
    lines = generations("gpt-image-2", 5)
    for index in (1, 3):
        lines[index]["body"]["prompt"] += " [[fault:500]]"
    batch = ended(sdk, create(sdk, lines).id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 2)
    rows = check_settled(proxy, simulator, batch, "gpt-image-2")
    assert [r["custom_id"] for r in rows] == [lines[i]["custom_id"] for i in (0, 2, 4)]
    assert batch.error_file_id is not None
    errors = [json.loads(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(e["custom_id"] for e in errors) == [lines[i]["custom_id"] for i in (1, 3)]
    assert reserved_total(proxy) == 0


def test_a_batch_cancelled_while_running_is_settled_for_the_lines_that_completed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(batch_delay_ms=6000)  # 12 lines, one each 0.4 s from 0.6 s
    sdk = proxy.client()
    created = create(sdk, generations("gpt-image-1.5", 12))

    def some_done() -> Batch | None:
        batch = sdk.batches.retrieve(created.id)
        counts = batch.request_counts
        return batch if counts is not None and counts.completed >= 3 else None

    wait_for("three lines done", some_done)
    assert sdk.batches.cancel(created.id).status == "cancelling"
    batch = ended(sdk, created.id)
    assert batch.status == "cancelled" and batch.request_counts is not None
    done = batch.request_counts.completed
    assert 3 <= done < 12
    rows = check_settled(proxy, simulator, batch, "gpt-image-1.5")
    assert len(rows) == done
    assert all(r["outcome"] == "ok" for r in rows)
    assert reserved_total(proxy) == 0


def test_an_expired_batch_is_settled_for_the_lines_that_completed(
    proxy: Tollgate, simulator: Simulator
) -> None:
    # 10 lines run from 0.3 s to 2.7 s; the window closes at 1.5 s.
    simulator.configure(batch_delay_ms=3000, batch_window_ms=1500)
    sdk = proxy.client()
    batch = ended(sdk, create(sdk, generations("gpt-image-1-mini", 10)).id)
    assert batch.status == "expired" and batch.request_counts is not None
    done = batch.request_counts.completed
    assert 0 < done < 10 and batch.request_counts.failed == 10 - done
    rows = check_settled(proxy, simulator, batch, "gpt-image-1-mini")
    assert len(rows) == done
    assert batch.error_file_id is not None
    errors = [json.loads(x) for x in sdk.files.content(batch.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert reserved_total(proxy) == 0


# -- 6. a team's own files and batches only ----------------------------------------------


def test_a_batchs_output_file_can_be_read_as_soon_as_the_batch_ended(
    proxy: Tollgate, simulator: Simulator
) -> None:
    """The client sees `completed` before Tollgate's follower does (it polls each second):
    the output file is the batch's team's at once."""
    sdk = proxy.client()
    batch = ended(sdk, create(sdk, generations("gpt-image-2", 2)).id)
    assert batch.output_file_id is not None
    text = sdk.files.content(batch.output_file_id).text
    assert len(text.splitlines()) == 2
    check_settled(proxy, simulator, batch, "gpt-image-2")


def test_teams_cannot_see_each_others_files_and_batches(
    proxy: Tollgate, simulator: Simulator
) -> None:
    simulator.configure(batch_delay_ms=1500)
    design, research = proxy.client(), proxy.client(RESEARCH_KEY)
    mine = [upload(design, generations("gpt-image-2", 1)) for _ in range(3)]
    batches = [
        design.batches.create(input_file_id=f.id, endpoint=GENERATIONS, completion_window="24h")
        for f in mine[:2]
    ]
    theirs = [upload(research, generations("gpt-image-2", 1)) for _ in range(3)]
    their_batch = research.batches.create(
        input_file_id=theirs[0].id, endpoint=GENERATIONS, completion_window="24h"
    )
    finished = [ended(design, b.id) for b in batches]
    ended(research, their_batch.id)
    outputs = [b.output_file_id for b in finished]
    assert all(outputs)
    for batch_id in (*(b.id for b in batches), their_batch.id):
        settled_rows(proxy, batch_id)  # nothing followed: only the attempts may arrive

    attempts: list[tuple[str, Callable[[], Any]]] = [
        (mine[0].id, lambda: research.files.retrieve(mine[0].id)),
        (mine[0].id, lambda: research.files.content(mine[0].id)),
        (mine[1].id, lambda: research.files.delete(mine[1].id)),
        (str(outputs[0]), lambda: research.files.content(str(outputs[0]))),
        (str(outputs[0]), lambda: research.files.retrieve(str(outputs[0]))),
        (batches[0].id, lambda: research.batches.retrieve(batches[0].id)),
        (batches[1].id, lambda: research.batches.cancel(batches[1].id)),
        (mine[2].id, lambda: research.batches.create(
            input_file_id=mine[2].id, endpoint=GENERATIONS, completion_window="24h")),
    ]  # fmt: skip
    for object_id, attempt in attempts:
        count = len(api_arrivals(simulator))
        with pytest.raises(openai.NotFoundError) as caught:
            attempt()
        assert object_id in caught.value.message
        found = api_arrivals(simulator)
        assert len(found) == count, (object_id, found[count:])  # nothing reached the upstream

    # Their own: every one listed (across pages, by the SDK's auto-pagination), no other.
    mine_ids = {f.id for f in mine} | {str(o) for o in outputs}
    theirs_ids = {f.id for f in theirs}
    listed = {f.id for f in design.files.list(limit=2)}
    assert mine_ids <= listed and not listed & theirs_ids
    listed = {f.id for f in research.files.list(limit=2)}
    assert theirs_ids <= listed and not listed & mine_ids
    assert {b.id for b in design.batches.list(limit=1)} >= {b.id for b in batches}
    assert their_batch.id not in {b.id for b in design.batches.list(limit=1)}
    owned = proxy.query("SELECT id FROM stored_objects WHERE kind = 'batch' AND team = 'research'")
    assert {b.id for b in research.batches.list(limit=1)} == {r["id"] for r in owned}
    assert design.files.retrieve(str(outputs[0])).purpose == "batch_output"
    assert design.files.delete(mine[1].id).deleted
    assert design.batches.retrieve(batches[0].id).status == "completed"


# -- 5. a batch outlives the process that created it -------------------------------------


def exactly_once(proxy: Tollgate, simulator: Simulator, batch: Batch, model: str) -> None:
    """The batch settled once: its billed lines' rows, no more, and the counters holding
    exactly their cost and nothing reserved."""
    rows = check_settled(proxy, simulator, batch, model)
    assert len(rows) == len(billed_lines(simulator, batch.id))
    assert len({r["id"] for r in rows}) == len(rows)
    spent = sum(r["cost_nanos"] for r in rows)
    counted = proxy.query(
        "SELECT scope, spent_nanos, reserved_nanos FROM budget_usage WHERE team = 'design' "
        "OR scope = 'organization'"
    )
    assert counted and all((c["spent_nanos"], c["reserved_nanos"]) == (spent, 0) for c in counted)
    everything = proxy.query("SELECT COUNT(*) AS n, SUM(cost_nanos) AS v FROM requests")[0]
    assert (everything["n"], everything["v"]) == (len(rows), spent)


@pytest.mark.parametrize("stop_with", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_a_restart_adopts_a_running_batch_and_settles_it_once(
    simulator: Simulator, tmp_path: Path, stop_with: signal.Signals
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    first = start_tollgate(tmp_path)
    simulator.configure(batch_delay_ms=4000)  # running while Tollgate restarts
    try:
        created = create(first.client(), generations("gpt-image-2", 6))
    finally:
        first.process.send_signal(stop_with)
        first.process.wait(timeout=30)
    [held] = batch_rows(first, created.id)
    assert (held["state"], held["held"]) == ("reserved", 1)  # not ended: still held
    second = start_tollgate(tmp_path)
    try:
        sdk = second.client()
        batch = ended(sdk, created.id)  # still the team's
        assert batch.status == "completed"
        exactly_once(second, simulator, batch, "gpt-image-2")
        assert held["owner"] not in {r["owner"] for r in batch_rows(second, batch.id)}
    finally:
        second.stop()


def test_two_replicas_follow_a_batch_whose_creator_died_and_one_settles_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    shared = pg.migrated_schema()
    write_config(tmp_path, f"{simulator.url}/v1", teams=TEAMS)
    replicas: list[Tollgate] = []
    try:
        creator = start_tollgate(tmp_path, ledger_url=shared)
        simulator.configure(batch_delay_ms=5000)
        try:
            created = create(creator.client(), generations("gpt-image-1.5", 8))
        finally:
            creator.process.kill()
            creator.process.wait(timeout=30)
        [held] = batch_rows(creator, created.id)
        assert (held["state"], held["held"]) == ("reserved", 1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replicas = list(pool.map(lambda _: start_tollgate(tmp_path, ledger_url=shared), [1, 2]))
        batch = ended(replicas[1].client(), created.id)
        assert batch.status == "completed"
        exactly_once(replicas[0], simulator, batch, "gpt-image-1.5")
        owners = {r["owner"] for r in batch_rows(replicas[0], batch.id)} - {None}
        assert len(owners) == 1 and held["owner"] not in owners  # adopted by one replica
    finally:
        for replica in replicas:
            replica.stop()
        drop_ledger(shared)


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
