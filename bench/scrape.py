"""`GET /metrics` with 1,000 teams that have each sent a request (not a test).

    .venv/bin/python -m bench.scrape [--teams 1000] [--workers 1,2] [--before DIR]

Starts the simulator and Tollgate on `harness.write_policies`' configuration with
`--teams` teams (three budgets and a per-user budget each), sends one request from every
team (so each has request metrics as well as budget gauges), then times ten scrapes and
prints their median and the size of the answer. A scrape runs on the event loop: while
it is written, no request of that worker moves. The scrapes are `FRESH_S` apart, so each
one reads the budget gauges from the ledger (a scrape sooner after another is answered from
that one's read, `proxy.web.scrape`). With `--workers 2` the values are summed
from every worker's files (prometheus-client's multiprocess mode). `--before DIR` times a
Tollgate from the `proxy` package in DIR beside this tree's.
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path

from bench import harness
from bench.all import every_team_spends, timed
from bench.harness import note, table
from proxy.web.scrape import FRESH_S


def scrape_bytes(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=60) as answer:
        return len(answer.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teams", type=int, default=1000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--before", type=Path, help="another tree's proxy package, beside")
    args = parser.parse_args()
    harness.raise_nofile()
    rows = []
    versions: list[tuple[str, Path | None]] = [("", None)]
    if args.before:
        versions.insert(0, (" (before)", args.before.resolve()))
    sim = harness.start_simulator()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for workers in (int(w) for w in args.workers.split(",")):
                for suffix, source in versions:
                    root = Path(tmp) / f"w{workers}{suffix.strip(' ()')}"
                    tg = harness.start_tollgate(
                        sim.url, root, workers=workers, teams=args.teams, source=source,
                        ledger=f"sqlite:///{root}/tollgate.db",
                    )  # fmt: skip
                    try:
                        note(f"{args.teams} teams, {workers} worker(s){suffix}: every team sends")
                        every_team_spends(tg)
                        size = scrape_bytes(tg.url)
                        took = timed(lambda tg=tg: scrape_bytes(tg.url), 10, FRESH_S)  # type: ignore[misc]
                        rows.append((
                            f"{workers} worker(s){suffix}", f"{took * 1000:.0f} ms",
                            f"{size / 1024:,.0f} KiB",
                        ))  # fmt: skip
                    finally:
                        tg.stop()
    finally:
        sim.stop()
    print(table(("GET /metrics, " + f"{args.teams:,} teams", "median of 10", "answer"), rows))


if __name__ == "__main__":
    main()
