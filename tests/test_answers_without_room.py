"""Answers the spool cannot hold (the shared spool memory full, and no file to spill to:
too many open files, or a full disk). A whole answer is charged its bound, flagged, at
once, and its client gets a 502 in OpenAI's error shape (the spool's error escaped as a
bare 500 and left the reservation `reserved` until a reclaim charged its bound). A stream
whose events cannot be kept for its repeats is relayed and settled all the same: keeping
it is a convenience, never a condition of the stream (the error ended the relay
mid-stream, its reservation unsettled)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web import spool
from proxy.web.gateway import Gateway
from tests.conftest import DESIGN_KEY, UPSTREAM_KEY, in_process, query_ledger, write_config


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    write_config(tmp_path, "http://simulated/v1")
    # Images and events of a few hundred KiB: past what a spool holds in its own memory.
    settings = SimulatorSettings(api_key=UPSTREAM_KEY, payload_bytes=300_000)
    with TestClient(in_process(tmp_path, create_simulator_app(settings))) as client:
        yield client


def without_room(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> openai.OpenAI:
    """The shared spool memory taken and no file to spill to; an SDK that does not retry."""
    gateway = client.app
    assert isinstance(gateway, Gateway) and gateway.runtime is not None
    gateway.runtime.spools.limit = 0

    def no_file(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(spool.tempfile, "TemporaryFile", no_file)
    return openai.OpenAI(
        api_key=DESIGN_KEY, base_url="http://testserver/v1", http_client=client, max_retries=0
    )


def test_a_whole_answer_that_cannot_be_held_is_charged_its_bound_and_answered_502(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdk = without_room(client, monkeypatch)
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.images.generate(model="gpt-image-1", prompt="A lantern")
    error = caught.value
    assert error.status_code == 502
    assert isinstance(error.body, dict)
    assert error.body["type"] == "api_error", error.body
    rows = query_ledger(
        tmp_path, None, "SELECT state, outcome, error_code, flagged, cost_nanos, estimated_nanos "
        "FROM requests",
    )  # fmt: skip
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["state"], row["outcome"], row["error_code"]) == (
        "settled", "upstream_error", "answer_not_held"
    ), row  # fmt: skip
    assert row["flagged"] and row["cost_nanos"] == row["estimated_nanos"] > 0, row
    assert error.response.headers["x-tollgate-cost-usd"] != "0"
    gateway = client.app
    assert isinstance(gateway, Gateway) and gateway.runtime is not None
    assert gateway.runtime.spools.held == 0


def test_an_error_answer_that_cannot_be_held_is_passed_on_empty_at_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream error answer past its first 64 KiB goes to disk, and is passed on empty:
    with no file to spill to, it is passed on empty all the same, and charges nothing."""

    async def refuse(request: Request) -> JSONResponse:
        error = {"message": "x" * 200_000, "type": "invalid_request_error", "code": None}
        return JSONResponse({"error": error}, status_code=400)

    upstream = Starlette(routes=[Route("/v1/images/generations", refuse, methods=["POST"])])
    write_config(tmp_path, "http://simulated/v1")

    def no_file(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.tempfile, "TemporaryFile", no_file)
    with TestClient(in_process(tmp_path, upstream)) as client:
        sdk = openai.OpenAI(
            api_key=DESIGN_KEY, base_url="http://testserver/v1", http_client=client, max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.images.generate(model="gpt-image-1", prompt="A lantern")
    assert caught.value.response.headers["x-tollgate-cost-usd"] == "0"
    rows = query_ledger(tmp_path, None, "SELECT state, outcome, cost_nanos FROM requests")
    assert [(r["state"], r["outcome"], r["cost_nanos"]) for r in rows] == [
        ("settled", "upstream_error", 0)
    ], rows


def test_a_stream_that_cannot_be_held_for_its_repeats_is_relayed_and_settled(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdk = without_room(client, monkeypatch)
    stream = sdk.images.generate(
        model="gpt-image-1", prompt="A lantern", stream=True, partial_images=2
    )
    kinds = [event.type for event in stream]
    assert kinds[-1] == "image_generation.completed", kinds
    rows = query_ledger(tmp_path, None, "SELECT state, outcome, cost_nanos FROM requests")
    assert [(r["state"], r["outcome"]) for r in rows] == [("settled", "ok")], rows
    assert rows[0]["cost_nanos"] > 0
