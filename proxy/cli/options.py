"""What several commands share: `--config` and `--ledger`, and where each points."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TypeAlias

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Once(argparse.Action):
    """A flag that may be given once: argparse keeps the last of a repeated one, so
    `report --by team --by model` answered by model alone, as the numbers asked for
    (the admin API refuses a parameter given twice, 400)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        given: set[str] = namespace.__dict__.setdefault("_given_once", set())
        if self.dest in given:
            parser.error(f"argument {option_string}: given more than once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


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
    from proxy.config import default_config_path

    return args.config if args.config is not None else default_config_path()


def ledger_url_of(args: argparse.Namespace) -> str:
    """`--ledger`, else the configuration's (read only when needed)."""
    from proxy.config import load_config

    return str(args.ledger or load_config(config_path(args)).ledger_url)


def port(text: str) -> int:
    """A TCP port (0: any free one), for argparse: else exit 2 with a usage message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port: use 0 to 65535")
    return value


def count(text: str) -> int:
    """A whole number of at least 1 (workers), for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def usd(text: str) -> Decimal:
    """An amount of US dollars, 0 or more (a tolerance), for argparse. Decimal's own error
    is no ValueError, which argparse would not turn into a usage message."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD, e.g. 0.01") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not an amount in USD of 0 or more")
    return value
