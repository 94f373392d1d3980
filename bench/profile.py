"""Profile Tollgate under load with py-spy (not a test).

    .venv/bin/python -m bench.profile [--seconds 16] [--concurrency 16] [--workers 1] [--out P]
                                      [--payload-bytes 1500000] [--stream]

Starts the simulated upstream and Tollgate (budgets and ledger on), drives it at
`--concurrency` while py-spy samples the Tollgate process(es), and writes a flame graph
(`OUT.svg`) and collapsed stacks (`OUT.txt`), then prints the top frames by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import tempfile
import threading
from pathlib import Path

from bench import harness

PY_SPY = str(harness.ROOT / ".venv" / "bin" / "py-spy")


def top(collapsed: Path, count: int = 25) -> str:
    """The frames with the most samples at the top of the stack (own time)."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    # Not read_text: its universal newlines would break a line at a frame name's \r.
    for line in collapsed.read_bytes().decode(errors="replace").split("\n"):
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        total += int(n)
        own[stack.split(";")[-1]] += int(n)
    return "\n".join(f"{n * 100 / total:5.1f}%  {frame}" for frame, n in own.most_common(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="/tmp/tollgate-profile")
    parser.add_argument(
        "--payload-bytes", type=int, default=0, help="image padding (2 MB: 1500000)"
    )
    parser.add_argument("--stream", action="store_true", help="streamed generations")
    args = parser.parse_args()
    harness.raise_nofile()
    sim = harness.start_simulator(payload_bytes=args.payload_bytes)
    body = {**harness.GENERATION, "stream": args.stream}
    with harness.running(sim), tempfile.TemporaryDirectory() as tmp:
        tg = harness.start_tollgate(sim.url, Path(tmp), args.workers)
        with harness.running(tg):
            url = tg.url + "/v1/images/generations"
            load = threading.Thread(
                target=lambda: asyncio.run(
                    harness.closed_loop(
                        url, harness.TEAM_KEY, args.concurrency, seconds=args.seconds + 4, body=body
                    )
                )
            )
            load.start()
            for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
                subprocess.run(
                    [PY_SPY, "record", "--pid", str(tg.pid), "--subprocesses", "--duration",
                     str(args.seconds // 2), "--rate", "250", "--format", fmt, "--nonblocking",
                     "--gil",
                     "-o", args.out + suffix],
                    check=True, capture_output=True,
                )  # fmt: skip
            load.join()
    print(top(Path(args.out + ".txt")))
    print(f"\nflame graph: {args.out}.svg, collapsed stacks: {args.out}.txt")


if __name__ == "__main__":
    main()
