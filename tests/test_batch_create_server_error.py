"""A batch create answered a server error: the look for a batch it made all the same."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from starlette.testclient import TestClient
from starlette.types import ASGIApp

from proxy.config import load_config
from proxy.core.auth import key_hash
from proxy.core.errors import LedgerUnavailable
from proxy.ledger import Row, StoredObject
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web.app import create_app
from proxy.web.gateway import Gateway
from proxy.web.runtime import Overrides
from tests.conftest import UPSTREAM_KEY, in_process, serving, write_config

KEY = "tg_test_batch_create_key"
HEADERS = {"authorization": f"Bearer {KEY}"}
TEAMS = {"web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n"}


GENERATIONS = "/v1/images/generations"


def _tollgate(root: Path) -> tuple[Gateway, ASGIApp]:
    """Tollgate in this process, in front of a simulator of its own (both returned)."""
    write_config(root, "http://simulated/v1", teams=TEAMS)
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    return in_process(root, upstream=simulator), simulator


def _upload(client: TestClient) -> str:
    """A batch input file of one generation, uploaded through Tollgate: its id."""
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": GENERATIONS,
        "body": {"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "low",
                 "size": "1024x1024"},
    }  # fmt: skip
    uploaded = client.post(
        "/v1/files",
        files={"file": ("in.jsonl", (json.dumps(line) + "\n").encode())},
        data={"purpose": "batch"},
        headers=HEADERS,
    )
    assert uploaded.status_code == 200, uploaded.text
    file_id: str = uploaded.json()["id"]
    return file_id


def _unreadable_batches(app: Gateway) -> None:
    """The ledger of `app` cannot read whose a batch is (its files it still reads)."""
    ledger = app.current().ledger
    stored = ledger.stored

    async def no_batches(object_id: str) -> StoredObject | None:
        if object_id.startswith("batch_"):
            raise LedgerUnavailable("the ledger's database is unreachable")
        return await stored(object_id)

    ledger.stored = no_batches  # type: ignore[method-assign]


def _row(client: TestClient, app: Gateway, request_id: str) -> Row:
    assert client.portal is not None
    [row] = [r for r in client.portal.call(app.current().ledger.rows) if r.entry.id == request_id]
    return row


def test_a_create_answered_5xx_whose_found_batch_the_ledger_cannot_look_up_gets_that_answer(
    tmp_path: Path,
) -> None:
    """Through Tollgate, against the simulator answering the create 502 after making its
    batch, with a ledger that cannot read whether that batch is someone's: the team gets
    the upstream's 502 (not a 500 of Tollgate's own), and the create's row is charged its
    bound, flagged (not left in flight)."""
    app, simulator = _tollgate(tmp_path)
    with TestClient(simulator) as upstream, TestClient(app) as client:
        file_id = _upload(client)
        upstream.post("/_sim/config", json={"batch_answer_status": 502}).raise_for_status()
        _unreadable_batches(app)
        answer = client.post(
            "/v1/batches",
            json={"input_file_id": file_id, "completion_window": "24h", "endpoint": GENERATIONS},
            headers=HEADERS,
        )
        assert answer.status_code == 502, answer.text
        row = _row(client, app, answer.headers["x-tollgate-request-id"])
    assert row.settlement is not None, "the create was left in flight"
    assert row.settlement.flagged and row.settlement.cost_nanos == row.entry.estimated_nanos > 0


def test_a_create_that_timed_out_whose_found_batch_the_ledger_cannot_look_up_is_charged(
    tmp_path: Path,
) -> None:
    """The same ledger fault after a create that got no answer in `timeout_s` (its batch
    made and listed): it raised out of the create, a 500 of Tollgate's own and the
    reservation left in flight. The create is answered 504 and charged its bound, flagged,
    as any create that may have been billed."""
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    # Served on a port: an in-process transport has no read timeout.
    with serving(simulator) as url:
        write_config(tmp_path, f"{url}/v1", teams=TEAMS)
        app = create_app(load_config(tmp_path), Overrides(), tmp_path)
        with TestClient(app) as client:
            file_id = _upload(client)
            # Past the configuration's `timeout_s: 3`, once the batch is listed.
            httpx.post(f"{url}/_sim/config", json={"batch_answer_ms": 4000}).raise_for_status()
            _unreadable_batches(app)
            answer = client.post(
                "/v1/batches",
                json={
                    "input_file_id": file_id,
                    "completion_window": "24h",
                    "endpoint": GENERATIONS,
                },
                headers=HEADERS,
            )
            assert answer.status_code == 504, answer.text
            row = _row(client, app, answer.headers["x-tollgate-request-id"])
    assert row.settlement is not None, "the create was left in flight"
    assert row.settlement.flagged and row.settlement.cost_nanos == row.entry.estimated_nanos > 0
