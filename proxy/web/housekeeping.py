"""Background duties of a running Tollgate: say it is alive, settle what dead ones held.

Every process registers itself in the ledger and beats a heartbeat, written and judged
on the ledger's clock (`Ledger.heartbeat`), never on one host's against another's.
Reservations whose process is gone (its pid is dead on this host, or its heartbeat
stopped) are reclaimed at start-up and then periodically, and so is any reservation older
than `reclaim_after_s`, whatever its owner: every exchange ends by its deadline
(`upstream.total_timeout_s` after its arrival) and settles within `timeout_s` more,
so no live request can still hold it. That age too is on the ledger's clock (the clock
it was reserved at, `reserved_clock`), never a row's `started_at`, which its replica's
own wall clock wrote: a replica whose clock was a minute behind had its oldest live
requests charged their bound.

A reclaimed reservation is never freed: its request may have reached OpenAI, which
bills what it accepted whether or not the answer arrived. It is settled at its
bound, flagged `outcome_unknown`, until an operator resolves it (`tollgate ledger
resolve`) or its late answer settles it.

A background response (Responses API) is different: its reservation is held until the
response ends (`Ledger.hold`), however long that takes, and its outcome can still be
learnt from OpenAI. A held reservation is never reclaimed: a live process adopts those of
dead ones (`Ledger.adopt`) and follows them to their end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable

from proxy.core.errors import LedgerError
from proxy.core.settings import UpstreamSettings
from proxy.ledger import Ledger, Owner
from proxy.ledger.base import SILENT_S, this_host
from proxy.metrics.text import pid_alive

log = logging.getLogger("tollgate")

HEARTBEAT_S = 5.0
RECLAIM_EVERY_S = 30.0
RECLAIM_MARGIN_S = 60.0
"""Beyond an exchange's deadline and its settlement's retries: a loop slow to notice a
deadline, a replica's clock running at another pace than the ledger's."""


def this_process() -> Owner:
    return Owner(uuid.uuid4().hex, this_host(), os.getpid())


def dead(owner: Owner, me: Owner) -> bool:
    """Whether `owner` has stopped, as `me` sees it: its pid is gone on this host, or it
    has been silent for `SILENT_S` on the ledger's clock (`Owner.silent_s`)."""
    if owner.id == me.id:
        return False
    if not owner.host:  # never registered, or already forgotten
        return True
    if owner.host == me.host and not pid_alive(owner.pid):
        return True
    return owner.silent_s > SILENT_S


def _no() -> None:
    """Nothing to tell."""


def reclaim_after_s(upstream: UpstreamSettings) -> float:
    """The age past which a reservation belongs to no live request: the exchange's total
    deadline, then the settlement's retries (`timeout_s`), then a margin."""
    return upstream.deadline_s + upstream.timeout_s + RECLAIM_MARGIN_S


async def reclaim_once(
    ledger: Ledger, me: Owner, now: float, after_s: float, reclaimed: Callable[[], None] = _no
) -> int:
    """Adopt the held reservations (background responses) of dead processes, then settle at
    their bound the other reservations of dead processes and of requests older than
    `after_s` (see `reclaim_after_s`); `reclaimed` is told when some were (the budget
    alerts: a charge at the bound may cross a threshold as any settlement may)."""
    gone = [o.id for o in await ledger.owners() if dead(o, me)]
    adopted = await ledger.adopt(gone)
    if adopted:
        log.info("following %d background response(s) of stopped processes", adopted)
    count = await ledger.reclaim(now, older_than_s=after_s, owners=gone)
    if count:
        reclaimed()
        log.warning(
            "charged %d reservation(s) of stopped processes or past every deadline at their "
            "bound, flagged outcome_unknown: see `tollgate ledger flagged`",
            count,
        )
    return count


async def run(
    ledger: Ledger,
    me: Owner,
    clock: Callable[[], float],
    after_s: Callable[[], float],
    reclaimed: Callable[[], None] = _no,
) -> None:
    """Heartbeat and reclaim until cancelled (`after_s`: the current configuration's age
    limit, which a reload may change; `reclaimed`: as for `reclaim_once`)."""
    since_reclaim = 0.0
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            await ledger.heartbeat()
            since_reclaim += HEARTBEAT_S
            if since_reclaim >= RECLAIM_EVERY_S:
                since_reclaim = 0.0
                await reclaim_once(ledger, me, clock(), after_s(), reclaimed)
        except LedgerError as exc:
            log.error("ledger housekeeping failed: %s", exc)
