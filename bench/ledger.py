"""Ledger: reservations + settlements per second, in-process, SQLite and PostgreSQL.

    .venv/bin/python -m bench.ledger [--requests 5000] [--concurrency 1 64] [--only-budgeted]
                                     [--postgres postgresql://postgres@127.0.0.1:5432/test]

Drives the ledger's `reserve` and `settle` directly (the Ledger API the request path
uses) with the bench team's real budgets (month and day team budgets, a per-user day
budget, the organization's month budget), so every reservation reads and writes the
budget counters. Each request is one reserve and one settle; CPU is this process's.
For SQLite, "WAL peak" is the largest size of the WAL file seen after any settlement.
With `--postgres SERVER` the same runs go to a fresh schema on that server too (dropped
afterwards); its CPU column leaves out the database server's own.

Why SQLite's transactions run inline on the event loop: on the machine these figures
were first taken on, one took about 0.1 ms, and handing it to a thread and back cost
twice that in wake-ups alone. A reserve and its settle write about 37 KB of WAL, so
the 64 MiB bound on the WAL is some 1,800 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import asyncpg

from bench import harness
from proxy.config import load_config
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.core.periods import applicable, counters, zone
from proxy.ledger import Reservation, migrate_ledger, open_ledger


async def run(
    url: str, root: Path, requests: int, concurrency: int, only_budgeted: bool = False
) -> tuple[float, float, int | None]:
    """(seconds, CPU seconds, largest WAL in bytes or None) for `requests` reserve+settle
    pairs at `concurrency`; with `only_budgeted`, each writes only the counters its budgets read
    and the organization's four instead of all twelve (team, user, organization × four
    periods), to measure that alternative."""
    config = load_config(harness.write_policies(root, "http://127.0.0.1:1"))
    team = config.teams[0]
    await migrate_ledger(url)
    ledger = await open_ledger(url)
    now = time.time()
    tz = zone(config.timezone)
    budgets = applicable(config, team, "bench-user", now)
    read = tuple(dict.fromkeys(a.counter for a in budgets))
    write = counters(team.name, "bench-user", now, tz)
    if only_budgeted:
        write = harness.budgeted_counters(budgets, now, tz)
    usage = Usage(text_input=5, image_output=272)
    left = [requests]
    wal = f"{url.removeprefix('sqlite:///')}-wal" if url.startswith("sqlite:///") else None
    peak = [0]

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
            await asyncio.sleep(0)  # the upstream's turn: the other clients go on meanwhile
            await ledger.settle(
                entry.id, Settlement(time.time(), "ok", 200, usage=usage, cost_nanos=9_000_000)
            )
            if wal is not None:
                peak[0] = max(peak[0], os.stat(wal).st_size)

    try:
        cpu = time.process_time()
        began = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(concurrency)))
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
        return seconds, cpu, peak[0] if wal is not None else None
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--postgres", help="a PostgreSQL server URL to measure as well")
    parser.add_argument(
        "--only-budgeted",
        action="store_true",
        help="write only the counters budgets read, and the organization's",
    )
    args = parser.parse_args()
    only = args.only_budgeted
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.concurrency:
            url = f"sqlite:///{tmp}/ledger-{c}.db"
            seconds, cpu, wal = asyncio.run(run(url, Path(tmp) / f"p{c}", args.requests, c, only))
            rows.append(("sqlite", c, args.requests, args.requests / seconds,
                         cpu * 1000 / args.requests, f"{(wal or 0) / 2**20:.1f}"))  # fmt: skip
        if args.postgres:
            for c in args.concurrency:
                with fresh_schema(args.postgres) as url:
                    seconds, cpu, _ = asyncio.run(
                        run(url, Path(tmp) / f"pg{c}", args.requests, c, only)
                    )
                rows.append(("postgresql", c, args.requests, args.requests / seconds,
                             cpu * 1000 / args.requests, "-"))  # fmt: skip
    header = ("ledger", "concurrency", "pairs", "reserve+settle/s", "CPU ms/pair", "WAL peak MiB")
    print(harness.table(header, rows))


@contextlib.contextmanager
def fresh_schema(server: str) -> Iterator[str]:
    """A ledger URL on a new schema of `server`, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_execute(server, f"CREATE SCHEMA {name}"))
    try:
        yield f"{server}?search_path={name}"
    finally:
        asyncio.run(_execute(server, f"DROP SCHEMA {name} CASCADE"))


async def _execute(server: str, sql: str) -> None:
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
