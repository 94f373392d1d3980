"""Background duties of a running Tollgate: say it is alive, release what dead ones held.

Every process registers itself in the ledger and beats a heartbeat. Reservations
whose process is gone (its pid is dead on this host, or its heartbeat stopped)
are released at start-up and then periodically, and any reservation older than
the upstream timeout is released whatever its owner: no request can still be
waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable

from proxy.errors import LedgerError
from proxy.ledger import Ledger, Owner

log = logging.getLogger("tollgate")

HEARTBEAT_S = 5.0
# A process silent for this long is dead (several missed heartbeats).
SILENT_S = 30.0
RECLAIM_EVERY_S = 30.0
# A reservation older than the upstream timeout plus this margin belongs to no live request.
RECLAIM_MARGIN_S = 60.0


def this_process() -> Owner:
    return Owner(uuid.uuid4().hex, socket.gethostname(), os.getpid())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead(owner: Owner, me: Owner, now: float) -> bool:
    if owner.id == me.id:
        return False
    if not owner.host:  # never registered, or already forgotten
        return True
    if owner.host == me.host and not pid_alive(owner.pid):
        return True
    return now - owner.heartbeat_at > SILENT_S


async def reclaim_once(ledger: Ledger, me: Owner, now: float, timeout_s: float) -> int:
    """Release the reservations of dead processes and of requests past any timeout."""
    gone = [o.id for o in await ledger.owners() if dead(o, me, now)]
    count = await ledger.reclaim(
        now, started_before=now - timeout_s - RECLAIM_MARGIN_S, owners=gone
    )
    if count:
        log.warning("released %d reservation(s) abandoned by stopped processes", count)
    return count


async def run(ledger: Ledger, me: Owner, clock: Callable[[], float], timeout_s: float) -> None:
    """Heartbeat and reclaim until cancelled."""
    since_reclaim = 0.0
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            await ledger.heartbeat(clock())
            since_reclaim += HEARTBEAT_S
            if since_reclaim >= RECLAIM_EVERY_S:
                since_reclaim = 0.0
                await reclaim_once(ledger, me, clock(), timeout_s)
        except LedgerError as exc:
            log.error("ledger housekeeping failed: %s", exc)
