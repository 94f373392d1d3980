"""Instructions per request, counted by callgrind (not a test).

    .venv/bin/python -m bench.instructions [--requests 300] [--before DIR]
                                           [--payload-bytes N] [--stream]

A CPU time measured under load moves by a third between runs on a shared machine; the
instructions a process executes do not. This runs Tollgate (one worker, SQLite ledger,
budgets on: `harness.write_policies`) under `valgrind --tool=callgrind`, sends it
`WARM` + `--requests` bench generations one after the other, stops it, and counts what
it executed. A second run that sends only the first `WARM` of them counts the start, the
stop and the first requests' one-time work (modules imported on first use, the upstream
client and its TLS context made, caches filled: about 250 M instructions for Tollgate,
whose first request makes its upstream session, 5 M for the floor); the difference, divided
by the requests between, is what one request costs once warm. Each tree runs twice
(bytecode compiled and cached by the first), and the median of the per-request figures
is printed. The floor (`bench.floor`: starlette and the same aiohttp session, no
Tollgate logic) is counted the same way for the same request, so the ratio to the floor
is one that load does not move either. `--before DIR` counts a Tollgate from the `proxy`
package in DIR beside this tree's (`git archive REV proxy | tar -x -C DIR`). Needs
valgrind (Debian's package); each run takes a minute or two. `--payload-bytes 1500000`
counts 2 MB answers (the simulator pads its images so), and `--stream` asks for them as an
event stream (`stream: true`), as `bench.all`'s big and stream rows do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench import harness
from bench.harness import note, table

FLOOR = "floor"
"""In place of a tree: the floor (`bench.floor`), counted as a Tollgate is."""


def executed(
    source: Path | str | None, upstream: str, requests: int, body: dict[str, object]
) -> int:
    """Instructions a Tollgate (or the floor) executes from start to stop, serving
    `requests` generations."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        harness.write_policies(root, upstream)
        out = root / "callgrind"
        out.mkdir()
        port = harness.free_port()
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # the second run reads cached bytecode
        if source == FLOOR:
            serve = ["-m", "bench.floor", "--port", str(port), "--upstream", upstream + "/v1"]
            key, source = harness.SIM_KEY, None
        else:
            serve = ["-m", "proxy", "serve", "--config", str(root), "--port", str(port)]
            serve += ["--workers", "1"]
            key = harness.TEAM_KEY
        if source is not None:
            env["PYTHONPATH"] = str(source)
        argv = [
            "valgrind", "--tool=callgrind", "--trace-children=yes",
            f"--callgrind-out-file={out}/out.%p", harness.PYTHON, *serve,
        ]  # fmt: skip
        process = subprocess.Popen(
            argv, cwd=source or harness.ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            ready(url + "/healthz", process)
            for _ in range(requests):
                generate(url + "/v1/images/generations", key, body)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=600)
        return sum(total(path) for path in out.iterdir())


def ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600  # slow under valgrind
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"Tollgate exited under valgrind ({process.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit("Tollgate did not start under valgrind")


def generate(url: str, key: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        answer.read()


def total(path: Path) -> int:
    """The instructions one callgrind output file counts."""
    with path.open() as lines:
        for line in lines:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


WARM = 30
"""Requests sent before those counted: their one-time work is not a request's."""


def per_request(
    source: Path | str | None, upstream: str, requests: int, body: dict[str, object]
) -> float:
    warm = [executed(source, upstream, WARM, body) for _ in range(2)][-1]
    busy = [executed(source, upstream, WARM + requests, body) for _ in range(2)]
    return statistics.median((b - warm) / requests for b in busy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--before", type=Path, help="another tree's proxy package, beside")
    parser.add_argument("--payload-bytes", type=int, default=0, help="of each image answer")
    parser.add_argument("--stream", action="store_true", help="answers as event streams")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("bench.instructions needs valgrind (apt-get install valgrind)")
    body = {**harness.GENERATION, "stream": True} if args.stream else harness.GENERATION
    sim = harness.start_simulator(payload_bytes=args.payload_bytes)
    counted = []
    with harness.running(sim):
        versions: list[tuple[str, Path | str | None]] = [("floor", FLOOR), ("this tree", None)]
        if args.before:
            versions.insert(1, (f"before ({args.before})", args.before))
        for name, source in versions:
            note(f"counting {name} …")
            counted.append((name, per_request(source, sim.url, args.requests, body)))
    floor = counted[0][1]
    rows = [(name, f"{n / 1e6:.2f}", f"{n / floor:.2f}") for name, n in counted]
    print(table(("server", "M instructions per request", "× floor"), rows))


if __name__ == "__main__":
    main()
