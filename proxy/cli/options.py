"""What several commands share: `--config` and `--ledger`, and where each points."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TypeAlias

from proxy.config import default_config_path, load_config

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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
