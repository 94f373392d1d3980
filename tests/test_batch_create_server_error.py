"""A batch create answered a server error: the look for a batch it made all the same."""

from __future__ import annotations

import json
from pathlib import Path

from starlette.testclient import TestClient

from proxy.core.auth import key_hash
from proxy.core.errors import LedgerUnavailable
from proxy.ledger import StoredObject
from proxy.simulator import SimulatorSettings, create_simulator_app
from tests.conftest import UPSTREAM_KEY, in_process, write_config

KEY = "tg_test_batch_create_key"
HEADERS = {"authorization": f"Bearer {KEY}"}


def test_a_create_answered_5xx_whose_found_batch_the_ledger_cannot_look_up_gets_that_answer(
    tmp_path: Path,
) -> None:
    """Through Tollgate, against the simulator answering the create 502 after making its
    batch, with a ledger that cannot read whether that batch is someone's: the team gets
    the upstream's 502 (not a 500 of Tollgate's own), and the create's row is charged its
    bound, flagged (not left in flight)."""
    write_config(tmp_path, "http://simulated/v1", teams={
        "web": f"name: web\nkeys:\n  - {{id: k, sha256: {key_hash(KEY)}}}\n",
    })  # fmt: skip
    simulator = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    app = in_process(tmp_path, upstream=simulator)
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/images/generations",
        "body": {"model": "gpt-image-1", "prompt": "a lighthouse", "quality": "low",
                 "size": "1024x1024"},
    }  # fmt: skip
    with TestClient(simulator) as upstream, TestClient(app) as client:
        uploaded = client.post(
            "/v1/files",
            files={"file": ("in.jsonl", (json.dumps(line) + "\n").encode())},
            data={"purpose": "batch"},
            headers=HEADERS,
        )
        assert uploaded.status_code == 200, uploaded.text
        upstream.post("/_sim/config", json={"batch_answer_status": 502}).raise_for_status()
        ledger = app.current().ledger
        stored = ledger.stored

        async def no_batches(object_id: str) -> StoredObject | None:
            if object_id.startswith("batch_"):
                raise LedgerUnavailable("the ledger's database is unreachable")
            return await stored(object_id)

        ledger.stored = no_batches  # type: ignore[method-assign]
        create = {"input_file_id": uploaded.json()["id"], "completion_window": "24h"}
        answer = client.post(
            "/v1/batches", json={**create, "endpoint": "/v1/images/generations"}, headers=HEADERS
        )
        assert answer.status_code == 502, answer.text
        assert client.portal is not None
        request_id = answer.headers["x-tollgate-request-id"]
        [row] = [r for r in client.portal.call(ledger.rows) if r.entry.id == request_id]
    assert row.settlement is not None, "the create was left in flight"
    assert row.settlement.flagged and row.settlement.cost_nanos == row.entry.estimated_nanos > 0
