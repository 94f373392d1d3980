"""Replicas whose clocks differ judge each other alive or dead on the ledger's one clock.

A replica is judged dead when it has been silent for 30 s. That silence used to be the
judge's wall clock less a heartbeat time written by the other replica's: two hosts whose
clocks were more than 30 s apart judged each other dead while both beat, and each then
charged the other's reservations in flight their bound (flagged `outcome_unknown`) and
adopted its background responses. Here one replica runs on a wall clock 45 s behind the
others'; and then one far enough behind that its requests, judged by the start its clock
wrote, were older than the age past which any reservation is reclaimed, whatever its owner
(that age is on the ledger's clock too now).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import load_config
from proxy.web.housekeeping import reclaim_after_s
from tests import pg
from tests.conftest import (
    BACKENDS,
    DESIGN_KEY,
    Simulator,
    Tollgate,
    backend_url,
    drop_ledger,
    free_port,
    start,
    start_tollgate,
    wait_for,
    write_config,
)
from tests.responses_e2e import tool

BEHIND_S = 45.0
"""How far the skewed replica's wall clock is behind: more than a replica may stay silent."""

SKEW = """
import os, time

_offset = float(os.environ["TOLLGATE_TEST_CLOCK_OFFSET_S"])
_wall = time.time
time.time = lambda: _wall() + _offset
"""
"""A `sitecustomize` that sets the wall clock of a Python process `_offset` seconds off."""


def start_skewed(root: Path, offset_s: float, tmp_path: Path, ledger_url: str | None) -> Tollgate:
    """A Tollgate (`start_tollgate`) whose wall clock is `offset_s` seconds off the host's."""
    site = tmp_path / "skewed-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(SKEW))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TOLLGATE_TEST_CLOCK_OFFSET_S": str(offset_s)}
    port = free_port()
    ledger = ["--ledger", ledger_url] if ledger_url else []
    process = start(
        ["serve", "--config", str(root), "--port", str(port), *ledger],
        f"http://127.0.0.1:{port}/healthz",
        env,
    )
    return Tollgate(f"http://127.0.0.1:{port}", root, process, ledger_url)


def age_heartbeat(gate: Tollgate, owner: str, seconds: float) -> None:
    """Make the last heartbeat of `owner` `seconds` older, as if it had stopped beating then."""
    sql = f"UPDATE processes SET heartbeat_at = heartbeat_at - {seconds} WHERE owner = '{owner}'"
    if gate.ledger_url:
        pg.fetch(gate.ledger_url, sql)
    else:
        with contextlib.closing(sqlite3.connect(gate.root / "tollgate.db")) as db, db:
            db.execute(sql)


@pytest.fixture
def ledger_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    found = backend_url(request.param)
    yield found
    drop_ledger(found)


@pytest.mark.parametrize("ledger_url", BACKENDS, indirect=True)
def test_a_replica_whose_clock_is_behind_is_alive_while_it_beats_and_dead_once_it_stops(
    upstream: Simulator, tmp_path: Path, ledger_url: str | None
) -> None:
    root = tmp_path / "policies"
    write_config(root, f"{upstream.url}/v1")
    config = root / "tollgate.yaml"
    # Long enough for a generation to be in flight while another replica starts.
    config.write_text(config.read_text().replace("timeout_s: 3\n", "timeout_s: 30\n"))
    gates: list[Tollgate] = []
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        upstream.configure(background_ms=600_000)  # runs (and is followed) for 10 minutes
        behind = start_skewed(root, -BEHIND_S, tmp_path, ledger_url)
        gates.append(behind)
        queued = behind.client(DESIGN_KEY).responses.create(
            model="gpt-5.5", input="A red bicycle", tools=[tool()], max_output_tokens=300,
            max_tool_calls=1, background=True,
        )  # fmt: skip
        [held] = rows(behind, f"response_id = '{queued.id}'")
        assert (held["state"], held["held"]) == ("reserved", 1)
        upstream.configure(latency_ms=15_000)
        pool.submit(generate, behind)
        [flight] = wait_for("the generation in flight", lambda: in_flight(behind) or None)

        # Its start-up reclaim judges every process: the one behind has kept beating.
        judge = start_tollgate(root, ledger_url=ledger_url)
        gates.append(judge)
        [still] = rows(judge, f"response_id = '{queued.id}'")
        assert (still["state"], still["owner"]) == ("reserved", held["owner"])  # not adopted
        [row] = rows(judge, f"id = '{flight['id']}'")
        assert row["error_code"] != "outcome_unknown", row  # not charged its bound

        # It stops beating (its process stopped, its last heartbeat a minute old): dead.
        behind.process.send_signal(signal.SIGSTOP)
        age_heartbeat(behind, held["owner"], 60.0)
        gates.append(start_tollgate(root, ledger_url=ledger_url))
        [adopted] = rows(judge, f"response_id = '{queued.id}'")
        assert adopted["state"] == "reserved" and adopted["owner"] != held["owner"]
        [charged] = rows(judge, f"id = '{flight['id']}'")
        assert (charged["state"], charged["error_code"]) == ("settled", "outcome_unknown")
        assert charged["cost_nanos"] == flight["reserved_nanos"]
    finally:
        upstream.configure(latency_ms=0, background_ms=0)
        if gates:
            gates[0].process.kill()  # stopped or not
            gates[0].process.wait(timeout=30)
        for gate in gates[1:]:
            gate.stop()
        pool.shutdown(wait=True)


