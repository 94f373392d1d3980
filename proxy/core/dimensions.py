"""The pixel size of an uploaded image, read so that no decoder can see another (pure).

A header reader and a decoder may disagree about a file that says two things: a
PNG with two IHDR chunks, a JPEG whose frame headers differ, a WebP whose VP8X
canvas is not its bitstream's size. Tollgate prices input images by their size,
so such a file is refused: the whole structure is walked (chunks, segments and
scans; C-speed searches over the entropy-coded data), every size it declares
must agree, and Pillow, reading the same header independently, must agree too.

Bytes after the image's end (a phone's second MPO picture, say) leave its size
open: the image is then priced at the model's ceiling, as a URL is.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass

from PIL import Image

from proxy.core.errors import InvalidRequest
from proxy.core.models import InputImage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# Frame headers: SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 JPG, CC DAC).
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_SOS, JPEG_EOI, JPEG_DNL, JPEG_DHP = 0xDA, 0xD9, 0xDC, 0xDE
# Inside entropy-coded data, 0xFF is followed by a stuffed 0x00 or a restart marker.
JPEG_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Each chunk or segment costs both walkers (this one and Pillow's, up to the image data)
# a few µs of the event loop: 8 MiB of empty chunks or segments took 2-5 s, and a body at
# the edits limit 16 times that. Real files hold far fewer: libpng writes 8 KiB image data
# chunks (6,400 for OpenAI's 50 MB limit), and a JPEG a few dozen segments.
MAX_PNG_CHUNKS = 100_000
MAX_PNG_CHUNKS_BEFORE_IDAT = 1_000
MAX_JPEG_MARKERS = 10_000
MAX_JPEG_FILL = 1_024
MAX_WEBP_CHUNKS = 1_000
"""Fill bytes (0xFF) before one marker: each is a step of both walkers."""
JPEG_FILL = re.compile(rb"\xff*")

Bytes = bytes | memoryview


class _Ambiguous(Exception):
    """The file is not one well-formed image of one size; the message says why."""


@dataclass(frozen=True, slots=True)
class Measured:
    """What the structure says: format, size, where the header ends, and whether bytes follow."""

    format: str
    width: int
    height: int
    header_end: int
    trailing: bool = False


def measure_image(data: Bytes, field: str) -> tuple[str, InputImage]:
    """The format and pixel size of an uploaded image; InvalidRequest when it is not one
    well-formed PNG, JPEG or WebP image of one size."""
    try:
        measured = _measure(data)
        if measured.width <= 0 or measured.height <= 0:
            raise _Ambiguous("it declares an empty size")
        if measured.width * measured.height > MAX_PIXELS:
            raise _Ambiguous(f"{measured.width}x{measured.height} is too many pixels")
        if _pillow_size(data, measured) != (measured.width, measured.height):
            raise _Ambiguous("its headers do not agree on its size")
    except _Ambiguous as exc:
        raise InvalidRequest(
            f"Invalid image file for '{field}': {exc}. Send one PNG, JPEG or WebP image.",
            param=field,
        ) from None
    if measured.trailing:
        return measured.format, InputImage()
    return measured.format, InputImage(measured.width, measured.height)


def _measure(data: Bytes) -> Measured:
    head = bytes(data[:12])
    if head.startswith(PNG_SIGNATURE):
        return _png(data)
    if head.startswith(JPEG_SOI):
        return _jpeg(data)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(data)
    raise _Ambiguous("it is not a PNG, JPEG or WebP image")


def _png(data: Bytes) -> Measured:
    """IHDR first and only once; every chunk inside the file; IDAT before IEND."""
    end = len(data)
    if end < 33:
        raise _Ambiguous("the PNG is truncated")
    length, kind, width, height = struct.unpack_from(">I4sII", data, 8)
    if kind != b"IHDR" or length != 13:
        raise _Ambiguous("the PNG does not start with its IHDR chunk")
    pos, first_idat, chunks = 33, 0, 0
    while True:
        chunks += 1
        if chunks > (MAX_PNG_CHUNKS if first_idat else MAX_PNG_CHUNKS_BEFORE_IDAT):
            raise _Ambiguous("the PNG has more chunks than any image needs")
        if pos + 12 > end:
            raise _Ambiguous("the PNG is truncated")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if length > 0x7FFFFFFF or pos + 12 + length > end:
            raise _Ambiguous("a PNG chunk runs past the end of the file")
        if kind == b"IHDR":
            raise _Ambiguous("the PNG has a second IHDR chunk")
        if kind == b"IDAT" and not first_idat:
            first_idat = pos
        pos += 12 + length
        if kind == b"IEND":
            break
    if not first_idat:
        raise _Ambiguous("the PNG has no image data")
    return Measured("png", width, height, first_idat + 8, trailing=pos != end)


def _jpeg(data: Bytes) -> Measured:
    """Every segment walked from SOI to EOI, scans skipped by searching for their end; every
    frame header must give the same size (a progressive JPEG has one SOF2 and many scans)."""
    end, pos = len(data), 2
    size: tuple[int, int] | None = None
    header_end = markers = 0
    while True:
        if pos >= end or data[pos] != 0xFF:
            raise _Ambiguous("the JPEG has bytes outside its segments")
        markers += 1
        fill = JPEG_FILL.match(data, pos)
        assert fill is not None  # `\xff*` matches anywhere
        if markers > MAX_JPEG_MARKERS or fill.end() - pos > MAX_JPEG_FILL:
            raise _Ambiguous("the JPEG has more markers or fill bytes than any image needs")
        pos = fill.end()
        if pos >= end:
            raise _Ambiguous("the JPEG is truncated")
        marker = data[pos]
        pos += 1
        if marker == JPEG_EOI:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            continue
        if marker in (0x00, 0xD8, JPEG_DNL, JPEG_DHP):
            raise _Ambiguous(f"the JPEG has an unexpected marker 0xFF{marker:02X}")
        if pos + 2 > end:
            raise _Ambiguous("the JPEG is truncated")
        length = data[pos] << 8 | data[pos + 1]
        if length < 2 or pos + length > end:
            raise _Ambiguous("a JPEG segment runs past the end of the file")
        if marker in JPEG_SOF:
            if length < 8:
                raise _Ambiguous("a JPEG frame header is too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            if size is not None and size != (width, height):
                raise _Ambiguous("the JPEG's frame headers declare different sizes")
            size = (width, height)
        pos += length
        if marker == JPEG_SOS:
            if size is None:
                raise _Ambiguous("the JPEG has a scan before its frame header")
            header_end = header_end or pos
            found = JPEG_MARKER_AFTER_SCAN.search(data, pos)
            if found is None:
                raise _Ambiguous("the JPEG is truncated")
            pos = found.start()
    if size is None or not header_end:
        raise _Ambiguous("the JPEG has no frame")
    return Measured("jpeg", *size, header_end, trailing=pos != end)


def _webp(data: Bytes) -> Measured:
    """The RIFF size covers the chunks; one VP8 or VP8L bitstream, whose size is the VP8X
    canvas when there is one; no animation."""
    (riff,) = struct.unpack_from("<I", data, 4)
    end = riff + 8
    if riff % 2 or end > len(data) or end < 20:
        raise _Ambiguous("the WebP's RIFF size does not match the file")
    pos = 12
    canvas: tuple[int, int] | None = None
    sizes: list[tuple[int, int]] = []
    for _ in range(MAX_WEBP_CHUNKS + 1):
        if pos >= end:
            break
        if pos + 8 > end:
            raise _Ambiguous("the WebP is truncated")
        kind = bytes(data[pos : pos + 4])
        (length,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if body + length > end:
            raise _Ambiguous("a WebP chunk runs past its RIFF size")
        if kind == b"VP8X":
            if pos != 12 or length < 10:
                raise _Ambiguous("the WebP's VP8X chunk is misplaced")
            w, h = (int.from_bytes(data[body + i : body + i + 3], "little") + 1 for i in (4, 7))
            canvas = (w, h)
        elif kind in (b"ANIM", b"ANMF"):
            raise _Ambiguous("animated WebP images are not accepted")
        elif kind == b"VP8 ":
            sizes.append(_vp8(data, body, length))
        elif kind == b"VP8L":
            sizes.append(_vp8l(data, body, length))
        pos = body + length + (length & 1)
    else:
        raise _Ambiguous("the WebP has more chunks than any image needs")
    if len(sizes) != 1:
        raise _Ambiguous("the WebP must hold exactly one image bitstream")
    if canvas is not None and canvas != sizes[0]:
        raise _Ambiguous("the WebP's canvas and bitstream declare different sizes")
    return Measured("webp", *sizes[0], end, trailing=end != len(data))


def _vp8(data: Bytes, body: int, length: int) -> tuple[int, int]:
    if length < 10 or data[body] & 1 or bytes(data[body + 3 : body + 6]) != b"\x9d\x01\x2a":
        raise _Ambiguous("the WebP's VP8 bitstream is not a key frame")
    width, height = struct.unpack_from("<HH", data, body + 6)
    return width & 0x3FFF, height & 0x3FFF


def _vp8l(data: Bytes, body: int, length: int) -> tuple[int, int]:
    if length < 5 or data[body] != 0x2F:
        raise _Ambiguous("the WebP's VP8L bitstream has no signature")
    (bits,) = struct.unpack_from("<I", data, body + 1)
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _pillow_size(data: Bytes, measured: Measured) -> tuple[int, int] | None:
    """The size Pillow reads, from the header alone where its reader stops there (PNG at
    the first IDAT, JPEG at the first scan): a second, independent reader. Sizes past
    MAX_PIXELS were refused before, so Pillow's bomb warning means it read another size."""
    # Pillow opens WebP with libwebp (the whole file) and follows a JPEG's MPO offsets.
    whole = measured.format == "webp" or measured.trailing
    head = data if whole else data[: measured.header_end]
    try:
        with Image.open(io.BytesIO(head), formats=(measured.format.upper(),)) as image:
            width, height = image.size
            return width, height
    except (
        OSError,
        ValueError,
        SyntaxError,
        struct.error,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ):
        return None
