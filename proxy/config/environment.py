"""What Tollgate reads from the process environment, and the one thing it writes there.

Serve options reach uvicorn's worker processes as an argument (`proxy.web.server`), not
through the environment. The exception is prometheus-client's multiprocess mode: the
client reads `PROMETHEUS_MULTIPROC_DIR` when it is imported, before any of Tollgate's code
runs in a worker, so the directory can only be handed down as an environment variable.
Both the writing and the reading are here.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from proxy.core.errors import ConfigError

METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_[0-9]+\.db")
"""The name of a file prometheus-client's multiprocess mode writes: `{kind}_{pid}.db`."""


def metrics_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """Where this process's metric values are kept for a scrape to sum across workers;
    None: in memory, this process alone."""
    env = os.environ if env is None else env
    given = env.get(METRICS_DIR)
    return Path(given) if given else None


def share_metrics_dir(env: MutableMapping[str, str] | None = None) -> Path:
    """An empty directory for the workers' metric files, set in the environment that the
    workers inherit: the directory given there already, cleared of a previous run's files
    (ConfigError when it holds another `*.db`), else a new temporary one."""
    env = os.environ if env is None else env
    given = metrics_dir(env)
    if given is None:
        given = Path(tempfile.mkdtemp(prefix="tollgate-metrics-"))
    else:
        given.mkdir(parents=True, exist_ok=True)
        found = list(given.glob("*.db"))
        others = sorted(path.name for path in found if not METRICS_FILE.fullmatch(path.name))
        if others:
            # The client sums every `*.db` there at each scrape, and this cleared them all:
            # a SQLite ledger kept in the same directory was deleted at start.
            raise ConfigError(
                [
                    f"{METRICS_DIR}={given}: holds {', '.join(others)}, which prometheus-client "
                    "did not write: give the workers' metrics a directory of their own (its "
                    "metric files are deleted at each start)"
                ]
            )
        for stale in found:
            stale.unlink()
    env[METRICS_DIR] = str(given)
    return given


def variable(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of the environment variable `name` (one a user named on the command
    line, such as `--admin-key-env`); None when it is unset or empty."""
    env = os.environ if env is None else env
    return env.get(name) or None
