"""Ledger: reservations + settlements per second on the SQLite ledger, in-process.

    .venv/bin/python -m bench.ledger [--requests 5000] [--concurrency 1 64]

Drives `SqliteLedger.reserve` and `.settle` directly (the Ledger API the request path
uses) with the bench team's real budgets (month and day team budgets, a per-user day
budget, the organization's month budget), so every reservation reads and writes the
budget counters. Each request is one reserve and one settle; CPU is this process's.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from bench import harness
from proxy.budgets import Counter, Totals, applicable, counters, zone
from proxy.config import load_config
from proxy.ledger import Entry, Reservation, Settlement, SqliteLedger
from proxy.models import Usage


async def run(path: Path, requests: int, concurrency: int) -> tuple[float, float]:
    """(seconds, CPU seconds) for `requests` reserve+settle pairs at `concurrency`."""
    root = harness.write_policies(path.parent / f"policies-{concurrency}", "http://127.0.0.1:1")
    config = load_config(root)
    team = config.teams[0]
    ledger = SqliteLedger(path)
    await ledger.open()
    now = time.time()
    tz = zone(config.timezone)
    budgets = applicable(config, team, "bench-user", now)
    read = tuple(dict.fromkeys(a.counter for a in budgets))
    write = counters(team.name, "bench-user", now, tz)
    usage = Usage(text_input=5, image_output=272)
    left = [requests]

    async def client(n: int) -> None:
        i = 0
        while left[0] > 0:
            left[0] -= 1
            i += 1
            entry = Entry(
                id=f"r{n}-{i}",
                started_at=now,
                endpoint="generations",
                team=team.name,
                user="bench-user",
                model="gpt-image-2",
                estimated_nanos=50_000_000,
            )

            def choose(totals: Mapping[Counter, Totals], entry: Entry = entry) -> Reservation:
                assert len(totals) == len(read)
                return Reservation(replace(entry, downgrades=""), usage, write)

            await ledger.reserve(read, choose)
            await ledger.settle(
                entry.id, Settlement(time.time(), "ok", 200, usage=usage, cost_nanos=9_000_000)
            )

    try:
        cpu = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(concurrency)))
        return time.perf_counter() - began, time.process_time() - cpu
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            seconds, cpu = asyncio.run(run(Path(tmp) / f"ledger-{c}.db", args.requests, c))
            rows.append((c, args.requests, args.requests / seconds, cpu * 1000 / args.requests))
    print(harness.table(("concurrency", "pairs", "reserve+settle/s", "CPU ms/pair"), rows))


if __name__ == "__main__":
    main()
