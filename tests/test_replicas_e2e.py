"""Several replicas on one PostgreSQL ledger: no overspend across replicas, reports identical to
SQLite's, `ledger copy` and `ledger migrate`, start-up errors, and a database outage mid-load."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.core.auth import key_hash
from proxy.ledger.migrations import SCHEMA_VERSION
from tests import pg
from tests.conftest import (
    DESIGN_KEY,
    RESEARCH_KEY,
    Simulator,
    Tollgate,
    drop_ledger,
    free_port,
    query_ledger,
    start_tollgate,
    write_config,
)
from tests.test_budgets_e2e import ONE, STORM_KEY, fire, storm_config
from tests.test_proxy_e2e import expected_cost

REPORT_BY = "team,cost_center,user,key,model,quality,size,endpoint,outcome,day"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )


def test_a_storm_over_two_replicas_never_overspends_and_leaves_no_room_unused(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    fits = 53
    limit = ONE * fits
    storm_config(tmp_path, simulator, limit)
    simulator.configure(latency_ms=200)
    replicas = [start_tollgate(tmp_path, ledger_url=shared) for _ in range(2)]

    async def both() -> list[int]:
        halves = await asyncio.gather(*(fire(r.url, 150) for r in replicas))
        return [status for half in halves for status in half]

    try:
        statuses = asyncio.run(both())
    finally:
        simulator.configure(latency_ms=0)
        for replica in replicas:
            replica.stop()
    assert len(statuses) == 300
    assert statuses.count(200) == fits, collections.Counter(statuses)
    assert statuses.count(429) == 300 - fits, collections.Counter(statuses)
    proxy = replicas[0]
    spent = Decimal(proxy.query("SELECT SUM(cost_nanos) AS v FROM requests")[0]["v"]) / 10**9
    assert spent <= limit
    assert limit - spent < ONE  # used to within one request of the limit
    usage = proxy.query(
        "SELECT scope, SUM(spent_nanos) AS spent, SUM(reserved_nanos) AS reserved "
        "FROM budget_usage WHERE period = 'month' GROUP BY scope"
    )
    by_scope = {r["scope"]: (r["spent"], r["reserved"]) for r in usage}
    # The organization's row holds exactly what its teams hold.
    assert by_scope["organization"] == by_scope["team"] == (spent * 10**9, 0)


# -- the same workload on both backends ------------------------------------------

TEAMS = {
    "design": f"""
name: design
cost_center: CC-1042
keys:
  - {{id: web-app, sha256: {key_hash(DESIGN_KEY)}}}
budgets:
  - {{period: month, limit_usd: 5, alert_at: [0.01]}}
allow:
  models: [gpt-image-2, gpt-image-1.5, gpt-image-1-mini]
""",
    "research": f"""
name: research
cost_center: CC-2077
keys:
  - {{id: notebook, sha256: {key_hash(RESEARCH_KEY)}}}
budgets:
  - {{period: day, limit_usd: 0.10}}
