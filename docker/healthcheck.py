"""The image's HEALTHCHECK: GET /healthz of the `tollgate serve` running in this container.

The address comes from the server's own command line (`--host`, `--port`), so a container
started with other arguments than the image's CMD is still checked where it listens.
Exit status 0 is healthy, 1 is not (Docker's convention).
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

DEFAULT_PORT = "8080"
# What a wildcard bind is reached through from inside the container.
LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def serve_arguments() -> list[str]:
    """The arguments of the oldest `serve` process: PID 1 unless an init runs first."""
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda p: int(p.name)):
        try:
            argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if "serve" in argv:
            return argv[argv.index("serve") + 1 :]
    return []


def option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def main() -> int:
    argv = serve_arguments()
    host = option(argv, "--host", "127.0.0.1")
    host = LOOPBACK.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{option(argv, '--port', DEFAULT_PORT)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
