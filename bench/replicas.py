"""Several replicas on one PostgreSQL ledger: reserve + settle pairs per second (not a test).

    .venv/bin/python -m bench.replicas [--postgres postgresql://postgres@127.0.0.1:5432/test]
                                       [--processes 1 2] [--teams 100] [--seconds 8]
                                       [--only-budgeted]

Each replica is a process of its own driving the ledger's `reserve` and `settle` (the
calls the request path makes) at concurrency 8 for `--seconds`, its requests spread over
`--teams` teams of `bench.harness.write_policies` (three budgets and a per-user budget
each, the organization's month budget above them), all on one fresh schema. Prints the
pairs per second of all the replicas together and each one's CPU per pair (the database
server's own left out). Every reservation and settlement first locks the organization's
`total` counter row (see "Several replicas" in the README), which bounds them all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from bench import harness
from bench.ledger import fresh_schema
from proxy.config import load_config
from proxy.core.models import Counter, Entry, Settlement, Totals, Usage
from proxy.core.periods import applicable, counters, zone
from proxy.ledger import Reservation, migrate_ledger, open_ledger

CONCURRENCY = 8


@dataclass(frozen=True)
class Found:
    pairs_per_s: float
    cpu_ms: float


async def drive(
    url: str, root: Path, name: str, begin: float, seconds: float, only_budgeted: bool
) -> dict[str, float]:
    """Reserve + settle from `begin` (unix time) for `seconds`: pairs done and CPU seconds.
    With `only_budgeted`, each writes only its budgets' counters and the organization's."""
    config = load_config(root)
    tz = zone(config.timezone)
    ledger = await open_ledger(url)
    usage = Usage(text_input=5, image_output=272)
    done = [0]
    try:
        await asyncio.sleep(max(0.0, begin - time.time()))
        cpu, end = time.process_time(), time.monotonic() + seconds

        async def client(n: int) -> None:
            i = 0
            while time.monotonic() < end:
                i += 1
                team = config.teams[(n * 7919 + i) % len(config.teams)]
                user = f"user-{i % 50}"
                now = time.time()
                budgets = applicable(config, team, user, now)
                read = tuple(dict.fromkeys(a.counter for a in budgets))
                adds_to = counters(team.name, user, now, tz)
                if only_budgeted:
                    adds_to = harness.budgeted_counters(budgets, now, tz)
                entry = Entry(
                    id=f"{name}-{n}-{i}",
                    started_at=now,
                    endpoint="generations",
                    team=team.name,
                    user=user,
                    model="gpt-image-2",
                    estimated_nanos=50_000_000,
                )

                def choose(
                    totals: Mapping[Counter, Totals],
                    entry: Entry = entry,
                    adds_to: tuple[Counter, ...] = adds_to,
                ) -> Reservation:
                    return Reservation(replace(entry, downgrades=""), usage, adds_to)

                await ledger.reserve(read, choose)
                await ledger.settle(
                    entry.id, Settlement(time.time(), "ok", 200, usage=usage, cost_nanos=9_000_000)
                )
                done[0] += 1

        await asyncio.gather(*(client(n) for n in range(CONCURRENCY)))
        return {"pairs": done[0], "cpu": time.process_time() - cpu}
    finally:
        await ledger.close()


def measure(
    server: str, processes: int, teams: int = 100, seconds: float = 8.0, only_budgeted: bool = False
) -> Found:
    """`processes` replicas on a fresh schema of `server`."""
    with tempfile.TemporaryDirectory() as tmp, fresh_schema(server) as url:
        root = harness.write_policies(Path(tmp), "http://127.0.0.1:1", teams=teams)
        asyncio.run(migrate_ledger(url))
        begin = time.time() + 3.0
        argv = [harness.PYTHON, "-m", "bench.replicas", "--worker", url, "--root", str(root),
                "--begin", str(begin), "--seconds", str(seconds)]  # fmt: skip
        argv += ["--only-budgeted"] if only_budgeted else []
        workers = [
            subprocess.Popen([*argv, "--name", f"p{n}"], stdout=subprocess.PIPE)
            for n in range(processes)
        ]
        found = [json.loads(w.communicate()[0]) for w in workers]
    pairs = sum(f["pairs"] for f in found)
    return Found(pairs / seconds, sum(f["cpu"] for f in found) * 1000 / max(1, pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--teams", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--only-budgeted",
        action="store_true",
        help="write only the counters budgets read, and the organization's",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--begin", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        found = asyncio.run(
            drive(args.worker, args.root, args.name, args.begin, args.seconds, args.only_budgeted)
        )
        print(json.dumps(found))
        return
    rows = []
    for n in args.processes:
        f = measure(args.postgres, n, args.teams, args.seconds, args.only_budgeted)
        rows.append((n, args.teams, f.pairs_per_s, f.cpu_ms))
    print(harness.table(("replicas", "teams", "reserve+settle/s", "CPU ms/pair"), rows))


if __name__ == "__main__":
    main()
