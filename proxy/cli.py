"""The `tollgate` command line: gathers flags and calls what a program would call.

The only module that prints or exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path

import uvicorn

from proxy import __version__
from proxy.app import (
    ENV_CONFIG,
    ENV_LEDGER,
    ENV_UPSTREAM_KEY,
    ENV_UPSTREAM_URL,
    ENV_WORKERS,
    Overrides,
    create_app,
)
from proxy.auth import key_hash, new_key
from proxy.budgets import zone
from proxy.config import Config, config_schema, default_config_path, load_config
from proxy.errors import ConfigError, LedgerError
from proxy.ledger import open_ledger
from proxy.status import BudgetStatus, budget_status

SIMULATED_KEY = "sk-simulated-upstream"


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

    serve = commands.add_parser("serve", help="run the proxy")
    add_config(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--ledger", help="ledger URL (overrides the configuration)")
    serve.add_argument(
        "--simulate",
        action="store_true",
        help="run the built-in simulated upstream in-process (no OpenAI key)",
    )
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(run=run_serve)

    check = commands.add_parser("check", help="validate the configuration")
    add_config(check)
    check.set_defaults(run=run_check)

    budgets = commands.add_parser("budgets", help="show every budget: limit, spent, remaining")
    add_config(budgets)
    budgets.add_argument("--ledger", help="ledger URL (overrides the configuration)")
    budgets.add_argument("--format", choices=("table", "json"), default="table")
    budgets.set_defaults(run=run_budgets)

    schema = commands.add_parser("schema", help="print the JSON Schema of the configuration")
    schema.set_defaults(run=run_schema)

    keys = commands.add_parser("keys", help="team keys").add_subparsers(title="keys commands")
    new = keys.add_parser("new", help="make a new key for TEAM")
    new.add_argument("team")
    new.add_argument("--label", help="the key's id in the team file")
    new.set_defaults(run=run_keys_new)

    simulate = commands.add_parser("simulate-upstream", help="run the simulated OpenAI image API")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8090)
    simulate.add_argument("--latency-ms", type=int, default=0)
    simulate.add_argument(
        "--payload-bytes", type=int, default=0, help="pad each image to about this many bytes"
    )
    simulate.add_argument("--api-key", help="the only upstream key accepted (default: any)")
    simulate.set_defaults(run=run_simulate)
    return parser


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML file or directory (default: $TOLLGATE_CONFIG, else ./policies)",
    )


def config_path(args: argparse.Namespace) -> Path:
    return args.config if args.config is not None else default_config_path(os.environ)


def run_check(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    budgets = len(config.organization_budgets) + sum(
        len(t.budgets) + len(t.per_user) for t in config.teams
    )
    print(f"{config_path(args)}: ok ({len(config.teams)} teams, {budgets} budgets)")
    return 0


def run_budgets(args: argparse.Namespace) -> int:
    config = load_config(config_path(args))
    found = asyncio.run(read_budgets(config, args.ledger or config.ledger_url, time.time()))
    if args.format == "json":
        print(json.dumps({"budgets": [b.as_json() for b in found]}, indent=2))
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
    return 0


async def read_budgets(config: Config, ledger_url: str, now: float) -> list[BudgetStatus]:
    ledger = await open_ledger(ledger_url)
    try:
        return await budget_status(config, ledger, now)
    finally:
        await ledger.close()


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
    from proxy.simulator import SimulatorSettings, create_simulator_app

    settings = SimulatorSettings(
        latency_ms=args.latency_ms, payload_bytes=args.payload_bytes, api_key=args.api_key
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
    path = config_path(args)
    config = load_config(path)
    overrides = Overrides(ledger_url=args.ledger)
    if args.simulate:
        port = start_simulator_thread()
        overrides = Overrides(
            ledger_url=args.ledger,
            upstream_url=f"http://127.0.0.1:{port}/v1",
            upstream_key=SIMULATED_KEY,
        )
    configure_logging(args.log_level)
    app = create_app(config, overrides, path)  # refuses a missing upstream key before serving
    print_banner(args, config, overrides)
    grace = config.upstream.timeout_s + 5
    if args.workers > 1:
        os.environ[ENV_CONFIG] = str(path)
        os.environ[ENV_WORKERS] = str(args.workers)
        for name, value in (
            (ENV_LEDGER, overrides.ledger_url),
            (ENV_UPSTREAM_URL, overrides.upstream_url),
            (ENV_UPSTREAM_KEY, overrides.upstream_key),
        ):
            if value:
                os.environ[name] = value
        uvicorn.run(
            "proxy.app:app_from_env",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=int(grace),
            log_config=None,
        )
    else:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=int(grace),
            log_config=None,
        )
    return 0


def print_banner(args: argparse.Namespace, config: Config, overrides: Overrides) -> None:
    url = f"http://{args.host}:{args.port}/v1"
    upstream = overrides.upstream_url or config.upstream.base_url
    simulated = " (simulated)" if args.simulate else ""
    print(
        f"Tollgate {__version__} on {url}, upstream {upstream}{simulated}, "
        f"ledger {overrides.ledger_url or config.ledger_url}",
        flush=True,
    )
    print(
        f"Call it with any OpenAI client:\n"
        f"    OPENAI_BASE_URL={url} OPENAI_API_KEY=<team key> python -c "
        f"\"import openai; print(openai.OpenAI().images.generate(model='gpt-image-2', "
        f"prompt='a lighthouse', quality='low', size='1024x1024').usage)\"",
        flush=True,
    )


def start_simulator_thread() -> int:
    """Run the simulated upstream on a free loopback port in a daemon thread; its port."""
    from proxy.simulator import SimulatorSettings, create_simulator_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_simulator_app(SimulatorSettings(api_key=SIMULATED_KEY)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )
    threading.Thread(target=server.run, name="simulated-upstream", daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return port


class JsonLines(logging.Formatter):
    """Request lines are JSON already; other records become JSON too."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "tollgate.requests":
            return message
        return json.dumps(
            {"level": record.levelname.lower(), "logger": record.name, "message": message}
        )


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
