"""Multipart/form-data bodies read into parts and written afresh (pure).

Reading refuses what two parsers could read differently: a part's headers must be
plain (a form-data disposition with an ASCII name, a content type in UTF-8 if any, no
transfer encoding) and none may repeat; the body must end with its closing boundary.
Writing uses plain ASCII names, a fresh boundary and no charset or transfer-encoding
parameters.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from proxy.core.dimensions import Bytes
from proxy.core.errors import InvalidRequest

UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_PARTS = 64
"""More parts than any request of the Images API holds (16 images, a mask, a markup and
its parameters). Each part costs the parser ~17 µs of the event loop: 8 MiB of empty parts
took 2.8 s, a body at the edits limit (128 MiB) would take 45."""
DISPOSITION = re.compile(
    r"[ \t]*form-data"
    r"((?:[ \t]*;[ \t]*[A-Za-z]+=(?:\"[^\"\\\r\n]*\"|[A-Za-z0-9!#$%&'+.^_`|~\[\]-]+))*)"
    r"[ \t]*;?[ \t]*",
    re.IGNORECASE,
)
DISPOSITION_PARAM = re.compile(r";[ \t]*([A-Za-z]+)=(\"[^\"\\\r\n]*\"|[^; \t]+)")

Scalar = str | int | bool


@dataclass(frozen=True, slots=True)
class Part:
    """One multipart part: its name and its bytes (a view of the body). Its headers are
    checked, not kept: an upload goes out named for the format its bytes were measured as."""

    name: str
    data: Bytes


@dataclass(frozen=True, slots=True)
class Upload:
    """An uploaded image as it will be forwarded: field, bytes, and the format they are."""

    name: str
    data: Bytes
    format: str


def parse_multipart(body: bytes, boundary: bytes) -> list[Part]:
    """Split a multipart/form-data body into parts (python-multipart's streaming parser).

    A part's data is a view of `body` where it is one run of it (the usual case), so the
    only copy of an image is the one `encode_multipart` makes."""
    collected = _Collector(body)
    try:
        # Built in the `try`: it refuses a boundary past 256 bytes (RFC 2046 allows 70).
        parser = MultipartParser(
            boundary,
            {
                "on_header_field": collected.on_header_field,
                "on_header_value": collected.on_header_value,
                "on_header_end": collected.on_header_end,
                "on_part_data": collected.on_part_data,
                "on_part_end": collected.on_part_end,
            },
        )
        parser.write(body)
        parser.finalize()
    except InvalidRequest:
        raise
    except Exception as exc:  # python-multipart raises several types for broken bodies
        raise InvalidRequest(f"Malformed multipart body: {exc}") from exc
    if parser.state != MultipartState.END:
        # `finalize` does not check this: a body cut short would lose its last part (an
        # image, or a `quality` whose absence is `auto`) and be forwarded without it.
        raise InvalidRequest("Malformed multipart body: it ends before its closing boundary.")
    if not collected.parts:
        raise InvalidRequest("Malformed multipart body: no parts.")
    return collected.parts


class _Collector:
    """The parser's callbacks: each part's headers, and its data as spans of the body (or a
    copy, once the parser hands over bytes that are not the body's own)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.view = memoryview(body)
        self.parts: list[Part] = []
        self.headers: dict[str, str] = {}
        self.field, self.value = bytearray(), bytearray()
        self.spans: list[tuple[int, int]] = []
        self.copied = bytearray()

    def on_header_field(self, buf: bytes, start: int, end: int) -> None:
        self.field.extend(buf[start:end])

    def on_header_value(self, buf: bytes, start: int, end: int) -> None:
        self.value.extend(buf[start:end])

    def on_header_end(self) -> None:
        name = self.field.decode("latin-1").lower()
        if name in self.headers:
            raise InvalidRequest(f"A multipart part has two {name} headers.")
        self.headers[name] = self.value.decode("latin-1")
        self.field.clear()
        self.value.clear()

    def on_part_data(self, buf: bytes, start: int, end: int) -> None:
        spans = self.spans
        if buf is self.body and not self.copied:
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
            return
        for first, last in spans:
            self.copied.extend(self.view[first:last])
        spans.clear()
        self.copied.extend(buf[start:end])

    def on_part_end(self) -> None:
        if len(self.parts) == MAX_PARTS:
            raise InvalidRequest(
                f"The multipart body has more than {MAX_PARTS} parts: an image request holds "
                "at most 16 images, a mask, a markup and its parameters."
            )
        data: Bytes
        if self.copied:
            data = bytes(self.copied)
        elif len(self.spans) == 1:
            data = self.view[self.spans[0][0] : self.spans[0][1]]
        else:
            data = b"".join(self.view[a:b] for a, b in self.spans)
        self.parts.append(_part(self.headers, data))
        self.headers.clear()
        self.spans.clear()
        self.copied.clear()


def encode_multipart(
    fields: Mapping[str, Scalar], uploads: tuple[Upload, ...]
) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type: scalars first, then the images,
    each with a filename and content type that say what its bytes are."""
    boundary = "tollgate-" + secrets.token_hex(16)
    chunks: list[bytes | memoryview] = []
    for name, value in fields.items():
        text = form_text(value)
        chunks += [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode(),
            text.encode(),
            b"\r\n",
        ]
    for upload in uploads:
        stem = upload.name.removesuffix("[]")
        chunks += [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{upload.name}"; '
            f'filename="{stem}.{upload.format}"\r\nContent-Type: {MIME_TYPES[upload.format]}'
            "\r\n\r\n".encode(),
            upload.data,
            b"\r\n",
        ]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def form_text(value: Scalar) -> str:
    """A parameter as a form field (and for policy checks): JSON's spelling of true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _part(headers: Mapping[str, str], data: Bytes) -> Part:
    """A part from its headers, refused unless they are plain: a form-data disposition with
    an ASCII name, a content type in UTF-8 if any, no transfer encoding."""
    for header in headers:
        if header not in ("content-disposition", "content-type", "content-transfer-encoding"):
            raise InvalidRequest(f"A multipart part has an unsupported {header!r} header.")
    encoding = headers.get("content-transfer-encoding", "binary").strip().lower()
    if encoding not in ("binary", "8bit", "7bit"):
        raise InvalidRequest(f"A multipart part has the transfer encoding {encoding!r}.")
    disposition = DISPOSITION.fullmatch(headers.get("content-disposition", ""))
    if disposition is None:
        raise InvalidRequest("A multipart part has a malformed Content-Disposition header.")
    params: dict[str, str] = {}
    for key, raw in DISPOSITION_PARAM.findall(disposition[1]):
        key = key.lower()
        if key not in ("name", "filename") or key in params:
            raise InvalidRequest(
                f"A multipart part's Content-Disposition has {key!r} twice or unknown."
            )
        params[key] = raw[1:-1] if raw.startswith('"') else raw
    name = params.get("name")
    if not name:
        raise InvalidRequest("A multipart part has no name.")
    if not name.isascii() or not name.isprintable():
        raise InvalidRequest("A multipart part's name is not plain ASCII.")
    content_type = headers.get("content-type")
    if content_type is not None:
        check_charset(parse_options_header(content_type)[1], f"part '{name}'")
    return Part(name, data)


def check_charset(options: Mapping[bytes, bytes], what: str) -> None:
    charset = options.get(b"charset")
    if charset is not None and charset.decode("latin-1").strip().lower() not in UTF8_CHARSETS:
        raise InvalidRequest(
            f"Unsupported charset {charset.decode('latin-1')!r} for {what}: send UTF-8."
        )
