"""One output line of an ended batch as its row is charged (`proxy.web.batch_follow`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from proxy.config import load_config
from proxy.core.models import Entry
from proxy.ledger import BatchLine
from proxy.web.batch_follow import billed_line
from proxy.web.runtime import Runtime
from tests.conftest import write_config

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
