"""Making the images the simulator returns: small, honest, decodable (pure, cached).

Encoding a 3840x2160 PNG costs far more than answering a request; a benchmark asks for
the same few shapes thousands of times, so encoded bytes are kept in an LRU cache.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import lru_cache

from PIL import Image

PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
# Ancillary, private, safe-to-copy: every PNG reader skips it.
PNG_PAD_CHUNK = b"tgPd"
PNG_CHUNK_OVERHEAD = 12
JPEG_SOI = b"\xff\xd8"
JPEG_COM = b"\xff\xfe"
JPEG_COM_MAX_DATA = 65_533
JPEG_SEGMENT_OVERHEAD = 4
CACHE_SIZE = 64
FILL = (64, 128, 192)


def _draw(width: int, height: int, transparent: bool) -> Image.Image:
    """A horizontal gradient over a solid colour (half-transparent when asked)."""
    gradient = Image.linear_gradient("L").rotate(90).resize((width, height))
    red, green, _ = (Image.new("L", (width, height), value) for value in FILL)
    bands = [red, green, gradient]
    if transparent:
        bands.append(Image.new("L", (width, height), 128))
        return Image.merge("RGBA", bands)
    return Image.merge("RGB", bands)


def _encode(width: int, height: int, fmt: str, compression: int | None, transparent: bool) -> bytes:
    image = _draw(width, height, transparent and fmt != "jpeg")
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, "PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(out, "JPEG", quality=max(1, compression if compression is not None else 90))
    else:
        quality = compression if compression is not None else 90
        image.save(out, "WEBP", quality=quality, method=0)
    return out.getvalue()


def pad_png(data: bytes, target: int) -> bytes:
    """`data` with a private chunk before IEND so it is about `target` bytes long."""
    room = target - len(data) - PNG_CHUNK_OVERHEAD
    if room <= 0 or not data.endswith(PNG_IEND):
        return data
    filler = bytes(room)
    crc = zlib.crc32(PNG_PAD_CHUNK + filler) & 0xFFFFFFFF
    chunk = struct.pack(">I", room) + PNG_PAD_CHUNK + filler + struct.pack(">I", crc)
    return data[: -len(PNG_IEND)] + chunk + PNG_IEND


def pad_jpeg(data: bytes, target: int) -> bytes:
    """`data` with comment segments after SOI so it is about `target` bytes long."""
    room = target - len(data)
    if room <= JPEG_SEGMENT_OVERHEAD or not data.startswith(JPEG_SOI):
        return data
    segments = []
    while room > JPEG_SEGMENT_OVERHEAD:
        size = min(room - JPEG_SEGMENT_OVERHEAD, JPEG_COM_MAX_DATA)
        segments.append(JPEG_COM + struct.pack(">H", size + 2) + b" " * size)
        room -= size + JPEG_SEGMENT_OVERHEAD
    return JPEG_SOI + b"".join(segments) + data[len(JPEG_SOI) :]


@lru_cache(maxsize=CACHE_SIZE)
def encoded_image(
    width: int,
    height: int,
    fmt: str,
    compression: int | None = None,
    padding: int = 0,
    transparent: bool = False,
) -> bytes:
    """The bytes of an image of this size and format, padded to about `padding` bytes.

    `encoded_image(1024, 1024, "png")` is a real 1024x1024 PNG; webp is never padded.
    """
    data = _encode(width, height, fmt, compression, transparent)
    if padding and fmt == "png":
        return pad_png(data, padding)
    if padding and fmt == "jpeg":
        return pad_jpeg(data, padding)
    return data


@lru_cache(maxsize=CACHE_SIZE)
def encoded_b64(
    width: int,
    height: int,
    fmt: str,
    compression: int | None = None,
    padding: int = 0,
    transparent: bool = False,
) -> str:
    """`encoded_image` in base64, cached too: benchmarks pay neither Pillow nor base64."""
    data = encoded_image(width, height, fmt, compression, padding, transparent)
    return base64.b64encode(data).decode("ascii")
