"""Settling through a ledger outage: a charge is retried, never dropped on the first error.

A request whose answer came back has been billed by OpenAI. If the database is
unreachable at that moment (a restart, a fail-over), the settlement is retried
with exponential backoff for up to `within_s` (the upstream timeout: the longest
a request may take anyway) before the error is given up and logged; the
reservation then stays in the ledger, still counted against the budgets, until
the periodic reclaim settles it at its bound (flagged `outcome_unknown`). Settling
is idempotent on every backend that can lose an acknowledgement, so a retry never
charges twice.

Past `within_s` it is tried once more, straight away: a process paused longer than that
(SIGSTOP, a frozen VM) in the middle of a settlement resumes with its deadline gone and
its attempt failed on what the pause broke: its session ended by the server meanwhile
(`LedgerConnectionLost`: the pool's connections are replaced), or its wait for a pooled
connection timed out by the clock that ran on. The next attempt settles it, rather than
leave the request to a reclaim at its bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from proxy.core.errors import LedgerUnavailable
from proxy.core.models import Settlement
from proxy.ledger.base import Ledger

log = logging.getLogger("tollgate")

FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0


async def settle_patiently(
    ledger: Ledger,
    request_id: str,
    settlement: Settlement,
    within_s: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """`ledger.settle`, retried while the ledger is unavailable, for up to `within_s` seconds
    and then once more; the last LedgerUnavailable propagates when time is up."""
    deadline = clock() + within_s
    delay = FIRST_DELAY_S
    attempt = 1
    last = False
    while True:
        try:
            await ledger.settle(request_id, settlement)
        except LedgerUnavailable as exc:
            if last:
                raise
            if attempt == 1:
                log.warning("ledger unavailable while settling %s, retrying: %s", request_id, exc)
            if clock() + delay > deadline:
                last = True
            else:
                await sleep(delay)
                delay = min(delay * 2, MAX_DELAY_S)
            attempt += 1
        else:
            if attempt > 1:
                log.warning("settled %s after %d attempts", request_id, attempt)
            return
