"""Slow, heavy requests in flight: 2,000 concurrent generations, 20 s upstream, ~2 MB answers.

    .venv/bin/python -m bench.inflight [--requests 2000] [--latency-ms 20000]
                                        [--payload-bytes 1500000] [--target tollgate|litellm]

All requests are sent at once (one connection each) and wait 20 s upstream; each answer
is ~2 MB of base64 (`--payload-bytes 1500000`). Reports completions, errors, wall time,
the peak resident memory of the proxy (process and children, sampled every 100 ms from
/proc) and of the simulator, and CPU per request of each.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench import harness, peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--latency-ms", type=int, default=20_000)
    parser.add_argument("--payload-bytes", type=int, default=1_500_000)
    parser.add_argument("--target", choices=("tollgate", "litellm", "direct"), default="tollgate")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--rss-cap-mb", type=int, default=8000, help="kill the proxy past this much memory"
    )
    args = parser.parse_args()
    harness.raise_nofile()
    endpoint = "/v1/images/generations"
    sim = harness.start_simulator(args.latency_ms, args.payload_bytes)
    with harness.running(sim), tempfile.TemporaryDirectory() as tmp:
        if args.target == "tollgate":
            proxy = harness.start_tollgate(sim.url, Path(tmp), args.workers, timeout_s=300)
            key = harness.TEAM_KEY
        elif args.target == "litellm":
            proxy = peer.start_litellm(sim.url, Path(tmp) / "litellm", args.workers)
            key = peer.MASTER_KEY
        else:
            proxy, key = sim, harness.SIM_KEY
        with harness.running(proxy):
            url = proxy.url + endpoint
            idle = harness.rss_bytes(proxy.pid)
            procs = [proxy] if proxy is sim else [proxy, sim]
            cap = args.rss_cap_mb << 20
            with harness.RssPeak(proxy.pid, cap=cap) as peak, harness.RssPeak(sim.pid) as sim_peak:
                began = time.perf_counter()
                run = harness.measured(
                    procs,
                    lambda: asyncio.run(
                        harness.closed_loop(
                            url, key, args.requests, requests=args.requests, warmup=0
                        )
                    ),
                )
                wall = time.perf_counter() - began
    load = run.load
    rows = [(
        args.target if args.workers == 1 else f"{args.target}-w{args.workers}",
        args.requests, load.count, load.errors, wall, load.pct(0.5), load.pct(0.99),
        load.body_bytes / max(load.count, 1) / 1e6, idle / 2**20, peak.peak / 2**20,
        run.cpu_ms_per_request(proxy.name), sim_peak.peak / 2**20,
        run.cpu_ms_per_request("simulator"),
    )]  # fmt: skip
    header = ("target", "sent", "ok", "errors", "wall s", "p50 ms", "p99 ms", "MB/answer",
              "idle RSS MiB", "peak RSS MiB", "proxy CPU ms/req", "sim peak RSS MiB",
              "sim CPU ms/req")  # fmt: skip
    print(harness.table(header, rows))
    if peak.capped:
        print(f"\nthe proxy was killed when its memory passed {args.rss_cap_mb} MiB")
    if load.errors:
        print(f"\nfirst error: {load.first_error}")


if __name__ == "__main__":
    main()
