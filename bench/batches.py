"""Ledger: a batch input file of 50,000 lines recorded, read back and settled, SQLite and
PostgreSQL.

    .venv/bin/python -m bench.batches [--lines 50000] [--repeat 3] [--chunk 2000]
                                      [--postgres postgresql://postgres@127.0.0.1:5432/test]

Drives the ledger's `own` (the file and its priced lines, one transaction), `batch_lines`
(read back by `custom_id`, as a batch is reserved and settled) and `settle_batch` (the
batch's reservation replaced by one row per billed line, counters summed per counter).
Each figure is the best of `--repeat` runs on a fresh ledger (the lock figures: the
worst). "Loop stall" is the longest the event loop went without a turn while the call ran
(a ticker every millisecond): what other requests of the process would have waited. On
SQLite, "longest write" is the longest of the settlement's write transactions (the write
lock every worker shares is held that long at most), and "writer waited" the longest
another connection to the file (a thread taking the write lock every 2 ms, as another
worker's reservation would, with SQLite's busy handler) waited for it while the batch
settled. `--chunk` sets the lines a settlement transaction writes
(`sqlite_batches.CHUNK_LINES`; 0: the whole batch in one transaction). With `--postgres
SERVER` the same runs go to a fresh schema on that server too (dropped afterwards).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from bench import harness
from bench.ledger import fresh_schema
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.ledger import (
    BatchLine,
    BilledLine,
    Reservation,
    StoredObject,
    open_ledger,
    sqlite_batches,
)
from proxy.ledger.sqlite import SqliteLedger

T = TypeVar("T")

DAY = 86_400.0
CREATED = (
    Counter("team", "bench", "", "day", 0.0),
    Counter("team", "bench", "", "month", 0.0),
    Counter("user", "bench", "bench-user", "day", 0.0),
)
ENDED = (
    Counter("team", "bench", "", "day", DAY),
    Counter("team", "bench", "", "month", 0.0),
    Counter("user", "bench", "bench-user", "day", DAY),
)
USAGE = Usage(text_input=12, image_output=4160, images=1)


def lines_of(count: int) -> list[BatchLine]:
    return [
        BatchLine(
            f"req-{i}",
            i,
            "generations",
            "gpt-image-1",
            "medium",
            "1024x1024",
            1,
            "bench-user",
            21_000_000,
        )
        for i in range(1, count + 1)
    ]


def billed_of(count: int) -> list[BilledLine]:
    done = Settlement(DAY + 10.0, "ok", 200, USAGE, 10_500_000, response_id="batch_bench")
    return [
        BilledLine(
            Entry(
                f"row-{i}",
                DAY + 5.0,
                "batches",
                "bench",
                None,
                "bench-key",
                "bench-user",
                "gpt-image-1",
                "gpt-image-1",
                "medium",
                "medium",
                "1024x1024",
                "1024x1024",
                1,
                1,
                estimated_nanos=21_000_000,
                custom_id=f"req-{i}",
            ),
            done,
            ENDED,
        )
        for i in range(1, count + 1)
    ]


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[T, float, float]:
    """What `call` returns, the seconds it took, and the longest the loop stalled meanwhile."""
    stall = [0.0]
    running = [True]

    async def tick() -> None:
        last = time.perf_counter()
        while running[0]:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall[0] = max(stall[0], now - last - 0.001)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    began = time.perf_counter()
    found = await call()
    took = time.perf_counter() - began
    running[0] = False
    await ticker
    return found, took, stall[0]


class LockProbe:
    """Another writer to the SQLite file at `path`: takes the write lock every 2 ms, and
    keeps the longest it waited for it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.longest = 0.0
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()

    def _run(self) -> None:
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
            db.execute("PRAGMA busy_timeout = 30000")
            while self._running:
                began = time.perf_counter()
                db.execute("BEGIN IMMEDIATE")
                self.longest = max(self.longest, time.perf_counter() - began)
                db.execute("COMMIT")
                time.sleep(0.002)


