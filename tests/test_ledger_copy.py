"""`tollgate ledger copy` between any two backends, through the ledger's own interface: every
row, counter and alert arrives once, and a ledger that holds anything is never merged into."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.core.errors import LedgerError
from proxy.core.models import Settlement
from proxy.ledger import open_ledger
from proxy.ledger.base import Backend, Batch, Owner, this_host
from proxy.ledger.copy import copy_between, copy_ledger
from tests import pg
from tests.conftest import Simulator, start_tollgate, write_config
from tests.test_ledger import ALICE_DAY, DESIGN_DAY, ORG_DAY, SETTLED, entry, ledger_url, take
from tests.test_ledger_responses import ANSWERED, take_response

COUNTERS = [DESIGN_DAY, ALICE_DAY, ORG_DAY]


async def fill(ledger: Backend) -> None:
    """A settled request, one in flight, a rejection and an alert sent."""
    await ledger.reserve([DESIGN_DAY], take("settled", started_at=1.0))
    await ledger.settle("settled", SETTLED)
    await ledger.reserve([DESIGN_DAY], take("in-flight", started_at=2.0))
    await ledger.record(entry("rejected", started_at=3.0), Settlement(3.0, "rejected_budget", 429))
    assert await ledger.claim_alert("design/day/80", 5.0)


@pytest.mark.parametrize(
    ("source_kind", "target_kind"),
    [("sqlite", "postgresql"), ("postgresql", "sqlite"), ("sqlite", "sqlite")],
)
async def test_a_copy_holds_what_its_source_holds_and_is_never_merged_into(
    source_kind: str, target_kind: str, tmp_path: Path
) -> None:
    source_url = ledger_url(source_kind, tmp_path / "source")
    target_url = ledger_url(target_kind, tmp_path / "target")
    try:
        source = await open_ledger(source_url)
        try:
            await fill(source)
            rows, totals = await source.rows(), await source.totals(COUNTERS)
            held = await source.contents()
        finally:
            await source.close()
        assert (held.requests, held.counters, held.alerts) == (3, 3, 1)
        assert await copy_between(source_url, target_url) == held
        target = await open_ledger(target_url)
        try:
            assert await target.rows() == rows
            assert await target.totals(COUNTERS) == totals
            assert not await target.claim_alert("design/day/80", 6.0)
        finally:
            await target.close()
        with pytest.raises(LedgerError, match=r"is not empty \(3 requests, 1 alerts, 3 counters"):
            await copy_between(source_url, target_url)
    finally:
        for kind, url in ((source_kind, source_url), (target_kind, target_url)):
            if kind == "postgresql":
                pg.drop_schema(url)


async def every_row(ledger: Backend) -> list[dict[str, Any]]:
    async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
        return [row async for row in rows]


async def test_a_copy_there_and_back_keeps_the_responses_columns(tmp_path: Path) -> None:
    """SQLite to PostgreSQL and back: a settled response, a held one in flight (its owner
    with it, to be adopted on the target) and their mainline columns arrive as they were."""
    first = ledger_url("sqlite", tmp_path / "first")
    shared = ledger_url("postgresql", tmp_path)
    last = ledger_url("sqlite", tmp_path / "last")
    try:
        source = await open_ledger(first)
        try:
            await source.register(Owner("source", "host", 1))
            await source.reserve([], take_response("done", started_at=1.0))
            await source.settle("done", ANSWERED)
            await source.reserve([], take_response("running", started_at=2.0))
            await source.hold("running", "resp_running")
            rows, stored = await source.rows(), await every_row(source)
            responses = [await source.response(r) for r in ("resp_abc", "resp_running")]
        finally:
            await source.close()
        # Its owner stopped long ago (a copy is refused while a Tollgate serves on it).
        with contextlib.closing(sqlite3.connect(first.removeprefix("sqlite:///"))) as db:
            db.execute("UPDATE processes SET heartbeat_at = heartbeat_at - 3600")
            db.commit()
        await copy_between(first, shared)
        await copy_between(shared, last)
        target = await open_ledger(last)
        try:
            assert await target.rows() == rows
            assert await every_row(target) == stored
            assert [await target.response(r) for r in ("resp_abc", "resp_running")] == responses
            await target.register(Owner("target", "host", 2))
            assert await target.adopt(["source"]) == 1
            assert await target.held() == [("running", "resp_running")]
        finally:
            await target.close()
        assert stored[1]["held"] == 1 and stored[0]["mainline_cost_nanos"] == 4_000_000
    finally:
        pg.drop_schema(shared)


async def test_an_export_read_slowly_is_not_cut_short_by_the_idle_session_timeout() -> None:
    """A PostgreSQL session idle inside a transaction is ended after a while (a replica
    paused holding a lock would stop the others); an export paused by its reader (a pipe
    not drained yet, a slower ledger copied into) is no such session, and is read whole."""
    url = pg.migrated_schema()
    hasty = f"{url}&idle_in_transaction_session_timeout=1s"
    try:
        ledger = await open_ledger(hasty)
        try:
            await fill(ledger)
            read = []
            async with contextlib.aclosing(ledger.export(0.0, float("inf"))) as rows:
                async for row in rows:
                    read.append(row["id"])
                    await asyncio.sleep(1.5)  # the reader is slow
            assert sorted(read) == ["in-flight", "rejected", "settled"]
        finally:
            await ledger.close()
    finally:
        pg.drop_schema(url)


def copy_cli(source: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "ledger", "copy", "--from", source, "--to", target],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_copy_is_refused_while_a_tollgate_serves_on_its_source(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Copied from under a running proxy, a ledger arrives torn (counters read after rows,
    so a settlement whose row was copied reserved is charged again at its bound on the
    target) and short (what the proxy writes after the copy is missing): refused, the
    target left empty, until the proxy stops."""
    write_config(tmp_path, f"{simulator.url}/v1")
    source = f"sqlite:///{tmp_path / 'tollgate.db'}"
    target = pg.new_schema()
    try:
        proxy = start_tollgate(tmp_path)
        try:
            proxy.client().images.generate(prompt="a lighthouse", size="1024x1024", quality="low")
            refused = copy_cli(source, target)
            assert refused.returncode == 1, refused.stdout
            assert "a Tollgate is serving on the source ledger" in refused.stderr
            assert f"pid {proxy.process.pid}" in refused.stderr
            assert pg.fetch(target, "SELECT count(*) AS n FROM requests") == [{"n": 0}]
        finally:
            proxy.stop()
        done = copy_cli(source, target)
        assert done.returncode == 0, done.stderr
        assert "copied 1 requests" in done.stdout
    finally:
        pg.drop_schema(target)


