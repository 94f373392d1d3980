"""The free paths of the Responses, Files and Batch APIs (a response's own paths, an
upload, a listing, a file's or a batch's own paths) answer with Tollgate's headers as every
proxied answer does: `x-tollgate-cost-usd: 0`, and the room left in the team's tightest USD
budget in `x-tollgate-budget-remaining-usd`, refusals included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    write_config,
)

TEAMS = {
    "design": f"""
name: design
keys:
  - {{id: web, sha256: {key_hash(DESIGN_KEY)}}}
budgets:
  - {{period: month, limit_usd: 50}}
""",
    "research": f"""
name: research
keys:
  - {{id: lab, sha256: {key_hash(RESEARCH_KEY)}}}
""",
}
LINE = {
    "custom_id": "one",
    "method": "POST",
    "url": "/v1/images/generations",
    "body": {
        "model": "gpt-image-1-mini",
        "prompt": "a kite",
        "quality": "low",
        "size": "1024x1024",
    },
}


@pytest.fixture
def tollgate(simulator: Simulator, tmp_path: Path) -> Iterator[Tollgate]:
    simulator.configure(latency_ms=0, fault=None)
    write_config(tmp_path, f"{simulator.url}/v1", "", TEAMS)
    proxy = start_tollgate(tmp_path)
    yield proxy
    proxy.stop()


def test_every_free_answer_says_it_cost_nothing_and_the_room_left(tollgate: Tollgate) -> None:
    design = tollgate.client()
    made = design.responses.with_raw_response.create(
        model="gpt-5.5", input="A kite", max_output_tokens=200
    )
    spent = Decimal(made.headers["x-tollgate-cost-usd"])
    room = str(Decimal(50) - spent)
    response_id = made.parse().id
    retrieved = design.responses.with_raw_response.retrieve(response_id).headers
    assert Decimal(retrieved["x-tollgate-budget-remaining-usd"]) == Decimal(room)
    upload = design.files.with_raw_response.create(
        file=("in.jsonl", json.dumps(LINE).encode()), purpose="batch"
    )
    file_id = upload.parse().id
    batch = design.batches.create(
        input_file_id=file_id, endpoint="/v1/images/generations", completion_window="24h"
    )
    answers: dict[str, httpx.Headers] = {
        "upload": upload.headers,
        "retrieve": retrieved,
        "input items": design.responses.input_items.with_raw_response.list(response_id).headers,
        "files": design.files.with_raw_response.list().headers,
        "file": design.files.with_raw_response.retrieve(file_id).headers,
        "batches": design.batches.with_raw_response.list().headers,
        "batch": design.batches.with_raw_response.retrieve(batch.id).headers,
    }
    with pytest.raises(openai.NotFoundError) as missing:
        design.files.retrieve("file-nobody-made")
    answers["refusal"] = missing.value.response.headers
    for what, headers in answers.items():
        assert headers["x-tollgate-cost-usd"] == "0", what
        assert headers["x-tollgate-team"] == "design", what
        left = Decimal(headers["x-tollgate-budget-remaining-usd"])
        assert left <= Decimal(room), what  # the batch holds its bound meanwhile
    # A team without a USD budget is told no room, as on an image request.
    research = tollgate.client(RESEARCH_KEY).files.with_raw_response.list()
    assert research.headers["x-tollgate-cost-usd"] == "0"
    assert "x-tollgate-budget-remaining-usd" not in research.headers
