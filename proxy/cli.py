"""The `tollgate` command line: gathers flags and calls what a program would call.

The only module that prints or exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from proxy import __version__
from proxy.config import config_schema, default_config_path, environment, load_config
from proxy.core.auth import key_hash, new_key
from proxy.core.budgets import zone
from proxy.core.errors import ConfigError, InvalidRequest, LedgerError, RequestError
from proxy.core.models import usd_text
from proxy.core.settings import HTTP_METHODS, Config
from proxy.core.status import BudgetStatus
from proxy.finance import flagged, projects, reconcile
from proxy.finance.reports_query import ReportQuery
from proxy.finance.reports_query import run as run_report_query
from proxy.finance.status import budget_status
from proxy.ledger import OpenBatch, migrate_ledger, open_ledger
from proxy.ledger.copy import copy_between

if TYPE_CHECKING:
    from proxy.web.server import Prepared

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except LedgerError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tollgate", description="A metering and budgeting proxy for OpenAI's image API."
    )
    parser.add_argument("--version", action="version", version=f"tollgate {__version__}")
    commands = parser.add_subparsers(title="commands")
    add_serve(commands)
    add_check(commands)
    add_budgets(commands)
    add_report(commands)
    add_reconcile(commands)
    add_ledger(commands)
    schema = commands.add_parser("schema", help="print the JSON Schema of the configuration")
    schema.set_defaults(run=run_schema)
    add_keys(commands)
    add_simulate(commands)
    return parser


def add_serve(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the proxy")
    add_config(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    add_ledger_url(serve)
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="run the built-in simulated upstream in-process (no OpenAI key)",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=run_serve)


def add_check(commands: Commands) -> None:
    check = commands.add_parser("check", help="validate the configuration")
    add_config(check)
    check.set_defaults(run=run_check)


def add_budgets(commands: Commands) -> None:
    budgets = commands.add_parser("budgets", help="show every budget: limit, spent, remaining")
    add_config(budgets)
    add_ledger_url(budgets)
    budgets.add_argument("--format", choices=("table", "json"), default="table")
    budgets.set_defaults(run=run_budgets)


def add_report(commands: Commands) -> None:
    report = commands.add_parser(
        "report", help="finance reports, chargeback statements, the audit export"
    )
    add_config(report)
    add_ledger_url(report)
    report.add_argument("--from", dest="start", metavar="DATE", help="first day (default: 1st)")
    report.add_argument("--to", dest="end", metavar="DATE", help="last day, included")
    report.add_argument("--by", metavar="FIELDS", help="e.g. team,model,quality or day")
    report.add_argument("--statement", metavar="YYYY-MM", help="the month's chargeback statement")
    report.add_argument("--audit", action="store_true", help="every ledger row (csv or jsonl)")
    report.add_argument(
        "--format", default=None, help="table|csv|json|html; jsonl|csv with --audit"
    )
    report.add_argument(
        "--excel", action="store_true", help="CSV with a byte-order mark, for spreadsheets"
    )
    report.add_argument("--output", type=Path, help="write here instead of standard output")
    report.set_defaults(run=run_report)


def add_reconcile(commands: Commands) -> None:
    rec = commands.add_parser("reconcile", help="compare the ledger with OpenAI's Costs API")
    add_config(rec)
    add_ledger_url(rec)
    source = rec.add_mutually_exclusive_group(required=True)
    source.add_argument("--costs", type=Path, metavar="FILE", help="a saved Costs API answer")
    source.add_argument(
        "--admin-key-env", metavar="VAR", help="fetch live with the admin key in $VAR"
    )
    rec.add_argument("--from", dest="start", metavar="DATE", help="first UTC day")
    rec.add_argument("--to", dest="end", metavar="DATE", help="last UTC day, included")
    rec.add_argument(
        "--by",
        choices=("model", "project"),
        default="model",
        help="per day and model, or per day and OpenAI project (the teams' openai_project)",
    )
    rec.add_argument(
        "--tolerance",
        type=Decimal,
        default=None,
        help="USD per day and model (or project; default 0.01)",
    )
    rec.add_argument("--format", choices=("table", "json"), default="table")
    rec.set_defaults(run=run_reconcile)


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
    listing.add_argument("--from", dest="start", metavar="DATE", help="first UTC day")
    listing.add_argument("--to", dest="end", metavar="DATE", help="last UTC day, included")
    listing.add_argument("--unresolved", action="store_true", help="only rows not resolved yet")
    listing.add_argument("--format", choices=("table", "json"), default="table")
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


def add_keys(commands: Commands) -> None:
    keys = commands.add_parser("keys", help="team keys").add_subparsers(title="keys commands")
    new = keys.add_parser("new", help="make a new key for TEAM")
    new.add_argument("team")
    new.add_argument("--label", help="the key's id in the team file")
    new.set_defaults(run=run_keys_new)


def add_simulate(commands: Commands) -> None:
    simulate = commands.add_parser("simulate-upstream", help="run the simulated OpenAI image API")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8090)
    simulate.add_argument("--latency-ms", type=int, default=0)
    simulate.add_argument(
        "--payload-bytes", type=int, default=0, help="pad each image to about this many bytes"
    )
    simulate.add_argument("--api-key", help="the only upstream key accepted (default: any)")
    simulate.add_argument(
        "--batch-delay-ms",
        type=int,
        help="how long a batch takes from validating to completed (default 1500)",
    )
    simulate.add_argument(
        "--batch-window-ms",
        type=int,
        help="the simulated completion window: a batch not finalizing by then expires "
        "(default 24 h)",
    )
    simulate.set_defaults(run=run_simulate)


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file or directory (default: $TOLLGATE_CONFIG, else ./policies)",
    )


def add_ledger_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ledger", help="ledger URL (overrides the configuration)")


def config_path(args: argparse.Namespace) -> Path:
    return args.config if args.config is not None else default_config_path()


def ledger_url_of(args: argparse.Namespace) -> str:
    """`--ledger`, else the configuration's (read only when needed)."""
    return str(args.ledger or load_config(config_path(args)).ledger_url)