def longest_write(ledger: Any) -> list[float]:
    """The durations of `ledger`'s write transactions from now on (SQLite only)."""
    found: list[float] = []
    if not isinstance(ledger, SqliteLedger):
        return found
    transaction = ledger.file.transaction

    async def timed_transaction(work: Any, *, long: bool = False) -> Any:
        began = time.perf_counter()
        try:
            return await transaction(work, long=long)
        finally:
            found.append(time.perf_counter() - began)

    ledger.file.transaction = timed_transaction  # type: ignore[method-assign]
    return found


async def run(url: str, count: int) -> dict[str, tuple[float, float]]:
    """(seconds, loop stall) of each call, for a file of `count` lines; for SQLite also
    (longest write transaction, longest wait of another writer) of the settlement."""
    lines, billed = lines_of(count), billed_of(count)
    file = StoredObject("file-bench", "bench", "file", "batch", 1.0, count, count * 21_000_000)
    ledger = await open_ledger(url)
    try:
        _, own, own_stall = await timed(lambda: ledger.own(file, lines))
        found, read, read_stall = await timed(lambda: ledger.batch_lines("file-bench"))
        assert len(found) == count

        def choose(totals: Mapping[Counter, Totals]) -> Reservation:
            entry = Entry(
                "batch",
                5.0,
                "batches",
                "bench",
                None,
                "bench-key",
                "bench-user",
                estimated_nanos=count * 21_000_000,
            )
            return Reservation(entry, USAGE.scaled(count), CREATED)

        await ledger.reserve(CREATED, choose)
        await ledger.hold("batch", "batch_bench")
        ended = Settlement(DAY + 10.0, "ok", 200)
        writes = longest_write(ledger)
        path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite") else None
        with LockProbe(path) if path else contextlib.nullcontext() as probe:
            written, settle, settle_stall = await timed(
                lambda: ledger.settle_batch("batch", billed, ended)
            )
        assert written == count
    finally:
        await ledger.close()
    figures = {
        "own": (own, own_stall),
        "batch_lines": (read, read_stall),
        "settle_batch": (settle, settle_stall),
    }
    if probe is not None:
        figures["settle_batch: longest write / writer waited"] = (max(writes), probe.longest)
    return figures


def best(runs: list[dict[str, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """The quickest run of each call; the worst of the lock figures (`run`)."""
    return {
        k: (
            (max(r[k][0] for r in runs), max(r[k][1] for r in runs))
            if "/" in k
            else min((r[k] for r in runs), key=lambda v: v[0])
        )
        for k in runs[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--postgres", help="a PostgreSQL server URL to measure as well")
    parser.add_argument("--chunk", type=int, default=sqlite_batches.CHUNK_LINES)
    args = parser.parse_args()
    sqlite_batches.CHUNK_LINES = args.chunk or args.lines + 1
    results: list[tuple[str, dict[str, tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [
            asyncio.run(run(f"sqlite:///{Path(tmp) / f'batches-{i}.db'}", args.lines))
            for i in range(args.repeat)
        ]
        results.append(("sqlite", best(runs)))
    if args.postgres:
        runs = []
        for _ in range(args.repeat):
            with fresh_schema(args.postgres) as url:
                runs.append(asyncio.run(run(url, args.lines)))
        results.append(("postgresql", best(runs)))
    rows = [
        (ledger, call, args.lines, f"{seconds:.3f}", f"{stall * 1000:.1f}")
        for ledger, found in results
        for call, (seconds, stall) in found.items()
        if "/" not in call
    ]
    print(f"SQLite settlement: {args.chunk or 'all'} lines a transaction")
    print(harness.table(("ledger", "call", "lines", "seconds", "loop stall ms"), rows))
    for ledger, found in results:
        for call, (longest, waited) in found.items():
            if "/" in call:
                print(f"{ledger} {call}: {longest * 1000:.0f} ms / {waited * 1000:.0f} ms")


if __name__ == "__main__":
    main()
