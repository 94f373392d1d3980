"""`tollgate budgets`, `tollgate report` and `tollgate reconcile`: what finance reads."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from proxy.cli.options import Commands, Once, add_config, add_ledger_url, config_path, usd
from proxy.core.errors import InvalidRequest, RequestError

if TYPE_CHECKING:
    from proxy.core.settings import Config
    from proxy.core.status import BudgetStatus
    from proxy.finance.reports_query import ReportQuery
    from proxy.ledger import OpenBatch


def add_budgets(commands: Commands) -> None:
    budgets = commands.add_parser("budgets", help="show every budget: limit, spent, remaining")
    add_config(budgets)
    add_ledger_url(budgets)
    budgets.add_argument("--format", choices=("table", "json"), default="table")
    budgets.set_defaults(run=run_budgets)


def run_budgets(args: argparse.Namespace) -> int:
    # A command over in a moment, whose objects (the modules, the configuration, the
    # statuses) all live until it ends: the cyclic collector's passes over them would
    # free nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _budgets(args)
    finally:
        if collecting:
            gc.enable()


def _budgets(args: argparse.Namespace) -> int:
    import asyncio
    from datetime import datetime

    from proxy.config import load_config
    from proxy.core.models import usd_text
    from proxy.core.periods import zone
    from proxy.ledger import require_existing

    config = load_config(config_path(args))
    found, batches = asyncio.run(
        read_budgets(config, require_existing(args.ledger or config.ledger_url), time.time())
    )
    if args.format == "json":
        held = [
            {"batch_id": b.batch_id, "team": b.team, "reserved": usd_text(b.reserved_nanos)}
            for b in batches
        ]
        print(json.dumps({"budgets": [b.as_json() for b in found], "open_batches": held}, indent=2))
        return 0
    header = ("SCOPE", "TEAM", "PERIOD", "LIMIT", "SPENT", "RESERVED", "REMAINING", "USED",
              "PERIOD ENDS")  # fmt: skip
    lines = [header]
    tz = zone(config.timezone)
    ends_at: dict[float, str] = {}  # a period's end is shared by many budgets
    dollars: dict[int, str] = {}  # so are limits, and often what is spent and remaining

    def money(nanos: int) -> str:
        text = dollars.get(nanos)
        if text is None:
            text = dollars[nanos] = usd_text(nanos)
        return text

    for b in found:
        show: Callable[[int], str] = money if b.metric == "usd" else str
        unit = "$" if b.metric == "usd" else ""
        suffix = "" if b.metric == "usd" else " " + b.metric.removesuffix("_tokens") + " tok"
        ends = "never"
        if (end := b.window.end) is not None:
            if end not in ends_at:
                ends_at[end] = datetime.fromtimestamp(end, tz).strftime("%Y-%m-%d %H:%M")
            ends = ends_at[end]
        lines.append((
            b.scope, b.team or "-", b.period, f"{unit}{show(b.limit)}{suffix}",
            f"{unit}{show(b.spent)}", f"{unit}{show(b.reserved)}",
            f"{unit}{show(b.remaining)}", f"{b.utilization * 100:.1f}%", ends,
        ))  # fmt: skip
    widths = [max(map(len, column)) for column in zip(*lines, strict=True)]
    row = "  ".join(f"{{:<{width}}}" for width in widths) + "\n"  # each cell left-aligned
    sys.stdout.write("".join(row.format(*line) for line in lines))
    if batches:
        print("\nOpen batches (their reservations are in RESERVED above):")
        for batch in batches:
            print(f"  {batch.batch_id}  {batch.team}  ${usd_text(batch.reserved_nanos)}")
    return 0


async def read_budgets(
    config: Config, ledger_url: str, now: float
) -> tuple[list[BudgetStatus], list[OpenBatch]]:
    from proxy.finance.status import budget_status
    from proxy.ledger import reading_ledger

    async with reading_ledger(ledger_url) as ledger:
        return await budget_status(config, ledger, now), await ledger.open_batches()


def add_report(commands: Commands) -> None:
    report = commands.add_parser(
        "report", help="finance reports, chargeback statements, the audit export"
    )
    add_config(report)
    add_ledger_url(report)
    once = report.add_argument
    once("--from", dest="start", action=Once, metavar="DATE", help="first day (default: 1st)")
    once("--to", dest="end", action=Once, metavar="DATE", help="last day, included")
    once("--by", action=Once, metavar="FIELDS", help="e.g. team,model,quality or day")
    once("--statement", action=Once, metavar="YYYY-MM", help="the month's chargeback statement")
    report.add_argument("--audit", action="store_true", help="every ledger row (csv or jsonl)")
    once("--format", action=Once, default=None, help="table|csv|json|html; jsonl|csv with --audit")
    report.add_argument(
        "--excel", action="store_true", help="CSV with a byte-order mark, for spreadsheets"
    )
    once("--output", action=Once, type=Path, help="write here instead of standard output")
    report.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.config import load_config
    from proxy.finance.reports_query import ReportQuery
    from proxy.ledger import require_existing

    config = load_config(config_path(args))
    fmt = args.format or ("jsonl" if args.audit else "table")
    try:
        query = ReportQuery.parse(
            start=args.start, end=args.end, by=args.by, fmt=fmt,
            statement=args.statement, audit=args.audit, excel=args.excel,
        )  # fmt: skip
        url = require_existing(args.ledger or config.ledger_url)
        asyncio.run(write_report(query, config, url, args.output))
    except InvalidRequest as exc:
        print(f"tollgate report: {exc.message}", file=sys.stderr)
        return 2
    return 0


async def write_report(
    query: ReportQuery, config: Config, ledger_url: str, output: Path | None
) -> None:
    from proxy.finance.reports_query import run as run_report_query
    from proxy.ledger import reading_ledger

    async with reading_ledger(ledger_url) as ledger:
        answer = await run_report_query(query, ledger, config, time.time())
        with report_output(output) as write:
            if answer.stream is not None:
                # Closed here, at once, when the reader goes away (`| head`): its ledger
                # connection with it, not later from a finalizer.
                async with contextlib.aclosing(answer.stream) as chunks:
                    async for chunk in chunks:
                        write(chunk)
            else:
                write(answer.body or "")


@contextlib.contextmanager
def report_output(path: Path | None) -> Iterator[Callable[[str], object]]:
    """How a report is written: to the file `path`, else to standard output, both in UTF-8
    whatever the locale says (a CSV is UTF-8, and the admin API's bytes: in a Latin-1
    locale a `user` outside it stopped the report with a UnicodeEncodeError, and one inside
    it was written in Latin-1)."""
    if path is not None:
        with open_output(path) as out:
            yield out.write
        return
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a stream of text only (a test's): nothing to encode
        yield sys.stdout.write
        return
    sys.stdout.flush()
    yield lambda text: buffer.write(text.encode())
    buffer.flush()


def open_output(path: Path) -> TextIO:
    try:
        return path.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise InvalidRequest(f"cannot write {path}: {exc}", param="output") from exc


def read_costs(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read the costs file {path}: {exc}", param="costs") from exc


def add_reconcile(commands: Commands) -> None:
    rec = commands.add_parser("reconcile", help="compare the ledger with OpenAI's Costs API")
    add_config(rec)
    add_ledger_url(rec)
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--costs", action=Once, type=Path, metavar="FILE", help="a saved Costs API answer"
    )
    source.add_argument(
        "--admin-key-env", action=Once, metavar="VAR", help="fetch live with the admin key in $VAR"
    )
    rec.add_argument("--from", dest="start", action=Once, metavar="DATE", help="first UTC day")
    rec.add_argument("--to", dest="end", action=Once, metavar="DATE", help="last UTC day, included")
    rec.add_argument(
        "--by",
        action=Once,
        choices=("model", "project"),
        default="model",
        help="per day and model, or per day and OpenAI project (the teams' openai_project)",
    )
    rec.add_argument(
        "--tolerance",
        action=Once,
        type=usd,
        default=None,
        help="USD per day and model (or project; default 0.01)",
    )
    rec.add_argument("--format", action=Once, choices=("table", "json"), default="table")
    rec.set_defaults(run=run_reconcile)


def run_reconcile(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.config import environment, load_config
    from proxy.finance import costs_api, projects, reconcile
    from proxy.ledger import require_existing

    config = load_config(config_path(args))
    tolerance = args.tolerance if args.tolerance is not None else reconcile.DEFAULT_TOLERANCE
    try:
        first = reconcile.parse_day(args.start) if args.start else None
        last = reconcile.parse_day(args.end) if args.end else None
        if args.costs is not None:
            pages = costs_api.load_costs_file(read_costs(args.costs))
    except InvalidRequest as exc:
        # Exit 1 says a day is off: a bad argument must not read as one.
        print(f"tollgate reconcile: {exc.message}", file=sys.stderr)
        return 2
    if args.costs is not None:
        admin_key = None
    else:
        admin_key = environment.variable(args.admin_key_env)
        if not admin_key:
            print(f"tollgate reconcile: ${args.admin_key_env} is not set", file=sys.stderr)
            return 2
        pages = []
    url = require_existing(args.ledger or config.ledger_url)
    given = (config, url, pages, admin_key, first, last, tolerance)
    try:
        if args.by == "project":
            per_project = asyncio.run(projects.run(*given, time.time()))
            found, off = projects.as_json(per_project), per_project.off_days
            table = projects.as_table(per_project)
        else:
            per_model = asyncio.run(reconcile.run(*given, time.time()))
            found, off = reconcile.as_json(per_model), per_model.off_days
            table = reconcile.as_table(per_model)
    except RequestError as exc:
        print(f"tollgate reconcile: {exc.message}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(found, indent=2))
    else:
        print(table, end="")
    return 1 if off else 0
