"""Retries never pay twice, within bounds: a storm of large answers keeps within
`retries.store_bytes` and is forgotten after the window; and what a replay and keeping a
large answer take, measured.
"""

from __future__ import annotations

import concurrent.futures
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import (
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
)
from tests.retries_e2e import (
    body,
    charges,
    clean,
    configure,
    fresh,
    gate,
    post,
    settled,
    sim,
)

__all__ = ["clean", "fresh", "gate", "sim"]  # the shared fixtures


# -- 1. a storm of large answers against store_bytes -------------------------------------------


STORE_BYTES = 6_000_000
WINDOW_S = 6


def test_a_storm_of_large_answers_keeps_within_store_bytes_and_forgets_them_after_the_window(
    sim: Simulator, tmp_path: Path
) -> None:
    configure(tmp_path, sim, f"retries: {{window_s: {WINDOW_S}, store_bytes: {STORE_BYTES}}}\n")
    gate = start_tollgate(tmp_path)
    samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            found = gate.query("SELECT coalesce(sum(size), 0) AS total FROM kept_answers")
            samples.append(int(found[0]["total"]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        sim.configure(latency_ms=1500, payload_bytes=2_000_000)
        prompts = [f"A large picture, number {i}" for i in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            gone = list(pool.map(lambda p: post(gate, body(p), retry=0, timeout=0.5), prompts))
            assert gone == [None] * 8
            settled(gate, 8)
            retried = list(pool.map(lambda p: post(gate, body(p), retry=1), prompts))
        assert all(r is not None and r.status_code == 200 for r in retried)
        rows = settled(gate, 16)
        stop_sampling.set()
        sampler.join()
        assert samples and max(samples) <= STORE_BYTES, max(samples)
        # Each request is charged once or replayed; the upstream billed every charge.
        by_content: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_content.setdefault(row["content_digest"], []).append(row)
        assert len(by_content) == 8
        replayed = 0
        for pair in by_content.values():
            first, retry = sorted(pair, key=lambda r: r["started_at"])
            assert first["outcome"] == "ok" and first["cost_nanos"] > 0
            assert retry["outcome"] in ("ok", "replayed")
            if retry["outcome"] == "replayed":
                replayed += 1
                assert retry["cost_nanos"] == 0 and retry["upstream_request_id"] == first["id"]
            else:
                assert retry["cost_nanos"] > 0
        assert len(charges(sim)) == 16 - replayed
        assert replayed >= 1, "the newest kept answers fit and are replayed"
        print(
            f"\nstorm: {replayed}/8 retries replayed, {8 - replayed} forwarded anew; kept "
            f"at most {max(samples)} bytes of {STORE_BYTES} ({len(samples)} samples)"
        )
        # Past the window, what is kept is forgotten.
        forgotten = wait_for(
            "kept answers forgotten",
            lambda: gate.query("SELECT count(*) AS n FROM kept_answers")[0]["n"] == 0 or None,
            timeout=3 * WINDOW_S + 10,
        )
        assert forgotten
    finally:
        stop_sampling.set()
        gate.stop()


# -- measured, not asserted ----------------------------------------------------------------


def timed(send: Callable[..., httpx.Response | None], *args: Any, **options: Any) -> float:
    started = time.perf_counter()
    answer = send(*args, **options)
    took = time.perf_counter() - started
    assert answer is not None and answer.status_code == 200
    return took * 1000


def test_measure_a_replay_and_keeping_a_large_answer(clean: Tollgate, sim: Simulator) -> None:
    for payload in (0, 2_000_000):
        sim.configure(payload_bytes=payload)
        plain, keyed, replayed = [], [], []
        for i in range(5):
            asked = body(f"Measured, {payload} bytes, {i}")
            plain.append(timed(post, clean, asked))
            key = f"measure-{payload}-{i}"
            keyed.append(timed(post, clean, asked, idempotency=key))
            replayed.append(timed(post, clean, asked, idempotency=key))
        med = statistics.median
        print(
            f"\nanswer ~{payload or 'natural'} bytes (medians of 5, ms): first answer "
            f"{med(plain):.1f}; first answer kept {med(keyed):.1f} (keeping: "
            f"{med(keyed) - med(plain):+.1f}); replay {med(replayed):.1f} "
            f"({med(replayed) - med(plain):+.1f} vs a first answer)"
        )
    rows = settled(clean, 30)
    assert sum(r["outcome"] == "replayed" for r in rows) == 10
