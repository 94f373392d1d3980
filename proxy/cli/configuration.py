"""`tollgate check`, `tollgate schema` and `tollgate keys new`: writing a configuration."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date

from proxy.cli.options import Commands, add_config, config_path


def add_check(commands: Commands) -> None:
    check = commands.add_parser("check", help="validate the configuration")
    add_config(check)
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    from proxy.config import load_config
    from proxy.core.settings import HTTP_METHODS

    config = load_config(config_path(args))
    budgets = len(config.organization_budgets) + sum(
        len(t.budgets) + len(t.per_user) for t in config.teams
    )
    teams = len(config.teams)
    print(
        f"{config_path(args)}: ok ({teams} team{'s' * (teams != 1)}, "
        f"{budgets} budget{'s' * (budgets != 1)})"
    )
    for entry in config.passthrough:
        methods = ", ".join(m for m in HTTP_METHODS if m in entry.methods)
        print(f"passthrough {entry.prefix}: {methods}, unmetered, with the company key")
    return 0


def run_schema(args: argparse.Namespace) -> int:
    from proxy.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def add_keys(commands: Commands) -> None:
    keys = commands.add_parser("keys", help="team keys").add_subparsers(title="keys commands")
    new = keys.add_parser("new", help="make a new key for TEAM")
    new.add_argument("team")
    new.add_argument("--label", help="the key's id in the team file")
    new.set_defaults(run=run_keys_new)


def run_keys_new(args: argparse.Namespace) -> int:
    from proxy.config import flow_scalar
    from proxy.core.auth import key_hash, new_key

    label = args.label or f"key-{date.today().isoformat()}"
    if "${" in label:
        # Every string of a team file has its `${NAME}` expanded: the id read back would
        # be another (or refused), whatever the quoting.
        print(f"tollgate: --label {label!r}: a key id may not hold '${{'", file=sys.stderr)
        return 2
    secret = new_key()
    print(f"New key for team {args.team!r} (shown once; give it to the team):\n")
    print(f"    {secret}\n")
    print("Add this entry under `keys:` in the team's file (it holds only the hash):\n")
    print(f"  - {{id: {flow_scalar(label)}, sha256: {key_hash(secret)}}}")
    return 0
