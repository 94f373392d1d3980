"""Retries never pay twice across processes: a retry sent to another replica on a
shared PostgreSQL ledger, two workers on SQLite, and a first attempt whose process is
killed (-9) while it renders.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.batches_e2e import (
    GENERATIONS,
    arrivals,
    generations,
    upload,
)
from tests.conftest import (
    DEADLINE_S,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
)
from tests.retries_e2e import (
    IMAGE,
    LATENCY_MS,
    body,
    charges,
    configure,
    decodable,
    fresh,
    in_background,
    one_charge,
    post,
    sdk,
    settled,
    sim,
)

__all__ = ["fresh", "sim"]  # the shared fixtures


# -- 1. replicas and workers ---------------------------------------------------------------


def test_a_retry_sent_to_another_replica_is_replayed_from_the_shared_ledger(
    sim: Simulator, tmp_path: Path, shared: str
) -> None:
    configure(tmp_path, sim)
    a = start_tollgate(tmp_path, ledger_url=shared)
    b = start_tollgate(tmp_path, ledger_url=shared)
    try:
        sim.configure(latency_ms=2000)
        asked = body("One picture, two replicas")
        assert post(a, asked, retry=0, timeout=0.5) is None
        answer = post(b, asked, retry=1)  # waits on B for A's first
        assert answer is not None and answer.status_code == 200
        decodable(answer.json()["data"][0]["b64_json"])
        one_charge(
            b, sim, answer.headers["x-tollgate-request-id"],
            answer.headers.get("x-tollgate-replay-of"), 2,
        )  # fmt: skip
        # And once A's answer is kept, a later retry on B replays it at once.
        again = post(b, asked, retry=2)
        assert again is not None and again.json() == answer.json()
        assert len(charges(sim)) == 1
    finally:
        a.stop()
        b.stop()


def test_two_workers_on_sqlite_answer_each_others_retries(sim: Simulator, tmp_path: Path) -> None:
    configure(tmp_path, sim)
    gate = start_tollgate(tmp_path, "--workers", "2")
    try:
        sim.configure(latency_ms=LATENCY_MS)
        client = sdk(gate)
        prompts = [f"Two workers, picture {i}" for i in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(
                    lambda p: client.images.with_raw_response.generate(prompt=p, **IMAGE),  # type: ignore[call-overload]
                    prompts,
                )
            )
        for raw in answers:
            decodable(raw.parse().data[0].b64_json)
            assert raw.headers.get("x-tollgate-replay-of")
        rows = settled(gate, 6)
        assert [r for r in rows if r["outcome"] == "ok"].__len__() == 3
        assert all(r["outcome"] in ("ok", "replayed") for r in rows)
        assert all(r["cost_nanos"] == 0 for r in rows if r["outcome"] == "replayed")
        assert len(charges(sim)) == 3
    finally:
        gate.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_attempts_with_one_idempotency_key_arriving_together_on_two_replicas_pay_once(
    sim: Simulator, tmp_path: Path, shared: str, stream: bool
) -> None:
    """Eight attempts of one request, with one Idempotency-Key, sent at once to two
    replicas of two workers each: each looked for an earlier attempt before any had
    reserved, so each was forwarded (and billed). The reservation now checks, in its own
    transaction, that no attempt reserved since it looked: one is forwarded, the seven
    others wait for it and replay its answer."""
    configure(tmp_path, sim)
    a = start_tollgate(tmp_path, "--workers", "2", ledger_url=shared)
    b = start_tollgate(tmp_path, "--workers", "2", ledger_url=shared)
    try:
        sim.configure(latency_ms=1500)
        asked = {**body("One key, eight attempts"), "stream": stream}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda i: post((a, b)[i % 2], asked, idempotency="one-key-eight-attempts"),
                    range(8),
                )
            )
        assert all(r is not None and r.status_code == 200 for r in answers)
        replays = [r for r in answers if r is not None and r.headers.get("x-tollgate-replay-of")]
        assert len(replays) == 7
        assert len({r.headers["x-tollgate-replay-of"] for r in replays}) == 1
        assert len(charges(sim)) == 1
        rows = settled(a, 8)
        assert sorted(r["outcome"] for r in rows) == ["ok"] + ["replayed"] * 7
    finally:
        a.stop()
        b.stop()


def test_batch_creates_with_one_idempotency_key_arriving_together_make_one_batch(
    sim: Simulator, tmp_path: Path, shared: str
) -> None:
    """Six creates of one batch, with one Idempotency-Key, sent at once to two replicas:
    one batch is created and reserved, the five others get it, at no cost."""
    configure(tmp_path, sim)
    a = start_tollgate(tmp_path, "--workers", "2", ledger_url=shared)
    b = start_tollgate(tmp_path, "--workers", "2", ledger_url=shared)
    try:
        sim.configure(latency_ms=1500)
        file = upload(a.client(), generations("gpt-image-2", 2))
        asked = {"input_file_id": file.id, "endpoint": GENERATIONS, "completion_window": "24h"}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(
                    lambda i: post(
                        (a, b)[i % 2], asked, idempotency="one-batch", path="/v1/batches"
                    ),
                    range(6),
                )
            )
        assert all(r is not None and r.status_code == 200 for r in answers)
        assert len({r.json()["id"] for r in answers if r is not None}) == 1
        assert arrivals(sim, "POST", "/v1/batches") == 1
        replays = [r for r in answers if r is not None and r.headers.get("x-tollgate-replay-of")]
        assert len(replays) == 5
        assert all(r.headers["x-tollgate-cost-usd"] == "0" for r in replays)
    finally:
        a.stop()
        b.stop()


# -- 2. the process holding the first attempt is killed ----------------------------------------


def kill_while_rendering(a: Tollgate, sim: Simulator, asked: dict[str, Any]) -> None:
    """Send `asked` to A and kill A (-9) once the upstream renders it."""

    def lost() -> None:
        with pytest.raises(httpx.TransportError):  # its process is killed under it
            post(a, asked, retry=0, timeout=30)

    first = in_background(lost)
    wait_for("the first rendering upstream", lambda: sim.billing() or None)
    a.process.kill()
    a.process.wait()
    first.result(timeout=DEADLINE_S)


def test_a_retry_after_the_first_attempts_process_was_killed_ends_once_each(
    sim: Simulator, tmp_path: Path
) -> None:
    """A's first attempt dies with A (kill -9 while it renders). Its retry on B waits for it no
    longer than its own deadline (no deadlock) and is not sent again: the first is charged its
    bound (OpenAI may have billed it), so the retry gets `409 answer_not_kept`; a restarted A
    reclaims the first at its bound, flagged, and the SDK's next retry gets the same, while a
    new request is forwarded. One settled row per request, nothing left reserved, and the
    ledger charges what the upstream billed (the dead first at its bound, for
    reconciliation)."""
    configure(tmp_path, sim, timeout_s=3)  # an exchange's deadline: 6 s
    a = start_tollgate(tmp_path)
    b = start_tollgate(tmp_path)
    restarted: Tollgate | None = None
    try:
        sim.configure(latency_ms=2500)
        asked = body("A first attempt that dies with its process")
        kill_while_rendering(a, sim, asked)
        started = time.monotonic()
        waited = post(b, asked, retry=1)
        took = time.monotonic() - started
        assert waited is not None, "the retry on B ended"
        assert took < 6 + 5, took
        print(f"\nkilled first: the retry on B ended after {took:.1f} s ({waited.status_code})")
        not_sent_again(waited)
        restarted = start_tollgate(tmp_path)  # reclaims what the dead process held
        again = post(restarted, asked, retry=2)
        assert again is not None
        not_sent_again(again)
        last = post(restarted, asked)  # no retry count: a new request
        assert last is not None and last.status_code == 200, last
        assert "x-tollgate-replay-of" not in last.headers
        decodable(last.json()["data"][0]["b64_json"])
        rows = settled(restarted, 4)
        assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
        dead, on_b, on_restarted, new = rows
        assert (dead["flagged"], dead["error_code"]) == (1, "outcome_unknown"), dead
        assert dead["cost_nanos"] == dead["estimated_nanos"] > 0
        for replay in (on_b, on_restarted):
            assert (replay["outcome"], replay["cost_nanos"]) == ("replayed", 0), replay
        assert (new["outcome"], new["flagged"]) == ("ok", 0) and new["cost_nanos"] > 0
        billed = charges(sim)  # the dead first and the new request: no retry was sent
        assert len(billed) == 2 and new["upstream_request_id"] in {r["id"] for r in billed}
    finally:
        for gate in (a, b, restarted):
            if gate is not None:
                gate.stop()


def not_sent_again(answer: httpx.Response) -> None:
    """`answer` is the refusal of a repeat whose first attempt was lost with its process."""
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["code"] == "answer_not_kept"
    assert answer.headers["x-should-retry"] == "false"
    assert answer.headers["x-tollgate-cost-usd"] == "0"
    assert answer.headers["x-tollgate-replay-of"]


def test_a_keyed_retry_waiting_on_a_killed_first_is_not_sent_again(
    sim: Simulator, tmp_path: Path
) -> None:
    """The first was sent, and dies with its process: it is charged its bound (OpenAI may
    have billed it), so its keyed repeat, waiting on it, is answered `409 answer_not_kept`,
    not forwarded and billed again."""
    configure(tmp_path, sim, timeout_s=3)
    a = start_tollgate(tmp_path)
    b = start_tollgate(tmp_path)
    try:
        sim.configure(latency_ms=2500)
        asked = body("A first attempt that dies, and a retry that must not pay again")

        def lost() -> None:
            with pytest.raises(httpx.TransportError):  # its process is killed under it
                post(a, asked, idempotency="dies", timeout=30)

        first = in_background(lost)
        wait_for("the first rendering upstream", lambda: sim.billing() or None)
        # The retry waits on the first, or arrives once it died: either way it finds it
        # in flight, in a process that is gone.
        retry = in_background(lambda: post(b, asked, idempotency="dies"))
        a.process.kill()
        a.process.wait()
        first.result(timeout=DEADLINE_S)
        answer = retry.result(timeout=DEADLINE_S)
        assert answer is not None
        not_sent_again(answer)
        assert arrivals(sim, "POST", GENERATIONS) == 1, "a repeat of a first lost was sent"
    finally:
        a.stop()
        b.stop()
