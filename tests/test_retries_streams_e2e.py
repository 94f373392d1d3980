"""Retries never pay twice, for streams: a repeat of a stream gets its events, and while the
first still streams, the events so far at once and then each later one as the first gets
it (kept in the ledger as they go, so a repeat served by another replica follows it too);
a first whose process dies mid-stream ends its follower's stream with an error event.

Live means ordered: the simulator paces its events (`latency_ms` spread over the stream),
and each client logs what it got, in the order it got it, into one list.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import (
    DEADLINE_S,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    start_tollgate,
    wait_for,
)
from tests.retries_e2e import (
    LATENCY_MS,
    body,
    clean,
    configure,
    decodable,
    fresh,
    gate,
    in_background,
    one_charge,
    post,
    sdk,
    settled,
    sim,
    stream_events,
)

PACED_MS = 6000
"""A stream of four events, one every 1.5 s."""
EVENTS = [*(f"partial:{i}" for i in range(3)), "completed"]


__all__ = ["clean", "fresh", "gate", "sim"]  # the shared fixtures


def streamed(prompt: str) -> dict[str, Any]:
    return {**body(prompt), "stream": True, "partial_images": 3}


def label(event: Any) -> str:
    kind = event.type.rsplit(".", 1)[-1].replace("partial_image", "partial")
    return f"{kind}:{event.partial_image_index}" if kind == "partial" else kind


class Log:
    """What each client got, in the order it got it, for every client."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.at: dict[str, float] = {}
        """When each line was logged (measured, never asserted)."""
        self.lock = threading.Lock()

    def add(self, who: str, what: str) -> None:
        with self.lock:
            self.lines.append(f"{who} {what}")
            self.at[f"{who} {what}"] = time.perf_counter()

    def lags_ms(self) -> list[float]:
        """How long after the first each later event reached the repeat."""
        return [(self.at[f"repeat {e}"] - self.at[f"first {e}"]) * 1000 for e in EVENTS[1:]]

    def of(self, who: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.lines if line.startswith(f"{who} ")]

    def before(self, earlier: str, later: str) -> bool:
        return self.lines.index(earlier) < self.lines.index(later)


def stream_with_sdk(
    gate: Tollgate, asked: dict[str, Any], who: str, log: Log, headers: dict[str, str]
) -> dict[str, str]:
    """Stream `asked` with the official Python SDK, logging each event as it arrives; the
    answer's headers."""
    client = sdk(gate, timeout=DEADLINE_S, max_retries=0)
    raw = client.images.with_raw_response.generate(**asked, extra_headers=headers)
    for event in raw.parse():
        log.add(who, label(event))
        if event.type.endswith("completed"):
            decodable(event.b64_json)
    return dict(raw.headers)


def test_a_repeat_while_the_first_streams_gets_the_events_so_far_then_the_rest_live(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=PACED_MS)
    asked, key, log = streamed("A kite, streamed twice"), {"Idempotency-Key": "live-1"}, Log()
    first = in_background(lambda: stream_with_sdk(clean, asked, "first", log, key))
    wait_for("the first's first event", lambda: log.lines or None)
    repeat = stream_with_sdk(clean, asked, "repeat", log, key)
    got = first.result(timeout=DEADLINE_S)
    assert log.of("first") == log.of("repeat") == EVENTS
    assert log.before("repeat partial:0", "first partial:1"), log.lines  # the events so far
    assert log.before("repeat partial:1", "first partial:2"), log.lines  # then live
    assert log.before("repeat partial:2", "first completed"), log.lines
    lags = ", ".join(f"{lag:.0f}" for lag in log.lags_ms())
    print(f"\nlive repeat, one process: each later event {lags} ms after the first got it")
    assert repeat["x-tollgate-replay-of"] == got["x-tollgate-request-id"]
    assert repeat["x-tollgate-cost-usd"] == "0"
    one_charge(clean, sim, repeat["x-tollgate-request-id"], got["x-tollgate-request-id"], 2)


def test_an_sdk_retry_of_a_stream_whose_client_left_follows_it_live(
    clean: Tollgate, sim: Simulator
) -> None:
    """The first's client reads one event and hangs up (then a retry may follow): from then
    on its stream is kept as it goes, and the SDK's retry gets the event it missed at once,
    while the first attempt is still in flight, then the rest."""
    sim.configure(latency_ms=PACED_MS)
    asked = streamed("A kite, left and retried")
    headers = {"authorization": f"Bearer {DESIGN_KEY}", "x-stainless-retry-count": "0"}
    url = f"{clean.url}/v1/images/generations"
    with httpx.stream("POST", url, json=asked, headers=headers, timeout=DEADLINE_S) as first:
        first_id = first.headers["x-tollgate-request-id"]
        read = b""
        for chunk in first.iter_raw():
            read += chunk
            if b"\n\n" in read:
                break  # one event, then the client is gone
    log = Log()
    retry = {"x-stainless-retry-count": "1"}
    client = sdk(clean, timeout=DEADLINE_S, max_retries=0)
    raw = client.images.with_raw_response.generate(**asked, extra_headers=retry)
    states = []
    for event in raw.parse():
        log.add("retry", label(event))
        states.append(clean.row(first_id)["state"])
    assert log.of("retry") == EVENTS
    assert states[0] == "reserved", "the retry got the first event while the first streamed"
    assert raw.headers["x-tollgate-replay-of"] == first_id
    one_charge(clean, sim, raw.headers["x-tollgate-request-id"], first_id, 2)


