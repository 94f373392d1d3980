"""Retries never pay twice, end to end: the official SDKs (Python and Node) with a timeout
shorter than the upstream's rendering → Tollgate → the simulator.

The oracle is the simulator's billing record (what OpenAI would have charged), priced
from the price book's rates without Tollgate's meter; the ledger must show one charge
(`ok`, that cost) and every other attempt `replayed` at no cost.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
from PIL import Image

from tests import pg
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    drop_ledger,
    start_simulator,
    start_tollgate,
    stop,
    write_config,
)
from tests.responses_e2e import NODE_PROJECT, node_sdk, record_cost
from tests.test_proxy_e2e import expected_cost

T = TypeVar("T")
DEADLINE_S = 60.0
LATENCY_MS = 2500
"""The simulator's rendering time: longer than the clients' timeout."""
TIMEOUT_S = 1.0
IMAGE = {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}
TOOL = {"type": "image_generation", **IMAGE}


# -- waiting and the oracle ----------------------------------------------------------


def wait_for(what: str, found: Callable[[], T | None], timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def charges(sim: Simulator) -> list[dict[str, Any]]:
    """What the simulator billed since it was last reset."""
    return [r for r in sim.billing() if r["billed"]]


def arrivals(sim: Simulator) -> list[dict[str, Any]]:
    return sim.billing()


def settled(gate: Tollgate, count: int, timeout: float = DEADLINE_S) -> list[dict[str, Any]]:
    """The ledger's rows, once there are `count` and every one is settled (and no more
    arrive for a moment)."""

    def done() -> list[dict[str, Any]] | None:
        rows = gate.rows()
        if len(rows) >= count and all(r["state"] == "settled" for r in rows):
            return rows
        return None

    wait_for(f"{count} settled rows", done, timeout)
    time.sleep(0.3)
    return wait_for(f"{count} settled rows", done, timeout)


def nanos(usd: Decimal | str) -> int:
    return int(Decimal(usd) * 10**9)


def one_charge(
    gate: Tollgate, sim: Simulator, answer_id: str, replay_of: str | None, attempts: int
) -> dict[str, Any]:
    """The ledger of one request its client retried: one `ok` row that costs what the
    simulator billed once, every other attempt `replayed` at 0 (the answer's among them,
    naming the first); returns the `ok` row."""
    rows = settled(gate, attempts)
    billed = charges(sim)
    assert len(billed) == 1, billed
    record = billed[0]
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert len(ok) == 1, rows
    first = ok[0]
    assert first["upstream_request_id"] == record["id"]
    cost = record_cost(record) if record["endpoint"] == "responses" else None
    assert first["cost_nanos"] == (cost if cost is not None else nanos(expected_cost(record)))
    assert first["cost_nanos"] > 0
    others = [r for r in rows if r is not first]
    assert others, "no retry reached Tollgate"
    for row in others:
        assert (row["outcome"], row["cost_nanos"], row["flagged"]) == ("replayed", 0, 0), row
        assert row["upstream_request_id"] == first["id"]
    assert replay_of == first["id"]
    assert answer_id in {r["id"] for r in others}
    return first


def decodable(b64: str | None) -> tuple[int, int]:
    assert b64, "no image"
    with Image.open(io.BytesIO(base64.b64decode(b64))) as picture:
        size: tuple[int, int] = picture.size
        return size


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def body(prompt: str) -> dict[str, Any]:
    return {**IMAGE, "prompt": prompt}


def post(
    gate: Tollgate,
    json_body: dict[str, Any],
    *,
    key: str = DESIGN_KEY,
    retry: int | None = None,
    idempotency: str | None = None,
    timeout: float = DEADLINE_S,
    path: str = "/v1/images/generations",
) -> httpx.Response | None:
    """A raw POST as an SDK sends it (`retry`: its x-stainless-retry-count); None when the
    client gave up waiting (its connection is then closed: the client is gone)."""
    headers = {"authorization": f"Bearer {key}"}
    if retry is not None:
        headers["x-stainless-retry-count"] = str(retry)
    if idempotency is not None:
        headers["idempotency-key"] = idempotency
    try:
        return httpx.post(f"{gate.url}{path}", json=json_body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        return None


def sdk(gate: Tollgate, key: str = DESIGN_KEY, **options: Any) -> openai.OpenAI:
    """The official Python client as an application builds it: its default retries."""
    options.setdefault("timeout", TIMEOUT_S)
    return openai.OpenAI(base_url=f"{gate.url}/v1", api_key=key, **options)


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    """A simulator of this module's own: its billing record is this module's alone."""
    simulator = start_simulator()
    yield simulator
    stop(simulator.process)


def configure(root: Path, sim: Simulator, settings: str = "", timeout_s: float = 10) -> None:
    write_config(root, f"{sim.url}/v1", settings=settings)
    config = root / "tollgate.yaml"
    config.write_text(config.read_text().replace("timeout_s: 3", f"timeout_s: {timeout_s}"))


@pytest.fixture(scope="module")
def gate(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("retries")
    configure(root, sim)
    tollgate = start_tollgate(root)
    yield tollgate
    tollgate.stop()


@pytest.fixture(autouse=True)
def fresh(sim: Simulator) -> Iterator[None]:
    """Each test starts with an empty billing record and a calm simulator."""
    calm = {"latency_ms": 0, "payload_bytes": 0, "fault": None}
    sim.configure(**calm)
    httpx.post(f"{sim.url}/_sim/reset").raise_for_status()
    yield
    sim.configure(**calm)


@pytest.fixture
def clean(gate: Tollgate) -> Tollgate:
    """The module's Tollgate with an empty ledger of requests (rows are counted per test)."""
    wait_for("nothing in flight", lambda: all(r["state"] == "settled" for r in gate.rows()) or None)
    gate.query("DELETE FROM requests")
    gate.query("DELETE FROM kept_answers")
    return gate


