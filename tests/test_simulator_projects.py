"""The simulated upstream scopes responses, files and batches to the project they were
made under, as OpenAI does: asked for under another project (or none), they are not found.
Driven by the official openai SDK, whose `project=` sends the `OpenAI-Project` header."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from proxy.simulator import SimulatorSettings, create_simulator_app
from tests.conftest import serving

API_KEY = "sk-sim-test-key-0005"
TOOL: Any = {"type": "image_generation", "quality": "low", "size": "1024x1024"}
LINE = {
    "custom_id": "a",
    "method": "POST",
    "url": "/v1/images/generations",
    "body": {"model": "gpt-image-2", "prompt": "a cat", "quality": "low", "size": "1024x1024"},
}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(create_simulator_app(SimulatorSettings(api_key=API_KEY))) as url:
        yield url


def client(server: str, project: str | None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server}/v1", api_key=API_KEY, project=project, max_retries=0, timeout=30
    )


def not_found_under_other_projects(server: str, ask: Callable[[openai.OpenAI], object]) -> None:
    for project in ("proj_B", None):
        with pytest.raises(openai.NotFoundError):
            ask(client(server, project))


def test_a_response_is_found_only_under_its_own_project(server: str) -> None:
    mine = client(server, "proj_A")
    created = mine.responses.create(
        model="gpt-4.1-mini", input="Draw a cat", tools=[TOOL], background=True
    )
    for ask in (
        lambda c: c.responses.retrieve(created.id),
        lambda c: c.responses.input_items.list(created.id),
        lambda c: c.responses.cancel(created.id),
        lambda c: c.responses.delete(created.id),
    ):
        not_found_under_other_projects(server, ask)
    with pytest.raises(openai.NotFoundError) as refused:
        client(server, "proj_B").responses.create(
            model="gpt-4.1-mini", input="Again", previous_response_id=created.id
        )
    assert refused.value.code == "previous_response_not_found"
    assert mine.responses.retrieve(created.id).id == created.id
    follow_up = mine.responses.create(
        model="gpt-4.1-mini", input="Again", previous_response_id=created.id
    )
    assert follow_up.status == "completed"
    mine.responses.delete(created.id)


def test_files_and_batches_are_found_and_listed_only_under_their_own_project(
    server: str,
) -> None:
    mine = client(server, "proj_A")
    uploaded = mine.files.create(
        file=("in.jsonl", (json.dumps(LINE) + "\n").encode()), purpose="batch"
    )
    for ask in (
        lambda c: c.files.retrieve(uploaded.id),
        lambda c: c.files.content(uploaded.id),
        lambda c: c.files.delete(uploaded.id),
        lambda c: c.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        ),
    ):
        not_found_under_other_projects(server, ask)
    batch = mine.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    for ask in (lambda c: c.batches.retrieve(batch.id), lambda c: c.batches.cancel(batch.id)):
        not_found_under_other_projects(server, ask)
    for other in (client(server, "proj_B"), client(server, None)):
        assert uploaded.id not in [f.id for f in other.files.list()]
        assert batch.id not in [b.id for b in other.batches.list()]
    assert uploaded.id in [f.id for f in mine.files.list()]
    assert batch.id in [b.id for b in mine.batches.list()]
    deadline = time.monotonic() + 20
    while (ended := mine.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline, ended.status
        time.sleep(0.05)
    # The batch's output file belongs to the batch's project.
    assert ended.output_file_id is not None
    not_found_under_other_projects(server, lambda c: c.files.content(ended.output_file_id))
    assert json.loads(mine.files.content(ended.output_file_id).text)["custom_id"] == "a"
