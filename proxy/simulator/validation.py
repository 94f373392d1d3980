"""OpenAI's request validation: a `RawRequest` becomes an `ImageOrder` or an ApiError (pure)."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from proxy.core.models import Endpoint, InputImage
from proxy.simulator.catalogue import (
    AUTO_SIZE,
    DEFAULT_MODELS,
    MODELS,
    SIZE_EDGE_MULTIPLE,
    SIZE_MAX_ASPECT,
    SIZE_MAX_EDGE,
    SIZE_MAX_PIXELS,
    SIZE_MIN_PIXELS,
    ModelRule,
)
from proxy.simulator.forms import RawRequest, image_size
from proxy.simulator.refusals import invalid, missing, unsupported

MAX_PROMPT_CHARS = 32_000
MAX_INPUT_IMAGES = 16
MAX_N = 10
MAX_PARTIAL_IMAGES = 3
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque", "auto")
FIDELITIES = ("high", "low")
RESPONSE_FORMATS = ("url", "b64_json")
STYLES = ("vivid", "natural")
MODERATIONS = ("low", "auto")
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", re.ASCII)


@dataclass(frozen=True)
class ImageOrder:
    """A valid request with every `auto` resolved: what the simulator will make and bill."""

    endpoint: Endpoint
    model: ModelRule
    prompt: str
    n: int
    quality: str
    width: int
    height: int
    output_format: str = "png"
    compression: int | None = None
    background: str = "opaque"
    stream: bool = False
    partial_images: int = 0
    high_fidelity: bool = False
    images: tuple[InputImage, ...] = ()
    response_format: str = "b64_json"
    safety_identifier: str | None = None
    """The end user the answer names: `safety_identifier`, else `user` (None: neither)."""

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class _Fields:
    """Typed access to JSON values or multipart text fields."""

    def __init__(self, raw: RawRequest) -> None:
        self.values = raw.fields
        self.form = raw.content == "multipart"

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        if value is None or isinstance(value, str):
            return value
        raise invalid(
            f"Invalid type for '{name}': expected a string, but got {type(value).__name__}.",
            param=name,
            code="invalid_type",
        )

    def integer(self, name: str) -> int | None:
        value = self.values.get(name)
        if value is None:
            return None
        if self.form and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise invalid(
            f"Invalid type for '{name}': expected an integer, but got {value!r}.",
            param=name,
            code="invalid_type",
        )

    def boolean(self, name: str) -> bool | None:
        value = self.values.get(name)
        if value is None or isinstance(value, bool):
            return value
        if self.form and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise invalid(
            f"Invalid type for '{name}': expected a boolean, but got {value!r}.",
            param=name,
            code="invalid_type",
        )


def _in_range(name: str, value: int, low: int, high: int) -> None:
    if value < low:
        raise invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, "
            f"but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise invalid(
            f"Invalid value: '{value}'. Supported values are: {_choices(allowed)}.", param=name
        )


def custom_size_problem(width: int, height: int) -> str | None:
    """Why a `WxH` breaks the custom-size rules of gpt-image-2 and 2.x, or None when it is
    acceptable."""
    if width % SIZE_EDGE_MULTIPLE or height % SIZE_EDGE_MULTIPLE:
        return f"both edges must be multiples of {SIZE_EDGE_MULTIPLE}"
    if max(width, height) > SIZE_MAX_EDGE:
        return f"no edge may exceed {SIZE_MAX_EDGE} pixels"
    if max(width, height) > SIZE_MAX_ASPECT * min(width, height):
        return f"the aspect ratio must be between 1:{SIZE_MAX_ASPECT} and {SIZE_MAX_ASPECT}:1"
    if not SIZE_MIN_PIXELS <= width * height <= SIZE_MAX_PIXELS:
        return f"total pixels must be between {SIZE_MIN_PIXELS:,} and {SIZE_MAX_PIXELS:,}"
    return None


def _size(model: ModelRule, value: str) -> tuple[int, int]:
    if value == "auto":
        return AUTO_SIZE
    match = _SIZE.fullmatch(value)
    if model.sizes is not None:
        if value not in model.sizes or match is None:
            allowed = (*model.sizes, "auto")
            raise invalid(
                f"Invalid value: '{value}'. Supported values for model '{model.name}' are: "
                f"{_choices(allowed)}.",
                param="size",
            )
        return int(match[1]), int(match[2])
    if match is None:
        raise invalid(f"Invalid value: '{value}'. Expected 'auto' or 'WIDTHxHEIGHT'.", param="size")
    width, height = int(match[1]), int(match[2])
    problem = custom_size_problem(width, height) if width and height else "edges must be > 0"
    if problem:
        raise invalid(f"Invalid size '{value}': {problem}.", param="size")
    return width, height


def _model(endpoint: Endpoint, fields: _Fields) -> ModelRule:
    name = fields.text("model") or DEFAULT_MODELS[endpoint]
    model = MODELS.get(name)
    if model is None:
        raise invalid(
            f"Invalid value: '{name}'. Supported values are: {_choices(tuple(MODELS))}.",
            param="model",
        )
    if endpoint not in model.endpoints:
        raise invalid(
            f"Invalid value: '{name}'. The model does not support image {endpoint}.",
            param="model",
        )
    return model


def _prompt(endpoint: Endpoint, fields: _Fields) -> str:
    if endpoint == "variations":
        return ""
    prompt = fields.text("prompt")
    if not prompt:
        raise missing("prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{MAX_PROMPT_CHARS}, but got a string with length {len(prompt)} instead.",
            param="prompt",
            code="string_above_max_length",
        )
    return prompt


MAX_IMAGE_URL_CHARS = 20_971_520
"""The longest `image_url` of a JSON edit (a base64 data URL of about 15 MB)."""


def _reference(value: Any, param: str) -> InputImage:
    if isinstance(value, dict) and len(value.keys() & {"image_url", "file_id"}) == 1:
        ref = value.get("image_url") or value.get("file_id")
        if isinstance(ref, str) and len(ref) > MAX_IMAGE_URL_CHARS:
            raise invalid(
                f"Invalid '{param}.image_url': string too long. Expected a string with "
                f"maximum length {MAX_IMAGE_URL_CHARS}, but got a string with length "
                f"{len(ref)} instead.",
                param=f"{param}.image_url",
                code="string_above_max_length",
            )
        if isinstance(ref, str) and ref:
            return data_url_image(ref)
    raise invalid(
        f"Invalid '{param}': each image must be an object with exactly one of 'image_url' "
        "or 'file_id'.",
        param=param,
    )


def data_url_image(ref: str) -> InputImage:
    """A base64 data URL's image at its size, as OpenAI reads (and bills) it; a URL, a
    file id or a data URL Pillow cannot read at no known size."""
    head, _, data = ref.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64")):
        return InputImage()
    try:
        size = image_size(base64.b64decode(data, validate=True))
    except binascii.Error:
        return InputImage()
    return InputImage(*size) if size else InputImage()


def _json_images(raw: RawRequest, model: ModelRule) -> tuple[InputImage, ...]:
    images = raw.fields.get("images")
    if images is None:
        raise missing("images")
    if model.is_dalle:
        raise invalid(
            f"Invalid value: '{model.name}'. JSON edits support GPT image models only.",
            param="model",
        )
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_INPUT_IMAGES:
        raise invalid(
            f"Invalid 'images': expected an array of 1 to {MAX_INPUT_IMAGES} images.",
            param="images",
        )
    refs = tuple(_reference(item, "images") for item in images)
    if raw.fields.get("mask") is not None:
        _reference(raw.fields["mask"], "mask")
    return refs


def _uploaded_images(raw: RawRequest) -> tuple[InputImage, ...]:
    plain = [p for p in raw.parts if p.field == "image"]
    if len(plain) > 1:
        raise invalid(
            "Duplicate parameter: 'image'. You provided multiple values for this parameter, "
            "when only one is expected. If you meant to provide an array, use the array syntax "
            "instead e.g. 'image[]=<value>'.",
            param="image",
            code="duplicate_parameter",
        )
    images = [p for p in raw.parts if p.field in ("image", "image[]")]
    if not images:
        raise missing("image")
    given = {p.field for p in raw.parts}
    if {"mask", "markup"} <= given:
        raise invalid("Invalid 'markup': it cannot be combined with 'mask'.", param="markup")
    if len(images) > MAX_INPUT_IMAGES:
        raise invalid(
            f"Invalid 'image': at most {MAX_INPUT_IMAGES} images are accepted.", param="image"
        )
    for part in raw.parts:
        if not part.decoded:
            raise invalid(
                f"Invalid file '{part.field}': the file is not a valid image. Supported file "
                "formats are 'image/jpeg', 'image/png', and 'image/webp'.",
                param=part.field.removesuffix("[]"),
                code="invalid_image_file",
            )
    return tuple(InputImage(p.width, p.height) for p in images)


def _input_images(raw: RawRequest, model: ModelRule) -> tuple[InputImage, ...]:
    if raw.endpoint == "generations":
        return ()
    if raw.content == "json":
        if raw.endpoint == "variations":
            raise missing("image")
        return _json_images(raw, model)
    return _uploaded_images(raw)


def _high_fidelity(model: ModelRule, fields: _Fields) -> bool:
    fidelity = fields.text("input_fidelity")
    if fidelity is not None:
        if not model.fidelity_param_allowed:
            raise unsupported("input_fidelity", model.name)
        _one_of("input_fidelity", fidelity, FIDELITIES)
        if fidelity not in model.fidelities:
            raise invalid(
                f"Invalid value: '{fidelity}'. Supported values for model '{model.name}' "
                f"are: {_choices(model.fidelities)}.",
                param="input_fidelity",
            )
    if model.fidelity == "param":
        return fidelity == "high"
    return model.fidelity == "high"


def validate(raw: RawRequest) -> ImageOrder:
    """The order a request describes, or the ApiError OpenAI would answer it with."""
    fields = _Fields(raw)
    model = _model(raw.endpoint, fields)
    prompt = _prompt(raw.endpoint, fields)
    images = _input_images(raw, model)
    n = _n(model, fields)
    quality = _quality(model, fields)
    width, height = _size(model, fields.text("size") or "auto")
    output_format, compression, background = _output(model, fields)
    stream, partial_images = _stream(model, fields)
    response_format = _legacy(model, fields)
    return ImageOrder(
        endpoint=raw.endpoint,
        model=model,
        prompt=prompt,
        n=n,
        quality=quality,
        width=width,
        height=height,
        output_format=output_format,
        compression=compression,
        background="opaque" if background == "auto" else background,
        stream=stream,
        partial_images=partial_images,
        high_fidelity=_high_fidelity(model, fields),
        images=images,
        response_format=response_format,
        safety_identifier=fields.text("safety_identifier") or fields.text("user") or None,
    )


def _legacy(model: ModelRule, fields: _Fields) -> str:
    """`response_format`, and the other options GPT image models and DALL·E do not share:
    `style` is dall-e-3's ("unsupported for GPT image models"); DALL·E answers URLs unless
    asked for `b64_json` (OpenAPI: default `url`), a GPT image model always answers base64
    ("url is not supported for them"); `moderation` is theirs (values checked; a DALL·E
    model ignores it)."""
    response_format = fields.text("response_format") or ("url" if model.is_dalle else "b64_json")
    _one_of("response_format", response_format, RESPONSE_FORMATS)
    style = fields.text("style")
    if style is not None:
        _one_of("style", style, STYLES)
    if model.is_dalle:
        return response_format
    if style is not None:
        raise unsupported("style", model.name)
    if response_format == "url":
        raise invalid(
            "Unknown parameter: 'response_format'. GPT image models always return "
            "base64-encoded images ('b64_json').",
            param="response_format",
            code="unknown_parameter",
        )
    moderation = fields.text("moderation")
    if moderation is not None:
        _one_of("moderation", moderation, MODERATIONS)
    return "b64_json"


def _n(model: ModelRule, fields: _Fields) -> int:
    n = fields.integer("n")
    n = 1 if n is None else n
    _in_range("n", n, 1, MAX_N)
    if n > model.max_n:
        raise invalid(f"Invalid 'n': model '{model.name}' supports only n=1.", param="n")
    return n


def _quality(model: ModelRule, fields: _Fields) -> str:
    quality = fields.text("quality") or "auto"
    _one_of("quality", quality, (*model.qualities, "auto"))
    return model.default_quality if quality == "auto" else quality


def _output(model: ModelRule, fields: _Fields) -> tuple[str, int | None, str]:
    """`output_format`, `output_compression` and `background` (DALL·E: a PNG, opaque)."""
    output_format = fields.text("output_format") or "png"
    compression = fields.integer("output_compression")
    background = fields.text("background") or "auto"
    if model.is_dalle:
        return "png", None, "opaque"
    _one_of("output_format", output_format, OUTPUT_FORMATS)
    _one_of("background", background, BACKGROUNDS)
    if compression is not None:
        _in_range("output_compression", compression, 0, 100)
        if output_format == "png":
            raise invalid(
                "Invalid value: 'output_compression' is only supported with output_format "
                "'jpeg' or 'webp'.",
                param="output_compression",
            )
    if background == "transparent" and output_format == "jpeg":
        raise invalid(
            "Invalid value: transparent background requires output_format 'png' or 'webp'.",
            param="background",
        )
    return output_format, compression, background


def _stream(model: ModelRule, fields: _Fields) -> tuple[bool, int]:
    """`stream` and `partial_images`."""
    stream = bool(fields.boolean("stream"))
    if stream and model.is_dalle:
        raise unsupported("stream", model.name)
    partial_images = fields.integer("partial_images")
    if partial_images is not None:
        _in_range("partial_images", partial_images, 0, MAX_PARTIAL_IMAGES)
        if not stream:
            raise invalid(
                "Invalid value: 'partial_images' is only supported when 'stream' is true.",
                param="partial_images",
            )
    return stream, partial_images or 0
