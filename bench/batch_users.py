"""How long a batch create, and the settlement of the batch when it ends, keep a worker's
other requests waiting, by the users its file names (not a test).

    .venv/bin/python -m bench.batch_users [--lines 50000]
                                          [--postgres postgresql://postgres@127.0.0.1:5432/test]
                                          [--source DIR]

Tollgate (one worker, `harness.write_policies`: its team has a daily per-user budget, so
a batch holds each named user's share of its bound) and the simulated upstream run as
processes on loopback. A file of `--lines` generations is uploaded three times over: its
lines naming one user, each line a user of its own, and the same under a team without
per-user budgets. For each, while the official `openai` client creates the batch, a
second thread asks `GET /v1/tollgate/budget` (a ledger read that never reaches the
upstream: the simulator, reading the same file, is busy too) one request after the
other; the longest any of them waited is what the create kept the worker from serving.

The simulated upstream completes each batch about 1.5 s after its create (its default
`batch_delay_ms`), with every line answered 200; Tollgate's follower reads its
`--lines`-line output file and settles a ledger row per line. The reads go on from the
create's answer until one of them shows the batch's reservation gone from the team's
budgets (every `reserved` 0): the settlement's time from the create's answer, and the
longest read meanwhile, what following and settling the batch kept the worker from serving.

The ledger is a SQLite file, or with `--postgres SERVER` a fresh schema of that server
(dropped after). `--source DIR` runs the `proxy` package of another tree (before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai

from bench import harness
from bench.harness import note, table
from bench.ledger import fresh_schema


def write_file(path: Path, lines: int, distinct: bool) -> None:
    with path.open("w") as out:
        for i in range(lines):
            body = {"model": "gpt-image-2", "prompt": f"a lighthouse, take {i}",
                    "quality": "low", "size": "1024x1024",
                    "user": f"user-{i}" if distinct else "one-user"}  # fmt: skip
            line = {"custom_id": f"line-{i}", "method": "POST",
                    "url": "/v1/images/generations", "body": body}  # fmt: skip
            out.write(json.dumps(line) + "\n")


def longest_wait(url: str, create: threading.Event, done: threading.Event) -> list[float]:
    """Budget reads one after the other from when `create` is set until `done` is: the
    time each one took."""
    waits = []
    ask = urllib.request.Request(
        url + "/v1/tollgate/budget", headers={"authorization": f"Bearer {harness.TEAM_KEY}"}
    )
    create.wait()
    while not done.is_set():
        began = time.perf_counter()
        with urllib.request.urlopen(ask, timeout=600) as answer:
            answer.read()
        waits.append(time.perf_counter() - began)
    return waits


def held(answer: object) -> bool:
    """Whether a budget answer shows anything reserved (a `reserved` figure not 0)."""
    if isinstance(answer, dict):
        return any(
            (key == "reserved" and float(value) != 0) or held(value)
            for key, value in answer.items()
        )
    return isinstance(answer, list) and any(held(value) for value in answer)


def until_settled(url: str, began: float) -> tuple[float, list[float]]:
    """Budget reads one after the other until one shows nothing reserved: (seconds from
    `began` until then, the time each read took)."""
    waits = []
    ask = urllib.request.Request(
        url + "/v1/tollgate/budget", headers={"authorization": f"Bearer {harness.TEAM_KEY}"}
    )
    while True:
        start = time.perf_counter()
        with urllib.request.urlopen(ask, timeout=600) as answer:
            found = json.loads(answer.read())
        waits.append(time.perf_counter() - start)
        if not held(found):
            return time.perf_counter() - began, waits


def measure(url: str, path: Path) -> tuple[float, float, float, float]:
    """(seconds the create took, longest budget read meanwhile, seconds from the create's
    answer until the batch was settled, longest budget read meanwhile) for the file at
    `path`."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=harness.TEAM_KEY, max_retries=0,
                       timeout=600) as sdk:  # fmt: skip
        with path.open("rb") as file:
            uploaded = sdk.files.create(file=(path.name, file), purpose="batch")
        create, done = threading.Event(), threading.Event()
        waits: list[float] = []
        reader = threading.Thread(target=lambda: waits.extend(longest_wait(url, create, done)))
        reader.start()
        create.set()
        time.sleep(0.2)  # the reads under way before the create starts
        began = time.perf_counter()
        sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
        )
        answered = time.perf_counter()
        took = answered - began
        time.sleep(0.2)
        done.set()
        reader.join()
        settled, settling = until_settled(url, answered)
    return took, max(waits), settled, max(settling)


def without_per_user(root: Path) -> None:
    """The team files of `root` with their per-user budgets taken out."""
    for team in (root / "teams").glob("*.yaml"):
        kept, skipping = [], False
        for line in team.read_text().splitlines():
            if line.strip() == "per_user:":
                skipping = True
                continue
            if skipping and line.lstrip().startswith("- "):
                continue
            skipping = False
            kept.append(line)
        team.write_text("\n".join(kept) + "\n")


def reload(url: str) -> None:
    ask = urllib.request.Request(
        url + "/admin/reload",
        method="POST",
        headers={"authorization": f"Bearer {harness.ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(ask, timeout=60) as answer:
        answer.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--postgres", help="a PostgreSQL server URL: the ledger on it")
    parser.add_argument("--source", type=Path, help="run the proxy package of this tree")
    args = parser.parse_args()
    rows = []
    simulator = harness.start_simulator()
    ledger = (
        fresh_schema(args.postgres)
        if args.postgres
        else contextlib.nullcontext("sqlite:///tollgate.db")
    )
    with harness.running(simulator), tempfile.TemporaryDirectory() as tmp, ledger as url:
        root = Path(tmp)
        tollgate = harness.start_tollgate(simulator.url, root, ledger=url, source=args.source)
        with harness.running(tollgate):
            for per_user, distinct in ((True, False), (True, True), (False, True)):
                if not per_user:
                    without_per_user(root)
                    reload(tollgate.url)
                note(f"per-user budgets {per_user}, a user per line {distinct} …")
                path = root / "batch.jsonl"
                write_file(path, args.lines, distinct)
                took, waited, settled, stalled = measure(tollgate.url, path)
                users = f"{args.lines:,}" if distinct else "1"
                rows.append(
                    ("yes" if per_user else "no", users, f"{took:.2f}", f"{waited:.2f}",
                     f"{settled:.2f}", f"{stalled:.2f}")
                )  # fmt: skip
    header = ("per-user budgets", "users named", "create s", "longest wait s", "settled after s",
              "longest wait s")  # fmt: skip
    print(table(header, rows))


if __name__ == "__main__":
    main()
