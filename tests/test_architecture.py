"""The import direction of STYLE.md, held by reading every module's imports with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import proxy

PACKAGE = Path(proxy.__file__).parent
PURE_CORE = (
    "proxy.core.models",
    "proxy.core.pricing",
    "proxy.core.metering",
    "proxy.core.parsing",
    "proxy.core.multipart",
    "proxy.core.dimensions",
    "proxy.core.auth",
    "proxy.core.paths",
    "proxy.core.errors",
    "proxy.core.budgets",
    "proxy.core.scrubbing",
    "proxy.core.settlement",
    "proxy.core.settings",
    "proxy.doors",
    "proxy.doors.base",
    "proxy.doors.images",
)
DOES_IO = (
    "httpx",
    "httpx_aiohttp",
    "aiohttp",
    "aiosqlite",
    "starlette",
    "uvicorn",
    "sqlite3",
    "asyncio",
    "socket",
    "subprocess",
    "prometheus_client",
    "proxy.ledger",
    "proxy.upstream",
    "proxy.web.pipeline",
    "proxy.web.exchange",
    "proxy.web.passthrough",
    "proxy.web.responses",
    "proxy.web.runtime",
    "proxy.web.app",
    "proxy.cli",
    "proxy.web.spool",
    "proxy.simulator",
    "proxy.web.admission",
    "proxy.web.connections",
)
WEB_AND_CLI = ("proxy.web", "proxy.cli")
MAY_PRINT_OR_EXIT = ("proxy.cli", "proxy.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def imports(name: str, tree: ast.Module) -> set[str]:
    """Every module `tree` imports, at any depth (function-local imports included)."""
    found: set[str] = set()
    package = name if tree_is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def tree_is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def matches(imported: str, prefix: str) -> bool:
    return imported == prefix or imported.startswith(prefix + ".")


MODULES = modules()


def test_every_module_is_found() -> None:
    assert set(PURE_CORE) <= set(MODULES)
    assert {"proxy.ledger", "proxy.upstream", "proxy.cli"} <= set(MODULES)


@pytest.mark.parametrize("name", PURE_CORE)
def test_pure_core_imports_nothing_that_does_io(name: str) -> None:
    found = imports(name, MODULES[name])
    assert not {i for i in found for bad in DOES_IO if matches(i, bad)}


@pytest.mark.parametrize(
    ("name", "forbidden"),
    [
        ("proxy.ledger", ("proxy.upstream", *WEB_AND_CLI)),
        ("proxy.upstream", ("proxy.ledger", *WEB_AND_CLI)),
    ],
)
def test_ledger_and_upstream_never_import_each_other_nor_the_web_layer(
    name: str, forbidden: tuple[str, ...]
) -> None:
    found = {
        i
        for module, tree in MODULES.items()
        if matches(module, name)
        for i in imports(module, tree)
    }
    assert not {i for i in found for bad in forbidden if matches(i, bad)}


HTTP_CLIENTS = ("httpx", "httpx_aiohttp", "aiohttp")
REQUEST_PATH = (
    "proxy.web.pipeline",
    "proxy.web.exchange",
    "proxy.web.passthrough",
    "proxy.web.responses",
    "proxy.upstream",
)


@pytest.mark.parametrize("name", REQUEST_PATH)
def test_only_the_upstream_knows_an_http_client_library(name: str) -> None:
    found = {i for i in imports(name, MODULES[name]) for lib in HTTP_CLIENTS if matches(i, lib)}
    if name == "proxy.upstream":
        assert {"aiohttp", "httpx"} <= found  # aiohttp for the network, httpx for tests
        assert "httpx_aiohttp" not in found
    else:
        assert found == set()


def test_only_the_entry_point_imports_the_cli() -> None:
    importers = {
        module
        for module, tree in MODULES.items()
        if module != "proxy.cli" and any(matches(i, "proxy.cli") for i in imports(module, tree))
    }
    assert importers <= {"proxy.__main__"}


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


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m not in MAY_PRINT_OR_EXIT), ids=str)
def test_only_the_cli_prints_or_exits(name: str) -> None:
    assert prints_or_exits(MODULES[name]) == []


def test_the_check_finds_print_and_exit_where_they_are() -> None:
    assert prints_or_exits(MODULES["proxy.cli"])
    assert prints_or_exits(ast.parse("import sys\nsys.exit(1)\n"))
    assert prints_or_exits(ast.parse("raise SystemExit(2)\n"))


def test_the_check_sees_imports_of_every_form() -> None:
    assert "aiohttp" in imports("proxy.upstream", MODULES["proxy.upstream"])
    assert "proxy.upstream.Answer" in imports("proxy.web.exchange", MODULES["proxy.web.exchange"])
    assert "proxy.ledger.base" in imports("proxy.ledger.sqlite", MODULES["proxy.ledger.sqlite"])
    assert "proxy.simulator" in imports("proxy.cli", MODULES["proxy.cli"])  # function-local
