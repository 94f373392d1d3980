"""The price book: what each model charges and how many tokens a request can use (pure).

(Work in progress: the full implementation lands shortly; the API below is fixed.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelPrices:
    name: str
    qualities: tuple[str, ...]

    def accepts_size(self, size: str) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class PriceBook:
    models: dict[str, ModelPrices]

    def find(self, model: str) -> ModelPrices | None:
        raise NotImplementedError


def load_price_book(path: Path | None = None) -> PriceBook:
    """The built-in book, extended or overridden by the entries of `path` (raises ConfigError)."""
    raise NotImplementedError
