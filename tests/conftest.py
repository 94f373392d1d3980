"""Fixtures that start the simulated upstream and Tollgate as real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import uvicorn
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from proxy.config import load_config
from proxy.core.auth import key_hash
from proxy.core.settings import Config, Team
from proxy.ledger import Backend, open_ledger
from proxy.simulator import SimulatorSettings, create_simulator_app
from proxy.web.app import create_app
from proxy.web.gateway import Gateway
from proxy.web.runtime import Overrides
from tests import pg

UPSTREAM_KEY = "sk-upstream-real-key-for-tests"
# The generated bound tests (`tests/bound_oracle.py`) run 40 times their examples under it.
settings.register_profile("bound-deep", deadline=None, database=None)
DESIGN_KEY = "tg_test_design_key_0001"
RESEARCH_KEY = "tg_test_research_key_0002"
DEADLINE_S = 60.0
"""How long an end-to-end test waits for what Tollgate or the simulator is to do."""
T = TypeVar("T")


def wait_for(what: str, found: Callable[[], T | None], timeout: float = DEADLINE_S) -> T:
    """`found()` once it is not None, asked every 50 ms; AssertionError naming `what` when
    it is still None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def nanos(usd: Decimal | str) -> int:
    """Nano-dollars of a dollar amount (an `x-tollgate-cost-usd` header's, say)."""
    return int(Decimal(usd) * 10**9)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    # Generous: a Python process importing its dependencies on a loaded 2-core machine.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{output(process)}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up:\n{output(process)}")


LOGS: dict[int, Path] = {}


