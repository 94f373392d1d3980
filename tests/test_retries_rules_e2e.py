"""Retries never pay twice, end to end: what is a repeat and what is not (a retry
while the first renders, after it answered, another team's, no mark, a key reused with
another body, a first that failed), and retries turned off.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    DEADLINE_S,
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
)
from tests.retries_e2e import (
    IMAGE,
    arrivals,
    body,
    charges,
    clean,
    configure,
    decodable,
    fresh,
    gate,
    in_background,
    mask_png,
    one_charge,
    png,
    post,
    sdk,
    settled,
    sim,
)

__all__ = ["clean", "fresh", "gate", "sim"]  # the shared fixtures
REPLAY = "x-tollgate-replay-of"


# -- 1. a retry while the first renders; after it answered a client that had gone --------


def test_a_retry_while_the_first_renders_waits_and_gets_its_answer(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=3000)
    asked = body("A retry that waits")
    started = time.monotonic()
    assert post(clean, asked, retry=0, timeout=0.5) is None  # the client is gone
    answer = post(clean, asked, retry=1)  # the first still renders
    waited = time.monotonic() - started
    assert answer is not None and answer.status_code == 200, answer
    assert waited >= 2.9, "the retry got its answer only once the first had it"
    decodable(answer.json()["data"][0]["b64_json"])
    one_charge(
        clean, sim, answer.headers["x-tollgate-request-id"],
        answer.headers.get("x-tollgate-replay-of"), 2,
    )  # fmt: skip


def test_a_retry_after_the_first_answered_a_gone_client_is_replayed_at_once(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=1500)
    asked = body("A retry after the answer")
    assert post(clean, asked, retry=0, timeout=0.3) is None
    first = settled(clean, 1)[0]
    assert first["outcome"] == "ok"
    kept = clean.query(f"SELECT size FROM kept_answers WHERE request_id = '{first['id']}'")
    assert len(kept) == 1 and kept[0]["size"] > 0
    answer = post(clean, asked, retry=1)
    assert answer is not None and answer.status_code == 200
    assert answer.headers["x-tollgate-replay-of"] == first["id"]
    decodable(answer.json()["data"][0]["b64_json"])
    one_charge(clean, sim, answer.headers["x-tollgate-request-id"], first["id"], 2)


# -- 2. what is not a repeat, a key reused, a first that failed ----------------------------


def test_two_teams_sending_the_same_retry_pay_each_their_own(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=1000)
    asked = body("The same picture for two teams")
    assert post(clean, asked, retry=0, timeout=0.3) is None  # design's answer is kept
    settled(clean, 1)
    other = post(clean, asked, key=RESEARCH_KEY, retry=1)
    assert other is not None and other.status_code == 200
    assert "x-tollgate-replay-of" not in other.headers
    own = post(clean, asked, retry=1)  # design's own retry is a repeat
    assert own is not None and "x-tollgate-replay-of" in own.headers
    rows = settled(clean, 3)
    assert sorted((r["team"], r["outcome"]) for r in rows) == [
        ("design", "ok"), ("design", "replayed"), ("research", "ok"),
    ]  # fmt: skip
    assert len(charges(sim)) == 2


def test_identical_requests_without_a_retry_mark_or_key_pay_twice(
    clean: Tollgate, sim: Simulator
) -> None:
    client = sdk(clean, max_retries=0, timeout=30)
    for _ in range(2):
        client.images.generate(prompt="Two pictures, the SDK not retrying", **IMAGE)  # type: ignore[call-overload]
    for _ in range(2):
        plain = post(clean, body("Two pictures, a plain POST"))
        assert plain is not None and plain.status_code == 200
    rows = settled(clean, 4)
    assert [r["outcome"] for r in rows] == ["ok"] * 4
    assert all(r["cost_nanos"] > 0 for r in rows)
    assert len(charges(sim)) == 4


def test_an_idempotency_key_reused_with_another_body_is_409(
    clean: Tollgate, sim: Simulator
) -> None:
    first = post(clean, body("Keyed, first"), idempotency="key-conflict-1")
    assert first is not None and first.status_code == 200
    again = post(clean, body("Keyed, something else"), idempotency="key-conflict-1")
    assert again is not None and again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "idempotency_conflict", error
    # Retried (as an SDK would, or by hand): it still conflicts with the key's first.
    retried = post(clean, body("Keyed, something else"), idempotency="key-conflict-1", retry=1)
    assert retried is not None and retried.status_code == 409
    rows = settled(clean, 3)
    assert sorted(r["outcome"] for r in rows) == ["client_error", "client_error", "ok"]
    assert len(charges(sim)) == 1


def test_the_sdk_does_not_retry_an_idempotency_conflict(clean: Tollgate) -> None:
    """The SDKs retry a 409 unless told not to; a conflict stays one whatever the retries."""
    client = sdk(clean, timeout=30)
    key = {"Idempotency-Key": "key-conflict-sdk"}
    client.images.generate(prompt="Keyed by the SDK", extra_headers=key, **IMAGE)  # type: ignore[call-overload]
    with pytest.raises(openai.ConflictError) as conflict:
        client.images.generate(prompt="Keyed, another", extra_headers=key, **IMAGE)  # type: ignore[call-overload]
    assert conflict.value.code == "idempotency_conflict"
    assert conflict.value.response.headers["x-should-retry"] == "false"
    rows = settled(clean, 2)
    assert sorted(r["outcome"] for r in rows) == ["client_error", "ok"], "one 409, not retried"


def test_the_same_key_and_body_while_the_first_is_in_flight_waits_and_replays(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=2500)
    asked = body("Keyed, sent twice")
    first = in_background(lambda: post(clean, asked, idempotency="key-twice-1"))
    time.sleep(0.8)
    second = post(clean, asked, idempotency="key-twice-1")
    got = first.result(timeout=DEADLINE_S)
    assert got is not None and second is not None
    assert got.status_code == second.status_code == 200
    assert second.json() == got.json(), "the second gets the first's answer"
    assert second.headers["x-tollgate-replay-of"] == got.headers["x-tollgate-request-id"]
    one_charge(
        clean, sim, second.headers["x-tollgate-request-id"], got.headers["x-tollgate-request-id"], 2
    )


def test_a_keyed_edit_sent_again_with_its_mask_before_its_image_is_replayed(
    clean: Tollgate, sim: Simulator
) -> None:
    """The same image and mask in another order are the same request: its key's repeat is
    answered from the first, not refused as a conflict (nor, unkeyed, paid twice)."""
    image, mask = png(), mask_png()
    key = {"Idempotency-Key": "key-edit-reordered"}
    raw = sdk(clean, timeout=30).images.with_raw_response.edit(
        image=("in.png", image, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="Keyed edit, parts reordered",
        extra_headers=key,
        **IMAGE,
    )
    assert raw.http_response.status_code == 200
    again = httpx.post(
        f"{clean.url}/v1/images/edits",
        data={**IMAGE, "prompt": "Keyed edit, parts reordered"},
        files=[("mask", ("m.png", mask, "image/png")), ("image", ("i.png", image, "image/png"))],
        headers={"authorization": f"Bearer {DESIGN_KEY}", **key},
        timeout=DEADLINE_S,
    )
    assert again.status_code == 200, again.text
    assert again.headers["x-tollgate-replay-of"] == raw.headers["x-tollgate-request-id"]
    assert again.json() == raw.http_response.json()
    one_charge(
        clean, sim, again.headers["x-tollgate-request-id"], again.headers["x-tollgate-replay-of"],
        2,
    )  # fmt: skip


@pytest.mark.parametrize("how", ["marker", "knob"])
def test_a_first_that_failed_without_a_charge_does_not_block_its_retry(
    clean: Tollgate, sim: Simulator, how: str
) -> None:
    prompt = "A first that fails" + (" [[fault:503]]" if how == "marker" else "")
    asked = body(prompt)
    if how == "knob":
        sim.configure(fault="500")
    failed = post(clean, asked, retry=0)
    assert failed is not None and failed.status_code >= 500
    if how == "marker":
        # The same body plays the same fault: the retry is forwarded, not answered with
        # the first's error, and fails (uncharged) on its own.
        retried = post(clean, asked, retry=1)
        assert retried is not None and retried.status_code >= 500
        assert "x-tollgate-replay-of" not in retried.headers
        assert len(arrivals(sim)) == 2 and charges(sim) == []
        rows = settled(clean, 2)
        assert all(r["cost_nanos"] == 0 and r["outcome"] != "replayed" for r in rows), rows
        return
    sim.configure(fault=None)
    retried = post(clean, asked, retry=1)
    assert retried is not None and retried.status_code == 200
    assert "x-tollgate-replay-of" not in retried.headers
    rows = settled(clean, 2)
    assert [r["cost_nanos"] > 0 for r in rows] == [False, True]
    assert rows[1]["outcome"] == "ok"
    assert len(charges(sim)) == 1


# -- 3. retries off ------------------------------------------------------------------------


def test_with_retries_off_a_retry_is_forwarded_and_charged_again(
    sim: Simulator, tmp_path: Path
) -> None:
    configure(tmp_path, sim, "retries: {enabled: false}\n")
    gate = start_tollgate(tmp_path)
    try:
        sim.configure(latency_ms=1000)
        asked = body("Retries off")
        assert post(gate, asked, retry=0, timeout=0.3) is None
        settled(gate, 1)
        again = post(gate, asked, retry=1)
        assert again is not None and again.status_code == 200
        assert "x-tollgate-replay-of" not in again.headers
        rows = settled(gate, 2)
        assert [r["outcome"] for r in rows] == ["ok", "ok"]
        assert len(charges(sim)) == 2
        assert gate.query("SELECT count(*) AS n FROM kept_answers")[0]["n"] == 0
    finally:
        gate.stop()


def test_a_retry_after_a_short_window_while_the_first_still_renders_pays_once(
    sim: Simulator, tmp_path: Path
) -> None:
    """A window shorter than a rendering: the SDK's retry that comes after it, while the
    first still renders, waits for it rather than being sent (and billed) again."""
    configure(tmp_path, sim, "retries: {window_s: 1}\n")
    gate = start_tollgate(tmp_path)
    try:
        sim.configure(latency_ms=3500)
        client = sdk(gate, timeout=2, max_retries=2)
        raw = client.images.with_raw_response.generate(prompt="Short window", **IMAGE)  # type: ignore[call-overload]
        assert raw.parse().data
        answer_id, replay_of = raw.headers["x-tollgate-request-id"], raw.headers.get(REPLAY)
        one_charge(gate, sim, answer_id, replay_of, len(settled(gate, 2)))
    finally:
        gate.stop()
