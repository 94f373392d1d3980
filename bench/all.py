"""Every figure of issue #17 in one run, beside the floor (not a test).

    .venv/bin/python -m bench.all [--rounds 3] [--seconds 4] [--sequential 1000]
                                  [--rows 10000000] [--big-ledger PATH]
                                  [--postgres postgresql://postgres@127.0.0.1:5432/test]
                                  [--only small,big,stream,responses,teams,rows]
                                  [--skip-points] [--before DIR]

One table of CPU per request and latency for each door and body, each row beside the
floor (`bench.floor`) for the same request, then the point figures:

- small: the bench generation (~21 kB answer) to the simulator direct, to the floor and
  to Tollgate with three teams (budgets and the SQLite ledger on);
- teams: Tollgate with 1,000 teams of three budgets and a per-user budget each;
- rows: Tollgate (three teams) on a ledger holding `--rows` generated requests (built
  once with a bulk insert, `bench.report_speed.generate`, and kept at `--big-ledger`);
- big, stream: 2 MB answers (`--payload-bytes 1500000`), whole and as one event stream,
  with the company key scrubbed out as always;
- responses: `POST /v1/responses` with the image_generation tool.

Each round runs every row once at concurrency 1 (`--sequential` requests, a quarter of
them for 2 MB answers) and 16 (`--seconds`); rows are interleaved round by round, and
the table shows the median of the rounds (the machine is shared and noisy). Added
latency is the row's c=1 p50 (p99) minus direct's for the same request.

Point figures: reloading the 1,000-team configuration (`POST /admin/reload`), one scrape
of `/metrics` (budget gauges read at scrape time) and `tollgate budgets` with 1,000 teams
(in process, and as users run it: a fresh `python -m proxy budgets`, median of 5, after
`compileall`, so that no run compiles the sources),
`tollgate report --by team,model` over the big ledger, a 50,000-line batch upload through
the floor and Tollgate (seconds, peak RSS), and with `--postgres` reserve + settle pairs
per second with one and two replica processes and 100 teams (`bench.replicas`).

`--before DIR` runs a second Tollgate for every Tollgate row but the big ledger's (its
schema is this tree's) from the `proxy` package in DIR (`git archive REV proxy | tar -x -C
DIR`), its rows interleaved with this tree's: before and after in one run, on the same
noise.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import proxy
from bench import batch_upload, harness, replicas, report_speed
from bench.harness import Proc, closed_loop, measured, note, table
from proxy import cli
from proxy.cli.finance import read_budgets
from proxy.config import load_config
from proxy.finance.reports import parse_by
from proxy.web.scrape import FRESH_S

SMALL = harness.GENERATION
STREAMED = {**harness.GENERATION, "stream": True}
RESPONSES: dict[str, object] = {
    "model": "gpt-5.5",
    "input": "A red bicycle",
    "tools": [
        {"type": "image_generation", "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}
    ],
    "max_output_tokens": 300,
    "max_tool_calls": 1,
    "user": "bench-user",
}
BIG_PAYLOAD = 1_500_000
TEAMS = 1000


@dataclass
class Target:
    """One row of the table: a server (None: the simulator direct) and a request."""

    name: str
    group: str
    server: Proc | None
    sim: Proc
    key: str
    path: str
    body: dict[str, object]
    scale: float = 1.0
    """Of `--sequential`: 2 MB answers take longer."""
    runs: dict[int, list[harness.Measured]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return (self.server or self.sim).url + self.path


def run_round(target: Target, args: argparse.Namespace) -> None:
    procs = [target.sim] if target.server is None else [target.server, target.sim]
    for c in (1, 16):
        note(f"  {target.name} c={c}")

        def load(c: int = c) -> harness.Load:
            if c == 1:
                count = max(50, int(args.sequential * target.scale))
                return asyncio.run(
                    closed_loop(target.url, target.key, 1, requests=count, body=target.body)
                )
            return asyncio.run(
                closed_loop(target.url, target.key, c, seconds=args.seconds, body=target.body)
            )

        found = measured(procs, load)
        if found.load.errors:
            note(f"    {found.load.errors} errors, first: {found.load.first_error}")
        target.runs.setdefault(c, []).append(found)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def overhead_table(targets: list[Target]) -> str:
    floors = {t.group: t for t in targets if t.name.startswith("floor")}
    directs = {t.group: t for t in targets if t.server is None}
    rows = []
    for t in targets:
        for c, runs in t.runs.items():
            proc = t.server.name if t.server else ""
            cpu = median([m.cpu_ms_per_request(proc) for m in runs]) if proc else float("nan")
            floor = floors.get(t.group)
            ratio = float("nan")
            if floor is not None and proc and floor is not t:
                floor_cpu = median(
                    [m.cpu_ms_per_request(floor.server.name) for m in floor.runs[c]]  # type: ignore[union-attr]
                )
                ratio = cpu / floor_cpu
            added50 = added99 = float("nan")
            direct = directs.get(t.group)
            if c == 1 and direct is not None and t is not direct:
                added50 = median(
                    [
                        m.load.pct(0.5) - d.load.pct(0.5)
                        for m, d in zip(runs, direct.runs[1], strict=True)
                    ]
                )
                added99 = median(
                    [
                        m.load.pct(0.99) - d.load.pct(0.99)
                        for m, d in zip(runs, direct.runs[1], strict=True)
                    ]
                )
            rows.append((
                t.name, c, sum(m.load.errors for m in runs),
                median([m.load.pct(0.5) for m in runs]), median([m.load.pct(0.99) for m in runs]),
                median([m.load.rate for m in runs]), cpu, ratio, added50, added99,
            ))  # fmt: skip
    header = ("target", "conc", "errors", "p50 ms", "p99 ms", "req/s", "CPU ms/req",
              "× floor", "added p50 ms", "added p99 ms")  # fmt: skip
    return table(header, rows)


def timed(call: Callable[[], object], repeat: int, apart_s: float = 0.0) -> float:
    """The median seconds of `repeat` calls, each `apart_s` after the one before."""
    took = []
    for _ in range(repeat):
        time.sleep(apart_s)
        began = time.perf_counter()
        call()
        took.append(time.perf_counter() - began)
    return statistics.median(took)


def post(url: str, token: str) -> None:
    request = urllib.request.Request(
        url, method="POST", data=b"", headers={"authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        answer.read()


def get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as answer:
        answer.read()


def every_team_spends(tg: Proc) -> None:
    """One request from each filler team, so each has counters (and gauges) to read."""

    async def send() -> None:
        load = harness.Load()
        async with harness.session(16) as http:
            keys = [f"tg_bench_filler_key_{n:06d}" for n in range(1, TEAMS)]
            url = tg.url + "/v1/images/generations"
            for start in range(0, len(keys), 16):
                await asyncio.gather(
                    *(harness.one(http, url, k, SMALL, load) for k in keys[start : start + 16])
                )
        if load.errors:
            note(f"    filler teams: {load.errors} errors, first: {load.first_error}")

    asyncio.run(send())


def budgets_command(root: Path) -> tuple[float, float]:
    """(seconds of `tollgate budgets` in process, of which reading the ledger and
    printing: the rest is parsing the configuration)."""
    config = load_config(root)
    found = []
    for _ in range(5):
        began = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["budgets", "--config", str(root)])
        whole = time.perf_counter() - began
        began = time.perf_counter()
        asyncio.run(read_budgets(config, config.ledger_url, time.time()))
        found.append((whole, time.perf_counter() - began))
    return median([w for w, _ in found]), median([r for _, r in found])


def budgets_fresh(root: Path) -> float:
    """Seconds of `tollgate budgets` in a fresh process, the median of 5: Python's start,
    the imports, the configuration, the ledger and the table. The package is compiled
    first (with PYTHONDONTWRITEBYTECODE set, every run would compile it)."""
    compileall.compile_dir(Path(proxy.__file__).parent, quiet=1)
    command = [sys.executable, "-m", "proxy", "budgets", "--config", str(root)]
    took = []
    for _ in range(5):
        began = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        took.append(time.perf_counter() - began)
    return median(took)


def big_ledger(path: Path, rows: int) -> Path:
    if not path.exists():
        note(f"generating {rows:,} ledger rows at {path} (kept for the next run)")
        took = report_speed.generate(path, rows)
        note(f"  {took:.0f} s")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per run at c=16")
    parser.add_argument("--sequential", type=int, default=1000, help="requests per run at c=1")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--big-ledger", type=Path, help="default /tmp/tollgate-bench-ROWS.db")
    parser.add_argument("--postgres", help="a PostgreSQL server for the replicas figure")
    parser.add_argument("--only", default="small,big,stream,responses,teams,rows")
    parser.add_argument("--skip-points", action="store_true")
    parser.add_argument(
        "--before", type=Path, help="a tree whose proxy/ runs beside this one's, row by row"
    )
    args = parser.parse_args()
    harness.raise_nofile()
    groups = set(args.only.split(","))
    path = args.big_ledger or Path(f"/tmp/tollgate-bench-{args.rows}.db")
    if "rows" in groups or not args.skip_points:
        big_ledger(path, args.rows)
    points: list[tuple[str, str]] = []
    small = harness.start_simulator()
    big = harness.start_simulator(payload_bytes=BIG_PAYLOAD)
    stack = contextlib.ExitStack()
    with stack, tempfile.TemporaryDirectory() as tmp:
        stack.enter_context(harness.running(small, big))

        def server(proc: Proc) -> Proc:
            stack.enter_context(harness.running(proc))
            return proc

        floor_small = server(harness.start_floor(small.url))
        floor_big = server(harness.start_floor(big.url))
        sim_key, key = harness.SIM_KEY, harness.TEAM_KEY
        gen, resp = "/v1/images/generations", "/v1/responses"
        r, st = RESPONSES, STREAMED
        targets = [
            Target("direct", "small", None, small, sim_key, gen, SMALL),
            Target("floor", "small", floor_small, small, sim_key, gen, SMALL),
            Target("direct, 2 MB", "big", None, big, sim_key, gen, SMALL, 0.25),
            Target("floor, 2 MB", "big", floor_big, big, sim_key, gen, SMALL, 0.25),
            Target("direct, 2 MB stream", "stream", None, big, sim_key, gen, st, 0.25),
            Target("floor, 2 MB stream", "stream", floor_big, big, sim_key, gen, st, 0.25),
            Target("direct, responses", "responses", None, small, sim_key, resp, r),
            Target("floor, responses", "responses", floor_small, small, sim_key, resp, r),
        ]
        versions = [("", None)] + ([(" (before)", args.before)] if args.before else [])

        def tollgate(
            sim: Proc, name: str, teams: int, source: Path | None, ledger: str | None = None
        ) -> Proc:
            tag = "before" if source else "now"
            root = Path(tmp) / f"{name}-{tag}"
            found = harness.start_tollgate(
                sim.url, root, teams=teams, source=source,
                ledger=ledger or f"sqlite:///{root}/tollgate.db",
            )  # fmt: skip
            found.name = f"tollgate-{name}-{tag}"
            return server(found)

        for suffix, source in versions:
            tg3 = tollgate(small, "t3", 3, source)
            targets += [
                Target("tollgate, 3 teams" + suffix, "small", tg3, small, key, gen, SMALL),
                Target("tollgate, responses" + suffix, "responses", tg3, small, key, resp, r),
            ]
            if "teams" in groups or (not args.skip_points and not source):
                tg1000 = tollgate(small, "t1000", TEAMS, source)
                label = "tollgate, 1,000 teams" + suffix
                targets.append(Target(label, "small", tg1000, small, key, gen, SMALL))
                if not source:
                    tg_teams = tg1000
            if "rows" in groups and not source:
                # The big ledger has this tree's schema, which an older tree may not open;
                # the row's figure is this tree beside its own empty ledger anyway.
                tgrows = tollgate(small, "rows", 3, source, f"sqlite:///{path}")
                label = f"tollgate, {args.rows / 1e6:g}M rows" + suffix
                targets.append(Target(label, "small", tgrows, small, key, gen, SMALL))
            tgbig = tollgate(big, "big", 3, source)
            targets += [
                Target("tollgate, 2 MB" + suffix, "big", tgbig, big, key, gen, SMALL, 0.25),
                Target("tollgate, 2 MB stream" + suffix, "stream", tgbig, big, key, gen, st, 0.25),
            ]  # fmt: skip
        wanted = groups | {"small"}
        targets = [
            t for t in targets
            if t.group in wanted and ("1,000" not in t.name or "teams" in groups)
            and ("rows" not in t.name or "rows" in groups)
        ]  # fmt: skip
        order = {"small": 0, "big": 1, "stream": 2, "responses": 3}
        targets.sort(key=lambda t: order[t.group])
        for n in range(args.rounds):
            note(f"round {n + 1} of {args.rounds}")
            for target in targets:
                run_round(target, args)
        print(overhead_table(targets), flush=True)
        if not args.skip_points:
            note("point figures")
            root = Path(tmp) / "t1000-now"
            tg1000 = tg_teams
            reload = timed(lambda: post(tg1000.url + "/admin/reload", harness.ADMIN_TOKEN), 5)
            points.append(
                (f"reload, {TEAMS:,} teams (POST /admin/reload)", f"{reload * 1000:.0f} ms")
            )
            every_team_spends(tg1000)
            # Apart, so that each scrape reads the gauges from the ledger (`proxy.web.scrape`).
            scrape = timed(lambda: get(tg1000.url + "/metrics"), 10, FRESH_S)
            points.append(
                (f"GET /metrics with budget gauges, {TEAMS:,} teams", f"{scrape * 1000:.0f} ms")
            )
            whole, read = budgets_command(root)
            points.append((
                f"tollgate budgets, {TEAMS:,} teams (in process)",
                f"{whole * 1000:.0f} ms ({read * 1000:.0f} ms reading the ledger and printing)",
            ))  # fmt: skip
            fresh = budgets_fresh(root)
            points.append((
                f"tollgate budgets, {TEAMS:,} teams (fresh process)", f"{fresh * 1000:.0f} ms"
            ))  # fmt: skip
            for name, proc, k in (("floor", floor_small, sim_key), ("tollgate", tg3, key)):
                up = batch_upload.measure(proc.url, k, proc.pid, 50_000)
                points.append((
                    f"batch upload, 50,000 lines, {name}",
                    f"{up.seconds:.2f} s, peak RSS {up.peak_before / 2**20:.0f} → "
                    f"{up.peak_after / 2**20:.0f} MiB",
                ))  # fmt: skip
    if not args.skip_points:
        by = parse_by("team,model")
        cold, groups_found = asyncio.run(report_speed.timed(path, by))
        warm, _ = asyncio.run(report_speed.timed(path, by))
        points.append((
            f"tollgate report --by team,model, {args.rows:,} rows",
            f"{cold:.2f} s cold, {warm:.2f} s warm ({groups_found} groups)",
        ))  # fmt: skip
        if args.postgres:
            for processes in (1, 2):
                found = replicas.measure(args.postgres, processes, teams=100, seconds=8)
                points.append((
                    f"PostgreSQL reserve + settle, {processes} replica(s), 100 teams",
                    f"{found.pairs_per_s:,.0f} pairs/s, {found.cpu_ms:.2f} ms CPU per pair",
                ))  # fmt: skip
    if points:
        print()
        print(table(("figure", "measured"), points))


if __name__ == "__main__":
    main()
