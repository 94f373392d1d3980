"""`GET /metrics`: the Prometheus exposition, its budget and rate-limit gauges read from the
ledger once for every scrape that comes close together.

`/metrics` needs no token and is answered even past `limits.max_connections`, so anyone who
reaches the port may scrape it as fast as they can send. Each read of the gauges is a few
statements on the ledger: on PostgreSQL it takes one of the pool's connections, which the
reservations of proxied requests wait for; on SQLite it queues on the read connection's one
thread, with the request path's own reads. Scrapes therefore share reads: a scrape that
arrives while a read runs awaits that read, and a read younger than `FRESH_S` answers the
scrapes after it. A Prometheus scraping every 15 s (or an HA pair scraping together) still
reads the ledger at each of its scrapes; a flood of scrapes reads it at most once a
`FRESH_S` per process. The process's own counters, histograms and gauges are rendered at
each scrape, never kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from proxy.core.errors import LedgerError
from proxy.core.status import BudgetStatus, RateStatus
from proxy.finance.status import budget_status, rate_status
from proxy.web.runtime import Runtime

log = logging.getLogger("tollgate")

FRESH_S = 0.5
"""How long one read of the ledger's gauges answers the scrapes after it: under any scrape
interval Prometheus is given (15 s by default; 1 s, its finest in practice, still reads
at every scrape, whatever the jitter between two)."""


@dataclass(frozen=True, slots=True)
class Gauges:
    """The budget and rate-limit gauges of one read of the ledger."""

    budgets: list[BudgetStatus]
    rates: list[RateStatus]
    now: float
    """The runtime's clock when the read began (budget periods are placed by it)."""
    began: float
    """`time.monotonic()` when the read began."""


class Scrapes:
    """Answers `/metrics`, with one ledger read shared by the scrapes that come together."""

    def __init__(
        self, fresh_s: float = FRESH_S, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.fresh_s = fresh_s
        self.monotonic = monotonic
        self._last: tuple[Runtime, Gauges] | None = None
        self._reading: tuple[Runtime, asyncio.Future[Gauges]] | None = None

    async def metrics(self, request: Request, runtime: Runtime) -> Response:
        """The Prometheus exposition, with the budget and rate-limit gauges the ledger held
        at most `fresh_s` ago."""
        gauges = await self.gauges(runtime)
        text = runtime.metrics.exposition(gauges.budgets, gauges.rates)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    async def gauges(self, runtime: Runtime) -> Gauges:
        """The gauges of a read of `runtime`'s ledger that began at most `fresh_s` ago: the
        last one, the one running, or a new one. A reload's new runtime reads anew."""
        last = self._last
        if last is not None and last[0] is runtime and self._fresh(last[1], runtime):
            return last[1]
        if self._reading is None or self._reading[0] is not runtime:
            reading = asyncio.ensure_future(self._read(runtime))
            self._reading = (runtime, reading)
        # Shielded: a scraper that hangs up leaves the read to the scrapes awaiting it.
        return await asyncio.shield(self._reading[1])

    def _fresh(self, gauges: Gauges, runtime: Runtime) -> bool:
        age = self.monotonic() - gauges.began
        # The runtime's clock too: tests move it across periods, and a move reads anew.
        moved = runtime.clock() - gauges.now
        return 0 <= age < self.fresh_s and 0 <= moved < self.fresh_s

    async def _read(self, runtime: Runtime) -> Gauges:
        began, now = self.monotonic(), runtime.clock()
        try:
            budgets = await budget_status(runtime.config, runtime.ledger, now)
            rates = await rate_status(runtime.config, runtime.ledger, now)
        except LedgerError as exc:
            # Kept like any read: a failing ledger is not asked again by every scrape.
            log.error("budget and rate-limit gauges left out of this scrape: %s", exc)
            budgets, rates = [], []
        finally:
            if self._reading is not None and self._reading[0] is runtime:
                self._reading = None
        gauges = Gauges(budgets, rates, now, began)
        self._last = (runtime, gauges)
        return gauges
