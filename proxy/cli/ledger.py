"""`tollgate ledger`: schema migrations, copies, and flagged rows listed and resolved."""

from __future__ import annotations

import argparse
import json
import sys
import time

from proxy.cli.options import Commands, Once, add_config, add_ledger_url, ledger_url_of
from proxy.core.errors import InvalidRequest


def add_ledger(commands: Commands) -> None:
    ledger = commands.add_parser("ledger", help="ledger schema migrations, copies, flagged rows")
    ledger_commands = ledger.add_subparsers(title="ledger commands")
    migrate = ledger_commands.add_parser("migrate", help="bring the ledger's schema up to date")
    add_config(migrate)
    add_ledger_url(migrate)
    migrate.set_defaults(run=run_ledger_migrate)
    copy = ledger_commands.add_parser(
        "copy", help="copy every row, counter and alert into an empty ledger"
    )
    copy.add_argument(
        "--from", dest="source", required=True, metavar="URL", help="e.g. sqlite:///tollgate.db"
    )
    copy.add_argument(
        "--to", dest="target", required=True, metavar="URL", help="e.g. postgresql://…"
    )
    copy.set_defaults(run=run_ledger_copy)
    add_ledger_flagged(ledger_commands)
    add_ledger_resolve(ledger_commands)


def add_ledger_flagged(ledger_commands: Commands) -> None:
    listing = ledger_commands.add_parser(
        "flagged", help="requests charged without a metered cost (to reconcile and resolve)"
    )
    add_config(listing)
    add_ledger_url(listing)
    listing.add_argument("--from", dest="start", action=Once, metavar="DATE", help="first UTC day")
    listing.add_argument(
        "--to", dest="end", action=Once, metavar="DATE", help="last UTC day, included"
    )
    listing.add_argument("--unresolved", action="store_true", help="only rows not resolved yet")
    listing.add_argument("--format", action=Once, choices=("table", "json"), default="table")
    listing.set_defaults(run=run_ledger_flagged)


def add_ledger_resolve(ledger_commands: Commands) -> None:
    resolving = ledger_commands.add_parser(
        "resolve", help="set the true cost of a flagged request (counters adjusted)"
    )
    add_config(resolving)
    resolving.add_argument("request_id", metavar="REQUEST_ID", help="e.g. tg_req_…")
    add_ledger_url(resolving)
    cost = resolving.add_mutually_exclusive_group(required=True)
    cost.add_argument("--cost", metavar="USD", help="what OpenAI billed for it")
    cost.add_argument("--free", action="store_true", help="OpenAI billed nothing for it")
    resolving.add_argument("--note", default="", help="why, e.g. the Costs API export it came from")
    resolving.set_defaults(run=run_ledger_resolve)


def run_ledger_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.ledger import migrate_ledger, redacted

    url = ledger_url_of(args)
    before, after = asyncio.run(migrate_ledger(url))
    shown = redacted(url)
    if before == after:
        print(f"{shown}: ledger schema is up to date (version {after})")
    else:
        print(f"{shown}: ledger schema migrated from version {before} to {after}")
    return 0


def run_ledger_copy(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.core.models import usd_text
    from proxy.ledger import redacted, require_existing
    from proxy.ledger.copy import copy_between

    copied = asyncio.run(copy_between(require_existing(args.source), args.target))
    print(
        f"copied {copied.requests} requests (${usd_text(copied.cost_nanos)}), "
        f"{copied.counters} budget counters, {copied.objects} files and batches "
        f"and {copied.alerts} alerts sent "
        f"from {redacted(args.source)} to {redacted(args.target)}"
    )
    return 0


def run_ledger_flagged(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.finance import flagged, reconcile
    from proxy.ledger import require_existing

    try:
        first = reconcile.parse_day(args.start) if args.start else None
        last = reconcile.parse_day(args.end) if args.end else None
    except InvalidRequest as exc:
        print(f"tollgate ledger flagged: {exc.message}", file=sys.stderr)
        return 2
    rows = asyncio.run(
        flagged.flagged_rows(
            require_existing(ledger_url_of(args)), first, last, unresolved=args.unresolved
        )
    )
    if args.format == "json":
        print(json.dumps(flagged.as_json(rows), indent=2))
    else:
        print(flagged.as_table(rows), end="")
    return 0


def run_ledger_resolve(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.core.models import usd_text
    from proxy.finance import flagged
    from proxy.ledger import require_existing

    try:
        cost = 0 if args.free else flagged.parse_usd(args.cost)
    except InvalidRequest as exc:
        print(f"tollgate ledger resolve: {exc.message}", file=sys.stderr)
        return 2
    before = asyncio.run(
        flagged.resolve(
            require_existing(ledger_url_of(args)), args.request_id, cost, args.note, time.time()
        )
    )
    print(
        f"{args.request_id}: charged ${usd_text(before)} -> ${usd_text(cost)} "
        f"(budgets adjusted by {'-' if cost < before else '+'}${usd_text(abs(cost - before))}); "
        "it stays flagged, marked resolved"
    )
    return 0
