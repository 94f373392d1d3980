"""Housekeeping on both ledgers: a live process adopts the background responses of dead
ones and charges their other reservations at the bound."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.ledger import open_ledger
from proxy.ledger.base import Owner
from proxy.metrics.text import pid_alive
from proxy.web import housekeeping
from tests import pg
from tests.test_ledger import take
from tests.test_ledger_responses import take_response


def silence(url: str, owner: str, seconds: float) -> None:
    """Make the last heartbeat of `owner` in the ledger at `url` `seconds` older: as if it had
    stopped beating that long ago."""
    sql = f"UPDATE processes SET heartbeat_at = heartbeat_at - {seconds} WHERE owner = '{owner}'"
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            db.execute(sql)
    else:
        pg.fetch(url, sql)


async def test_reclaim_once_adopts_the_held_responses_of_dead_processes(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stopped = await open_ledger(url)
    try:
        await stopped.register(Owner("stopped", "elsewhere", 1))
        await stopped.reserve([], take_response("bg", started_at=100.0))
        await stopped.hold("bg", "resp_bg")
        await stopped.reserve([], take("lost", started_at=100.0))
    finally:
        await stopped.close()
    silence(url, "stopped", housekeeping.SILENT_S + 1)  # then it stopped beating
    me = Owner("me", socket.gethostname(), os.getpid())
    live = await open_ledger(url)
    try:
        await live.register(me)
        with caplog.at_level(logging.INFO, logger="tollgate"):
            assert await housekeeping.reclaim_once(live, me, 1000.0, after_s=3600.0) == 1
        assert "following 1 background response(s)" in caplog.text
        assert await live.held() == [("bg", "resp_bg")]
        rows = {row.entry.id: row for row in await live.rows()}
        assert rows["bg"].settlement is None
        lost = rows["lost"].settlement
        assert lost is not None and lost.error_code == "outcome_unknown"
        # Past every deadline too: a held response is followed, never charged its bound.
        assert await housekeeping.reclaim_once(live, me, 99_999.0, after_s=3600.0) == 0
        assert await live.held() == [("bg", "resp_bg")]
    finally:
        await live.close()


async def test_liveness_is_judged_on_the_ledgers_clock_not_on_a_process_clock(url: str) -> None:
    """Heartbeats are written and judged on the ledger's clock (the database server's, the
    machine's time since boot on SQLite): a replica whose clock is an hour ahead of another's
    does not judge it dead while it beats (by their two clocks it had been silent for an hour,
    and its reservations were charged their bound); once it stops beating, it is."""
    now = time.time()
    other = await open_ledger(url)
    me = Owner("me", "elsewhere-too", 2)
    judge = await open_ledger(url)
    try:
        await other.register(Owner("other", "elsewhere", 1))
        await other.reserve([], take_response("bg", started_at=now))
        await other.hold("bg", "resp_bg")
        await other.reserve([], take("flight", started_at=now))
        await judge.register(me)
        [seen] = [o for o in await judge.owners() if o.id == "other"]
        assert 0 <= seen.silent_s < housekeeping.SILENT_S
        ahead = now + 3600.0
        assert await housekeeping.reclaim_once(judge, me, ahead, after_s=7200.0) == 0
        assert await judge.held() == [] and await other.held() == [("bg", "resp_bg")]
        rows = {row.entry.id: row for row in await judge.rows()}
        assert rows["flight"].settlement is None
        silence(url, "other", housekeeping.SILENT_S + 1)  # it stopped beating
        assert await housekeeping.reclaim_once(judge, me, ahead, after_s=7200.0) == 1
        assert await judge.held() == [("bg", "resp_bg")]
    finally:
        await other.close()
        await judge.close()


async def test_on_sqlite_a_heartbeat_from_before_the_machine_booted_is_silent(
    tmp_path: Path,
) -> None:
    """The SQLite ledger's clock is the time since boot: a heartbeat later than it was beaten
    before the last boot, by a process that is gone whatever its pid now names."""
    url = f"sqlite:///{tmp_path / 'tollgate.db'}"
    other = await open_ledger(url)
    try:
        await other.register(Owner("other", "elsewhere", 1))
        await other.reserve([], take_response("bg"))
        await other.hold("bg", "resp_bg")
    finally:
        await other.close()
    silence(url, "other", -1e9)  # beaten when the uptime was longer than now
    me = Owner("me", "elsewhere-too", 2)
    judge = await open_ledger(url)
    try:
        await judge.register(me)
        [seen] = [o for o in await judge.owners() if o.id == "other"]
        assert seen.silent_s == float("inf")
        assert housekeeping.dead(seen, me)
        await housekeeping.reclaim_once(judge, me, time.time(), after_s=3600.0)
        assert await judge.held() == [("bg", "resp_bg")]
    finally:
        await judge.close()


PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text()) if Path("/proc").is_dir() else 0


def in_a_pid_namespace(pid: int) -> subprocess.Popen[str]:
    """A Python process of this host in a pid namespace of its own, where its pid is `pid`
    (the namespace's next pid set to it), printing the owner it would register as."""
    script = (
        "import sys; from proxy.web.housekeeping import this_process; "
        "o = this_process(); print(o.host, o.pid, flush=True); sys.stdin.read()"
    )
    command = (
        f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "
        f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    )
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def test_a_live_process_of_this_host_in_another_pid_namespace_is_not_dead() -> None:
    """Containers on the host network (as `tests/test_container_e2e.py` runs the image) share
    the host's name but not its pids: a replica in one, whose pid is no process in the
    other's namespace, was judged dead by the other at once. Its reservations in flight
    were then charged their bound, flagged `outcome_unknown`, every 30 s, the repeats of
    its requests refused `answer_not_kept`, and its background responses followed twice."""
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            ["unshare", "--pid", "--fork", "true"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("no pid namespaces here")
    # A pid no process of this namespace has: the other process's, there.
    pid = next(p for p in range(PID_MAX - 1, PID_MAX // 2, -1) if not pid_alive(p))
    other = in_a_pid_namespace(pid)
    try:
        assert other.stdout is not None
        host, seen = other.stdout.readline().rsplit(" ", 1)
        assert int(seen) == pid
        me = housekeeping.this_process()
        owner = Owner("other", host, pid, silent_s=1.0)
        assert not housekeeping.dead(owner, me)
        silent = Owner("other", host, pid, silent_s=60.0)
        assert housekeeping.dead(silent, me)  # its heartbeat still tells
    finally:
        other.kill()
        other.wait()
