"""Housekeeping on both ledgers: a live process adopts the background responses of dead
ones and charges their other reservations at the bound."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from proxy.ledger import open_ledger
from proxy.ledger.base import Owner
from proxy.web import housekeeping
from tests.test_ledger import take
from tests.test_ledger_responses import take_response


async def test_reclaim_once_adopts_the_held_responses_of_dead_processes(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stopped = await open_ledger(url)
    try:
        await stopped.register(Owner("stopped", "elsewhere", 1), 10.0)  # silent since
        await stopped.reserve([], take_response("bg", started_at=100.0))
        await stopped.hold("bg", "resp_bg")
        await stopped.reserve([], take("lost", started_at=100.0))
    finally:
        await stopped.close()
    me = Owner("me", socket.gethostname(), os.getpid())
    live = await open_ledger(url)
    try:
        await live.register(me, 1000.0)
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
