"""Price-book files → a `PriceBook`, or a `ConfigError` naming the file and line of each problem.

    book = load_price_book()                      # the built-in book
    book = load_price_book(Path("prices.yaml"))   # extended or overridden by a deployment's

The built-in book is `proxy/prices.yaml` (package data). An entry of the deployment's file
changes the keys it names and keeps the rest of the built-in entry of the same name (its
aliases too); a new name adds a model. `proxy.core.pricing` builds the entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.config.source import Document, JsonPath, parse_document, read_document
from proxy.core.errors import ConfigError
from proxy.core.pricing import (
    ENTRY_ERRORS,
    CustomSizes,
    ModelPrices,
    PriceBook,
    model_prices,
    price_book,
)

BUILT_IN = "proxy/prices.yaml"


@dataclass(frozen=True)
class _Entry:
    """The fields of one model and the document (and key) where they were written."""

    fields: Any
    doc: Document
    path: JsonPath


def load_price_book(path: Path | None = None) -> PriceBook:
    """The built-in book, extended or overridden by the entries of `path` (raises ConfigError)."""
    text = resources.files("proxy").joinpath("prices.yaml").read_text()
    built_in, problems = parse_document(text, BUILT_IN, None)
    entries, custom = _models(built_in, problems)
    if path is not None:
        override, found = read_document(Path(path), str(path), None)
        problems += found
        overrides, _ = _models(override, problems)
        entries |= {name: _overridden(entries.get(name), e) for name, e in overrides.items()}
    if problems:
        raise ConfigError(problems)
    return price_book(_built(entries, custom))


def _overridden(base: _Entry | None, entry: _Entry) -> _Entry:
    """`entry` over the built-in entry of the same name: the keys it names change."""
    if base is None or not isinstance(base.fields, dict) or not isinstance(entry.fields, dict):
        return entry
    return _Entry({**base.fields, **entry.fields}, entry.doc, entry.path)


def _models(doc: Document | None, problems: list[str]) -> tuple[dict[str, _Entry], CustomSizes]:
    """The `models:` entries of `doc` and its `custom_sizes:` rules (problems go to `problems`)."""
    if doc is None:
        return {}, CustomSizes()
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        where: JsonPath = ("models",) if isinstance(data, dict) and "models" in data else ()
        problems.append(doc.problem(where, "a price book needs a `models:` mapping"))
        return {}, CustomSizes()
    entries = {
        str(name): _Entry(fields, doc, ("models", name)) for name, fields in data["models"].items()
    }
    try:
        custom = CustomSizes(**data.get("custom_sizes", {}))
    except TypeError as exc:
        problems.append(doc.problem(("custom_sizes",), f"invalid size rules: {exc}"))
        custom = CustomSizes()
    return entries, custom


def _built(entries: dict[str, _Entry], custom: CustomSizes) -> list[ModelPrices]:
    built: list[ModelPrices] = []
    problems: list[str] = []
    for name, entry in entries.items():
        try:
            built.append(model_prices(name, entry.fields, custom))
        except ENTRY_ERRORS as exc:
            problems.append(entry.doc.problem(entry.path, f"invalid price-book entry: {exc!r}"))
    if problems:
        raise ConfigError(problems)
    return built