def test_a_stream_whose_reader_timed_out_is_replayed_as_its_events(
    clean: Tollgate, sim: Simulator
) -> None:
    """The SDK retries a stream only until its headers arrive; a reader that times out
    mid-stream raises (not retried by the SDK). Its events are kept, and its retry (the
    same body, `x-stainless-retry-count: 1`) gets them, whole, at no cost."""
    sim.configure(latency_ms=LATENCY_MS)
    asked = {**body("A kite, streamed and retried"), "stream": True, "partial_images": 1}
    client = sdk(clean)
    with pytest.raises((openai.APITimeoutError, httpx.TimeoutException)):
        for _ in client.images.generate(**asked):  # type: ignore[call-overload]
            pass
    first = wait_for("the first stream settled", lambda: settled(clean, 1)[0])
    assert first["outcome"] == "ok"
    replay = post(clean, asked, retry=1)
    assert replay is not None and replay.status_code == 200
    assert replay.headers["x-tollgate-replay-of"] == first["id"]
    events = stream_events(replay.text)
    kinds = [json.loads(e.split("data: ", 1)[1])["type"] for e in events]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    done = json.loads(events[-1].split("data: ", 1)[1])
    decodable(done["b64_json"])
    one_charge(clean, sim, replay.headers["x-tollgate-request-id"], first["id"], 2)


# -- another replica follows the stream through the shared ledger ------------------------------


def test_a_repeat_on_another_replica_follows_the_stream_live(
    sim: Simulator, tmp_path: Path, shared: str
) -> None:
    configure(tmp_path, sim)
    a = start_tollgate(tmp_path, ledger_url=shared)
    b = start_tollgate(tmp_path, ledger_url=shared)
    try:
        sim.configure(latency_ms=PACED_MS)
        asked, key, log = streamed("A kite, two replicas"), {"Idempotency-Key": "live-2"}, Log()
        first = in_background(lambda: stream_with_sdk(a, asked, "first", log, key))
        wait_for("the first's first event", lambda: log.lines or None)
        repeat = stream_with_sdk(b, asked, "repeat", log, key)
        got = first.result(timeout=DEADLINE_S)
        assert log.of("first") == log.of("repeat") == EVENTS
        assert log.before("repeat partial:0", "first partial:1"), log.lines
        assert log.before("repeat partial:2", "first completed"), log.lines
        lags = ", ".join(f"{lag:.0f}" for lag in log.lags_ms())
        print(f"\nlive repeat, another replica: each later event {lags} ms after the first")
        one_charge(b, sim, repeat["x-tollgate-request-id"], got["x-tollgate-request-id"], 2)
        assert b.query("SELECT count(*) AS n FROM kept_chunks")[0]["n"] >= 1
    finally:
        a.stop()
        b.stop()


def test_a_follower_whose_first_is_killed_mid_stream_ends_with_an_error_event(
    sim: Simulator, tmp_path: Path, shared: str
) -> None:
    """A's process dies (-9) after the repeat on B got some of its events: B cannot send a
    new request's events after them, so it ends the stream with an error event in OpenAI's
    shape, which the SDK raises; it does not wait for the first's deadline (120 s, past the
    SDK's read timeout)."""
    configure(tmp_path, sim, timeout_s=60)
    a = start_tollgate(tmp_path, ledger_url=shared)
    b = start_tollgate(tmp_path, ledger_url=shared)
    try:
        sim.configure(latency_ms=3 * PACED_MS)
        asked, key, log = streamed("A kite, a replica killed"), {"Idempotency-Key": "live-3"}, Log()

        def first_stream() -> None:
            with pytest.raises((openai.APIConnectionError, httpx.TransportError)):
                stream_with_sdk(a, asked, "first", log, key)

        first = in_background(first_stream)
        wait_for("the first's first event", lambda: log.lines or None)
        repeat = in_background(lambda: stream_with_sdk(b, asked, "repeat", log, key))
        wait_for("the repeat's first event", lambda: log.of("repeat") or None)
        a.process.kill()
        a.process.wait()
        first.result(timeout=DEADLINE_S)
        with pytest.raises(openai.APIError) as ended:
            repeat.result(timeout=DEADLINE_S)
        assert "stopped streaming before its end" in str(ended.value)
        assert log.of("repeat") == ["partial:0"]
    finally:
        a.stop()
        b.stop()
