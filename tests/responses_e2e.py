"""What the Responses API end-to-end tests share: the oracle (the simulator's billing
priced at the price book's rates, the mainline model and the image tool apart), the
teams, a Tollgate process per test module, and the waits with deadlines.

Every cost is checked against an oracle that does not use Tollgate's meter: the usage the
simulator billed (its record, and the raw JSON it answered) priced at the price book's
rates, the mainline model's `usage` and the image tool's `tool_usage.image_gen` apart.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from proxy.config.prices import load_price_book
from proxy.core.auth import key_hash
from proxy.core.models import Usage
from tests.conftest import (
    DEADLINE_S,
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
    write_config,
)

BOOK = load_price_book()
KEYS = {name: f"tg_test_{name}_responses_key" for name in ("capped", "strict", "storm")}
PAIRS = [("gpt-5.5", "gpt-image-2"), ("gpt-4.1-mini", "gpt-image-1.5")]
"""(mainline model, image model): two of each, with different rates and token rules."""
T = TypeVar("T")


def team(name: str, body: str) -> str:
    return f"name: {name}\nkeys:\n  - {{id: {name}-key, sha256: {key_hash(KEYS[name])}}}\n" + body


TEAMS = {
    "design": f"name: design\nkeys:\n  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}\n",
    "research": f"name: research\nkeys:\n  - {{id: nb, sha256: {key_hash(RESEARCH_KEY)}}}\n",
    "capped": team("capped", "responses: {max_output_tokens: 600, max_tool_calls: 2}\n"),
    "strict": team("strict", "responses: {unbounded: refuse}\n"),
}


def tool(model: str | None = "gpt-image-2", **options: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"type": "image_generation", "quality": "low", "size": "1024x1024"}
    if model is not None:
        found["model"] = model
    return {**found, **options}


# -- the oracle ----------------------------------------------------------------------


def priced(mainline: str, image_model: str | None, main: Usage, images: Usage) -> int:
    """Nano-dollars: `main` at the mainline model's rates plus `images` at the image
    model's, straight from the price book's rates."""
    mainline_prices = BOOK.find_mainline(mainline)
    assert mainline_prices is not None
    cost = mainline_prices.cost(main)
    if image_model is not None:
        model = BOOK.find(image_model)
        assert model is not None
        cost += model.cost(images)
    return cost


def record_cost(record: dict[str, Any]) -> int:
    """What the simulator's billing record of one response costs."""
    main, images = record["mainline"], record["usage"]
    return priced(
        record["mainline_model"],
        record["model"],
        Usage(
            mainline_input=main["input"] - main["cached_input"],
            mainline_cached_input=main["cached_input"],
            mainline_output=main["output"],
        ),
        Usage(
            text_input=images["text_input"],
            image_input=images["image_input"],
            image_output=images["image_output"],
            text_output=images["text_output"],
        ),
    )


def json_cost(body: dict[str, Any], image_model: str) -> int:
    """What a response object's raw `usage` and `tool_usage.image_gen` cost."""
    usage = body["usage"]
    cached = usage["input_tokens_details"]["cached_tokens"]
    gen = body["tool_usage"]["image_gen"]
    return priced(
        body["model"],
        image_model,
        Usage(
            mainline_input=usage["input_tokens"] - cached,
            mainline_cached_input=cached,
            mainline_output=usage["output_tokens"],
        ),
        Usage(
            text_input=gen["input_tokens_details"]["text_tokens"],
            image_input=gen["input_tokens_details"]["image_tokens"],
            image_output=gen["output_tokens_details"]["image_tokens"],
            text_output=gen["output_tokens_details"]["text_tokens"],
        ),
    )


# -- waiting for conditions -----------------------------------------------------------


def rows_of(proxy: Tollgate, response_id: str) -> list[dict[str, Any]]:
    return proxy.query(f"SELECT * FROM requests WHERE response_id = '{response_id}'")


def settled_row(proxy: Tollgate, response_id: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        rows = rows_of(proxy, response_id)
        return rows[0] if rows and rows[0]["state"] == "settled" else None

    row = wait_for(f"the row of {response_id} settled", settled, timeout)
    assert len(rows_of(proxy, response_id)) == 1
    return row


def billed(simulator: Simulator, response_id: str) -> dict[str, Any]:
    """The simulator's billing record of `response_id`, once it has billed it."""

    def found() -> dict[str, Any] | None:
        return next((r for r in simulator.billing() if r["id"] == response_id), None)

    return wait_for(f"{response_id} billed", found)


def check_charge(
    proxy: Tollgate, simulator: Simulator, response_id: str, mainline: str, image_model: str
) -> dict[str, Any]:
    """The ledger row of `response_id` is the oracle's price of what the simulator billed,
    within its reservation."""
    record = billed(simulator, response_id)
    assert (record["mainline_model"], record["model"]) == (mainline, image_model)
    cost = record_cost(record)
    row = settled_row(proxy, response_id)
    assert row["cost_nanos"] == cost > 0
    assert row["estimated_nanos"] >= row["cost_nanos"]
    assert (row["endpoint"], row["model"], row["mainline_model"]) == (
        "responses",
        image_model,
        mainline,
    )
    assert (row["flagged"], row["outcome"], row["held"]) == (0, "ok", 0)
    assert row["image_output_tokens"] == record["usage"]["image_output"]
    main = record["mainline"]
    assert row["mainline_output_tokens"] == main["output"]
    assert row["mainline_input_tokens"] + row["mainline_cached_input_tokens"] == main["input"]
    assert row["mainline_cost_nanos"] == priced(
        mainline,
        None,
        Usage(
            mainline_input=main["input"] - main["cached_input"],
            mainline_cached_input=main["cached_input"],
            mainline_output=main["output"],
        ),
        Usage(),
    )
    return row


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    """A Tollgate of the test module's own, in front of the simulator, with `TEAMS` (a
    module imports this fixture, and `calm`, and lists them in its `__all__`)."""
    root = tmp_path_factory.mktemp("responses")
    write_config(root, f"{simulator.url}/v1", teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def calm(simulator: Simulator) -> Iterator[None]:
    """Each test starts and ends with a simulator without latency or faults."""
    simulator.configure(latency_ms=0, fault=None)
    yield
    simulator.configure(latency_ms=0, fault=None)


def arrivals(simulator: Simulator) -> list[dict[str, Any]]:
    """The requests that reached the simulated API (not its `/_sim/` pages)."""
    found = httpx.get(f"{simulator.url}/_sim/arrivals").json()["requests"]
    return [a for a in found if a["raw_path"].startswith("/v1/")]


NODE_PROJECT = Path(__file__).parent / "node"
IN_CI = os.environ.get("CI", "").lower() not in {"", "0", "false", "no"}


def node_sdk() -> str:
    """The `node` binary, with tests/node's packages installed (`npm ci`, as tests/run
    does, when they are missing). Without node the test skips on a workstation and fails
    in CI ($CI)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are not installed (tests/run installs them)"
        if IN_CI:
            pytest.fail(f"{reason}; CI is set: the Node SDK test must run", pytrace=False)
        pytest.skip(reason)
    if not (NODE_PROJECT / "node_modules" / "openai").is_dir():
        subprocess.run(
            [npm, "ci", "--prefix", str(NODE_PROJECT), "--no-audit", "--no-fund"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return node
