"""Price-book files → a `PriceBook`, or a `ConfigError` naming the file and line of each problem.

    book = load_price_book()                      # the built-in book
    book = load_price_book(Path("prices.yaml"))   # extended or overridden by a deployment's

The built-in book is `proxy/prices.yaml` (package data): image models under `models:`, the
Responses API's mainline text models under `mainline:`. An entry of the deployment's file
changes the keys it names and keeps the rest of the built-in entry of the same name (its
aliases too); a new name adds a model. `proxy.core.price_entries` builds the entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.config.source import Document, JsonPath, dotted, parse_document, read_document
from proxy.core.errors import ConfigError
from proxy.core.image_tokens import CustomSizes
from proxy.core.price_entries import (
    ENTRY_ERRORS,
    EntryError,
    mainline_prices,
    model_prices,
    price_book,
)
from proxy.core.pricing import MainlinePrices, ModelPrices, PriceBook

BUILT_IN = "proxy/prices.yaml"
SECTIONS = ("models", "mainline")
BOOK_KEYS = ("version", *SECTIONS, "custom_sizes")


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
    entries, mainline, custom = _sections(built_in, problems)
    if path is not None:
        override, found = read_document(Path(path), str(path), None)
        problems += found
        models, texts, _ = _sections(override, problems)
        entries |= {name: _overridden(entries.get(name), e) for name, e in models.items()}
        mainline |= {name: _overridden(mainline.get(name), e) for name, e in texts.items()}
    if problems:
        raise ConfigError(problems)
    images = _built(entries, custom, problems)
    written = {model.name: entries[model.name] for model in images}
    built_mainline = _built_mainline(mainline, images, written, problems)
    if problems:
        raise ConfigError(problems)
    return price_book(images, built_mainline)


def _overridden(base: _Entry | None, entry: _Entry) -> _Entry:
    """`entry` over the built-in entry of the same name: the keys it names change."""
    if base is None or not isinstance(base.fields, dict) or not isinstance(entry.fields, dict):
        return entry
    return _Entry({**base.fields, **entry.fields}, entry.doc, entry.path)


def _sections(
    doc: Document | None, problems: list[str]
) -> tuple[dict[str, _Entry], dict[str, _Entry], CustomSizes]:
    """The `models:` and `mainline:` entries of `doc` and its `custom_sizes:` rules (problems
    go to `problems`). A book needs at least one of the two sections."""
    if doc is None:
        return {}, {}, CustomSizes()
    data = doc.data
    if not isinstance(data, dict) or not any(section in data for section in SECTIONS):
        problems.append(doc.problem((), "a price book needs a `models:` or `mainline:` mapping"))
        return {}, {}, CustomSizes()
    for key in data:
        if key not in BOOK_KEYS:  # `mainlin:` would leave out every entry under it
            known = ", ".join(BOOK_KEYS)
            problems.append(doc.problem((str(key),), f"unknown key (known: {known})"))
    found: dict[str, dict[str, _Entry]] = {}
    for section in SECTIONS:
        written = data.get(section, {})
        if not isinstance(written, dict):
            problems.append(doc.problem((section,), f"`{section}:` must be a mapping of models"))
            written = {}
        found[section] = {
            str(name): _Entry(fields, doc, (section, name)) for name, fields in written.items()
        }
    try:
        custom = CustomSizes(**data.get("custom_sizes", {}))
    except TypeError as exc:
        problems.append(doc.problem(("custom_sizes",), f"invalid size rules: {exc}"))
        custom = CustomSizes()
    return found["models"], found["mainline"], custom


def _built(
    entries: dict[str, _Entry], custom: CustomSizes, problems: list[str]
) -> list[ModelPrices]:
    """The image models; a name or alias that another entry also claims is a problem (one
    name prices one model: a deployment's alias must not quietly reprice a real model)."""
    built: list[ModelPrices] = []
    owners: dict[str, str] = {}
    for name, entry in entries.items():
        try:
            model = model_prices(name, entry.fields, custom)
        except ENTRY_ERRORS as exc:
            problems.append(_problem(entry, exc))
            continue
        for claimed in dict.fromkeys((model.name, *model.aliases)):
            owner = owners.setdefault(claimed, model.name)
            if owner != model.name:
                other = entries[owner]
                where = f"{dotted(other.path)} at {other.doc.where(other.path)}"
                message = f"{claimed!r} is also {owner!r} ({where}); a name prices one model"
                problems.append(entry.doc.problem(entry.path, message))
        built.append(model)
    return built


def _built_mainline(
    entries: dict[str, _Entry],
    images: list[ModelPrices],
    written: dict[str, _Entry],
    problems: list[str],
) -> list[MainlinePrices]:
    """The mainline models; a name (or alias) that is also an image model's is a problem
    (one name prices one model), naming where that image model is written."""
    image_names = {name: model.name for model in images for name in (model.name, *model.aliases)}
    built: list[MainlinePrices] = []
    texts: dict[str, str] = {}
    for name, entry in entries.items():
        try:
            text = mainline_prices(name, entry.fields)
        except ENTRY_ERRORS as exc:
            problems.append(_problem(entry, exc))
            continue
        clash = [n for n in (text.name, *text.aliases) if n in image_names]
        twice = [n for n in (text.name, *text.aliases) if texts.setdefault(n, name) != name]
        if twice:
            other = entries[texts[twice[0]]]
            where = f"{dotted(other.path)} at {other.doc.where(other.path)}"
            message = f"{twice[0]!r} is also {texts[twice[0]]!r} ({where}); a name prices one model"
            problems.append(entry.doc.problem(entry.path, message))
        if clash:
            image = written[image_names[clash[0]]]
            where = f"{dotted(image.path)} at {image.doc.where(image.path)}"
            message = f"{clash[0]!r} is also an image model ({where}); a name prices one model"
            problems.append(entry.doc.problem(entry.path, message))
        built.append(text)
    return built


def _problem(entry: _Entry, exc: Exception) -> str:
    """`file:line: key.path: invalid price-book entry: …`, at the key at fault where known."""
    if isinstance(exc, EntryError):
        return entry.doc.problem((*entry.path, *exc.at), f"invalid price-book entry: {exc}")
    return entry.doc.problem(entry.path, f"invalid price-book entry: {exc!r}")
