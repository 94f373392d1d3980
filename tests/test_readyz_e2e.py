"""`/readyz` needs no token: when the ledger is not ready it says so, naming neither the
database's host, port, user nor password (the detail goes to the log)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests import pg
from tests.conftest import Simulator, start_tollgate, wait_for, write_config

PASSWORD = "hunter2-ledger-secret"


def test_a_ledger_that_goes_away_is_unready_without_naming_where_it_is(
    simulator: Simulator, tmp_path: Path, cluster: pg.Cluster
) -> None:
    from proxy.ledger import migrate_ledger

    # The server trusts every local connection: the password is only there to be hidden.
    url = cluster.url.replace("postgres@", f"postgres:{PASSWORD}@")
    pg.run(migrate_ledger(url))
    write_config(tmp_path, f"{simulator.url}/v1")
    proxy = start_tollgate(tmp_path, ledger_url=url)
    try:
        assert httpx.get(f"{proxy.url}/readyz").json() == {"status": "ready"}
        cluster.stop()

        def unready() -> httpx.Response | None:
            answer = httpx.get(f"{proxy.url}/readyz", timeout=30)
            return answer if answer.status_code == 503 else None

        answer = wait_for("a 503 from /readyz", unready)
        assert answer.json() == {"status": "unavailable", "reason": "ledger unreachable"}
        for secret in ("127.0.0.1", str(cluster.port), "postgres", PASSWORD):
            assert secret not in answer.text
    finally:
        log = proxy.stop()
    assert "not ready: ledger unreachable" in log
    assert PASSWORD not in log
