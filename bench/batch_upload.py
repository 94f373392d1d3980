"""A batch input file of 50,000 lines uploaded through a real Tollgate process: the upload's
time and the process's peak resident memory.

    .venv/bin/python -m bench.batch_upload [--lines 50000] [--repeat 3]

Tollgate and the simulated upstream run as processes on loopback; the file (small
prompts, gpt-image-2 generations) is written to disk and sent by the official `openai`
client (`files.create`, purpose `batch`), so Tollgate spools it, reads, checks and prices
every line, writes the file out again and forwards it. "Peak RSS" is the process's
high-water mark (VmHWM in /proc/PID/status) before the first upload and after the last:
an upload held in memory whole would raise it by the file's size or more. Each upload
time is Tollgate's answer to the SDK (the simulator's share, storing the file, included);
the best of `--repeat` runs is shown, with the file's size and the rate in lines a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from bench import harness

MiB = 1024 * 1024


def write_file(path: Path, lines: int) -> int:
    """A batch file of `lines` small generations at `path`; its size in bytes."""
    with path.open("w") as out:
        for i in range(lines):
            body = {"model": "gpt-image-2", "prompt": f"a lighthouse, take {i}",
                    "quality": "low", "size": "1024x1024"}  # fmt: skip
            line = {"custom_id": f"line-{i}", "method": "POST",
                    "url": "/v1/images/generations", "body": body}  # fmt: skip
            out.write(json.dumps(line) + "\n")
    return path.stat().st_size


def high_water_mark(pid: int) -> int:
    """VmHWM (peak resident memory) of `pid` and its live descendants, in bytes."""
    total = 0
    for p in harness.tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


@dataclass(frozen=True)
class Upload:
    file_id: str
    seconds: float


def upload(url: str, key: str, path: Path) -> Upload:
    """`path` uploaded through Tollgate at `url` with the official client."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600) as sdk:
        began = time.perf_counter()
        with path.open("rb") as file:
            found = sdk.files.create(file=(path.name, file), purpose="batch")
        return Upload(found.id, time.perf_counter() - began)


@dataclass(frozen=True)
class Measured:
    lines: int
    file_bytes: int
    seconds: float
    """The best upload."""
    peak_before: int
    peak_after: int


def measure(url: str, key: str, pid: int, lines: int, repeat: int = 1) -> Measured:
    """Upload a file of `lines` lines `repeat` times through the Tollgate process `pid`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        size = write_file(path, lines)
        before = high_water_mark(pid)
        took = min(upload(url, key, path).seconds for _ in range(repeat))
        after = high_water_mark(pid)
    return Measured(lines, size, took, before, after)


def report(found: Measured) -> str:
    return harness.table(
        ("lines", "file MiB", "upload s", "lines/s", "peak RSS before MiB",
         "peak RSS after MiB", "growth MiB"),
        [(found.lines, found.file_bytes / MiB, found.seconds, found.lines / found.seconds,
          found.peak_before / MiB, found.peak_after / MiB,
          (found.peak_after - found.peak_before) / MiB)],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    simulator = harness.start_simulator()
    with tempfile.TemporaryDirectory() as tmp, harness.running(simulator):
        tollgate = harness.start_tollgate(simulator.url, Path(tmp))
        with harness.running(tollgate):
            found = measure(tollgate.url, harness.TEAM_KEY, tollgate.pid, args.lines, args.repeat)
    print(report(found))


if __name__ == "__main__":
    main()