def start(
    args: list[str], health_url: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `python -m proxy ARGS`; its output goes to a file (a pipe nobody reads fills up
    and blocks the process)."""
    log = Path(tempfile.mkstemp(prefix="tollgate-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    LOGS[process.pid] = log
    wait_until_up(health_url, process)
    return process


def output(process: subprocess.Popen[bytes]) -> str:
    log = LOGS.get(process.pid)
    return log.read_text(errors="replace") if log is not None else ""


def stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return output(process)


def workers_of(supervisor: int) -> list[int]:
    """The pids of the serving workers of a multi-worker server (not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == supervisor and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    assert found, "no worker found"
    return found


@dataclass
class Simulator:
    url: str
    process: subprocess.Popen[bytes]

    def billing(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = httpx.get(f"{self.url}/_sim/billing").json()["requests"]
        return records

    def record(self, upstream_id: str) -> dict[str, Any]:
        return next(r for r in self.billing() if r["id"] == upstream_id)

    def configure(self, **knobs: Any) -> None:
        httpx.post(f"{self.url}/_sim/config", json=knobs).raise_for_status()


@contextmanager
def raw_serving(
    reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> Iterator[str]:
    """A scripted upstream that writes raw bytes: `reply` run for each connection by an
    asyncio server on a free loopback port, in a thread of this process; its `/v1` URL."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(reply, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request as a scripted upstream reads it: its head, through the blank line, and
    its body, as long as its content-length says."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(h.split(b":")[1])
            for h in head.split(b"\r\n")
            if h.lower().startswith(b"content-length")
        ),
        0,
    )
    return head, await reader.readexactly(length)


def in_process(
    root: Path, upstream: ASGIApp | None = None, clock: Callable[[], float] | None = None
) -> Gateway:
    """Tollgate's app on the configuration in `root`, in front of `upstream` in this
    process (when None, a simulator app of its own), on `clock` when given."""
    if upstream is None:
        upstream = create_simulator_app(SimulatorSettings(api_key=UPSTREAM_KEY))
    overrides = Overrides(transport=httpx.ASGITransport(app=upstream), clock=clock)
    return create_app(load_config(root), overrides, root)


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread of this process; its URL."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="critical",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def start_simulator(*extra: str) -> Simulator:
    """A simulated upstream of its own, in a process on a free port (stop its `.process`),
    started with `extra` options (e.g. `--data-residency`)."""
    port = free_port()
    process = start(
        ["simulate-upstream", "--port", str(port), "--api-key", UPSTREAM_KEY, *extra],
        f"http://127.0.0.1:{port}/healthz",
    )
    return Simulator(f"http://127.0.0.1:{port}", process)


def run_simulator(*extra: str) -> Iterator[Simulator]:
    """A simulator in a process of its own (`start_simulator(*extra)`), stopped after: for a
    fixture to `yield from`."""
    simulator = start_simulator(*extra)
    try:
        yield simulator
    finally:
        stop(simulator.process)


@pytest.fixture(scope="session")
def simulator() -> Iterator[Simulator]:
    yield from run_simulator()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Simulator]:
    """A simulator of the test module's own, for a module that reads what it holds whole
    (its billing record, arrivals or files), which the shared `simulator` mixes with others'."""
    yield from run_simulator()


DEFAULT_TEAMS = {
    "design": f"""
        name: design
        cost_center: CC-1042
        keys:
          - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
    """,
    "research": f"""
        name: research
        cost_center: CC-2077
        keys:
          - {{id: notebook, sha256: {key_hash(RESEARCH_KEY)}}}
    """,
}


@dataclass
class Tollgate:
    url: str
    root: Path
    process: subprocess.Popen[bytes]
    ledger_url: str | None = None
    """A PostgreSQL ledger (`--ledger`); None: the SQLite file in `root`."""

    def client(self, key: str = DESIGN_KEY, **options: Any) -> openai.OpenAI:
        options.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, **options)

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Rows of `sql` run on this Tollgate's ledger, whichever backend it is."""
        return query_ledger(self.root, self.ledger_url, sql)

    def rows(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM requests ORDER BY started_at")

    def row(self, request_id: str) -> dict[str, Any]:
        return next(r for r in self.rows() if r["id"] == request_id)

    def metric(self, name: str, **labels: str) -> float:
        """The sample `name` with exactly `labels` on /metrics now; 0 when there is none."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def stop(self) -> str:
        return stop(self.process)


def write_config(
    root: Path, upstream_url: str, settings: str = "", teams: dict[str, str] | None = None
) -> None:
    (root / "teams").mkdir(parents=True, exist_ok=True)
    (root / "tollgate.yaml").write_text(
        textwrap.dedent(f"""
        upstream:
          base_url: {upstream_url}
          api_key: {UPSTREAM_KEY}
          timeout_s: 3
        ledger: sqlite:///tollgate.db
        default_model: gpt-image-2
    """)
        + textwrap.dedent(settings)
    )
    for name, text in (teams or DEFAULT_TEAMS).items():
        (root / "teams" / f"{name}.yaml").write_text(textwrap.dedent(text))


def start_tollgate(root: Path, *extra: str, ledger_url: str | None = None) -> Tollgate:
    port = free_port()
    ledger = ["--ledger", ledger_url] if ledger_url else []
    process = start(
        ["serve", "--config", str(root), "--port", str(port), *ledger, *extra],
        f"http://127.0.0.1:{port}/healthz",
    )
    return Tollgate(f"http://127.0.0.1:{port}", root, process, ledger_url)


def run_tollgate(root: Path, *extra: str, ledger_url: str | None = None) -> Iterator[Tollgate]:
    """A Tollgate on the configuration written in `root` (`start_tollgate`), stopped after:
    for a fixture to `yield from`."""
    tollgate = start_tollgate(root, *extra, ledger_url=ledger_url)
    try:
        yield tollgate
    finally:
        tollgate.stop()


@contextmanager
def in_front_of_raw(
    reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    root: Path,
    settings: str = "",
) -> Iterator[Tollgate]:
    """A Tollgate configured in `root` in front of `raw_serving(reply)`, stopped after."""
    with raw_serving(reply) as upstream:
        write_config(root, upstream, settings=settings)
        yield from run_tollgate(root)


def two_teams(root: Path, strict: str) -> Config:
    """A configuration written in `root` and loaded, its upstream never reached: team
    `design` (key `tg_a`) and team `strict` (key `tg_b`, then the YAML `strict`)."""
    write_config(
        root,
        "http://upstream.invalid/v1",
        teams={
            "design": f"name: design\nkeys:\n  - {{id: a, sha256: {key_hash('tg_a')}}}\n",
            "strict": f"name: strict\nkeys:\n  - {{id: b, sha256: {key_hash('tg_b')}}}\n" + strict,
        },
    )
    return load_config(root)


def team_named(config: Config, name: str = "design") -> Team:
    return next(t for t in config.teams if t.name == name)


def query_ledger(root: Path, ledger_url: str | None, sql: str) -> list[dict[str, Any]]:
    """Rows of `sql` on the PostgreSQL ledger `ledger_url`, else on `root`'s SQLite file."""
    if ledger_url:
        return pg.fetch(ledger_url, sql)
    with sqlite3.connect(root / "tollgate.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql)]


BACKENDS = ["sqlite", "postgresql"]


def backend_url(backend: str) -> str | None:
    """A fresh ledger for `backend`: None (the SQLite default) or a new PostgreSQL schema."""
    return pg.migrated_schema() if backend == "postgresql" else None


def drop_ledger(ledger_url: str | None) -> None:
    if ledger_url:
        pg.drop_schema(ledger_url)


@pytest.fixture
def shared() -> Iterator[str]:
    """A migrated PostgreSQL ledger of the test's own (a schema on the shared server), for
    the replicas or processes that share it; dropped after."""
    url = pg.migrated_schema()
    yield url
    drop_ledger(url)


@pytest.fixture(scope="module")
def tollgate(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tollgate]:
    root = tmp_path_factory.mktemp("policies")
    write_config(
        root,
        f"{simulator.url}/v1",
        settings="""
        limits:
          generations_bytes: 4096
          edits_bytes: 2000000
    """,
    )
    yield from run_tollgate(root)


@pytest.fixture
def cluster() -> Iterator[pg.Cluster]:
    """A private PostgreSQL server a test may stop: the shared one is never stopped."""
    private = pg.Cluster(free_port())
    private.start()
    yield private
    private.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger's URL, once for each backend, which one or several processes open
    (a module may define its own `url`)."""
    found = pg.ledger_url(request.param, tmp_path)
    yield found
    if request.param == "postgresql":
        pg.drop_schema(found)


@pytest.fixture
async def ledger(url: str) -> AsyncIterator[Backend]:
    """The ledger at `url`, open (a module may define its own `ledger`)."""
    opened = await open_ledger(url)
    yield opened
    await opened.close()


AGE_SQL = "UPDATE requests SET reserved_clock = reserved_clock - {} WHERE state = 'reserved'"


async def age_reservations(ledger: Backend, seconds: float) -> None:
    """Make every reservation in `ledger` `seconds` older on the ledger's clock (the one a
    reclaim and a repeat judge its age by), as if it had been made that long ago."""
    from proxy.ledger.postgres import PostgresLedger
    from proxy.ledger.sqlite import SqliteLedger

    if isinstance(ledger, SqliteLedger):
        await ledger.file.transaction(lambda conn: conn.execute(AGE_SQL.format("?"), (seconds,)))
    else:
        assert isinstance(ledger, PostgresLedger)
        await ledger.db.execute(AGE_SQL.format("$1::float8"), float(seconds))
