"""Uploaded images: one well-formed PNG, JPEG or WebP of one size, or refused."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from proxy.core.dimensions import (
    MAX_JPEG_FILL,
    MAX_JPEG_MARKERS,
    MAX_PNG_CHUNKS,
    MAX_PNG_CHUNKS_BEFORE_IDAT,
    MAX_WEBP_CHUNKS,
    measure_image,
)
from proxy.core.errors import InvalidRequest
from proxy.core.models import InputImage


def encoded(width: int, height: int, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 40).convert("RGB").save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ihdr(width: int, height: int) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00")


def refused(data: bytes) -> str:
    with pytest.raises(InvalidRequest) as caught:
        measure_image(data, "image")
    assert caught.value.param == "image"
    return caught.value.message


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("JPEG", {"progressive": True, "optimize": True, "restart_marker_blocks": 1}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_real_images_are_measured(fmt: str, options: dict[str, object]) -> None:
    data = encoded(300, 170, fmt, **options)
    assert measure_image(data, "image") == (fmt.lower(), InputImage(300, 170))
    assert measure_image(memoryview(data), "image") == (fmt.lower(), InputImage(300, 170))


def test_a_jpeg_with_exif_and_a_thumbnail_of_another_size_is_measured() -> None:
    image = Image.effect_noise((640, 480), 40).convert("RGB")
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: the token count of a rotated size is the same
    thumbnail = encoded(160, 120, "JPEG")
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    data = out.getvalue()
    # An APP1 segment holding a whole JPEG of another size, as cameras write.
    app = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 8) + b"Exif\x00\x00" + thumbnail
    data = data[:2] + app + data[2:]
    assert measure_image(data, "image") == ("jpeg", InputImage(640, 480))


def test_a_png_with_a_second_ihdr_is_refused() -> None:
    data = encoded(1, 1, "PNG")
    assert "second IHDR" in refused(data[:33] + ihdr(2048, 16) + data[33:])


def test_a_png_whose_ihdr_is_not_first_is_refused() -> None:
    data = encoded(4, 4, "PNG")
    text = png_chunk(b"tEXt", b"k\x00v")
    assert "IHDR" in refused(data[:8] + text + data[8:])


@pytest.mark.parametrize("cut", [40, -12, -1])
def test_a_truncated_png_is_refused(cut: int) -> None:
    refused(encoded(16, 16, "PNG")[:cut])


def test_bytes_after_the_end_price_an_image_at_the_ceiling() -> None:
    data = encoded(16, 16, "PNG") + encoded(2048, 2048, "PNG")
    assert measure_image(data, "image") == ("png", InputImage())
    jpeg = encoded(16, 16, "JPEG") + encoded(64, 64, "JPEG")
    assert measure_image(jpeg, "image") == ("jpeg", InputImage())


def sof_offset(data: bytes) -> int:
    return data.index(b"\xff\xc0")


def frame_header(data: bytes, height: int, width: int) -> bytes:
    """A copy of `data`'s frame header (SOF0 segment) declaring another size."""
    at = sof_offset(data)
    length = struct.unpack_from(">H", data, at + 2)[0]
    sof = bytearray(data[at : at + 2 + length])
    struct.pack_into(">HH", sof, 5, height, width)
    return bytes(sof)


def test_a_jpeg_with_two_frame_headers_of_different_sizes_is_refused() -> None:
    data = encoded(32, 32, "JPEG")
    at = sof_offset(data)
    assert "different sizes" in refused(data[:at] + frame_header(data, 2048, 2048) + data[at:])


def test_a_second_frame_header_after_the_scan_is_refused() -> None:
    data = encoded(32, 32, "JPEG")
    # Before EOI, past the entropy-coded data a header reader never walks.
    assert "different sizes" in refused(data[:-2] + frame_header(data, 16, 4096) + data[-2:])


def test_a_jpeg_with_bytes_between_segments_is_refused() -> None:
    data = encoded(32, 32, "JPEG")
    assert "outside its segments" in refused(data[:2] + b"junk" + data[2:])


def test_a_jpeg_whose_height_comes_later_is_refused() -> None:
    data = encoded(32, 32, "JPEG")
    at = sof_offset(data)
    zeroed = bytearray(data)
    struct.pack_into(">H", zeroed, at + 5, 0)
    refused(bytes(zeroed))


def test_a_webp_whose_canvas_is_not_its_bitstream_is_refused() -> None:
    data = encoded(64, 48, "WEBP")
    payload = data[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    vp8x += (2047).to_bytes(3, "little") + (2047).to_bytes(3, "little")
    body = b"WEBP" + vp8x + payload
    assert "different sizes" in refused(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_a_webp_with_a_wrong_riff_size_is_refused() -> None:
    data = bytearray(encoded(64, 48, "WEBP"))
    struct.pack_into("<I", data, 4, len(data) * 2)
    refused(bytes(data))


def test_a_webp_with_two_bitstreams_is_refused() -> None:
    small, large = encoded(16, 16, "WEBP"), encoded(512, 512, "WEBP")
    body = b"WEBP" + small[12:] + large[12:]
    assert "exactly one" in refused(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize(
    "data", [b"", b"hello", b"GIF89a" + b"\x00" * 40, b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]
)
def test_what_is_not_an_image_is_refused(data: bytes) -> None:
    refused(data)


# Floods of empty chunks, segments or fill bytes: each once cost both walkers a few µs of the
# event loop, 2-5 s for 8 MiB, 16 times that for a body at the edits limit.
TEXT = png_chunk(b"tEXt", b"")


def png_with(before_idat: int, after_idat: int) -> bytes:
    data = encoded(8, 8, "PNG")
    iend = data.rindex(b"IEND") - 4
    return data[:33] + TEXT * before_idat + data[33:iend] + TEXT * after_idat + data[iend:]


def jpeg_with(comments: int = 0, fill: int = 0) -> bytes:
    data = encoded(8, 8, "JPEG")
    return data[:2] + b"\xff\xfe\x00\x02" * comments + b"\xff" * fill + data[2:]


def webp_with(chunks: int) -> bytes:
    body = encoded(8, 8, "WEBP")[12:] + (b"XTRA" + struct.pack("<I", 0)) * chunks
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


@pytest.mark.parametrize(
    "data",
    [
        png_with(before_idat=MAX_PNG_CHUNKS_BEFORE_IDAT, after_idat=0),
        png_with(before_idat=0, after_idat=MAX_PNG_CHUNKS),
        jpeg_with(comments=MAX_JPEG_MARKERS),
        jpeg_with(fill=MAX_JPEG_FILL + 1),
        webp_with(MAX_WEBP_CHUNKS),
    ],
    ids=["png-before-idat", "png-after-idat", "jpeg-segments", "jpeg-fill", "webp-chunks"],
)
def test_a_flood_of_empty_chunks_or_segments_is_refused(data: bytes) -> None:
    assert "more" in refused(data)


@pytest.mark.parametrize(
    "data",
    [
        png_with(before_idat=MAX_PNG_CHUNKS_BEFORE_IDAT - 2, after_idat=5_000),
        jpeg_with(comments=100, fill=MAX_JPEG_FILL - 1),
        webp_with(MAX_WEBP_CHUNKS - 10),
    ],
    ids=["png", "jpeg", "webp"],
)
def test_chunks_and_segments_within_the_bounds_are_measured(data: bytes) -> None:
    assert measure_image(data, "image")[1] == InputImage(8, 8)
