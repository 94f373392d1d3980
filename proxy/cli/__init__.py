"""The `tollgate` command line: gathers flags and calls what a program would call.

The only package that prints or exits. A module per group of commands: `server` (serve,
simulate-upstream), `configuration` (check, schema, keys), `finance` (budgets, report,
reconcile) and `ledger`; `options` holds the flags several share.

Building the parser imports argparse and little else: each command imports what it runs
when it runs (`tollgate budgets` never loads the server's stack, the reports or the
reconciliation), so that a command costs a fresh process only its own work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.cli.configuration import add_check, add_keys, run_schema
from proxy.cli.finance import add_budgets, add_reconcile, add_report
from proxy.cli.ledger import add_ledger
from proxy.cli.server import add_serve, add_simulate
from proxy.core.errors import ConfigError, LedgerError, LedgerMissing


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # here, where a reader gone away is caught below
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except LedgerMissing as exc:
        # A mistyped path, as a bad argument: not exit 1, which `reconcile` gives a day off.
        print(f"tollgate: {exc}", file=sys.stderr)
        return 2
    except LedgerError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Whoever read the output stopped reading (`| head`): no traceback. What is still
        # buffered goes nowhere, else flushing it at exit fails the same way.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
