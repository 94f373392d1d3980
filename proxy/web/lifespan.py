"""What opens with a Tollgate process, runs while it serves, and closes when it stops.

Start-up opens the ledger and the upstream client into the first runtime, registers the
process in the ledger, settles what stopped processes left reserved, and starts the alerts
and the housekeeping (heartbeat, reclaim), and follows the background responses it holds
(`proxy.web.follow`); a serving process then sets its start-up heap aside from the garbage
collector (`proxy.web.heap`). Shutdown lets the exchanges in flight finish and
settle within their deadline, then closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from proxy.core.errors import LedgerError
from proxy.core.settings import Config
from proxy.logs import flush_logs
from proxy.web import heap, housekeeping
from proxy.web.gateway import Gateway
from proxy.web.reload import Reloader, reload_on_hangup
from proxy.web.runtime import Overrides, Runtime, open_runtime

log = logging.getLogger("tollgate")


class Lifespan:
    """starlette's `lifespan` for `gateway`, first serving `config`; with `settle_heap`
    (a serving process, not an app in a test's process), `heap.settle` once started."""

    def __init__(
        self,
        gateway: Gateway,
        config: Config,
        overrides: Overrides,
        reloader: Reloader,
        settle_heap: bool = False,
    ) -> None:
        self.gateway = gateway
        self.config = config
        self.overrides = overrides
        self.reloader = reloader
        self.settle_heap = settle_heap

    @contextlib.asynccontextmanager
    async def __call__(self, app: Any) -> AsyncIterator[None]:
        gateway = self.gateway
        first = await open_runtime(self.config, self.overrides, gateway.metrics, gateway.bodies)
        first = replace(first, in_force=gateway.current)
        gateway.runtime = first
        duties = await start_duties(first, gateway.current)
        reload_on_hangup(self.reloader)
        if self.settle_heap:
            heap.settle()
        try:
            yield
        finally:
            duties.cancel()
            await close(gateway.current())
            flush_logs()


async def start_duties(first: Runtime, current: Callable[[], Runtime]) -> asyncio.Task[None]:
    """Register this process, reclaim what stopped processes left, start the alerts and
    the housekeeping (which follows the configuration in force: `current()`)."""
    ledger, clock = first.ledger, first.clock
    me = housekeeping.this_process()
    await ledger.register(me)
    after_s = housekeeping.reclaim_after_s(first.config.upstream)
    # Announced once the alerts start: the teams whose reservations were charged their
    # bound may have crossed a threshold.
    await housekeeping.reclaim_once(ledger, me, clock(), after_s, first.alerts.reclaimed)
    first.alerts.start()

    async def duties() -> None:
        await asyncio.gather(
            housekeeping.run(
                ledger,
                me,
                clock,
                lambda: housekeeping.reclaim_after_s(current().config.upstream),
                first.alerts.reclaimed,
            ),
            first.followers.run(current),
            forget_kept_answers(current),
            forget_rate_counts(current),
        )

    return asyncio.create_task(duties())


FORGET_EVERY_S = 60.0
"""At most; a shorter retry window is followed more closely (every `window_s`)."""


async def forget_kept_answers(current: Callable[[], Runtime]) -> None:
    """Forget the answers kept for repeats once they are past the retry window."""
    while True:
        await asyncio.sleep(min(FORGET_EVERY_S, current().config.retries.window_s))
        runtime = current()
        try:
            await runtime.ledger.forget_answers(runtime.clock() - runtime.config.retries.window_s)
        except LedgerError as exc:
            log.warning("forgetting kept answers failed: %s; will try again", exc)


COUNTS_KEPT_S = 2 * 86400.0
"""Rate counts are forgotten once their window started this long ago: longer than any
window (a day, 25 hours across a clock change), so a count is never forgotten in force."""


async def forget_rate_counts(current: Callable[[], Runtime]) -> None:
    """Forget the rate-limit counts of windows long past (else one row per team, limit and
    minute would stay in the ledger for ever)."""
    while True:
        await asyncio.sleep(FORGET_EVERY_S)
        runtime = current()
        try:
            await runtime.ledger.forget_counts(runtime.clock() - COUNTS_KEPT_S)
        except LedgerError as exc:
            log.warning("forgetting rate counts failed: %s; will try again", exc)


async def close(last: Runtime) -> None:
    """Let the exchanges in flight finish, then close what the runtime holds."""
    # In-flight exchanges are being billed: let them finish and settle. Each ends by its
    # deadline, then settles within `timeout_s` (a ledger outage's retries).
    upstream = last.config.upstream
    await last.tasks.finish(upstream.deadline_s + upstream.timeout_s)
    await last.upstream.aclose()
    await last.alerts.aclose()
    last.metrics.close()
    await last.ledger.unregister()
    await last.ledger.close()
