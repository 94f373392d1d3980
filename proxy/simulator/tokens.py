"""The token rules the simulator bills by (pure).

text input    ceil(utf-8 bytes of the prompt / 4), per image made
image input   gpt-image-1's published tile rule for every input image, per image made
image output  the image-generation guide's table (models before gpt-image-2; for
              gpt-image-1-mini its published per-image prices at its output rate) or the
              community formula (gpt-image-2 and 2.x), per image, + 100 per streamed partial

OpenAI does not say whether a request for `n` images bills its input once or once per
image; the simulator bills it per image, the dearer reading (as the Responses image tool
bills every call its input), so that a bound that counts it once is caught.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from proxy.core.models import InputImage
from proxy.simulator.catalogue import ModelRule
from proxy.simulator.faults import TEXT_OUTPUT_TOKENS, UNDETAILED_TEXT_TOKENS, Fault
from proxy.simulator.validation import ImageOrder

PARTIAL_IMAGE_TOKENS = 100
TILE = 512
FIT_WITHIN = 2048
TILE_BASE_TOKENS = 65
TOKENS_PER_TILE = 129
HIGH_FIDELITY_SQUARE = 4160
HIGH_FIDELITY_OTHER = 6240
# An image given by URL or file id (or a data URL Pillow cannot read) is counted as if
# it were this size; a data URL's image is counted at its own.
REFERENCE_IMAGE_SIZE = (1024, 1024)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def text_tokens(prompt: str) -> int:
    """Text input tokens: `text_tokens("cat!") == 1`; never more than the prompt's bytes."""
    return _ceil_div(len(prompt.encode("utf-8")), 4)


def image_input_tokens(width: int, height: int, *, high_fidelity: bool) -> int:
    """gpt-image-1's rule: `image_input_tokens(1024, 1024, high_fidelity=False) == 194`."""
    w, h = float(width), float(height)
    if max(w, h) > FIT_WITHIN:
        scale = FIT_WITHIN / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > TILE:
        # Like the vision calculator: images are scaled down, never up.
        scale = TILE / min(w, h)
        w, h = w * scale, h * scale
    tiles = _ceil_div(round(w), TILE) * _ceil_div(round(h), TILE)
    tokens = TILE_BASE_TOKENS + TOKENS_PER_TILE * tiles
    if high_fidelity:
        tokens += HIGH_FIDELITY_SQUARE if width == height else HIGH_FIDELITY_OTHER
    return tokens


def images_input_tokens(images: tuple[InputImage, ...], *, high_fidelity: bool) -> int:
    """Image input tokens of all input images (a mask adds none)."""
    total = 0
    for image in images:
        if image.width is None or image.height is None:
            width, height = REFERENCE_IMAGE_SIZE
        else:
            width, height = image.width, image.height
        total += image_input_tokens(width, height, high_fidelity=high_fidelity)
    return total


def formula_tokens(factor: int, width: int, height: int) -> int:
    """The community fit to OpenAI's calculator: `formula_tokens(96, 1024, 1024) == 7024`."""
    long, short = max(width, height), min(width, height)
    s = (2 * factor * short + long) // (2 * long)
    return _ceil_div(factor * s * (2_000_000 + width * height), 4_000_000)


def output_tokens_per_image(model: ModelRule, quality: str, width: int, height: int) -> int:
    """Image output tokens of one final image at an effective quality and size (0 for DALL·E)."""
    if model.output_rule == "table":
        return model.table[quality][f"{width}x{height}"]
    if model.output_rule == "formula":
        tokens = formula_tokens(model.factors[quality], width, height)
        return math.ceil(tokens * model.multipliers.get(quality, 1))
    return 0


@dataclass(frozen=True)
class Tokens:
    """What one request bills, split the way the answers report it."""

    text_input_per_image: int
    image_input_per_image: int
    output_per_image: int
    n: int
    partials_per_image: int = 0
    text_output: int = 0
    """Text output of the whole request (only with the `texttokens` and `textnodetails`
    faults)."""
    undetailed: bool = False
    """Whether the usage leaves out `output_tokens_details`, text output or not (the
    `textnodetails` fault): its output tokens are then told as a total only."""

    @property
    def text_input(self) -> int:
        """Text input of the whole request: the prompt, billed for every image."""
        return self.text_input_per_image * self.n

    @property
    def image_input(self) -> int:
        """Image input of the whole request: the input images, billed for every image."""
        return self.image_input_per_image * self.n

    @property
    def input_total(self) -> int:
        return self.text_input + self.image_input

    @property
    def output_per_completed(self) -> int:
        """Output tokens of one image with its streamed partials."""
        return self.output_per_image + PARTIAL_IMAGE_TOKENS * self.partials_per_image

    @property
    def output_total(self) -> int:
        return self.output_per_completed * self.n


def tokens_for(order: ImageOrder) -> Tokens:
    """Everything a valid order bills: `tokens_for(order).output_total` etc."""
    return Tokens(
        text_input_per_image=0 if order.model.is_dalle else text_tokens(order.prompt),
        image_input_per_image=(
            0
            if order.model.is_dalle
            else images_input_tokens(order.images, high_fidelity=order.high_fidelity)
        ),
        output_per_image=output_tokens_per_image(
            order.model, order.quality, order.width, order.height
        ),
        n=order.n,
        partials_per_image=order.partial_images if order.stream else 0,
    )


def played_tokens(order: ImageOrder, fault: Fault | None) -> Tokens:
    """What a valid order bills when it plays `fault`: `tokens_for`'s, with the text output
    of the `texttokens` and `textnodetails` faults (for a GPT image model)."""
    tokens = tokens_for(order)
    if order.model.is_dalle:
        return tokens
    if fault == "texttokens":
        return replace(tokens, text_output=TEXT_OUTPUT_TOKENS)
    if fault == "textnodetails":
        return replace(tokens, text_output=UNDETAILED_TEXT_TOKENS * order.n, undetailed=True)
    return tokens