# -- 1. the Python SDK: one image, one charge ------------------------------------------


def test_python_sdk_generation_retried_after_timeout_pays_once(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).images.with_raw_response.generate(prompt="A lighthouse, retried", **IMAGE)
    image = raw.parse()
    assert image.data is not None
    assert decodable(image.data[0].b64_json) == (1024, 1024)
    assert raw.headers["x-tollgate-cost-usd"] == "0"
    rows = settled(clean, 2)
    one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip


def test_python_sdk_edit_retried_with_a_new_boundary_pays_once(
    clean: Tollgate, sim: Simulator
) -> None:
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).images.with_raw_response.edit(
        image=("in.png", png(), "image/png"), prompt="Paint it blue, retried", **IMAGE
    )
    image = raw.parse()
    assert image.data is not None
    decodable(image.data[0].b64_json)
    rows = settled(clean, 2)
    one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip


def test_python_sdk_responses_request_retried_pays_once(clean: Tollgate, sim: Simulator) -> None:
    sim.configure(latency_ms=LATENCY_MS)
    raw = sdk(clean).responses.with_raw_response.create(
        model="gpt-5.5",
        input="A harbour at dawn, retried",
        tools=[TOOL],  # type: ignore[list-item]
        max_output_tokens=300,
        max_tool_calls=1,
    )
    response = raw.parse()
    calls = [o for o in response.output if o.type == "image_generation_call"]
    assert calls and decodable(calls[0].result)  # type: ignore[union-attr]
    rows = settled(clean, 2)
    first = one_charge(
        clean, sim, raw.headers["x-tollgate-request-id"], raw.headers.get("x-tollgate-replay-of"),
        len(rows),
    )  # fmt: skip
    assert first["response_id"] == response.id


def stream_events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e.strip()]


