"""What one client may make Tollgate hold: slow headers, slow bodies, idle sockets, big bodies.

Each bound is proved against a running Tollgate; waits are bounded waits for a condition.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from proxy.core.multipart import Upload, encode_multipart
from tests.conftest import (
    DESIGN_KEY,
    Simulator,
    Tollgate,
    free_port,
    output,
    start_tollgate,
    stop,
    wait_until_up,
    write_config,
)

MiB = 1024 * 1024
# Two edit bodies of ~2.5 MiB (charged 3x: ~7.5 MiB each) fit in 16 MiB; a third does not.
SETTINGS = """
limits:
  edits_bytes: 4194304
  variations_bytes: 4194304
  inflight_bytes: 16777216
  header_timeout_s: 1
  body_idle_timeout_s: 1
passthrough:
  - {path: /v1/moderations, methods: [POST]}
"""


@pytest.fixture(scope="module")
def tollgate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("policies")
    write_config(root, f"{simulator.url}/v1", settings=SETTINGS)
    proxy = start_tollgate(root)
    yield proxy
    proxy.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def body_bytes(tollgate: Tollgate) -> float:
    return tollgate.metric("tollgate_inflight_body_bytes")


def closed_by_server(sock: socket.socket, timeout: float = 20.0) -> bool:
    """Whether the server closes `sock` (end of file or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def port_of(tollgate: Tollgate) -> int:
    return int(tollgate.url.rsplit(":", 1)[1])


def big_png(nbytes: int) -> bytes:
    """A PNG of noise of about `nbytes` (noise does not compress)."""
    side = int((nbytes / 3) ** 0.5)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def image() -> bytes:
    return big_png(int(2.5 * MiB))


def edit_body(image: bytes) -> tuple[bytes, str]:
    return encode_multipart(
        {
            "model": "gpt-image-2",
            "prompt": "add a lighthouse",
            "quality": "low",
            "size": "1024x1024",
        },
        (Upload("image", image, "png"),),
    )


def start_post(
    tollgate: Tollgate, path: str, body: bytes, content_type: str, sent: int
) -> http.client.HTTPConnection:
    """A POST whose headers declare all of `body` but only its first `sent` bytes go."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(tollgate), timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("authorization", f"Bearer {DESIGN_KEY}")
    conn.putheader("content-type", content_type)
    conn.putheader("content-length", str(len(body)))
    conn.endheaders()
    conn.send(body[:sent])
    return conn


def half_sent_edits(
    tollgate: Tollgate, body: bytes, content_type: str
) -> list[http.client.HTTPConnection]:
    """Two edits whose headers and first half are in: each holds its charge meanwhile."""
    held = [
        start_post(tollgate, "/v1/images/edits", body, content_type, len(body) // 2)
        for _ in range(2)
    ]
    wait_for(lambda: body_bytes(tollgate) == 2 * 3 * len(body), "two bodies are charged")
    return held


def finish_edits(held: list[http.client.HTTPConnection], body: bytes) -> list[bytes]:
    """Send the rest of `half_sent_edits`' bodies; their answers, each a 200."""
    for conn in held:
        conn.send(body[len(body) // 2 :])
    answers = []
    for conn in held:
        done = conn.getresponse()
        answer = done.read()
        assert done.status == 200, answer
        answers.append(answer)
        conn.close()
    return answers


def test_a_connection_that_does_not_finish_its_headers_is_closed(tollgate: Tollgate) -> None:
    silent = socket.create_connection(("127.0.0.1", port_of(tollgate)))
    partial = socket.create_connection(("127.0.0.1", port_of(tollgate)))
    # A byte at a time does not keep a connection open either: the deadline is not reset.
    partial.sendall(b"POST /v1/images/generations HTTP/1.1\r\nhost: x\r\n")
    partial.sendall(b"x-slow: 1")
    with silent, partial:
        assert closed_by_server(silent)
        assert closed_by_server(partial)
    assert httpx.get(f"{tollgate.url}/healthz").status_code == 200


def test_a_stalled_body_is_a_408_and_nothing_is_reserved_or_forwarded(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    before = len(simulator.billing())
    body = b'{"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low"}'
    conn = start_post(tollgate, "/v1/images/generations", body, "application/json", 20)
    answer = conn.getresponse()
    error = json.loads(answer.read())["error"]
    assert answer.status == 408
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
    assert answer.getheader("connection") == "close"
    assert answer.getheader("x-tollgate-cost-usd") == "0"
    conn.close()
    row = tollgate.row(answer.getheader("x-tollgate-request-id") or "")
    assert (row["status"], row["outcome"], row["reserved_nanos"]) == (408, "client_error", 0)
    assert tollgate.query("SELECT * FROM requests WHERE state = 'reserved'") == []
    assert len(simulator.billing()) == before
    assert body_bytes(tollgate) == 0
    assert tollgate.metric("tollgate_overload_refusals_total", reason="body_timeout") >= 1


def test_a_client_gone_mid_body_leaves_nothing_charged(tollgate: Tollgate, image: bytes) -> None:
    body, content_type = edit_body(image)
    conn = start_post(tollgate, "/v1/images/edits", body, content_type, len(body) // 2)
    wait_for(lambda: body_bytes(tollgate) == 3 * len(body), "the body is charged")
    conn.close()
    wait_for(lambda: body_bytes(tollgate) == 0, "the charge is given back")


def test_a_passthrough_body_is_charged_and_given_back(
    tollgate: Tollgate, simulator: Simulator
) -> None:
    body = b"x" * 100_000
    conn = start_post(tollgate, "/v1/moderations", body, "application/octet-stream", 10)
    wait_for(lambda: body_bytes(tollgate) == 3 * len(body), "the body is charged")
    conn.send(body[10:])
    conn.getresponse().read()  # whatever the upstream says of it
    conn.close()
    wait_for(lambda: body_bytes(tollgate) == 0, "the charge is given back")


def test_bodies_past_the_inflight_cap_get_503_and_the_accepted_ones_succeed(
    tollgate: Tollgate, simulator: Simulator, image: bytes
) -> None:
    before = len(simulator.billing())
    body, content_type = edit_body(image)
    # Two edits hold their charge while their bodies are on the way (their length is declared).
    held = half_sent_edits(tollgate, body, content_type)

    # A third, through the official client (which would retry it: x-should-retry, Retry-After).
    with pytest.raises(openai.InternalServerError) as refused:
        tollgate.client().images.edit(
            model="gpt-image-2",
            image=("big.png", image, "image/png"),
            prompt="add a lighthouse",
            quality="low",
            size="1024x1024",
        )
    answer = refused.value.response
    assert answer.status_code == 503
    error: dict[str, Any] = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "server_overloaded")
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["x-should-retry"] == "true"

    # A chunked body declares no length: it is refused once what came would pass the cap.
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    chunked = httpx.post(
        f"{tollgate.url}/v1/images/edits",
        content=chunks(),
        headers={"authorization": f"Bearer {DESIGN_KEY}", "content-type": content_type},
        timeout=30,
    )
    assert chunked.status_code == 503, chunked.text
    assert chunked.json()["error"]["code"] == "server_overloaded"

    for edited in finish_edits(held, body):
        assert b'"b64_json"' in edited
    wait_for(lambda: body_bytes(tollgate) == 0, "every charge is given back")
    assert len(simulator.billing()) == before + 2
    assert tollgate.metric("tollgate_overload_refusals_total", reason="inflight_bytes") >= 2


@pytest.fixture
def starved_tollgate(simulator: Simulator, tmp_path: Path) -> Iterator[Tollgate]:
    """A Tollgate allowed 700 file descriptors, as a small container would give it."""
    write_config(tmp_path, f"{simulator.url}/v1", settings="limits:\n  header_timeout_s: 2\n")
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="tollgate-", suffix=".log")[1])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(tmp_path),
                "--port",
                str(port),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (700, hard)),
        )
    from tests import conftest

    conftest.LOGS[process.pid] = log
    wait_until_up(f"http://127.0.0.1:{port}/healthz", process)
    yield Tollgate(f"http://127.0.0.1:{port}", tmp_path, process)
    stop(process)


