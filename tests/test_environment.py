"""What Tollgate reads from, and writes to, the process environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.environment import METRICS_DIR, share_metrics_dir
from proxy.core.errors import ConfigError


def test_a_metrics_directory_given_is_cleared_of_a_previous_runs_metric_files(
    tmp_path: Path,
) -> None:
    for name in ("counter_12.db", "gauge_livesum_12.db", "histogram_7.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    env = {METRICS_DIR: str(tmp_path)}
    assert share_metrics_dir(env) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_metrics_directory_holding_another_database_is_refused_and_left_whole(
    tmp_path: Path,
) -> None:
    """`PROMETHEUS_MULTIPROC_DIR=/var/lib/tollgate`, the ledger's volume: `serve --workers 2`
    deleted `tollgate.db` (every `*.db` went), and a scrape would have read it as metrics."""
    for name in ("tollgate.db", "counter_12.db"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ConfigError) as refused:
        share_metrics_dir({METRICS_DIR: str(tmp_path)})
    [problem] = refused.value.problems
    assert problem.startswith(f"{METRICS_DIR}={tmp_path}: holds tollgate.db, which ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_12.db", "tollgate.db"]
