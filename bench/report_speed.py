"""How fast is `tollgate report --by team,model` over a big ledger? (not a test)

    .venv/bin/python -m bench.report_speed [--rows 1000000] [--keep PATH]

Generates the rows straight into a fresh SQLite ledger (the real schema, opened by
`SqliteLedger`) with `executemany`, one month of traffic from 12 teams, 6 models,
3 qualities and 500 users (one request in ten through the Responses API, billed under
one of 3 mainline models too), then times the report through the same code the CLI
runs (`proxy.finance.reports.summarize` + `render`), cold and warm, for a few groupings.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
from datetime import date
from pathlib import Path

from proxy.finance.reports import Dimension, Period, parse_by, render, summarize
from proxy.ledger.sqlite import SqliteLedger

TEAMS = [f"team-{i:02d}" for i in range(12)]
MODELS = [
    "gpt-image-2", "gpt-image-1.5", "gpt-image-1-mini", "gpt-image-1", "gpt-image-2.5-sunburst",
    "dall-e-3",
]  # fmt: skip
MAINLINE = ["gpt-5.5", "gpt-5.4-mini", "gpt-4.1"]
QUALITIES = ["low", "medium", "high"]
OUTCOMES = ["ok"] * 90 + ["downgraded"] * 6 + ["rejected_budget"] * 3 + ["rejected_policy"]
PERIOD = Period(date(2026, 11, 1), date(2026, 11, 30), "Europe/Paris")
BATCH = 50_000


def generate(path: Path, rows: int, seed: int = 7) -> float:
    """Write `rows` settled requests spread over PERIOD; seconds taken."""
    began = time.perf_counter()
    asyncio.run(_create(path))
    rng = random.Random(seed)
    start, span = PERIOD.start, PERIOD.end - PERIOD.start
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous = OFF")
    columns = (
        "id, started_at, finished_at, team, cost_center, key_id, user, endpoint, model, "
        "quality, size, n, state, outcome, status, text_input_tokens, image_output_tokens, "
        "images, estimated_nanos, cost_nanos, mainline_model, mainline_input_tokens, "
        "mainline_output_tokens, mainline_cost_nanos"
    )
    sql = f"INSERT INTO requests ({columns}) VALUES ({', '.join('?' * 24)})"
    for offset in range(0, rows, BATCH):
        batch = []
        for i in range(offset, min(offset + BATCH, rows)):
            team = TEAMS[i % len(TEAMS)]
            outcome = rng.choice(OUTCOMES)
            billed = outcome in ("ok", "downgraded")
            out_tokens = rng.randrange(200, 6000) if billed else 0
            cost = out_tokens * 30_000 + 40 * 5_000 if billed else 0
            responses = i % 10 == 0
            mainline = rng.choice(MAINLINE) if responses else None
            text_in, text_out = (1800, 200) if responses and billed else (0, 0)
            text_cost = text_in * 5_000 + text_out * 30_000
            at = start + span * i / rows
            row = (
                f"req_{i:08d}", at, at + 5, team, f"CC-{TEAMS.index(team) % 4}",
                "key", f"user-{rng.randrange(500)}", "responses" if responses else "generations",
                rng.choice(MODELS), rng.choice(QUALITIES), "1024x1024", 1, "settled", outcome,
                200 if billed else 429, 40 if billed else 0, out_tokens, int(billed),
                cost + text_cost, cost + text_cost, mainline, text_in, text_out, text_cost,
            )  # fmt: skip
            batch.append(row)
        db.executemany(sql, batch)
        db.commit()
    db.close()
    return time.perf_counter() - began


async def _create(path: Path) -> None:
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.close()


async def timed(path: Path, by: tuple[Dimension, ...]) -> tuple[float, int]:
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        began = time.perf_counter()
        report = await summarize(ledger, PERIOD, by)
        render(report, "json")
        return time.perf_counter() - began, len(report.rows)
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the ledger here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "bench.db"
        path.unlink(missing_ok=True)
        made = generate(path, args.rows)
        size = path.stat().st_size >> 20
        print(f"generated {args.rows:,} ledger rows in {made:.1f} s ({size} MiB)")
        print(f"\n{'report --by':<24}{'groups':>8}{'cold s':>9}{'warm s':>9}")
        measured: dict[str, float] = {}
        for text in ("team,model", "team,model,quality", "cost_center,team,day", ""):
            by = parse_by(text)
            cold, groups = asyncio.run(timed(path, by))
            warm, _ = asyncio.run(timed(path, by))
            measured[text] = cold
            print(f"{text or '(total)':<24}{groups:>8}{cold:>9.3f}{warm:>9.3f}")
        took = measured["team,model"]
        verdict = "PASS" if took <= 2.0 else "FAIL"
        print(f"\n--by team,model over {args.rows:,} rows: {took:.3f} s (target <= 2 s): {verdict}")


if __name__ == "__main__":
    main()
