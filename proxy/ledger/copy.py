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
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from proxy.core.errors import LedgerError
from proxy.ledger import migrate_ledger, open_ledger
from proxy.ledger.base import Backend, Batch, Contents
from proxy.ledger.statements import COPIED_TABLES


async def copy_ledger(source: Backend, target: Backend) -> Contents:
    """Copy every row of `source` into the empty `target` (both open, at the same schema);
    what the target holds then."""
    await target.restore(_history(source))
    return await target.contents()


async def _history(source: Backend) -> AsyncIterator[tuple[str, Batch]]:
    for table in COPIED_TABLES:
        async for batch in source.dump(table):
            yield table, batch


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
