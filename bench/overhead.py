"""Overhead and throughput: direct vs the floor vs Tollgate vs LiteLLM, side by side.

    .venv/bin/python -m bench.overhead [--seconds 6] [--sequential 2000] [--no-litellm]

Starts the simulated upstream (no latency, natural-size images), a bare pass-through
(`bench.floor`), Tollgate with budgets and the SQLite ledger on (1 worker, then 2) and,
unless `--no-litellm`, LiteLLM proxy from its own virtual environment (`bench.peer`),
all on 127.0.0.1. The same generation request goes to each at concurrency 1, 16 and 64
(closed loop); the c=64 run is the saturation throughput. CPU per request is read from
/proc for each server process (workers included) and for the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from bench import harness, peer
from bench.harness import Load, Measured, Proc, closed_loop, measured, note, table

CONCURRENCY = (1, 16, 64)


def run_target(
    name: str, url: str, key: str, server: Proc | None, sim: Proc, args: argparse.Namespace
) -> dict[int, Measured]:
    procs = [sim] if server is None else [server, sim]
    out: dict[int, Measured] = {}
    for c in CONCURRENCY:
        note(f"  {name} c={c}")
        if c == 1:
            out[c] = measured(
                procs, lambda: asyncio.run(closed_loop(url, key, 1, requests=args.sequential))
            )
        else:

            def timed(c: int = c) -> Load:
                return asyncio.run(closed_loop(url, key, c, seconds=args.seconds))

            out[c] = measured(procs, timed)
        if out[c].load.errors:
            note(f"    {out[c].load.errors} errors, first: {out[c].load.first_error}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per concurrent run")
    parser.add_argument("--sequential", type=int, default=2000, help="requests at c=1")
    parser.add_argument("--no-litellm", action="store_true")
    args = parser.parse_args()
    harness.raise_nofile()
    endpoint = "/v1/images/generations"
    results: dict[str, tuple[str, dict[int, Measured]]] = {}
    sim = harness.start_simulator()
    with harness.running(sim), tempfile.TemporaryDirectory() as tmp:
        note("direct")
        results["direct"] = ("", run_target(
            "direct", sim.url + endpoint, harness.SIM_KEY, None, sim, args))  # fmt: skip
        floor = harness.start_floor(sim.url)
        with harness.running(floor):
            note("floor")
            results["floor"] = ("floor", run_target(
                "floor", floor.url + endpoint, harness.SIM_KEY, floor, sim, args))  # fmt: skip
        for workers in (1, 2):
            tg = harness.start_tollgate(sim.url, Path(tmp) / f"w{workers}", workers)
            with harness.running(tg):
                name = f"tollgate-w{workers}"
                note(name)
                results[name] = (tg.name, run_target(
                    name, tg.url + endpoint, harness.TEAM_KEY, tg, sim, args))  # fmt: skip
        if not args.no_litellm:
            try:
                lite = peer.start_litellm(sim.url, Path(tmp) / "litellm")
            except RuntimeError as exc:
                note(f"LiteLLM not measured: {exc}")
            else:
                with harness.running(lite):
                    note("litellm")
                    url = lite.url + endpoint
                    runs = run_target("litellm", url, peer.MASTER_KEY, lite, sim, args)
                    results["litellm-w1"] = (lite.name, runs)
    print(report(results))


def report(results: dict[str, tuple[str, dict[int, Measured]]]) -> str:
    rows = []
    for target, (proc, runs) in results.items():
        for c, m in runs.items():
            load = m.load
            rows.append((
                target, c, load.count, load.errors, load.pct(0.5), load.pct(0.9), load.pct(0.99),
                load.rate, m.cpu_ms_per_request(proc) if proc else float("nan"),
                m.cpu_ms_per_request("simulator"), m.cpu_ms_per_request("loadgen"),
            ))  # fmt: skip
    header = ("target", "conc", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "req/s",
              "proxy CPU ms/req", "sim CPU ms/req", "loadgen CPU ms/req")  # fmt: skip
    out = [table(header, rows)]
    direct = results["direct"][1][1].load
    lines = ["", "Added latency at concurrency 1 (target minus direct):"]
    for target, (_, runs) in results.items():
        if target == "direct":
            continue
        load = runs[1].load
        lines.append(
            f"  {target:<12} p50 +{load.pct(0.5) - direct.pct(0.5):.2f} ms   "
            f"p99 +{load.pct(0.99) - direct.pct(0.99):.2f} ms"
        )
    return "\n".join(out + lines)


if __name__ == "__main__":
    main()