def run_ledger_migrate(args: argparse.Namespace) -> int:
    url = ledger_url_of(args)
    before, after = asyncio.run(migrate_ledger(url))
    if before == after:
        print(f"{url}: ledger schema is up to date (version {after})")
    else:
        print(f"{url}: ledger schema migrated from version {before} to {after}")
    return 0


def run_ledger_copy(args: argparse.Namespace) -> int:
    copied = asyncio.run(copy_between(args.source, args.target))
    print(
        f"copied {copied.requests} requests (${usd_text(copied.cost_nanos)}), "
        f"{copied.counters} budget counters, {copied.objects} files and batches "
        f"and {copied.alerts} alerts sent "
        f"from {args.source} to {args.target}"
    )
    return 0


def run_ledger_flagged(args: argparse.Namespace) -> int:
    try:
        first = reconcile.parse_day(args.start) if args.start else None
        last = reconcile.parse_day(args.end) if args.end else None
    except InvalidRequest as exc:
        print(f"tollgate ledger flagged: {exc.message}", file=sys.stderr)
        return 2
    rows = asyncio.run(
        flagged.flagged_rows(ledger_url_of(args), first, last, unresolved=args.unresolved)
    )
    if args.format == "json":
        print(json.dumps(flagged.as_json(rows), indent=2))
    else:
        print(flagged.as_table(rows), end="")
    return 0


def run_ledger_resolve(args: argparse.Namespace) -> int:
    try:
        cost = 0 if args.free else flagged.parse_usd(args.cost)
    except InvalidRequest as exc:
        print(f"tollgate ledger resolve: {exc.message}", file=sys.stderr)
        return 2
    before = asyncio.run(
        flagged.resolve(ledger_url_of(args), args.request_id, cost, args.note, time.time())
    )
    print(
        f"{args.request_id}: charged ${usd_text(before)} -> ${usd_text(cost)} "
        f"(budgets adjusted by {'-' if cost < before else '+'}${usd_text(abs(cost - before))}); "
        "it stays flagged, marked resolved"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    budgets = len(config.organization_budgets) + sum(
        len(t.budgets) + len(t.per_user) for t in config.teams
    )
    print(f"{config_path(args)}: ok ({len(config.teams)} teams, {budgets} budgets)")
    for entry in config.passthrough:
        methods = ", ".join(m for m in HTTP_METHODS if m in entry.methods)
        print(f"passthrough {entry.prefix}: {methods}, unmetered, with the company key")
    return 0


def run_budgets(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    found, batches = asyncio.run(
        read_budgets(config, args.ledger or config.ledger_url, time.time())
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
    for b in found:
        shown = b.as_json()
        unit = "$" if b.metric == "usd" else ""
        suffix = "" if b.metric == "usd" else " " + b.metric.removesuffix("_tokens") + " tok"
        ends = "never"
        if b.window.end is not None:
            ends = datetime.fromtimestamp(b.window.end, zone(config.timezone)).strftime(
                "%Y-%m-%d %H:%M"
            )
        lines.append((
            b.scope, b.team or "-", b.period, f"{unit}{shown['limit']}{suffix}",
            f"{unit}{shown['spent']}", f"{unit}{shown['reserved']}",
            f"{unit}{shown['remaining']}", f"{b.utilization * 100:.1f}%", ends,
        ))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)))
    if batches:
        print("\nOpen batches (their reservations are in RESERVED above):")
        for batch in batches:
            print(f"  {batch.batch_id}  {batch.team}  ${usd_text(batch.reserved_nanos)}")
    return 0


