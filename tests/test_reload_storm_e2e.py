"""Reloads and stops under load: a worker replaced at a reload, or a server stopped by
SIGTERM, breaks no client's request or connection, and every request is settled once."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from proxy.core.auth import key_hash
from tests.batches_e2e import GENERATIONS, generations, upload
from tests.conftest import (
    BACKENDS,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    backend_url,
    drop_ledger,
    output,
    start_tollgate,
    workers_of,
    write_config,
)

ADMIN = "admin-reload-token"


def reload(gate: Tollgate) -> None:
    answer = httpx.post(
        f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}, timeout=60
    )
    assert answer.status_code == 200, answer.text


def test_a_reload_waits_for_a_worker_slow_to_start(simulator: Simulator, tmp_path: Path) -> None:
    """A new worker registers in the ledger before it serves: with the ledger's write lock
    held for longer than uvicorn's 5 s health check, the supervisor used to kill it as
    hung and keep the old worker, under the old configuration."""
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n")
    gate = start_tollgate(tmp_path, "--workers", "2")
    try:
        before = set(workers_of(gate.process.pid))
        with (
            sqlite3.connect(tmp_path / "tollgate.db", isolation_level=None) as db,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            db.execute("BEGIN IMMEDIATE")  # the write lock every worker's writes wait for
            reloaded = pool.submit(reload, gate)  # answered once every worker is replaced
            time.sleep(8)
            assert not reloaded.done()
            db.execute("ROLLBACK")
            reloaded.result(timeout=90)
        deadline = time.monotonic() + 90
        while (now := set(workers_of(gate.process.pid))) & before or len(now) != 2:
            assert time.monotonic() < deadline, output(gate.process)
            time.sleep(0.2)
    finally:
        log = gate.stop()
    assert "not ready in time" not in log and "died" not in log


@dataclass
class Storm:
    """Requests sent back to back by `clients` tasks of one SDK client (max_retries=0)
    until `stop` is set: each answer's Tollgate request id, and every error."""

    ids: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retried: int = 0
    """Requests a replaced worker could not decide, had it failed to read the new
    configuration (`Superseded`), refused before anything was reserved with a 503
    `configuration_reloaded` that closes the connection and tells the SDKs to retry on a
    new one; with `max_retries=0` the storm would see them. A request a reload overtook
    while it was decided is decided again under the new configuration: no error."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, gate: Tollgate, clients: int) -> None:
        sdk = openai.AsyncOpenAI(base_url=f"{gate.url}/v1", api_key=DESIGN_KEY, max_retries=0)

        async def client(c: int) -> None:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    raw = await sdk.images.with_raw_response.generate(
                        model="gpt-image-2", prompt=f"{c}-{i}", quality="low", size="1024x1024"
                    )
                    self.ids.append(raw.headers["x-tollgate-request-id"])
                except openai.APIStatusError as exc:
                    if (
                        exc.status_code == 503
                        and exc.code == "configuration_reloaded"
                        and exc.response.headers.get("x-should-retry") == "true"
                        and exc.response.headers.get("connection") == "close"
                    ):
                        self.retried += 1
                    else:
                        self.errors.append(f"{type(exc).__name__}: {exc!r}")
                except openai.APIError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc!r} ({exc.__cause__!r})")

        async with sdk:
            await asyncio.gather(*(client(c) for c in range(clients)))


def settled_once(gate: Tollgate, ids: list[str]) -> None:
    """Every answered request is one settled row, and nothing is held."""
    rows = gate.query("SELECT id, state, outcome, cost_nanos FROM requests")
    assert len(ids) == len(set(ids))
    by_id = {r["id"]: r for r in rows}
    assert set(ids) <= set(by_id)
    assert all(r["state"] == "settled" for r in rows)
    assert all(by_id[i]["outcome"] == "ok" and by_id[i]["cost_nanos"] > 0 for i in ids)
    held = gate.query("SELECT scope, period, reserved_nanos FROM budget_usage")
    assert all(r["reserved_nanos"] == 0 for r in held), held


async def replaced(gate: Tollgate, ask: Callable[[], None]) -> None:
    """Ask for a reload, and wait until the supervisor has replaced every worker."""
    before = set(workers_of(gate.process.pid))
    await asyncio.to_thread(ask)
    deadline = time.monotonic() + 120
    while (now := set(workers_of(gate.process.pid))) & before or len(now) != len(before):
        assert time.monotonic() < deadline, output(gate.process)
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_during_a_storm_break_no_request(
    simulator: Simulator, tmp_path: Path, workers: int
) -> None:
    """Three reloads (two asked over HTTP, one by SIGHUP), with two workers each replacing
    both, while 16 clients send requests back to back without retrying: not one error."""
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n")
    simulator.configure(latency_ms=100)
    gate = start_tollgate(tmp_path, "--workers", str(workers))
    storm = Storm()

    async def reloads() -> None:
        await asyncio.sleep(1)
        for ask in (
            lambda: reload(gate),
            lambda: os.kill(gate.process.pid, signal.SIGHUP),
            lambda: reload(gate),
        ):
            if workers > 1:
                await replaced(gate, ask)
            else:
                await asyncio.to_thread(ask)
                await asyncio.sleep(1)
            await asyncio.sleep(0.5)
        storm.stop.set()

    async def both() -> None:
        await asyncio.gather(storm.run(gate, 16), reloads())

    try:
        asyncio.run(both())
    finally:
        simulator.configure(latency_ms=0)
        log = gate.stop()
    assert not storm.errors, storm.errors[:5]
    assert len(storm.ids) > 50
    if workers > 1:
        assert log.count("Received SIGHUP") == 3 and "not ready in time" not in log
    else:
        assert log.count("configuration reloaded") == 3
    settled_once(gate, storm.ids)


def test_a_request_sent_late_on_a_connection_a_replaced_worker_holds_completes(
    simulator: Simulator, tmp_path: Path
) -> None:
    """A connection a worker accepted before a reload replaced it brings its request 9 s
    after the worker was told to stop (its header deadline is 30 s), and the upstream takes
    9 s of its 12 s deadline. uvicorn cancelled what a stopping worker still ran 17 s after
    the stop (the deadline + 5 s), and the client got a plain 500; the worker now lets it
    finish, and it is answered and settled."""
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n")
    settings = tmp_path / "tollgate.yaml"
    settings.write_text(
        settings.read_text().replace("timeout_s: 3", "timeout_s: 10\n  total_timeout_s: 12")
        + "limits:\n  header_timeout_s: 30\n"
    )
    gate = start_tollgate(tmp_path, "--workers", "2")
    body = json.dumps({"model": "gpt-image-2", "prompt": "late", "quality": "low"}).encode()
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nhost: t\r\ncontent-type: application/json"
        f"\r\nauthorization: Bearer {DESIGN_KEY}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    port = int(gate.url.rsplit(":", 1)[1])
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            time.sleep(0.5)  # accepted by a worker the reload replaces
            reload(gate)  # answered 0.5 s after the old workers were told to stop
            simulator.configure(latency_ms=9000)
            time.sleep(8.5)
            sock.sendall(head.encode() + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        simulator.configure(latency_ms=0)
        log = gate.stop()
    assert answer.startswith(b"HTTP/1.1 200 "), (answer[:300], log[-3000:])
    assert b"connection: close" in answer.lower()
    [row] = gate.query("SELECT state, outcome FROM requests")
    assert (row["state"], row["outcome"]) == ("settled", "ok")


def exchange(sock: socket.socket, path: str = "/healthz") -> bytes:
    """One GET on a kept-alive connection: the answer's bytes, headers and body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_what_is_asked_and_refuses_new_connections(
    simulator: Simulator, tmp_path: Path, workers: int
) -> None:
    """SIGTERM: a request in flight ends and is settled; the next request on an idle
    kept-alive connection is answered, with `Connection: close`; a new connection is
    refused at once (with several workers too: the supervisor's socket used to queue them
    until the workers were done, then reset them). One whose handshake the kernel completed
    as the last worker closed the socket may be reset instead, at once."""
    write_config(tmp_path, f"{simulator.url}/v1")
    gate = start_tollgate(tmp_path, "--workers", str(workers))
    idle = socket.create_connection(("127.0.0.1", int(gate.url.rsplit(":", 1)[1])))
    assert b"200 OK" in exchange(idle)
    results: list[object] = []

    def slow() -> None:
        try:
            results.append(
                openai.OpenAI(base_url=f"{gate.url}/v1", api_key=DESIGN_KEY, max_retries=0)
                .images.with_raw_response.generate(
                    model="gpt-image-2", prompt="slow", quality="low", size="1024x1024"
                )
                .headers["x-tollgate-request-id"]
            )
        except openai.APIError as exc:
            results.append(exc)

    simulator.configure(latency_ms=2000)
    caller = threading.Thread(target=slow)
    try:
        caller.start()
        deadline = time.monotonic() + 60
        while not gate.query("SELECT id FROM requests WHERE state = 'reserved'"):
            assert time.monotonic() < deadline, "the request was never reserved"
            time.sleep(0.02)
        assert b"200 OK" in exchange(idle)  # idle from now: its keep-alive time ahead
        gate.process.send_signal(signal.SIGTERM)
        refused_by = time.monotonic() + 5
        while True:  # served until it stops listening, then refused: never held
            try:
                assert httpx.get(f"{gate.url}/healthz", timeout=10).status_code == 200
            except httpx.ConnectError:
                break
            except httpx.ReadError:
                # A handshake the kernel completed just before the last worker closed the
                # socket is queued, then reset when it closes: a reset at once, not one held
                # until the workers are done (the request in flight has not ended yet).
                assert caller.is_alive(), "a new connection was held, then reset"
                break
            assert time.monotonic() < refused_by, "new connections still accepted"
            time.sleep(0.05)
        last = exchange(idle)
        assert b"200 OK" in last and b"connection: close" in last.lower()
        assert idle.recv(1) == b""  # closed after the answer
        caller.join(timeout=60)
        gate.process.wait(timeout=60)
    finally:
        idle.close()
        simulator.configure(latency_ms=0)
        gate.stop()
    [request_id] = results
    assert isinstance(request_id, str), request_id
    settled_once(gate, [request_id])


