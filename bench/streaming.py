"""Streaming: time to the first partial image, direct vs through Tollgate.

    .venv/bin/python -m bench.streaming [--requests 100] [--latency-ms 300]

A streamed generation with two partial images (`stream: true, partial_images: 2`); the
simulator spreads `--latency-ms` over the stream's three events. Time to first partial
is measured from sending the request to receiving the bytes of the first
`image_generation.partial_image` event; requests are sent one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench import harness

STREAMED = {**harness.GENERATION, "stream": True, "partial_images": 2}
MARK = b"event: image_generation.partial_image"


async def first_partials(url: str, key: str, requests: int) -> tuple[harness.Load, harness.Load]:
    """(time to first partial, time to the end of the stream) of `requests` requests."""
    first, whole = harness.Load(), harness.Load()
    async with harness.session(4) as http:
        for i in range(requests + 5):
            began = time.perf_counter()
            seen: float | None = None
            tail = b""
            async with http.post(
                url, json=STREAMED, headers={"authorization": f"Bearer {key}"}
            ) as answer:
                if answer.status != 200:
                    first.errors += 1
                    await answer.read()
                    continue
                async for chunk in answer.content.iter_any():
                    if seen is None and MARK in tail + chunk:
                        seen = time.perf_counter() - began
                    tail = chunk[-len(MARK) :]
            ended = time.perf_counter() - began
            if i < 5:  # warm-up
                continue
            if seen is None:
                first.errors += 1
            else:
                first.latencies.append(seen)
                whole.latencies.append(ended)
    return first, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--latency-ms", type=int, default=300)
    args = parser.parse_args()
    harness.raise_nofile()
    endpoint = "/v1/images/generations"
    sim = harness.start_simulator(latency_ms=args.latency_ms)
    rows = []
    with harness.running(sim), tempfile.TemporaryDirectory() as tmp:
        direct = asyncio.run(first_partials(sim.url + endpoint, harness.SIM_KEY, args.requests))
        tg = harness.start_tollgate(sim.url, Path(tmp))
        with harness.running(tg):
            url = tg.url + endpoint
            proxied = asyncio.run(first_partials(url, harness.TEAM_KEY, args.requests))
    for name, (first, whole) in (("direct", direct), ("tollgate", proxied)):
        rows.append((name, first.count, first.errors, first.pct(0.5), first.pct(0.9),
                     first.pct(0.99), whole.pct(0.5)))  # fmt: skip
    header = ("target", "streams", "errors", "first partial p50 ms", "p90 ms", "p99 ms",
              "whole stream p50 ms")  # fmt: skip
    print(harness.table(header, rows))
    d, t = direct[0], proxied[0]
    print(
        f"\nTollgate adds {t.pct(0.5) - d.pct(0.5):.2f} ms (p50) and "
        f"{t.pct(0.99) - d.pct(0.99):.2f} ms (p99) to the first partial image (target <= 5 ms)"
    )


if __name__ == "__main__":
    main()
