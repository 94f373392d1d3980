"""How many tokens an image of a given size is: the published rules for sizes and tiles (pure).

    parse_size("1536x1024")                  # (1536, 1024)
    formula_tokens(16, 1024, 1024)           # gpt-image-2's output tokens at a quality's factor
    TileRule(...).tokens(1024, 1024, False)  # gpt-image-1's input tokens of one image

`proxy.core.pricing` prices a model's images with these rules, as its price-book entry
sets them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True, slots=True)
class CustomSizes:
    """The rules for arbitrary `WxH` sizes (gpt-image-2 and later)."""

    multiple_of: int = 16
    max_edge: int = 3840
    max_aspect: int = 3
    min_pixels: int = 655_360
    max_pixels: int = 8_294_400

    def accepts(self, width: int, height: int) -> bool:
        long, short = max(width, height), min(width, height)
        return (
            width % self.multiple_of == 0
            and height % self.multiple_of == 0
            and long <= self.max_edge
            and long <= self.max_aspect * short
            and self.min_pixels <= width * height <= self.max_pixels
        )

    def describe(self) -> str:
        """The rules, as an error message names them."""
        return (
            f"WxH sizes with both edges multiples of {self.multiple_of}, no edge above "
            f"{self.max_edge}, an aspect ratio within {self.max_aspect}:1 and "
            f"{self.min_pixels:,} to {self.max_pixels:,} pixels"
        )


@dataclass(frozen=True, slots=True)
class TileRule:
    """gpt-image-1's published input rule: 512-px tiles, 65 + 129 a tile, more at high fidelity."""

    fit: int
    shortest_side: int
    tile: int
    base: int
    per_tile: int
    high_fidelity_square: int
    high_fidelity_other: int

    def tokens(self, width: int, height: int, high_fidelity: bool) -> int:
        """An upper bound of the published rule. The rule does not say how a scaled side is
        rounded (1250x2501 scales to 512 x 1024.41: 2 tiles rounded, 3 if rounded up), so
        sides are kept exact and the tiles counted rounding up, at least what any rounding
        counts."""
        w, h = Fraction(width), Fraction(height)
        if max(w, h) > self.fit:
            scale = self.fit / max(w, h)
            w, h = w * scale, h * scale
        if min(w, h) > self.shortest_side:
            scale = self.shortest_side / min(w, h)
            w, h = w * scale, h * scale
        tiles = math.ceil(w / self.tile) * math.ceil(h / self.tile)
        tokens = self.base + self.per_tile * tiles
        if high_fidelity:
            tokens += self.high_fidelity_square if width == height else self.high_fidelity_other
        return tokens

    @property
    def ceiling(self) -> int:
        """The most one image can cost: the longest thin image at high fidelity."""
        tiles = math.ceil(self.fit / self.tile)
        return self.base + self.per_tile * tiles + self.high_fidelity_other


SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", re.ASCII)


def parse_size(size: str) -> tuple[int, int] | None:
    """`"1536x1024"` → (1536, 1024); None for anything else (ASCII digits only: `str.isdigit`
    takes `²⁰⁴⁸`, which `int()` then refuses; no leading zero: `01024x1024` is forwarded as
    written, so it is priced only if it is written as OpenAI's sizes are)."""
    match = SIZE.fullmatch(size)
    if match is None:
        return None
    return int(match[1]), int(match[2])


def formula_tokens(factor: int, width: int, height: int) -> int:
    """Output tokens of one gpt-image-2/2.5 image (the community fit to OpenAI's calculator)."""
    long, short = max(width, height), min(width, height)
    steps = (2 * factor * short + long) // (2 * long)
    return -(-(factor * steps * (2_000_000 + width * height)) // 4_000_000)