on_exhausted: reject
""",
}

WORKLOAD: list[tuple[str, dict[str, Any]]] = [
    (DESIGN_KEY, {"model": "gpt-image-2", "quality": "low", "size": "1024x1024", "user": "alice"}),
    (DESIGN_KEY, {"model": "gpt-image-2", "quality": "medium", "size": "1536x1024", "user": "bob"}),
    (DESIGN_KEY, {"model": "gpt-image-1.5", "quality": "low", "size": "1024x1024", "n": 2}),
    (DESIGN_KEY, {"model": "gpt-image-1", "quality": "low"}),  # 403 policy
    (RESEARCH_KEY, {"model": "gpt-image-2", "quality": "low", "size": "1024x1024"}),
    (RESEARCH_KEY, {"model": "gpt-image-2", "quality": "high", "size": "2048x2048"}),  # 429
    ("tg_unknown", {"model": "gpt-image-2"}),  # 401
]


@dataclass
class Run:
    tollgate: Tollgate
    statuses: list[int]

    def report(self, *args: str) -> Any:
        ledger = ["--ledger", self.tollgate.ledger_url] if self.tollgate.ledger_url else []
        done = cli("report", "--config", str(self.tollgate.root), *ledger, *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if "json" in args else done.stdout


def run_workload(simulator: Simulator, root: Path, ledger_url: str | None) -> Run:
    # The webhook answers 404 (not retried): enough for an alert to be claimed and recorded.
    settings = f"timezone: UTC\nalerts: {{webhooks: ['{simulator.url}/_sim/hook']}}\n"
    write_config(root, f"{simulator.url}/v1", settings=settings, teams=TEAMS)
    tollgate = start_tollgate(root, ledger_url=ledger_url)
    statuses = []
    try:
        for key, params in WORKLOAD:
            time.sleep(0.3)  # let the alert task see each settlement in turn
            answer = httpx.post(
                f"{tollgate.url}/v1/images/generations",
                headers={"authorization": f"Bearer {key}"},
                json={"prompt": "a lighthouse", **params},
                timeout=30,
            )
            statuses.append(answer.status_code)
        deadline = time.monotonic() + 60
        while not tollgate.query("SELECT key FROM alerts_sent"):
            assert time.monotonic() < deadline, "no alert was claimed"
            time.sleep(0.1)
    finally:
        tollgate.stop()
    return Run(tollgate, statuses)


@pytest.fixture(scope="module")
def runs(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Run]]:
    url = pg.migrated_schema()
    sqlite = run_workload(simulator, tmp_path_factory.mktemp("on-sqlite"), None)
    postgres = run_workload(simulator, tmp_path_factory.mktemp("on-postgres"), url)
    yield [sqlite, postgres]
    drop_ledger(url)


def test_the_workload_answers_the_same_on_both_backends(runs: list[Run]) -> None:
    sqlite, postgres = runs
    assert sqlite.statuses == postgres.statuses == [200, 200, 200, 403, 200, 429, 401]


@pytest.mark.parametrize("by", [REPORT_BY, "team", "outcome,month"])
def test_reports_are_identical_on_sqlite_and_postgresql(runs: list[Run], by: str) -> None:
    sqlite, postgres = (r.report("--by", by, "--format", "json") for r in runs)
    assert sqlite["rows"] and Decimal(sqlite["total"]["cost_usd"]) > 0
    assert sqlite == postgres


def test_statements_are_identical_on_sqlite_and_postgresql(runs: list[Run]) -> None:
    month = time.strftime("%Y-%m", time.gmtime())
    sqlite, postgres = (r.report("--statement", month, "--format", "json") for r in runs)
    assert sqlite == postgres


def test_ledger_copy_moves_every_row_counter_and_alert_then_refuses_a_second_time(
    runs: list[Run],
) -> None:
    source = runs[0].tollgate
    target = pg.new_schema()  # not even migrated: copy does it
    try:
        done = cli(
            "ledger", "copy", "--from", f"sqlite:///{source.root / 'tollgate.db'}", "--to", target
        )
        assert done.returncode == 0, done.stderr
        assert "copied 6 requests" in done.stdout  # the 401 is not a ledger row
        for table, order in (
            ("requests", "id"),
            ("budget_usage", 'scope, team, "user", period, start'),
            ("alerts_sent", "key"),
        ):
            sql = f"SELECT * FROM {table} ORDER BY {order}"
            before = query_ledger(source.root, None, sql.replace('"user"', "user"))
            after = query_ledger(source.root, target, sql)
            assert after == before, table
        assert query_ledger(source.root, target, "SELECT count(*) AS n FROM alerts_sent")[0]["n"]
        copied = Run(Tollgate(source.url, source.root, source.process, target), [])
        assert copied.report("--by", REPORT_BY, "--format", "json") == runs[0].report(
            "--by", REPORT_BY, "--format", "json"
        )
        again = cli(
            "ledger", "copy", "--from", f"sqlite:///{source.root / 'tollgate.db'}", "--to", target
        )
        assert again.returncode == 1
        assert "is not empty (6 requests" in again.stderr
        assert "does not merge" in again.stderr
    finally:
        drop_ledger(target)


# -- start-up ---------------------------------------------------------------------


def test_serve_refuses_an_unreachable_database_with_a_clear_error(
    simulator: Simulator, tmp_path: Path
) -> None:
    write_config(tmp_path, f"{simulator.url}/v1")
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    done = cli("serve", "--config", str(tmp_path), "--port", str(free_port()), "--ledger", url)
    assert done.returncode == 1
    assert "cannot reach the PostgreSQL ledger" in done.stderr


def test_two_replicas_started_together_on_an_empty_database_initialise_it_and_serve(
    simulator: Simulator, tmp_path: Path
) -> None:
    url = pg.new_schema()  # no Tollgate tables at all: no `ledger migrate` first
    replicas: list[Tollgate] = []
    try:
        write_config(tmp_path, f"{simulator.url}/v1")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            starting = [pool.submit(start_tollgate, tmp_path, ledger_url=url) for _ in range(2)]
            replicas = [f.result() for f in starting]
        for replica in replicas:
            answer = httpx.post(
                f"{replica.url}/v1/images/generations",
                headers={"authorization": f"Bearer {DESIGN_KEY}"},
                json={"model": "gpt-image-2", "prompt": "a lighthouse", "quality": "low",
                      "size": "1024x1024"},
                timeout=30,
            )  # fmt: skip
            assert answer.status_code == 200, answer.text
        versions = query_ledger(tmp_path, url, "SELECT version FROM schema_version")
        assert [v["version"] for v in versions] == [SCHEMA_VERSION]
        assert len(query_ledger(tmp_path, url, "SELECT id FROM requests")) == 2
    finally:
        for replica in replicas:
            replica.stop()
        drop_ledger(url)


def test_serve_refuses_a_schema_behind_until_ledger_migrate_runs(
    simulator: Simulator, tmp_path: Path
) -> None:
    url = pg.schema_at_version(1)
    try:
        write_config(tmp_path, f"{simulator.url}/v1")
        port = str(free_port())
        done = cli("serve", "--config", str(tmp_path), "--port", port, "--ledger", url)
        assert done.returncode == 1
        assert "run `tollgate ledger migrate" in done.stderr
        migrated = cli("ledger", "migrate", "--config", str(tmp_path), "--ledger", url)
        assert migrated.returncode == 0, migrated.stderr
        assert "migrated from version 1 to" in migrated.stdout
        again = cli("ledger", "migrate", "--ledger", url)
        assert "up to date" in again.stdout
        proxy = start_tollgate(tmp_path, ledger_url=url)
        proxy.stop()
    finally:
        drop_ledger(url)


# -- the database goes away mid-load ----------------------------------------------


def test_database_restart_mid_load_loses_no_charge_and_leaks_no_reservation(
    simulator: Simulator, tmp_path: Path, cluster: pg.Cluster
) -> None:
    from proxy.ledger import migrate_ledger

    url = cluster.url
    pg.run(migrate_ledger(url))
    storm_config(tmp_path, simulator, Decimal(100))
    (tmp_path / "tollgate.yaml").write_text(
        (tmp_path / "tollgate.yaml").read_text().replace("timeout_s: 3", "timeout_s: 30")
    )
    simulator.configure(latency_ms=400)
    proxy = start_tollgate(tmp_path, ledger_url=url)
    answers: list[httpx.Response | None] = []
    ready: list[int] = []
    during: list[httpx.Response] = []

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=60) as http:

            async def one() -> None:
                try:
                    answer = await http.post(
                        f"{proxy.url}/v1/images/generations",
                        headers={"authorization": f"Bearer {STORM_KEY}"},
                        json={"model": "gpt-image-2", "prompt": "abcd", "quality": "low"},
                    )
                except httpx.HTTPError:
                    answers.append(None)
                    return
                answers.append(answer)

            async def worker() -> None:
                while not stop.is_set():
                    await one()

            async def probe() -> None:
                while not stop.is_set():
                    ready.append((await http.get(f"{proxy.url}/readyz")).status_code)
                    await asyncio.sleep(0.1)

            await asyncio.gather(*(worker() for _ in range(8)), probe())

    def served_count() -> int:
        return sum(1 for a in answers if a is not None and a.status_code == 200)

    async def until(condition: Callable[[], bool], what: str) -> None:
        # Each phase ends on what it waits for, however slowly the machine gets there.
        deadline = time.monotonic() + 90
        while not condition():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.05)

    async def outage() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(load(stop))
        await until(lambda: served_count() > 10, "nothing served before the outage")
        await asyncio.to_thread(cluster.stop)
        await until(lambda: 503 in ready, "readiness never failed")
        # The workers may all be waiting on settlements that retry: send new requests too.
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(3):
                during.append(
                    await http.post(
                        f"{proxy.url}/v1/images/generations",
                        headers={"authorization": f"Bearer {STORM_KEY}"},
                        json={"model": "gpt-image-2", "prompt": "abcd", "quality": "low"},
                    )
                )
        await asyncio.to_thread(cluster.start)
        before = served_count()
        await until(lambda: ready[-1] == 200 and served_count() > before, "never recovered")
        stop.set()
        await running

    try:
        asyncio.run(outage())
        deadline = time.monotonic() + 60  # settlements of the last answers
        while query_ledger(tmp_path, url, "SELECT id FROM requests WHERE state = 'reserved'"):
            assert time.monotonic() < deadline, "reservations still held"
            time.sleep(0.05)
        after = httpx.post(
            f"{proxy.url}/v1/images/generations",
            headers={"authorization": f"Bearer {STORM_KEY}"},
            json={"model": "gpt-image-2", "prompt": "abcd", "quality": "low"},
            timeout=30,
        )
    finally:
        simulator.configure(latency_ms=0)
        log = proxy.stop()
    statuses = collections.Counter(a.status_code if a is not None else 0 for a in answers)
    # Served before and after, refused (never forwarded unmetered) while the database was away.
    assert statuses[200] > 10 and set(statuses) <= {200, 503}, statuses
    for refused in during:
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "api_error"
        assert refused.json()["error"]["code"] == "service_unavailable"
    assert 503 in ready and ready[-1] == 200  # readiness failed, then recovered
    assert after.status_code == 200  # recovered without a restart
    billing = {r["id"]: r for r in simulator.billing()}
    rows = {
        r["upstream_request_id"]: r
        for r in query_ledger(tmp_path, url, "SELECT * FROM requests")
        if r["upstream_request_id"]
    }
    served = [a for a in answers if a is not None and a.status_code == 200] + [after]
    for answer in served:
        upstream_id = answer.headers["x-request-id"]
        row = rows[upstream_id]  # billed upstream, answered 200: in the ledger…
        assert row["state"] == "settled", log
        assert Decimal(row["cost_nanos"]) / 10**9 == expected_cost(billing[upstream_id])  # …charged
    # Refused requests never reached the upstream: every billed request is in the ledger.
    assert set(billing) >= set(rows) and len(rows) == len(served)
    held = query_ledger(
        tmp_path, url, "SELECT count(*) AS n FROM requests WHERE state = 'reserved'"
    )
    reserved = query_ledger(tmp_path, url, "SELECT sum(reserved_nanos) AS v FROM budget_usage")
    assert held[0]["n"] == 0 and reserved[0]["v"] == 0
    spent = query_ledger(
        tmp_path,
        url,
        "SELECT spent_nanos FROM budget_usage WHERE scope = 'team' AND period = 'month'",
    )[0]["spent_nanos"]
    assert spent == sum(int(r["cost_nanos"]) for r in rows.values())


# -- a replica frozen in the middle of a transaction ------------------------------------------


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process `pid` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for entry in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = entry.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_the_admin_api_answers_503_while_the_database_is_down(
    simulator: Simulator, tmp_path: Path, cluster: pg.Cluster
) -> None:
    """As a team's own budget answers: a 500 "it has been logged" sent the operator to the
    logs for a database that is only restarting, and the audit export answered 200 and
    broke off before its first row."""
    from proxy.ledger import migrate_ledger

    pg.run(migrate_ledger(cluster.url))
    write_config(tmp_path, f"{simulator.url}/v1", settings="admin_token: admin-secret-for-tests\n")
    proxy = start_tollgate(tmp_path, ledger_url=cluster.url)
    admin = {"authorization": "Bearer admin-secret-for-tests"}
    paths = ["/admin/budgets", "/admin/report", "/admin/report?statement=2026-11",
             "/admin/report?audit=1", "/admin/report?audit=1&format=csv"]  # fmt: skip
    try:
        cluster.stop()
        answers = [httpx.get(f"{proxy.url}{path}", headers=admin, timeout=60) for path in paths]
        refused = httpx.get(f"{proxy.url}/admin/budgets", timeout=60)
        cluster.start()
        after = [httpx.get(f"{proxy.url}{path}", headers=admin, timeout=60) for path in paths]
    finally:
        log = proxy.stop()
    for path, answer in zip(paths, answers, strict=True):
        assert answer.status_code == 503, (path, answer.text)
        assert answer.json()["error"]["code"] == "service_unavailable"
    assert refused.status_code == 401  # the token first: no one else learns the ledger's state
    assert [a.status_code for a in after] == [200] * len(paths), log
    assert "unhandled error" not in log


def test_a_replica_frozen_inside_a_transaction_does_not_stop_the_others(
    simulator: Simulator, tmp_path: Path, shared: str
) -> None:
    """A replica paused (SIGSTOP, a paused VM, a stalled host) while its transaction holds
    the counters' lock used to hold it for as long as it stayed paused: every other
    replica's reservations and settlements waited on it, and the fleet answered 503. The
    database now ends a session left idle inside a transaction, which releases the lock;
    the paused replica's transaction is rolled back (it wrote nothing) and it is retried
    or refused once it resumes."""
    storm_config(tmp_path, simulator, Decimal(100))
    simulator.configure(latency_ms=300)
    frozen, other = (start_tollgate(tmp_path, ledger_url=shared) for _ in range(2))
    stalled = (
        "SELECT client_port FROM pg_stat_activity WHERE state = 'idle in transaction' "
        "AND now() - state_change > interval '1 second' "
        "AND query LIKE '%INSERT INTO budget_usage%'"  # it holds the counters' first lock
    )

    def paused_inside_a_transaction() -> bool:
        ports = {r["client_port"] for r in pg.fetch(shared, stalled)}
        return bool(ports & local_ports(frozen.process.pid))

    try:

        async def storm() -> httpx.Response | None:
            async def freeze_inside_a_transaction() -> httpx.Response | None:
                for _ in range(200):  # until it is paused with a transaction open
                    await asyncio.sleep(0.05)
                    os.kill(frozen.process.pid, signal.SIGSTOP)
                    await asyncio.sleep(1.2)
                    if await asyncio.to_thread(paused_inside_a_transaction):
                        break
                    os.kill(frozen.process.pid, signal.SIGCONT)
                else:
                    raise AssertionError("never paused inside a transaction")
                try:
                    async with httpx.AsyncClient(timeout=30) as http:
                        deadline = time.monotonic() + 60
                        while time.monotonic() < deadline:
                            with contextlib.suppress(httpx.TimeoutException):
                                answer = await http.post(
                                    f"{other.url}/v1/images/generations",
                                    headers={"authorization": f"Bearer {STORM_KEY}"},
                                    json={"model": "gpt-image-2", "prompt": "abcd",
                                          "quality": "low", "size": "1024x1024"},
                                )  # fmt: skip
                                if answer.status_code == 200:
                                    return answer
                        return None
                finally:
                    os.kill(frozen.process.pid, signal.SIGCONT)

            *_, served = await asyncio.gather(
                fire(frozen.url, 60), fire(other.url, 60), freeze_inside_a_transaction()
            )
            return served

        served = asyncio.run(storm())
        assert served is not None, "the other replica served nothing while the lock was held"
    finally:
        simulator.configure(latency_ms=0)
        frozen.stop()
        other.stop()
    # Once the paused replica resumed, everything it and the other held was settled: a
    # settlement it was paused in (its session ended by the server meanwhile, or its wait
    # for a connection timed out by the clock that ran on) was tried once more past its
    # deadline.
    rows = frozen.query("SELECT state FROM requests")
    assert all(r["state"] == "settled" for r in rows), rows
    assert frozen.query("SELECT sum(reserved_nanos) AS v FROM budget_usage")[0]["v"] == 0
