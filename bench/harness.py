"""What every benchmark shares: processes on loopback, /proc accounting, a load generator.

Not a test and not part of the package. Processes are started as `python -m …` with
their output in a file (a pipe nobody reads would block them), and are always stopped.
CPU time comes from /proc/PID/stat (utime + stime of the process and of its live
descendants, so uvicorn's workers count); resident memory from /proc/PID/status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp

from proxy.core.auth import key_hash
from proxy.core.models import Counter
from proxy.core.periods import PERIOD_ORDER, Applied, window

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python")
TICKS = os.sysconf("SC_CLK_TCK")
SIM_KEY = "sk-bench-upstream"
TEAM_KEY = "tg_bench_team_key_0001"
ADMIN_TOKEN = "tg_bench_admin_token"
NOFILE = 65536


def raise_nofile(limit: int = NOFILE) -> None:
    """Lift this process's open-file limit (thousands of sockets) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def children_of() -> dict[int, list[int]]:
    """ppid → pids, for every process."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found.setdefault(ppid, []).append(int(entry))
    return found


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    kids = children_of()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its live descendants."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and its live descendants."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class RssPeak:
    """Samples the resident memory of a process tree every 100 ms; `peak` is the largest.
    Past `cap` bytes the tree is killed (`capped` is set) before it takes the machine down."""

    def __init__(self, pid: int, every: float = 0.1, cap: int | None = None) -> None:
        self.pid, self.every, self.cap, self.peak = pid, every, cap, 0
        self.capped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            if self.cap is not None and self.peak > self.cap and not self.capped:
                self.capped = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            self._stop.wait(self.every)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _preexec() -> None:
    raise_nofile()
    os.setsid()


@dataclass
class Proc:
    """A server process on loopback."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()


def start(
    name: str,
    argv: Sequence[str],
    health_url: str,
    url: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> Proc:
    """Start `argv` in its own process group, wait for `health_url` to answer 200."""
    log = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(argv),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_preexec,
            cwd=cwd,
        )
    proc = Proc(name, url, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0]))):
                pass
            import urllib.request

            with urllib.request.urlopen(health_url, timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{name} did not come up:\n{log.read_text()}")


def start_simulator(latency_ms: int = 0, payload_bytes: int = 0) -> Proc:
    port = free_port()
    return start(
        "simulator",
        [PYTHON, "-m", "proxy", "simulate-upstream", "--port", str(port),
         "--latency-ms", str(latency_ms), "--payload-bytes", str(payload_bytes),
         "--api-key", SIM_KEY],
        f"http://127.0.0.1:{port}/healthz",
        f"http://127.0.0.1:{port}",
    )  # fmt: skip


def write_policies(
    root: Path,
    upstream: str,
    timeout_s: int = 120,
    teams: int = 1,
    ledger: str = "sqlite:///tollgate.db",
) -> Path:
    """A config with one team whose budgets are large but real: every request reserves
    against a month USD budget, a day USD budget and a per-user day budget. `teams` - 1
    more teams (one file each) have three budgets each (month, week, day) and a per-user
    day budget: a configuration that grows without changing the bench team's work."""
    (root / "teams").mkdir(parents=True, exist_ok=True)
    (root / "tollgate.yaml").write_text(
        textwrap.dedent(f"""\
            upstream:
              base_url: {upstream}/v1
              api_key: {SIM_KEY}
              timeout_s: {timeout_s}
            ledger: {ledger}
            admin_token: {ADMIN_TOKEN}
            default_model: gpt-image-2
            organization:
              budgets:
                - {{period: month, limit_usd: 100000000}}
        """)
    )
    (root / "teams" / "bench.yaml").write_text(
        textwrap.dedent(f"""\
            name: bench
            cost_center: CC-0001
            keys:
              - {{id: bench, sha256: {key_hash(TEAM_KEY)}}}
            budgets:
              - {{period: month, limit_usd: 10000000}}
              - {{period: day, limit_usd: 1000000}}
            per_user:
              - {{period: day, limit_usd: 1000000}}
        """)
    )
    for n in range(1, teams):
        (root / "teams" / f"team-{n:04d}.yaml").write_text(
            textwrap.dedent(f"""\
                name: team-{n:04d}
                cost_center: CC-{n % 40:04d}
                keys:
                  - {{id: k{n}, sha256: {key_hash(f"tg_bench_filler_key_{n:06d}")}}}
                budgets:
                  - {{period: month, limit_usd: 100000}}
                  - {{period: week, limit_usd: 50000}}
                  - {{period: day, limit_usd: 10000}}
                per_user:
                  - {{period: day, limit_usd: 1000}}
            """)
        )
    return root


def start_tollgate(
    upstream: str,
    root: Path,
    workers: int = 1,
    timeout_s: int = 120,
    settings: str = "",
    teams: int = 1,
    ledger: str = "sqlite:///tollgate.db",
    source: Path | None = None,
) -> Proc:
    """Tollgate on `write_policies`' config, with `settings` (YAML) appended to tollgate.yaml.
    With `source`, the `proxy` package is that directory's (another version's tree, for
    before-and-after runs side by side; the venv's dependencies are shared)."""
    write_policies(root, upstream, timeout_s, teams, ledger)
    with (root / "tollgate.yaml").open("a") as file:
        file.write(settings)
    port = free_port()
    return start(
        f"tollgate-w{workers}",
        [PYTHON, "-m", "proxy", "serve", "--config", str(root), "--port", str(port),
         "--workers", str(workers)],
        f"http://127.0.0.1:{port}/healthz",
        f"http://127.0.0.1:{port}",
        env={"PYTHONPATH": str(source)} if source else None,
        cwd=source,
    )  # fmt: skip


def start_floor(upstream: str) -> Proc:
    port = free_port()
    return start(
        "floor",
        [PYTHON, "-m", "bench.floor", "--port", str(port), "--upstream", upstream + "/v1"],
        f"http://127.0.0.1:{port}/healthz",
        f"http://127.0.0.1:{port}",
    )


# -- load ---------------------------------------------------------------------------------

GENERATION: dict[str, object] = {
    "model": "gpt-image-2",
    "prompt": "a lighthouse at dusk",
    "quality": "low",
    "size": "1024x1024",
    "user": "bench-user",
}


@dataclass
class Load:
    """What a run of requests measured."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0
    body_bytes: int = 0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        """The q-quantile latency in milliseconds (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600), auto_decompress=False
    )


