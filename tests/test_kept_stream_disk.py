"""A stream whose events cannot be held for its repeats (the spool memory full, and no
file to spill them to: too many open files, or a full disk) is relayed and settled all
the same: keeping a stream for its retries is a convenience, never a condition of the
stream itself. It was not: the spool's error ended the relay mid-stream and left its
reservation unsettled until a reclaim charged its bound."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.testclient import TestClient

from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web import spool
from proxy.web.gateway import Gateway
from tests.conftest import DESIGN_KEY, UPSTREAM_KEY, in_process, query_ledger, write_config


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    write_config(tmp_path, "http://simulated/v1")
    # Events of a few hundred KiB: past what a spool holds in its own memory.
    settings = SimulatorSettings(api_key=UPSTREAM_KEY, payload_bytes=300_000)
    with TestClient(in_process(tmp_path, create_simulator_app(settings))) as client:
        yield client


def test_a_stream_that_cannot_be_held_for_its_repeats_is_relayed_and_settled(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = client.app
    assert isinstance(gateway, Gateway) and gateway.runtime is not None
    gateway.runtime.spools.limit = 0  # the shared spool memory is taken

    def no_file(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(spool.tempfile, "TemporaryFile", no_file)
    sdk = openai.OpenAI(
        api_key=DESIGN_KEY, base_url="http://testserver/v1", http_client=client, max_retries=0
    )
    stream = sdk.images.generate(
        model="gpt-image-1", prompt="A lantern", stream=True, partial_images=2
    )
    kinds = [event.type for event in stream]
    assert kinds[-1] == "image_generation.completed", kinds
    rows = query_ledger(tmp_path, None, "SELECT state, outcome, cost_nanos FROM requests")
    assert [(r["state"], r["outcome"]) for r in rows] == [("settled", "ok")], rows
    assert rows[0]["cost_nanos"] > 0
