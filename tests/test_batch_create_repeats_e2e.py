"""A repeat of a batch create whose answer was not kept (README, "Retries never pay
twice"): the first attempt made a batch, held and followed, so the repeat gets that batch
as it stands, never a second one billed again."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.batches_e2e import (
    GENERATIONS,
    TEAMS,
    arrivals,
    calm,
    ended,
    generations,
    settled_rows,
    upload,
)
from tests.conftest import (
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    write_config,
)

__all__ = ["calm"]  # the shared fixture


@pytest.fixture(scope="module")
def keeping_nothing(
    simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tollgate]:
    """A Tollgate whose store of kept answers holds none (`retries.store_bytes` under any
    answer's size), as when newer answers have pushed a create's out."""
    root = tmp_path_factory.mktemp("batch-repeats")
    settings = "timezone: UTC\nretries:\n  store_bytes: 64\n"
    write_config(root, f"{simulator.url}/v1", settings, teams=TEAMS)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


def test_a_repeat_of_a_create_whose_answer_was_not_kept_gets_its_batch(
    keeping_nothing: Tollgate, simulator: Simulator
) -> None:
    proxy = keeping_nothing
    client = proxy.client()
    uploaded = upload(client, generations("gpt-image-2", 2))
    key = {"Idempotency-Key": f"create-{uploaded.id}"}
    simulator.configure(batch_delay_ms=600_000)  # still running when it is repeated
    try:
        first = client.batches.with_raw_response.create(
            input_file_id=uploaded.id,
            endpoint=GENERATIONS,
            completion_window="24h",
            extra_headers=key,
        )
        again = client.batches.with_raw_response.create(
            input_file_id=uploaded.id,
            endpoint=GENERATIONS,
            completion_window="24h",
            extra_headers=key,
        )
        made, repeated = first.parse(), again.parse()
        assert repeated.id == made.id
        assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
        assert again.headers["x-tollgate-cost-usd"] == "0"
        page = httpx.get(
            f"{simulator.url}/v1/batches",
            headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
            params={"limit": 100},
        ).json()
        assert [b["id"] for b in page["data"] if b["input_file_id"] == uploaded.id] == [made.id]
        replay = proxy.row(again.headers["x-tollgate-request-id"])
        assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0)
    finally:
        simulator.configure(batch_delay_ms=400)
        for batch in client.batches.list(limit=100):
            if batch.status in ("validating", "in_progress"):
                client.batches.cancel(batch.id)


def test_a_repeat_of_a_create_whose_batch_ended_and_was_settled_gets_it_not_a_second(
    keeping_nothing: Tollgate, simulator: Simulator
) -> None:
    """The batch ended (and was settled, its lines charged) within the retry window, its
    create's answer not kept: the repeat gets the batch as it stands, never a second one."""
    proxy = keeping_nothing
    client = proxy.client()
    uploaded = upload(client, generations("gpt-image-2", 2))
    key = {"Idempotency-Key": f"ended-{uploaded.id}"}
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    before = arrivals(simulator, "POST", "/v1/batches")
    first = client.batches.with_raw_response.create(**asked, extra_headers=key)  # type: ignore[arg-type]
    made = first.parse()
    assert ended(client, made.id).status == "completed"
    assert sum(r["cost_nanos"] for r in settled_rows(proxy, made.id)) > 0
    again = client.batches.with_raw_response.create(**asked, extra_headers=key)  # type: ignore[arg-type]
    repeated = again.parse()
    assert repeated.id == made.id and repeated.status == "completed"
    assert again.headers["x-tollgate-replay-of"] == first.headers["x-tollgate-request-id"]
    assert arrivals(simulator, "POST", "/v1/batches") == before + 1, "a second batch was made"
