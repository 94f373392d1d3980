"""Configuration files → a validated `Config`, or a `ConfigError` listing every problem.

Two passes per file: the JSON Schema (shape, types, unknown keys), then the
checks it cannot express (priced models, quality names, time zone, money exact
to the nano-dollar, duplicates across files). Each problem reads
`file:line: key.path: message`. This module reads the files; `proxy.config.builder`
turns their documents into a `Config`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config.builder import Builder, PriceBookLoader
from proxy.config.prices import load_price_book
from proxy.config.source import Document, read_document
from proxy.core.errors import ConfigError
from proxy.core.settings import Config

SETTINGS_FILE = "tollgate.yaml"
TEAMS_DIR = "teams"


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$TOLLGATE_CONFIG`, else `./policies`."""
    env = os.environ if env is None else env
    return Path(env.get("TOLLGATE_CONFIG") or "policies")


def load_config(
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    price_book_loader: PriceBookLoader = load_price_book,
) -> Config:
    """Read a configuration directory (tollgate.yaml + teams/*.yaml) or single file.

    Raises ConfigError with every problem found, each `file:line: message`.
    """
    env = os.environ if env is None else env
    given = Path(path)
    if given.is_dir():
        read = _read_directory(given, env)
    elif given.is_file():
        read = _read_file(given, env)
    else:
        raise ConfigError([f"{given}: no such file or directory"])
    builder = Builder(given.parent if given.is_file() else given, price_book_loader)
    config = builder.build(read.settings, read.teams)
    problems = read.problems + builder.problems
    if problems or config is None:
        in_order = _in_file_order(problems, read.files)
        raise ConfigError(in_order or [f"{given}: invalid configuration"])
    return config


@dataclass
class _Read:
    """The documents of a configuration, the files in reading order, and what was wrong."""

    settings: Document | None
    teams: list[Document] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read_directory(given: Path, env: Mapping[str, str]) -> _Read:
    """`tollgate.yaml` and every `teams/*.yaml` (or `.yml`), by file name."""
    settings_path = given / SETTINGS_FILE
    read = _Read(None, files=[str(settings_path)])
    if settings_path.is_file():
        read.settings, found = read_document(settings_path, str(settings_path), env)
        read.problems += found
    else:
        read.problems.append(f"{settings_path}: not found (the global settings file)")
    team_files = sorted(
        (p for p in (given / TEAMS_DIR).glob("*") if p.suffix in (".yaml", ".yml") and p.is_file()),
        key=lambda p: p.name,
    )
    for team_file in team_files:
        doc, found = read_document(team_file, str(team_file), env)
        read.files.append(str(team_file))
        read.problems += found
        if doc is not None:
            read.teams.append(doc)
    return read


def _read_file(given: Path, env: Mapping[str, str]) -> _Read:
    """A single file holding the settings and, under `teams:`, every team."""
    doc, found = read_document(given, str(given), env)
    return _Read(doc, files=[str(given)], problems=found)


def _in_file_order(problems: list[str], files: list[str]) -> list[str]:
    """Problems grouped by file (in reading order), then by line."""

    def position(problem: str) -> tuple[int, int]:
        for index, file in enumerate(files):
            if problem.startswith(file + ":"):
                line = problem[len(file) + 1 :].partition(":")[0]
                return index, int(line) if line.isdigit() else 0
        return len(files), 0

    return sorted(problems, key=position)
