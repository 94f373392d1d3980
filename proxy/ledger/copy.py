"""`tollgate ledger copy`: move a ledger's history to another backend, losing nothing.

Every row of `requests` (settled and in flight), every `budget_usage` counter
(team, user and organization, so budgets carry on where they were), every alert
already sent (so no alert is sent twice) and every file and batch forwarded (so
each stays its team's, and an open batch's input file keeps its priced lines) is
copied as stored, in batches, into one transaction on the target: it holds all of
it or, on any error, none.
The answers kept for repeats (`kept_answers`) are not copied: they are not history
but a cache for the retry window (minutes), bounded and forgotten as it passes; the
target starts with none, and the rows of the requests they answered are copied like any
other. The live-process registry is not copied; a reservation copied in flight belongs
to a process the target never saw alive, so the first Tollgate that starts on
the target settles it at its bound (flagged `outcome_unknown`), as after a crash;
a held one (a background response, a batch) it adopts and follows to its end instead.

The target is brought to this Tollgate's schema first and must be empty: copy
refuses to merge two histories (run it again on a fresh database).

The source must be at rest: a copy is refused while a Tollgate serves on it (a process in
its registry that is alive: its pid on this host, or a heartbeat within `SILENT_S`), before
anything is read and again once everything has been read, before the target commits (one
that started meanwhile). Copied from under a running proxy, a ledger arrived torn (its
tables are read one after the other: the counters held settlements whose rows were still
reserved, which the target then charged again at their bound, and reservations whose rows
were missing, room never given back) and short (whatever the proxy wrote after the copy
was missing from the target, though its requests were forwarded and billed).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence

from proxy.core.errors import LedgerError
from proxy.ledger import migrate_ledger, open_ledger
from proxy.ledger.base import SILENT_S, Backend, Batch, Contents, Owner, this_host
from proxy.ledger.statements import COPIED_TABLES


async def copy_ledger(source: Backend, target: Backend) -> Contents:
    """Copy every row of `source` into the empty `target` (both open, at the same schema);
    what the target holds then. LedgerError, the target left as it was, if a Tollgate
    serves on `source` before or during the copy."""
    await _at_rest(source)
    await target.restore(_history(source))
    return await target.contents()


async def _history(source: Backend) -> AsyncIterator[tuple[str, Batch]]:
    for table in COPIED_TABLES:
        async for batch in source.dump(table):
            yield table, batch
    await _at_rest(source)  # raised inside the target's transaction: it rolls back


async def _at_rest(source: Backend) -> None:
    """LedgerError if a Tollgate serves on `source`."""
    found = running(await source.owners(), this_host())
    if found:
        owner = found[0]
        raise LedgerError(
            f"ledger copy: a Tollgate is serving on the source ledger (pid {owner.pid} on "
            f"{owner.host}, {len(found)} process(es) in all): stop it first; what it writes "
            "during or after a copy would be missing from the target"
        )


def running(owners: Sequence[Owner], host: str) -> list[Owner]:
    """The processes of `owners` that are alive: registered (a host), not silent for
    `SILENT_S` on the ledger's clock, and on `host` (this one's `this_host`) with their pid
    still running (a process killed there is dead at once)."""
    return [
        o
        for o in owners
        if o.host and o.silent_s <= SILENT_S and (o.host != host or _pid_alive(o.pid))
    ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it may be a Tollgate
    return True


async def copy_between(source_url: str, target_url: str) -> Contents:
    """Migrate the ledger at `target_url`, then copy the one at `source_url` into it."""
    if source_url == target_url:
        raise LedgerError("ledger copy: --from and --to name the same ledger")
    await migrate_ledger(target_url)
    source = await open_ledger(source_url)
    try:
        target = await open_ledger(target_url)
        try:
            return await copy_ledger(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