@pytest.mark.parametrize("ledger_url", BACKENDS, indirect=True)
def test_a_replica_whose_clock_is_far_behind_keeps_its_requests_in_flight(
    upstream: Simulator, tmp_path: Path, ledger_url: str | None
) -> None:
    """A reservation older than its deadline, its settlement and a margin is charged its
    bound whatever its owner: that age is the ledger's clock's, never the `started_at` its
    replica's wall clock wrote. Judged by `started_at`, a replica whose clock was behind by
    more than that age had every request it forwarded charged its bound (flagged) by the
    start-up reclaim of any other replica, and a repeat of one sent to another replica was
    refused 409 at once, its first attempt taken for one past its deadline."""
    root = tmp_path / "policies"
    write_config(root, f"{upstream.url}/v1")
    config = root / "tollgate.yaml"
    config.write_text(config.read_text().replace("timeout_s: 3\n", "timeout_s: 30\n"))
    far_behind = reclaim_after_s(load_config(root).upstream) + 60.0
    gates: list[Tollgate] = []
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        behind = start_skewed(root, -far_behind, tmp_path, ledger_url)
        gates.append(behind)
        upstream.configure(latency_ms=10_000)
        first = pool.submit(keyed, behind)
        [flight] = wait_for("the generation in flight", lambda: in_flight(behind) or None)

        judge = start_tollgate(root, ledger_url=ledger_url)  # its start-up reclaim runs
        gates.append(judge)
        [row] = rows(judge, f"id = '{flight['id']}'")
        assert (row["state"], row["error_code"]) == ("reserved", None), row
        repeat = keyed(judge)
        assert repeat.status_code == 200, repeat.text
        assert repeat.headers["x-tollgate-replay-of"] == flight["id"]
        assert first.result(timeout=60).status_code == 200
        [row] = rows(judge, f"id = '{flight['id']}'")
        assert (row["state"], row["outcome"], row["flagged"]) == ("settled", "ok", 0), row
    finally:
        upstream.configure(latency_ms=0)
        for gate in gates:
            gate.stop()
        pool.shutdown(wait=True)


def keyed(gate: Tollgate) -> httpx.Response:
    """A generation through `gate` with the same `Idempotency-Key` each time."""
    raw = gate.client(DESIGN_KEY, timeout=60).images.with_raw_response.generate(
        model="gpt-image-2", prompt="A red bicycle", quality="low", size="1024x1024",
        extra_headers={"Idempotency-Key": "far-behind-1"},
    )  # fmt: skip
    return raw.http_response


def rows(gate: Tollgate, where: str) -> list[dict[str, Any]]:
    return gate.query(f"SELECT * FROM requests WHERE {where}")


def in_flight(gate: Tollgate) -> list[dict[str, Any]]:
    return rows(gate, "endpoint = 'generations' AND state = 'reserved'")


def generate(gate: Tollgate) -> None:
    """A generation through `gate`, whatever its end (its replica may be killed meanwhile)."""
    with contextlib.suppress(Exception):
        gate.client(DESIGN_KEY, timeout=60).images.generate(
            model="gpt-image-2", prompt="A red bicycle", quality="low", size="1024x1024"
        )
