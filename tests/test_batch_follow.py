"""One output line of an ended batch as its row is charged (`proxy.web.batch_follow`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from proxy.config import load_config
from proxy.config.prices import load_price_book
from proxy.core.models import Entry
from proxy.core.pricing import PriceBook
from proxy.ledger import BatchLine
from proxy.web.batch_follow import billed_line
from proxy.web.runtime import Runtime
from tests.conftest import write_config
from tests.test_batches_reload_e2e import price_book

LINE = BatchLine("a", 1, "generations", "gpt-image-2", "low", "1024x1024", 1, None, 5_900_000)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    root: Path = tmp_path_factory.mktemp("batch-follow")
    write_config(root, "http://upstream.invalid/v1", "timezone: UTC\n")
    return cast(Runtime, SimpleNamespace(config=load_config(root)))


def charged(runtime: Runtime, output: dict[str, Any]) -> Any:
    reservation = Entry("tg_req_1", 1_800_000_000.0, "batches", "design")
    raw = json.dumps({"custom_id": "a", **output}).encode()
    found = billed_line(runtime, reservation, {"a": LINE}, raw, 1_800_000_000.0, "batch_1")
    assert found is not None
    return found.settlement


@pytest.mark.parametrize("body", ["not an object", ["a", "list"], None, 7])
def test_a_billed_line_whose_body_is_not_an_object_is_charged_its_bound_flagged(
    runtime: Runtime, body: Any
) -> None:
    settled = charged(runtime, {"response": {"status_code": 200, "body": body}})
    assert (settled.cost_nanos, settled.flagged) == (LINE.bound_nanos, True)


def test_a_line_is_charged_the_dearer_of_the_book_it_was_reserved_under_and_the_one_in_force(
    runtime: Runtime, tmp_path: Path
) -> None:
    """A batch followed by the process that created it keeps the book it was reserved
    with: a reload that cut a rate while it ran does not settle it below that book."""
    usage = {
        "input_tokens": 10, "output_tokens": 200, "total_tokens": 210,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
    }  # fmt: skip
    raw = json.dumps(
        {"custom_id": "a", "response": {"status_code": 200, "body": {"data": [{}], "usage": usage}}}
    ).encode()
    reservation = Entry("tg_req_1", 1_800_000_000.0, "batches", "design")
    book = runtime.config.prices
    (tmp_path / "prices.yaml").write_text(price_book("150.00"))
    dearer = load_price_book(tmp_path / "prices.yaml")

    def charge(now: Runtime, reserved_under: PriceBook | None) -> int:
        found = billed_line(now, reservation, {"a": LINE}, raw, 1.8e9, "b", reserved_under)
        assert found is not None
        return found.settlement.cost_nanos

    later = cast(Runtime, SimpleNamespace(config=replace(runtime.config, prices=dearer)))
    # 10 text input tokens at 2.50 and 200 image output tokens at 15.00 (batch rates) ...
    assert charge(runtime, None) == charge(runtime, book) == 25_000 + 3_000_000
    # ... or at 150.00, whichever book has it: the one reserved under or the one now.
    assert (
        charge(runtime, dearer) == charge(later, book) == charge(later, None) == 25_000 + 30_000_000
    )
