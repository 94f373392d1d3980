"""Configuration files → a validated `Config`, or a `ConfigError` listing every problem.

Two passes per file: the JSON Schema (shape, types, unknown keys), then the
checks it cannot express (priced models, quality names, time zone, money exact
to the nano-dollar, duplicates across files). Each problem reads
`file:line: key.path: message`. This module reads the files; `proxy.config.builder`
turns their documents into a `Config`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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
    """`tollgate.yaml` and every `teams/*.yaml` (or `.yml`, in any case), by file name, all
    from one snapshot of the directory (`_snapshot`); a name in `teams/` that looks like a
    team file but cannot be read as one (a dangling symlink, a directory) is a problem."""
    settings_path = given / SETTINGS_FILE
    read = _Read(None, files=[str(settings_path)])
    where = _snapshot(given)
    settings_real = where(SETTINGS_FILE)
    if settings_real.is_file():
        read.settings, found = read_document(settings_real, str(settings_path), env)
        read.problems += found
    else:
        read.problems.append(f"{settings_path}: not found (the global settings file)")
    shown = given / TEAMS_DIR
    teams = _snapshot(where(TEAMS_DIR))
    try:
        names = sorted(entry.name for entry in os.scandir(teams("")))
    except OSError:
        names = []  # no teams directory: every team is in tollgate.yaml, or there are none
    for name in names:
        if not _looks_like_team_file(name):
            continue
        team_file, file = teams(name), str(shown / name)
        read.files.append(file)
        if not team_file.is_file():
            why = "a symlink to nothing" if team_file.is_symlink() else "not a regular file"
            read.problems.append(f"{file}:1: not read as a team file: {why}")
            continue
        doc, found = read_document(team_file, file, env)
        read.problems += found
        if doc is not None:
            read.teams.append(doc)
    return read


TEAM_SUFFIXES = (".yaml", ".yml")
"""What a team file's name ends with, in any case (`design.YAML` is read too)."""


def _looks_like_team_file(name: str) -> bool:
    """Whether `name` in `teams/` is meant as a team file: a YAML suffix in any case, and
    not an editor's lock file (`.#design.yaml`, a symlink to nothing while it edits)."""
    return name.lower().endswith(TEAM_SUFFIXES) and not name.startswith(".#")


KUBERNETES_DATA = "..data"
"""In a Kubernetes ConfigMap or Secret volume: the symlink to the directory of the current
snapshot (`..2026_05_28_10_00_00.123`), swapped atomically to a new one at each update;
each file is a symlink through it (`teams -> ..data/teams`)."""


def _snapshot(directory: Path) -> Callable[[str], Path]:
    """Where each name in `directory` is read, resolved once: every file of one load is
    read from one snapshot of it. The directory's real path (`os.path.realpath`); within a
    Kubernetes volume (`KUBERNETES_DATA`), the snapshot its `..data` names now, for the
    names it holds. Read name by name through the unresolved path, a swap during a load
    could mix old files with new ones."""
    real = Path(os.path.realpath(directory))
    data = real / KUBERNETES_DATA
    pinned = Path(os.path.realpath(data)) if data.is_symlink() else None

    def where(name: str) -> Path:
        if pinned is not None and name and os.path.lexists(pinned / name):
            return pinned / name
        if not name:
            return pinned or real
        return real / name

    return where


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