async def one(
    http: aiohttp.ClientSession, url: str, key: str, body: dict[str, object], load: Load
) -> None:
    began = time.perf_counter()
    try:
        async with http.post(url, json=body, headers={"authorization": f"Bearer {key}"}) as r:
            size = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                size += len(chunk)
            if r.status != 200:
                load.errors += 1
                load.first_error = load.first_error or f"HTTP {r.status}"
                return
    except (TimeoutError, aiohttp.ClientError) as exc:
        load.errors += 1
        load.first_error = load.first_error or f"{type(exc).__name__}: {exc}"
        return
    load.latencies.append(time.perf_counter() - began)
    load.body_bytes += size


async def closed_loop(
    url: str,
    key: str,
    concurrency: int,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    body: dict[str, object] | None = None,
    warmup: int = 20,
) -> Load:
    """`concurrency` clients, each sending its next request when the last one is answered,
    until `requests` were sent or `seconds` passed."""
    sent = body or GENERATION
    async with session(concurrency) as http:
        scratch = Load()
        for _ in range(warmup):
            await one(http, url, key, sent, scratch)
        load = Load()
        left = [requests if requests is not None else 1 << 62]
        deadline = time.perf_counter() + (seconds if seconds is not None else 1e9)

        async def client() -> None:
            while left[0] > 0 and time.perf_counter() < deadline:
                left[0] -= 1
                await one(http, url, key, sent, load)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        load.seconds = time.perf_counter() - began
        return load


@dataclass
class Measured:
    """A load run with the CPU each named process spent during it."""

    load: Load
    cpu_s: dict[str, float]

    def cpu_ms_per_request(self, name: str) -> float:
        done = self.load.count + self.load.errors
        return self.cpu_s[name] * 1000 / done if done else float("nan")


def measured(procs: Sequence[Proc], run: Callable[[], Load]) -> Measured:
    """Run `run()` and account the CPU of `procs` (and of this process, as `loadgen`)."""
    before = {p.name: p.cpu() for p in procs}
    mine = time.process_time()
    load = run()
    cpu = {p.name: p.cpu() - before[p.name] for p in procs}
    cpu["loadgen"] = time.process_time() - mine
    return Measured(load, cpu)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, numbers right-aligned."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        pairs = enumerate(zip(r, widths, strict=True))
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)
        lines.append("  ".join(padded))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.stop()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def budgeted_counters(budgets: Sequence[Applied], now: float, tz: ZoneInfo) -> tuple[Counter, ...]:
    """The counters a request would write if it wrote only those its budgets read and the
    organization's four (`--only-budgeted`): an alternative measured, not what Tollgate does.
    Tollgate writes all twelve (team, user, organization × four periods), so that a budget
    added by a reload counts the spend already made in its period."""
    found = [Counter("organization", "", "", p, window(p, now, tz).start) for p in PERIOD_ORDER]
    found += [a.counter for a in budgets if a.counter.scope != "organization"]
    return tuple(dict.fromkeys(found))
