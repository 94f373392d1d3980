"""A repeat of a batch create whose answer was not kept (README, "Retries never pay
twice"): the first attempt made a batch, held and followed, so the repeat gets that batch
as it stands, never a second one billed again."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.batches_e2e import (
    GENERATIONS,
    TEAMS,
    arrivals,
    batch_cost,
    billed_lines,
    calm,
    check_settled,
    ended,
    generations,
    record_tokens,
    settled_rows,
    upload,
)
from tests.conftest import (
    RESEARCH_KEY,
    UPSTREAM_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
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


def upstream_batches(simulator: Simulator, file_id: str) -> list[dict[str, Any]] | None:
    """The batches the simulated upstream made of the input file `file_id` (None: none)."""
    page = httpx.get(
        f"{simulator.url}/v1/batches",
        headers={"authorization": f"Bearer {UPSTREAM_KEY}"},
        params={"limit": 100},
    ).json()
    return [b for b in page["data"] if b["input_file_id"] == file_id] or None


@pytest.mark.parametrize("repeat", ["idempotency-key", "sdk-retry"])
def test_a_repeat_of_a_create_whose_process_was_killed_after_sending_it_makes_no_second_batch(
    simulator: Simulator, tmp_path: Path, repeat: str
) -> None:
    """Tollgate is killed (SIGKILL) after the upstream made the batch and before its answer
    came back: the batch runs and bills, and the restarted Tollgate reclaims the create's
    reservation at its bound, flagged. A repeat of that create (the same Idempotency-Key, or
    an SDK retry of it) was forwarded as a new request: a second batch of the same file,
    billed again. It is refused, and the batch the first made, found upstream, is the
    team's (it used to be no one's: its images never reached the team that paid for it)."""
    write_config(tmp_path, f"{simulator.url}/v1", "timezone: UTC\n", teams=TEAMS)
    first = start_tollgate(tmp_path)
    uploaded = upload(first.client(), generations("gpt-image-2", 2))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    key = {"Idempotency-Key": f"killed-{uploaded.id}"} if repeat == "idempotency-key" else {}
    # The batch exists upstream 2.5 s before its create is answered (within `timeout_s: 3`).
    simulator.configure(batch_answer_ms=2_500)
    failed: list[Exception] = []

    def create() -> None:
        try:
            first.client().with_options(max_retries=0).batches.create(**asked, extra_headers=key)
        except openai.APIConnectionError as exc:
            failed.append(exc)

    sending = threading.Thread(target=create)
    sending.start()
    try:
        [made] = wait_for(
            "the batch made upstream", lambda: upstream_batches(simulator, uploaded.id)
        )
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
        sending.join()
    assert failed, "the create was answered before its process was killed"
    simulator.configure(batch_answer_ms=0)
    second = start_tollgate(tmp_path)
    try:
        retry = {"x-stainless-retry-count": "1"} if repeat == "sdk-retry" else {}
        with pytest.raises(openai.ConflictError) as refused:
            second.client().with_options(max_retries=0).batches.create(
                **asked, extra_headers={**key, **retry}
            )
        assert refused.value.code == "answer_not_kept"
        assert refused.value.response.headers["x-should-retry"] == "false"
        assert [b["id"] for b in upstream_batches(simulator, uploaded.id) or ()] == [made["id"]]
        # The batch made is the team's, named in the refusal, and read with its output.
        assert f"GET /v1/batches/{made['id']}" in refused.value.message
        sdk = second.client()
        batch = ended(sdk, made["id"])
        assert batch.status == "completed" and batch.output_file_id is not None
        assert len(sdk.files.content(batch.output_file_id).text.splitlines()) == 2
        assert second.client(RESEARCH_KEY).batches.list().data == []
        # The batch made is paid for once: its create's reservation, charged its bound.
        replay_of = refused.value.response.headers["x-tollgate-replay-of"]
        charged = second.row(replay_of)
        assert (charged["state"], charged["flagged"]) == ("settled", 1)

        def billed() -> int | None:
            lines = billed_lines(simulator, made["id"])
            return sum(batch_cost("gpt-image-2", record_tokens(r)) for r in lines.values()) or None

        assert charged["cost_nanos"] >= wait_for("the batch's lines billed", billed)
    finally:
        second.stop()


def test_a_create_answered_a_server_error_after_its_batch_was_made_follows_that_batch(
    keeping_nothing: Tollgate, simulator: Simulator
) -> None:
    """A gateway's 502 in front of a create the upstream made all the same: the batch runs
    and bills. It used to be released at $0 (an upstream error charges nothing), the batch
    no one's: its lines billed with nothing reserved, past any hard limit, and its images
    out of the team's reach. The upstream's list is asked for it, and it is the team's,
    followed and settled as its lines billed."""
    client = keeping_nothing.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 2))
    simulator.configure(batch_answer_status=502)
    with pytest.raises(openai.InternalServerError) as failed:
        client.batches.create(
            input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
        )
    simulator.configure(batch_answer_status=0)
    assert failed.value.status_code == 502
    [made] = upstream_batches(simulator, uploaded.id) or [None]
    assert made is not None, "the simulator made no batch"
    created = keeping_nothing.row(failed.value.response.headers["x-tollgate-request-id"])
    assert created["held"] == 1, "the create's reservation was not held for its batch"
    assert made["id"] in [b.id for b in client.batches.list(limit=100)]
    batch = ended(client, made["id"])
    assert batch.status == "completed"
    check_settled(keeping_nothing, simulator, batch, "gpt-image-2")


def test_a_create_answered_a_server_error_that_made_no_batch_is_released(
    keeping_nothing: Tollgate, simulator: Simulator
) -> None:
    """A 5xx with no batch of the file upstream (nor one already the team's) is the
    failure it says: nothing is held, nothing charged."""
    client = keeping_nothing.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 1))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    made = client.batches.create(**asked)  # type: ignore[arg-type]
    assert ended(client, made.id).status == "completed"
    simulator.configure(batch_fail_status=500)
    with pytest.raises(openai.InternalServerError) as failed:
        client.batches.create(**asked)  # type: ignore[arg-type]
    simulator.configure(batch_fail_status=0)
    row = keeping_nothing.row(failed.value.response.headers["x-tollgate-request-id"])
    assert (row["state"], row["held"], row["cost_nanos"]) == ("settled", 0, 0)
    assert [b["id"] for b in upstream_batches(simulator, uploaded.id) or ()] == [made.id]


# -- a create that timed out while the upstream was still reading its file ----------------


def lost_create(
    client: openai.OpenAI, simulator: Simulator, asked: dict[str, Any], key: dict[str, str]
) -> openai.APIStatusError:
    """A create whose answer Tollgate stops waiting for (`timeout_s: 3`) while the upstream
    is still reading its file: no batch of the file is listed when Tollgate looks, and the
    upstream makes it after. The client's 504."""
    simulator.configure(batch_read_ms=5_000)
    try:
        with pytest.raises(openai.APIStatusError) as failed:
            client.batches.create(**asked, extra_headers=key)
    finally:
        simulator.configure(batch_read_ms=0)
    assert failed.value.status_code == 504
    assert failed.value.response.headers["x-should-retry"] == "false"
    return failed.value


@pytest.mark.parametrize("repeat", ["idempotency-key", "sdk-retry"])
def test_a_repeat_of_a_create_that_timed_out_before_its_batch_was_made_names_that_batch(
    keeping_nothing: Tollgate, simulator: Simulator, repeat: str
) -> None:
    """The create's bound is charged, flagged, with no batch on record; the batch the
    upstream made after was no one's: its team paid for it but could neither see it nor
    read its output, and a repeat of the create got the 504 again and nothing more. The
    repeat names the batch, which is the team's, and is still never sent again."""
    proxy = keeping_nothing
    client = proxy.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 2))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    key = {"Idempotency-Key": f"lost-{uploaded.id}"} if repeat == "idempotency-key" else {}
    first = lost_create(client, simulator, asked, key)
    first_id = first.response.headers["x-tollgate-request-id"]
    [made] = wait_for("the batch made upstream", lambda: upstream_batches(simulator, uploaded.id))
    retry = {"x-stainless-retry-count": "1"} if repeat == "sdk-retry" else {}
    with pytest.raises(openai.APIStatusError) as again:
        client.batches.create(**asked, extra_headers={**key, **retry})  # type: ignore[arg-type]
    assert again.value.status_code == 504
    assert again.value.response.headers["x-tollgate-replay-of"] == first_id
    assert again.value.response.headers["x-should-retry"] == "false"
    assert f"GET /v1/batches/{made['id']}" in again.value.message
    assert [b["id"] for b in upstream_batches(simulator, uploaded.id) or ()] == [made["id"]]
    # The team's: listed, read, its output read; another team's list does not show it.
    assert made["id"] in [b.id for b in client.batches.list(limit=100)]
    batch = ended(client, made["id"])
    assert batch.status == "completed" and batch.output_file_id is not None
    assert len(client.files.content(batch.output_file_id).text.splitlines()) == 2
    assert made["id"] not in [b.id for b in proxy.client(RESEARCH_KEY).batches.list()]
    # Paid for once: the create's bound, flagged; the repeat at no cost.
    charged = proxy.row(first_id)
    assert (charged["state"], charged["flagged"]) == ("settled", 1)
    lines = billed_lines(simulator, made["id"])
    billed = sum(batch_cost("gpt-image-2", record_tokens(r)) for r in lines.values())
    assert charged["cost_nanos"] >= billed > 0
    replay = proxy.row(again.value.response.headers["x-tollgate-request-id"])
    assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0)


def test_the_batch_of_a_create_that_timed_out_before_it_was_made_is_the_teams_unasked(
    keeping_nothing: Tollgate, simulator: Simulator
) -> None:
    """No repeat comes: Tollgate looks again for the batch the upstream may still be
    making of the file, and it is the team's once it is listed, in the team's own list."""
    client = keeping_nothing.client().with_options(max_retries=0)
    uploaded = upload(client, generations("gpt-image-2", 1))
    asked = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    lost_create(client, simulator, asked, {})
    [made] = wait_for("the batch made upstream", lambda: upstream_batches(simulator, uploaded.id))

    def listed() -> bool | None:
        return made["id"] in [b.id for b in client.batches.list(limit=100)] or None

    wait_for("the batch in the team's list", listed)
    batch = ended(client, made["id"])
    assert batch.status == "completed" and batch.output_file_id is not None
    assert len(client.files.content(batch.output_file_id).text.splitlines()) == 1
