"""The import direction of STYLE.md, held by following every module's imports with `ast`.

Each module under `proxy/` belongs to a layer named by its package prefix. A module's
reach is the transitive closure of what it imports (function-local imports included;
importing `a.b.c` runs `a` and `a.b` too); the rules below are statements about reach,
so a module cannot break one through an intermediate. A module in no layer fails.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import proxy

PACKAGE = Path(proxy.__file__).parent
ROOT = "proxy"
LAYERS = {
    "core": "proxy.core",
    "doors": "proxy.doors",
    "config": "proxy.config",
    "ledger": "proxy.ledger",
    "upstream": "proxy.upstream",
    "metrics": "proxy.metrics",
    "logs": "proxy.logs",
    "web": "proxy.web",
    "finance": "proxy.finance",
    "simulator": "proxy.simulator",
    "cli": "proxy.cli",
    "main": "proxy.__main__",
}
IO_LIBRARIES = (
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "sqlite3",
    "aiosqlite",
    "asyncpg",
    "aiohttp",
    "httpx",
    "httpx_aiohttp",
    "starlette",
    "uvicorn",
    "prometheus_client",
    "yaml",
    "jsonschema",
    "subprocess",
    "multiprocessing",
    "threading",
    "logging",
    "os",
    "shutil",
    "tempfile",
    "importlib.resources",
    "urllib.request",
    "http.client",
)
DATABASE_DRIVERS = ("sqlite3", "_sqlite3", "aiosqlite", "asyncpg")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> str | None:
    """The layer of a module of `proxy`: its package prefix (None for a module in none)."""
    if name == ROOT:
        return "root"
    return next((layer for layer, prefix in LAYERS.items() if matches(name, prefix)), None)


class Graph:
    """The modules of one package and what each imports, by name."""

    def __init__(self, modules: Mapping[str, ast.Module], packages: Iterable[str] = ()) -> None:
        self.modules = modules
        self.packages = {name.rpartition(".")[0] for name in modules} | set(packages)

    def imports(self, name: str) -> set[str]:
        """What module `name` imports, at any depth of its body: modules of the package
        (with the packages that importing them runs) and libraries by dotted name."""
        found: set[str] = set()
        package = name if name in self.packages else name.rpartition(".")[0]
        for node in ast.walk(self.modules[name]):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        return {parent for imported in found for parent in self._run_by(imported)}

    def _run_by(self, imported: str) -> list[str]:
        """What importing `imported` runs: a module of the package and its parent packages,
        or a library (an attribute imported from a module of the package is no module)."""
        if not matches(imported, ROOT):
            return [imported]
        parts = imported.split(".")
        dotted = (".".join(parts[:end]) for end in range(1, len(parts) + 1))
        return [name for name in dotted if name in self.modules]

    def reach(
        self, start: str, not_through: Callable[[str], bool] = lambda _: False
    ) -> dict[str, str]:
        """Every module and library `start` reaches, each with the module that imports it
        (the way back to `start`); the imports of modules `not_through` are not followed."""
        via: dict[str, str] = {}
        todo = [start]
        while todo:
            current = todo.pop()
            if current != start and not_through(current):
                continue
            for imported in self.imports(current):
                if imported not in via and imported != start:
                    via[imported] = current
                    if imported in self.modules:
                        todo.append(imported)
        return via

    def chain(self, via: Mapping[str, str], start: str, end: str) -> str:
        """`start → … → end`, the way one import leads to another."""
        path = [end]
        while path[-1] != start:
            path.append(via[path[-1]])
        return " → ".join(reversed(path))


@dataclass(frozen=True)
class Rule:
    """Modules of `layers` never reach `forbidden` (libraries or layers), except through a
    module of the layer `through`, whose own imports are its business."""

    says: str
    layers: tuple[str, ...]
    forbidden: tuple[str, ...]
    through: str | None = None
    exempt: tuple[str, ...] = ()
    """Modules of `layers` the rule names as its exceptions."""

    def targets(self) -> tuple[str, ...]:
        return tuple(LAYERS.get(name, name) for name in self.forbidden)

    def violations(self, graph: Graph) -> list[str]:
        """Each way a module of `layers` reaches something forbidden, as an import chain."""
        found = []
        for name in sorted(graph.modules):
            if layer_of(name) not in self.layers or name in self.exempt:
                continue
            via = graph.reach(name, lambda module: layer_of(module) == self.through)
            found += [
                graph.chain(via, name, reached)
                for reached in sorted(via)
                if any(matches(reached, target) for target in self.targets())
            ]
        return found


def every_layer_but(*allowed: str) -> tuple[str, ...]:
    return tuple(layer for layer in LAYERS if layer not in allowed)


RULES = [
    Rule("core reaches no I/O library", ("core",), IO_LIBRARIES),
    Rule("core reaches no proxy layer but core", ("core",), every_layer_but("core")),
    Rule("doors reach no I/O library", ("doors",), IO_LIBRARIES),
    Rule("doors reach no proxy layer but core", ("doors",), every_layer_but("core", "doors")),
    Rule(
        "only config reads YAML and JSON Schema",
        every_layer_but("config"),
        ("yaml", "jsonschema", "jsonschema_rs"),
        through="config",
    ),
    *(
        Rule(f"{layer} reaches no proxy layer but core", (layer,), every_layer_but("core", layer))
        for layer in ("ledger", "upstream", "metrics")
    ),
    Rule("finance never reaches web, upstream or cli", ("finance",), ("web", "upstream", "cli")),
    Rule(
        "simulator reaches no proxy layer but core",
        ("simulator",),
        every_layer_but("core", "simulator"),
    ),
    Rule(
        "only the cli and the server (`serve --simulate`) start the simulator",
        every_layer_but("simulator", "cli", "main"),
        ("simulator",),
        exempt=("proxy.web.server",),
    ),
    Rule("only the upstream speaks aiohttp", every_layer_but("upstream"), ("aiohttp",), "upstream"),
    Rule("only the entry point reaches the cli", every_layer_but("cli", "main"), ("cli",)),
    Rule("the package root reaches nothing", ("root",), tuple(LAYERS)),
]


def wiring(graph: Graph) -> list[str]:
    """Modules outside web and cli that reach both the ledger and the upstream."""
    found = []
    for name in sorted(graph.modules):
        if layer_of(name) in ("web", "cli", "main"):
            continue
        reached = graph.reach(name)
        if any(matches(r, LAYERS["ledger"]) for r in reached) and any(
            matches(r, LAYERS["upstream"]) for r in reached
        ):
            found.append(name)
    return found


def unlayered(graph: Graph) -> list[str]:
    return sorted(name for name in graph.modules if layer_of(name) is None)


def prints_or_exits(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id in ("print", "exit", "quit")) or (
                isinstance(func, ast.Attribute)
                and func.attr in ("exit", "_exit")
                and isinstance(func.value, ast.Name)
                and func.value.id in ("sys", "os")
            ):
                lines.append(node.lineno)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                lines.append(node.lineno)
    return lines


ENVIRONMENT = ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")


def reads_environment(tree: ast.Module) -> list[int]:
    """Lines that read or write the process environment: `os.environ`, `os.getenv`,
    `environ[...]`, or those names imported from `os`."""
    lines = []
    for node in ast.walk(tree):
        if (
            (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT)
            or (isinstance(node, ast.Name) and node.id in ENVIRONMENT)
            or (
                isinstance(node, ast.ImportFrom)
                and node.module == "os"
                and any(alias.name in ENVIRONMENT for alias in node.names)
            )
        ):
            lines.append(node.lineno)
    return sorted(set(lines))


MODULES = read_modules()
GRAPH = Graph(MODULES)


# -- the package ----------------------------------------------------------------


def test_every_module_is_in_a_layer() -> None:
    assert unlayered(GRAPH) == []


def test_every_layer_has_modules() -> None:
    assert {layer_of(name) for name in MODULES} == {*LAYERS, "root"}


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.says)
def test_layer_rule(rule: Rule) -> None:
    assert rule.violations(GRAPH) == []


def test_only_web_and_cli_wire_the_ledger_and_the_upstream_together() -> None:
    assert wiring(GRAPH) == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer_of(m) not in ("cli", "main")))
def test_only_the_cli_prints_or_exits(name: str) -> None:
    assert prints_or_exits(MODULES[name]) == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer_of(m) != "config"))
def test_only_config_reads_the_environment(name: str) -> None:
    assert reads_environment(MODULES[name]) == []


def imported_at_run_time(module: str) -> set[str]:
    script = f"import sys, {module}; print('\\n'.join(sys.modules))"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


def test_importing_metrics_loads_no_database_driver() -> None:
    loaded = imported_at_run_time("proxy.metrics")
    assert not {m for m in loaded for driver in DATABASE_DRIVERS if matches(m, driver)}
    assert not {m for m in loaded if matches(m, "proxy.ledger") or matches(m, "proxy.finance")}


# -- the checker ------------------------------------------------------------------


def graph_of(**sources: str) -> Graph:
    """A package written inline: `proxy__core__a="import x"` is module `proxy.core.a`."""
    modules = {
        name.replace("__", "."): ast.parse(textwrap.dedent(text)) for name, text in sources.items()
    }
    return Graph({"proxy": ast.parse(""), **modules}, packages=("proxy.core", "proxy.ledger"))


CORE_RULES = [rule for rule in RULES if rule.layers == ("core",)]


def test_the_checker_finds_a_function_local_import() -> None:
    graph = graph_of(proxy__core__clock="def now():\n    import asyncio\n")
    assert CORE_RULES[0].violations(graph) == ["proxy.core.clock → asyncio"]


def test_the_checker_finds_a_violation_through_an_intermediate_module() -> None:
    graph = graph_of(
        proxy__core__a="from proxy.core import b\n",
        proxy__core__b="from . import c\n",
        proxy__core__c="from proxy.ledger.base import Ledger\n",
        proxy__ledger="",
        proxy__ledger__base="import sqlite3\n",
    )
    found = CORE_RULES[1].violations(graph)
    assert "proxy.core.a → proxy.core.b → proxy.core.c → proxy.ledger" in found
    assert "proxy.core.a → proxy.core.b → proxy.core.c → proxy.ledger.base" in found
    assert "proxy.core.a → proxy.core.b → proxy.core.c → proxy.ledger.base → sqlite3" in (
        CORE_RULES[0].violations(graph)
    )


def test_the_checker_finds_a_module_in_no_layer() -> None:
    graph = graph_of(proxy__helpers="", proxy__core__models="")
    assert unlayered(graph) == ["proxy.helpers"]


def test_the_checker_stops_at_the_layer_a_rule_lets_through() -> None:
    graph = graph_of(
        proxy__cli="import proxy.config\n",
        proxy__config="import yaml\n",
        proxy__web="import yaml\n",
    )
    only_config = next(rule for rule in RULES if rule.through == "config")
    assert only_config.violations(graph) == ["proxy.web → yaml"]


def test_the_checker_finds_the_ledger_and_the_upstream_wired_outside_web() -> None:
    graph = graph_of(
        proxy__finance="import proxy.ledger\nimport proxy.upstream\n",
        proxy__ledger="",
        proxy__upstream="",
        proxy__web="import proxy.ledger\nimport proxy.upstream\n",
    )
    assert wiring(graph) == ["proxy.finance"]


def test_the_checker_sees_imports_of_every_form() -> None:
    assert "aiohttp" in GRAPH.imports("proxy.upstream")
    assert "proxy.upstream" in GRAPH.imports("proxy.web.exchange")
    assert {"proxy.ledger", "proxy.ledger.base"} <= GRAPH.imports("proxy.ledger.sqlite")
    assert "proxy.simulator" in GRAPH.imports("proxy.cli.server")  # function-local
    assert "proxy.simulator.connection" in GRAPH.imports("proxy.simulator.routes")


def test_the_checker_finds_print_exit_and_the_environment_where_they_are() -> None:
    assert prints_or_exits(MODULES["proxy.cli"])
    assert prints_or_exits(ast.parse("import sys\nsys.exit(1)\n"))
    assert prints_or_exits(ast.parse("raise SystemExit(2)\n"))
    assert reads_environment(MODULES["proxy.config.loader"])
    assert reads_environment(ast.parse("import os\nos.getenv('A')\n")) == [2]
    assert reads_environment(ast.parse("from os import environ\nenviron['A'] = '1'\n")) == [1, 2]
