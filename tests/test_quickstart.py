"""The README's quick start, line by line, on a fresh copy of the repository.

The lines are read out of README.md's "Quick start" section (its indented blocks; a line
continued with a backslash is left for bash to join) and run in order with bash in a copy
of the repository without `.venv` or any ledger, as a newcomer would run them on a fresh
machine: pip installs from its cache or PyPI. Two substitutions keep the test off port
8080, which another process may hold: the `serve --simulate` line gets `--port P` (a free
port) appended and runs in the background; `127.0.0.1:8080` in the client line becomes
`127.0.0.1:P`. The last line, `bash tests/run`, is the suite this test belongs to, so it
is only checked to be there. Every step has a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from decimal import Decimal
from pathlib import Path

import httpx

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
INSTALL_DEADLINE_S = 600.0
"""A fresh virtualenv and the installation of the package (pip's cache makes it quick)."""


def quick_start(readme: str) -> list[str]:
    """The commands of README.md's "Quick start" section (one per indented block), in order."""
    section = readme.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    commands: list[str] = []
    for block in re.findall(r"(?:^(?: {4}.*)?\n)+", section, re.MULTILINE):
        text = textwrap.dedent(block).strip()
        if text:
            commands.append(text)
    return commands


def fresh_copy(target: Path) -> Path:
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "*.db", "*.db-*", "build"
    )
    shutil.copytree(REPO, target, ignore=ignored)
    return target


def test_the_quick_start_works_line_by_line_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    serve, client, suite = quick_start((REPO / "README.md").read_text())
    assert serve.startswith("python3 -m venv .venv && ") and serve.endswith("serve --simulate")
    assert "import openai" in client and "127.0.0.1:8080" in client
    assert suite == "bash tests/run"
    root = fresh_copy(tmp_path / "tollgate")
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        ["bash", "-c", f"{serve} --port {port}"],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the venv, pip and the server
    )
    try:
        deadline = time.monotonic() + INSTALL_DEADLINE_S
        while not up(port):
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        done = subprocess.run(
            ["bash", "-c", client.replace("127.0.0.1:8080", f"127.0.0.1:{port}")],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=INSTALL_DEADLINE_S,
            env={k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        cost = done.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"\d+(\.\d+)?", cost), done.stdout
        assert Decimal(cost) > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_quick_start_commands_are_its_indented_blocks() -> None:
    readme = (
        "# T\n\n    z\n\n## Quick start\n\nText:\n\n    a && \\\n      b\n\nMore.\n\n"
        "    c\n\n## Next\n\n    d\n"
    )
    assert quick_start(readme) == ["a && \\\n  b", "c"]