def test_a_stream_whose_reader_timed_out_is_replayed_as_its_events(
    clean: Tollgate, sim: Simulator
) -> None:
    """The SDK retries a stream only until its headers arrive; a reader that times out
    mid-stream raises (not retried by the SDK). Its events are kept, and its retry (the
    same body, `x-stainless-retry-count: 1`) gets them, whole, at no cost."""
    sim.configure(latency_ms=LATENCY_MS)
    asked = {**body("A kite, streamed and retried"), "stream": True, "partial_images": 1}
    client = sdk(clean)
    got: list[str] = []
    with pytest.raises((openai.APITimeoutError, httpx.TimeoutException)):
        for event in client.images.generate(**asked):  # type: ignore[call-overload]
            got.append(event.type)
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


# -- 2. the Node SDK -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["generate", "edit", "responses"])
def test_node_sdk_retried_after_timeout_pays_once(
    clean: Tollgate, sim: Simulator, kind: str
) -> None:
    node = node_sdk()
    sim.configure(latency_ms=LATENCY_MS)
    ran = subprocess.run(
        [node, str(NODE_PROJECT / "retries.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "TOLLGATE_BASE_URL": f"{clean.url}/v1",
            "TOLLGATE_API_KEY": DESIGN_KEY,
            "RETRY_KIND": kind,
            "PROMPT": f"A lighthouse, retried from Node ({kind})",
            "TIMEOUT_MS": str(int(TIMEOUT_S * 1000)),
        },
    )
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout)
    decodable(got["b64"])
    assert got["cost_usd"] == "0"
    rows = settled(clean, 2)
    first = one_charge(clean, sim, got["request_id"], got["replay_of"], len(rows))
    retried = [a["headers"].get("x-stainless-retry-count") for a in sim.billing()]
    assert retried == ["0"], "only the first attempt reaches the upstream"
    if kind == "responses":
        assert first["response_id"] == got["id"]


# -- 3. a retry while the first renders; after it answered a client that had gone --------


def in_background(work: Callable[[], T]) -> concurrent.futures.Future[T]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


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


# -- 4. what is not a repeat, a key reused, a first that failed ----------------------------


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


# -- 8. retries off ------------------------------------------------------------------------


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


# -- 5. replicas and workers ---------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[str]:
    url = pg.migrated_schema()
    yield url
    drop_ledger(url)


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


# -- 6. a storm of large answers against store_bytes -------------------------------------------


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


# -- 7. the process holding the first attempt is killed ----------------------------------------


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
    longer than its own deadline (no deadlock); a restarted A reclaims the first at its bound,
    flagged, and the SDK's next retry is forwarded as new. One settled row per request,
    nothing left reserved, and the ledger charges what the upstream billed (the dead first at
    its bound, for reconciliation)."""
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
        restarted = start_tollgate(tmp_path)  # reclaims what the dead process held
        last = post(restarted, asked, retry=2)
        assert last is not None and last.status_code == 200, last
        assert "x-tollgate-replay-of" not in last.headers
        decodable(last.json()["data"][0]["b64_json"])
        rows = settled(restarted, 3)
        assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
        dead, on_b, new = rows
        assert (dead["flagged"], dead["error_code"]) == (1, "outcome_unknown"), dead
        assert dead["cost_nanos"] == dead["estimated_nanos"] > 0
        assert (new["outcome"], new["flagged"]) == ("ok", 0) and new["cost_nanos"] > 0
        assert on_b["outcome"] in ("ok", "upstream_error")
        billed = charges(sim)
        assert {r["id"] for r in billed} >= {new["upstream_request_id"]}
        assert len(billed) == 1 + sum(r["outcome"] == "ok" for r in (on_b, new))
    finally:
        for gate in (a, b, restarted):
            if gate is not None:
                gate.stop()


def test_a_retry_waiting_on_a_killed_first_is_forwarded_with_time_to_render(
    sim: Simulator, tmp_path: Path
) -> None:
    configure(tmp_path, sim, timeout_s=3)
    a = start_tollgate(tmp_path)
    b = start_tollgate(tmp_path)
    try:
        sim.configure(latency_ms=2500)
        asked = body("A first attempt that dies, and a retry that should render")
        kill_while_rendering(a, sim, asked)
        retry = post(b, asked, retry=1)
        assert retry is not None and retry.status_code == 200, retry
    finally:
        a.stop()
        b.stop()


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