def test_no_reload_moves_the_workers_to_another_ledger(
    simulator: Simulator, tmp_path: Path
) -> None:
    """With two workers, a reload that names another ledger used to move each replaced
    worker to it, with none of the spend made so far: a $0.10 hard limit let $0.20 through,
    $0.10 in each ledger. Asked over HTTP it is refused, and by SIGHUP to the supervisor the
    new workers refuse to start and the old ones stay: one ledger, one limit."""
    teams = {
        "design": f"""
            name: design
            keys:
              - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
            budgets:
              - {{period: total, limit_usd: 0.10}}
        """
    }
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n", teams=teams)
    gate = start_tollgate(tmp_path, "--workers", "2")
    sdk = gate.client()

    def spend(times: int) -> int:
        done = 0
        for _ in range(times):
            with contextlib.suppress(openai.RateLimitError):
                sdk.images.generate(model="gpt-image-2", prompt="x", quality="low")
                done += 1
        return done

    try:
        fit = spend(25)
        assert 0 < fit < 25
        settings = tmp_path / "tollgate.yaml"
        settings.write_text(settings.read_text().replace("tollgate.db", "elsewhere.db"))
        refused = httpx.post(
            f"{gate.url}/admin/reload", headers={"authorization": f"Bearer {ADMIN}"}, timeout=60
        )
        assert refused.status_code == 400 and "ledger: changed" in refused.text
        before = set(workers_of(gate.process.pid))
        os.kill(gate.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 90
        while "aborting the restart" not in output(gate.process):
            assert time.monotonic() < deadline, output(gate.process)
            time.sleep(0.2)
        assert set(workers_of(gate.process.pid)) == before
        assert spend(25) == 0
    finally:
        log = gate.stop()
    assert "ledger cannot change on a reload" in log
    assert not (tmp_path / "elsewhere.db").exists()
    [spent] = gate.query("SELECT sum(cost_nanos) AS s FROM requests WHERE state = 'settled'")
    assert 0 < spent["s"] <= 100_000_000


def across_a_reload(
    gate: Tollgate, path: str, media: str, body: bytes, change: Callable[[], None]
) -> bytes:
    """POST `body` to `path` with the design team's key on a raw connection: its headers
    and first bytes, then `change` (the teams' files rewritten) and a reload, then the rest.
    The answer, up to the end of its head at least."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: {media}\r\n"
        f"authorization: Bearer {DESIGN_KEY}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    port = int(gate.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head.encode() + body[:10])
        time.sleep(0.5)  # the headers are in: the request has taken its runtime
        change()
        reload(gate)
        sock.sendall(body[10:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
    return answer


def image_or_batch(gate: Tollgate, path: str, quality: str) -> bytes:
    """The JSON body of an image request (`quality`), or of a batch of two image lines
    uploaded first."""
    if path == "/v1/batches":
        uploaded = upload(gate.client(), generations("gpt-image-2", 2))
        fields = {"input_file_id": uploaded.id, "endpoint": GENERATIONS, "completion_window": "24h"}
    else:
        fields = {"model": "gpt-image-2", "prompt": "a slow body", "quality": quality}
    return json.dumps(fields).encode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_once_a_reload_answers_a_revoked_key_works_on_no_worker(
    simulator: Simulator, tmp_path: Path, backend: str
) -> None:
    """Two workers, one with requests in flight, and the design team's key revoked. The
    reload used to answer at once, and the supervisor replaced the workers one at a time,
    waiting for the first to finish its requests before replacing the second: the revoked
    key went on working for as long (96 of 472 requests over 25 s). Now the answer comes
    once every worker serves the new files; the requests in flight still end and settle."""
    ledger_url = backend_url(backend)
    write_config(tmp_path, f"{simulator.url}/v1", settings=f"admin_token: {ADMIN}\n")
    settings = tmp_path / "tollgate.yaml"
    settings.write_text(settings.read_text().replace("timeout_s: 3", "timeout_s: 30"))
    gate = start_tollgate(tmp_path, "--workers", "2", ledger_url=ledger_url)
    slow: list[str] = []

    def in_flight() -> None:
        raw = gate.client(timeout=60).images.with_raw_response.generate(
            model="gpt-image-2", prompt="slow", quality="low", size="1024x1024"
        )
        slow.append(raw.headers["x-tollgate-request-id"])

    callers = [threading.Thread(target=in_flight) for _ in range(4)]
    try:
        simulator.configure(latency_ms=10_000)
        for caller in callers:
            caller.start()
        deadline = time.monotonic() + 60
        while len(gate.query("SELECT id FROM requests WHERE state = 'reserved'")) < 4:
            assert time.monotonic() < deadline, "the requests were never reserved"
            time.sleep(0.05)
        team = tmp_path / "teams" / "design.yaml"
        team.write_text(team.read_text().replace(key_hash(DESIGN_KEY), key_hash("tg_new_0001")))
        reload(gate)
        statuses = []
        for _ in range(40):  # a connection each: each may reach either worker
            with httpx.Client() as fresh:
                statuses.append(
                    fresh.post(
                        f"{gate.url}/v1/images/generations",
                        headers={"authorization": f"Bearer {DESIGN_KEY}"},
                        json={"prompt": "revoked", "quality": "low", "size": "1024x1024"},
                        timeout=30,
                    ).status_code
                )
        assert set(statuses) == {401}, statuses
        for caller in callers:
            caller.join(timeout=60)
    finally:
        simulator.configure(latency_ms=0)
        gate.stop()
    try:
        assert len(slow) == 4
        settled_once(gate, slow)
    finally:
        drop_ledger(ledger_url)


@pytest.mark.parametrize(
    ("path", "change", "status"),
    [
        ("/v1/images/generations", "key", 401),
        ("/v1/images/generations", "budget", 429),
        ("/v1/batches", "key", 401),
        ("/v1/batches", "budget", 429),
    ],
)
def test_a_request_whose_body_arrives_after_a_reload_is_admitted_under_the_new_configuration(
    simulator: Simulator, tmp_path: Path, path: str, change: str, status: int
) -> None:
    """The headers arrive, then a reload revokes the key (or cuts the day's budget to a
    micro-dollar), then the body ends. The request used to be admitted under the
    configuration it found on arrival: forwarded and billed ($0.21 for the image) with a
    key refused everywhere else, past the new hard limit, up to `limits.body_timeout_s`
    (300 s) after the reload."""

    def design(key: str, limit: str) -> dict[str, str]:
        budget = f"budgets:\n  - {{period: day, limit_usd: {limit}}}\n"
        return {"design": f"name: design\nkeys:\n  - {{id: a, sha256: {key_hash(key)}}}\n{budget}"}

    write_config(
        tmp_path, f"{simulator.url}/v1", f"admin_token: {ADMIN}\n", design(DESIGN_KEY, "1")
    )
    gate = start_tollgate(tmp_path)
    body = image_or_batch(gate, path, "high")

    def cut() -> None:
        revoked = change == "key"
        key, limit = ("tg_test_rotated_0001", "1") if revoked else (DESIGN_KEY, "0.000001")
        for name, text in design(key, limit).items():
            (tmp_path / "teams" / f"{name}.yaml").write_text(text)

    try:
        answer = across_a_reload(gate, path, "application/json", body, cut)
    finally:
        gate.stop()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    [row] = gate.query("SELECT state, cost_nanos FROM requests")
    assert (row["state"], row["cost_nanos"]) == ("settled", 0)


@pytest.mark.parametrize("path", ["/v1/files", "/v1/moderations"])
def test_an_upload_or_passthrough_whose_body_arrives_after_a_reload_revoking_its_key_is_refused(
    simulator: Simulator, tmp_path: Path, path: str
) -> None:
    """As for an image request: the headers arrive, a reload revokes the key, then the body
    ends. A file upload used to be forwarded and recorded as the team's (200), and a
    passthrough request forwarded with the company key, under the key refused everywhere
    else, up to `limits.body_timeout_s` after the reload."""

    def design(key: str) -> dict[str, str]:
        return {"design": f"name: design\nkeys:\n  - {{id: a, sha256: {key_hash(key)}}}\n"}

    settings = (
        f"admin_token: {ADMIN}\npassthrough:\n  - {{path: /v1/moderations, methods: [POST]}}\n"
    )
    write_config(tmp_path, f"{simulator.url}/v1", settings, design(DESIGN_KEY))
    gate = start_tollgate(tmp_path)
    if path == "/v1/files":
        boundary = "b0undary"
        lines = b"".join(json.dumps(one).encode() + b"\n" for one in generations("gpt-image-2", 2))
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"'
                "\r\nContent-Type: application/jsonl\r\n\r\n"
            ).encode()
            + lines
            + f"\r\n--{boundary}--\r\n".encode()
        )
        media = f"multipart/form-data; boundary={boundary}"
    else:
        body, media = b'{"input": "a slow body, revoked"}', "application/json"
    arrivals = f"{simulator.url}/_sim/arrivals"
    before = [a for a in httpx.get(arrivals).json()["requests"] if a["raw_path"] == path]

    def revoke() -> None:
        for name, text in design("tg_test_rotated_0001").items():
            (tmp_path / "teams" / f"{name}.yaml").write_text(text)

    try:
        answer = across_a_reload(gate, path, media, body, revoke)
    finally:
        gate.stop()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
    after = [a for a in httpx.get(arrivals).json()["requests"] if a["raw_path"] == path]
    assert after == before
    assert gate.query("SELECT id FROM stored_objects") == []


@pytest.mark.parametrize(
    ("path", "status"), [("/v1/images/generations", 200), ("/v1/batches", 404)]
)
def test_a_request_whose_key_moved_team_while_its_body_arrived_names_its_new_team(
    simulator: Simulator, tmp_path: Path, path: str, status: int
) -> None:
    """The headers arrive, then a reload moves the key to another team, then the body
    ends: the request is that team's (the batch's input file, uploaded by the first team,
    is not found), and its answer names that team, not the one its headers found."""

    def team(name: str, key: str) -> str:
        keys = f"keys:\n  - {{id: a, sha256: {key_hash(key)}}}\n"
        return f"name: {name}\n{keys}budgets:\n  - {{period: day, limit_usd: 1}}\n"

    write_config(
        tmp_path,
        f"{simulator.url}/v1",
        f"admin_token: {ADMIN}\n",
        {"design": team("design", DESIGN_KEY), "brand": team("brand", "tg_test_brand_0001")},
    )
    gate = start_tollgate(tmp_path)
    body = image_or_batch(gate, path, "low")

    def move() -> None:
        (tmp_path / "teams" / "design.yaml").write_text(team("design", "tg_test_other_0001"))
        (tmp_path / "teams" / "brand.yaml").write_text(team("brand", DESIGN_KEY))

    try:
        answer = across_a_reload(gate, path, "application/json", body, move)
    finally:
        gate.stop()
    head_lines = answer.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert head_lines[0].startswith(f"http/1.1 {status} ".encode()), answer[:300]
    assert b"x-tollgate-team: brand" in head_lines, answer[:600]
    teams = {row["team"] for row in gate.query("SELECT team FROM requests")}
    assert teams == {"brand"}


class LateFirstBody(httpx.BaseTransport):
    """The official client's transport, but its first attempt's body stops after 10 bytes
    (`head_sent` set) until `go_on` is set; any retry is sent whole. The status of each
    answer is kept."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.head_sent, self.go_on = threading.Event(), threading.Event()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.statuses and not self.head_sent.is_set():
            body = request.read()

            def late() -> Iterator[bytes]:
                yield body[:10]
                self.head_sent.set()
                assert self.go_on.wait(60)
                yield body[10:]

            request = httpx.Request(
                request.method, request.url, headers=request.headers, content=late()
            )
        answer = self.inner.handle_request(request)
        self.statuses.append(answer.status_code)
        return answer

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize(
    ("path", "change"),
    [
        ("/v1/images/generations", "key"),
        ("/v1/images/generations", "budget"),
        ("/v1/files", "key"),
        ("/v1/batches", "budget"),
    ],
)
def test_with_workers_a_request_whose_body_arrives_after_a_reload_is_decided_under_the_new_one(
    simulator: Simulator, tmp_path: Path, path: str, change: str
) -> None:
    """With two workers, the headers reach an old worker, then a reload revokes the key (or
    cuts the day's budget to a micro-dollar) and replaces both workers, then the body ends.
    The old worker, draining, used to admit the request under the configuration it was
    replaced for: forwarded and billed ($0.21 for the image) with the revoked key, or past
    the new limit. Told it was replaced, it now reads the files again, and refuses it under
    them as a single worker does: 401, or 429, at once."""

    def design(key: str, limit: str) -> dict[str, str]:
        budget = f"budgets:\n  - {{period: day, limit_usd: {limit}}}\n"
        return {"design": f"name: design\nkeys:\n  - {{id: a, sha256: {key_hash(key)}}}\n{budget}"}

    write_config(
        tmp_path, f"{simulator.url}/v1", f"admin_token: {ADMIN}\n", design(DESIGN_KEY, "1")
    )
    gate = start_tollgate(tmp_path, "--workers", "2")
    uploaded = upload(gate.client(), generations("gpt-image-2", 2))
    arrivals = f"{simulator.url}/_sim/arrivals"
    before = [a for a in httpx.get(arrivals).json()["requests"] if a["raw_path"] == path]
    transport = LateFirstBody()
    sdk = openai.OpenAI(
        base_url=f"{gate.url}/v1",
        api_key=DESIGN_KEY,
        max_retries=2,
        http_client=httpx.Client(transport=transport, timeout=60),
    )
    expected = openai.AuthenticationError if change == "key" else openai.RateLimitError
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            if path == "/v1/files":
                asked = pool.submit(upload, sdk, generations("gpt-image-2", 2))
            elif path == "/v1/batches":
                asked = pool.submit(
                    sdk.batches.create,
                    input_file_id=uploaded.id,
                    endpoint=GENERATIONS,
                    completion_window="24h",
                )
            else:
                asked = pool.submit(
                    sdk.images.generate,
                    model="gpt-image-2",
                    prompt="a slow body",
                    quality="high",
                    size="1024x1024",
                )
            assert transport.head_sent.wait(60), "the request never started"
            time.sleep(0.5)  # the headers are in: the request has taken its worker's runtime
            revoked = change == "key"
            key, limit = ("tg_test_rotated_0001", "1") if revoked else (DESIGN_KEY, "0.000001")
            for name, text in design(key, limit).items():
                (tmp_path / "teams" / f"{name}.yaml").write_text(text)
            reload(gate)
            transport.go_on.set()
            with pytest.raises(expected):
                asked.result(timeout=120)
        finally:
            transport.go_on.set()
            gate.stop()
    assert transport.statuses == [401 if change == "key" else 429]
    after = [a for a in httpx.get(arrivals).json()["requests"] if a["raw_path"] == path]
    assert after == before  # nothing forwarded
    rows = gate.query("SELECT state, status, cost_nanos FROM requests")
    assert {(r["state"], r["cost_nanos"]) for r in rows} <= {("settled", 0)}
    assert [o["id"] for o in gate.query("SELECT id FROM stored_objects")] == [uploaded.id]
