"""LiteLLM proxy, the peer users would pick instead, in a virtual environment of its own.

The first run creates `bench/.litellm-venv` (git-ignored) with `pip install 'litellm[proxy]'`;
later runs reuse it. LiteLLM runs without a database, with one model, `gpt-image-2`, routed
as `openai/gpt-image-2` to the simulated upstream's /v1 with the simulator's key.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from bench import harness

VENV = harness.ROOT / "bench" / ".litellm-venv"
# With no database, the master key is the one key LiteLLM accepts (it refuses to run open).
MASTER_KEY = "sk-bench-" + "5f0c9e7a41d2b8366ad1c0f9e2b47d18a3c6e5f0b9d2a4c7e1f3b5d7a9c0e2f4"


def ensure_venv() -> Path:
    """LiteLLM's executable, installing it into its own venv the first time."""
    exe = VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    harness.note(f"installing litellm[proxy] into {VENV} (once)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True, timeout=900
    )
    return exe


def start_litellm(upstream: str, root: Path, workers: int = 1) -> harness.Proc:
    """LiteLLM proxy routed to `upstream` (the simulator's base URL, without /v1)."""
    exe = ensure_venv()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "litellm.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            model_list:
              - model_name: gpt-image-2
                litellm_params:
                  model: openai/gpt-image-2
                  api_base: {upstream}/v1
                  api_key: {harness.SIM_KEY}
                model_info:
                  mode: image_generation
            litellm_settings:
              drop_params: true
              telemetry: false
              request_timeout: 600
        """)
    )
    port = harness.free_port()
    return harness.start(
        f"litellm-w{workers}",
        [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--num_workers", str(workers)],
        f"http://127.0.0.1:{port}/health/liveliness",
        f"http://127.0.0.1:{port}",
        env={"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOG": "ERROR",
             "LITELLM_TELEMETRY": "False", "NO_DOCS": "True"},
        timeout=180,
    )  # fmt: skip
