"""The input images of an edit or a variation: uploaded parts, or JSON references (pure).

An uploaded image and a data URL's are measured (`proxy.core.dimensions`), so that they are
priced by their size; a URL or a file id is priced at the model's ceiling (Tollgate never
fetches either).
"""

from __future__ import annotations

import binascii
import re
from typing import Any

from proxy.core.dimensions import measure_image
from proxy.core.errors import InvalidRequest
from proxy.core.models import Endpoint, InputImage
from proxy.core.multipart import Part, Upload

MAX_IMAGES = 16
IMAGE_FIELDS = ("image", "image[]", "mask", "markup")
DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,", re.ASCII)


def json_images(refs: Any) -> tuple[tuple[InputImage, ...], list[dict[str, str]]]:
    if not isinstance(refs, list) or not refs:
        raise InvalidRequest("Missing required parameter: 'images'.", param="images")
    if len(refs) > MAX_IMAGES:
        raise InvalidRequest(f"Too many images: at most {MAX_IMAGES}.", param="images")
    read = [json_image_ref(ref, f"images[{i}]") for i, ref in enumerate(refs)]
    return tuple(image for image, _ in read), [ref for _, ref in read]


def json_image_ref(ref: Any, param: str) -> tuple[InputImage, dict[str, str]]:
    """One `{image_url}` or `{file_id}`: the size of a data URL's image (a URL or a file id
    is priced at the model's ceiling), and the reference rebuilt with its one key."""
    if not isinstance(ref, dict) or len(ref) != 1 or not ref.keys() <= {"image_url", "file_id"}:
        raise InvalidRequest(
            f"'{param}' must hold exactly one of image_url or file_id.", param=param
        )
    ((key, value),) = ref.items()
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{param}.{key}' must be a non-empty string.", param=param)
    if key == "file_id" or value.startswith(("https://", "http://")):
        # Tollgate never fetches URLs nor files: their size is unknown.
        return InputImage(), {key: value}
    header = DATA_URL.match(value)
    if header is None:
        raise InvalidRequest(
            f"'{param}.image_url' must be an http(s) URL or a base64 data URL of a PNG, JPEG "
            "or WebP image.",
            param=param,
        )
    try:
        # Strict: a decoder that skipped what Python's lenient one drops would see other bytes.
        data = binascii.a2b_base64(value[header.end() :], strict_mode=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{param}.image_url' is not valid base64.", param=param) from None
    fmt, image = measure_image(data, param)
    if fmt != header[1].replace("jpg", "jpeg"):
        raise InvalidRequest(
            f"'{param}.image_url' says image/{header[1]} but holds a {fmt.upper()} image.",
            param=param,
        )
    return image, {key: value}


def multipart_images(
    endpoint: Endpoint, parts: list[Part]
) -> tuple[tuple[Upload, ...], tuple[InputImage, ...], InputImage | None, InputImage | None]:
    """The uploads, the input images, the mask and the markup. The markup (an image laid over
    the first one) is not an input image of the request, but it is priced as one: OpenAI
    publishes nothing that says it is free."""
    files = [p for p in parts if p.name in ("image", "image[]")]
    counts = {name: sum(p.name == name for p in parts) for name in IMAGE_FIELDS}
    if counts["image"] > 1:
        raise InvalidRequest(
            "Duplicate parameter: 'image'. To send several images, use the array syntax "
            "'image[]=<value>'.",
            param="image",
        )
    for name in ("mask", "markup"):
        if counts[name] > 1:
            raise InvalidRequest(f"Duplicate parameter: '{name}'.", param=name)
    if not files:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image")
    if endpoint == "variations" and (len(files) > 1 or counts["mask"] or counts["markup"]):
        raise InvalidRequest("Variations take exactly one image.", param="image")
    if len(files) > MAX_IMAGES:
        raise InvalidRequest(f"Too many images: at most {MAX_IMAGES}.", param="image")
    uploads: list[Upload] = []
    images: list[InputImage] = []
    mask = markup = None
    for part in parts:
        if part.name not in IMAGE_FIELDS:
            continue
        fmt, image = measure_image(part.data, part.name)
        uploads.append(Upload(part.name, part.data, fmt))
        if part.name == "mask":
            mask = image
        elif part.name == "markup":
            markup = image
        else:
            images.append(image)
    return tuple(uploads), tuple(images), mask, markup