async def read_budgets(
    config: Config, ledger_url: str, now: float
) -> tuple[list[BudgetStatus], list[OpenBatch]]:
    ledger = await open_ledger(ledger_url)
    try:
        return await budget_status(config, ledger, now), await ledger.open_batches()
    finally:
        await ledger.close()


def run_report(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    fmt = args.format or ("jsonl" if args.audit else "table")
    try:
        query = ReportQuery.parse(
            start=args.start, end=args.end, by=args.by, fmt=fmt,
            statement=args.statement, audit=args.audit, excel=args.excel,
        )  # fmt: skip
        asyncio.run(write_report(query, config, args.ledger or config.ledger_url, args.output))
    except InvalidRequest as exc:
        print(f"tollgate report: {exc.message}", file=sys.stderr)
        return 2
    return 0


async def write_report(
    query: ReportQuery, config: Config, ledger_url: str, output: Path | None
) -> None:
    ledger = await open_ledger(ledger_url)
    try:
        answer = await run_report_query(query, ledger, config, time.time())
        out = output.open("w", encoding="utf-8", newline="") if output else sys.stdout
        try:
            if answer.stream is not None:
                async for chunk in answer.stream:
                    out.write(chunk)
            else:
                out.write(answer.body or "")
        finally:
            if output:
                out.close()
    finally:
        await ledger.close()


def run_reconcile(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    first = reconcile.parse_day(args.start) if args.start else None
    last = reconcile.parse_day(args.end) if args.end else None
    tolerance = args.tolerance if args.tolerance is not None else reconcile.DEFAULT_TOLERANCE
    if args.costs is not None:
        pages = reconcile.load_costs_file(args.costs.read_text(encoding="utf-8"))
        admin_key = None
    else:
        admin_key = environment.variable(args.admin_key_env)
        if not admin_key:
            print(f"tollgate reconcile: ${args.admin_key_env} is not set", file=sys.stderr)
            return 2
        pages = []
    given = (config, args.ledger or config.ledger_url, pages, admin_key, first, last, tolerance)
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


def run_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_schema(), indent=2))
    return 0


def run_keys_new(args: argparse.Namespace) -> int:
    secret = new_key()
    label = args.label or f"key-{date.today().isoformat()}"
    print(f"New key for team {args.team!r} (shown once; give it to the team):\n")
    print(f"    {secret}\n")
    print("Add this entry under `keys:` in the team's file (it holds only the hash):\n")
    print(f"  - {{id: {label}, sha256: {key_hash(secret)}}}")
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.simulator import SimulatorSettings, create_simulator_app

    batches = {
        name: value
        for name in ("batch_delay_ms", "batch_window_ms")
        if (value := getattr(args, name)) is not None
    }
    settings = SimulatorSettings(
        latency_ms=args.latency_ms,
        payload_bytes=args.payload_bytes,
        api_key=args.api_key,
        **batches,
    )
    print(f"Simulated OpenAI image API on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(
        create_simulator_app(settings),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """The server's stack (uvicorn, starlette, aiohttp, httpx) is imported here, by the one
    command that serves: importing it takes longer than `tollgate budgets` needs in all."""
    from proxy.logs import configure_logging
    from proxy.web.runtime import Overrides
    from proxy.web.server import ServeOptions, prepare, serve, with_simulated_upstream

    options = ServeOptions(
        config_path(args),
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        overrides=Overrides(ledger_url=args.ledger),
    )
    if args.simulate:
        options = with_simulated_upstream(options)
    configure_logging(args.log_level)
    prepared = prepare(options)
    print_banner(prepared, simulate=args.simulate)
    return 0 if serve(prepared) else 1


def print_banner(prepared: Prepared, simulate: bool) -> None:
    options, config = prepared.options, prepared.config
    overrides = options.overrides
    url = f"http://{options.host}:{options.port}/v1"
    upstream = overrides.upstream_url or config.upstream.base_url
    note = " (simulated)" if simulate else ""
    print(
        f"Tollgate {__version__} on {url}, upstream {upstream}{note}, "
        f"ledger {overrides.ledger_url or config.ledger_url}",
        flush=True,
    )
    print(
        f"Call it with any OpenAI client (pip install openai):\n"
        f"    OPENAI_BASE_URL={url} OPENAI_API_KEY=<team key> python -c "
        f"\"import openai; print(openai.OpenAI().images.generate(model='gpt-image-2', "
        f"prompt='a lighthouse', quality='low', size='1024x1024').usage)\"",
        flush=True,
    )