class StartsMidCopy:
    """A source ledger on which a Tollgate starts once its first table has been read."""

    def __init__(self, ledger: Backend) -> None:
        self.ledger = ledger

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ledger, name)

    async def dump(self, table: str) -> AsyncIterator[Batch]:
        async for batch in self.ledger.dump(table):
            yield batch
        if table == "requests":
            me = Owner("started", this_host(), os.getpid())
            await self.ledger.register(me)


@pytest.mark.parametrize("source_kind", ["sqlite", "postgresql"])
async def test_a_copy_during_which_a_tollgate_starts_on_its_source_is_rolled_back(
    source_kind: str, tmp_path: Path
) -> None:
    source_url = ledger_url(source_kind, tmp_path / "source")
    target_url = ledger_url("sqlite", tmp_path / "target")
    try:
        source = await open_ledger(source_url)
        target = await open_ledger(target_url)
        try:
            await fill(source)
            started = StartsMidCopy(source)
            with pytest.raises(LedgerError, match="a Tollgate is serving on the source ledger"):
                await copy_ledger(started, target)  # type: ignore[arg-type]
            held = await target.contents()
            assert (held.requests, held.counters, held.alerts) == (0, 0, 0)
        finally:
            await target.close()
            await source.close()
    finally:
        if source_kind == "postgresql":
            pg.drop_schema(source_url)
