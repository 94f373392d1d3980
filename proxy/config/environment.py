"""What Tollgate reads from the process environment, and the one thing it writes there.

Serve options reach uvicorn's worker processes as an argument (`proxy.web.server`), not
through the environment. The exception is prometheus-client's multiprocess mode: the
client reads `PROMETHEUS_MULTIPROC_DIR` when it is imported, before any of Tollgate's code
runs in a worker, so the directory can only be handed down as an environment variable.
Both the writing and the reading are here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """Where this process's metric values are kept for a scrape to sum across workers;
    None: in memory, this process alone."""
    env = os.environ if env is None else env
    given = env.get(METRICS_DIR)
    return Path(given) if given else None


def share_metrics_dir(env: MutableMapping[str, str] | None = None) -> Path:
    """An empty directory for the workers' metric files, set in the environment that the
    workers inherit: the directory given there already, cleared of a previous run's files,
    else a new temporary one."""
    env = os.environ if env is None else env
    given = metrics_dir(env)
    if given is None:
        given = Path(tempfile.mkdtemp(prefix="tollgate-metrics-"))
    else:
        given.mkdir(parents=True, exist_ok=True)
        for stale in given.glob("*.db"):
            stale.unlink()
    env[METRICS_DIR] = str(given)
    return given


def variable(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of the environment variable `name` (one a user named on the command
    line, such as `--admin-key-env`); None when it is unset or empty."""
    env = os.environ if env is None else env
    return env.get(name) or None