def test_idle_sockets_past_the_descriptor_limit_do_not_starve_healthz(
    starved_tollgate: Tollgate,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    port = port_of(starved_tollgate)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(750)]
    try:
        health = httpx.get(f"{starved_tollgate.url}/healthz", timeout=30)
        assert health.status_code == 200, output(starved_tollgate.process)
        answer = starved_tollgate.client().images.generate(
            model="gpt-image-2", prompt="a lighthouse", quality="low", size="1024x1024"
        )
        assert answer.data
        deadline = time.monotonic() + 60
        open_ = list(idle)
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 1.0)
            for sock in readable:
                if closed_by_server(sock, timeout=1.0):
                    open_.remove(sock)
        assert open_ == [], f"{len(open_)} idle sockets still open"
    finally:
        for sock in idle:
            sock.close()
    assert starved_tollgate.process.poll() is None
    # The burst never took every descriptor (asyncio would have stopped accepting).
    assert "out of system resource" not in output(starved_tollgate.process)


@pytest.fixture
def busy_tollgate(simulator: Simulator, tmp_path: Path) -> Iterator[Tollgate]:
    write_config(
        tmp_path,
        f"{simulator.url}/v1",
        settings="limits:\n  max_connections: 2\n  edits_bytes: 4194304\n"
        "  variations_bytes: 4194304\n  inflight_bytes: 104857600\n",
    )
    proxy = start_tollgate(tmp_path)
    yield proxy
    proxy.stop()


def test_past_the_connection_cap_with_every_connection_busy_requests_get_503(
    busy_tollgate: Tollgate, simulator: Simulator, image: bytes
) -> None:
    before = len(simulator.billing())
    body, content_type = edit_body(image)
    busy = half_sent_edits(busy_tollgate, body, content_type)
    # Nothing idle to close: the third connection is read, answered 503 and closed.
    refused = httpx.post(
        f"{busy_tollgate.url}/v1/images/generations",
        json={"prompt": "a lighthouse", "quality": "low"},
        headers={"authorization": f"Bearer {DESIGN_KEY}"},
        timeout=30,
    )
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "server_overloaded")
    assert refused.headers["connection"] == "close"
    assert refused.headers["x-should-retry"] == "true"
    assert httpx.get(f"{busy_tollgate.url}/healthz", timeout=30).status_code == 200
    finish_edits(busy, body)
    assert len(simulator.billing()) == before + 2
    assert busy_tollgate.metric("tollgate_overload_refusals_total", reason="connections") == 1
