"""`tollgate ledger copy` between any two backends, through the ledger's own interface: every
row, counter and alert arrives once, and a ledger that holds anything is never merged into."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.core.errors import LedgerError
from proxy.core.models import Settlement
from proxy.ledger import open_ledger
from proxy.ledger.base import Backend
from proxy.ledger.copy import copy_between
from tests import pg
from tests.test_ledger import ALICE_DAY, DESIGN_DAY, ORG_DAY, SETTLED, entry, ledger_url, take

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
