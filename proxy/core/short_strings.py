"""JSON bytes with their long strings emptied, chunk by chunk (pure).

An image answer's JSON is megabytes of base64 in a few strings, and its usage a few short
numbers: `ShortStrings` passes a JSON byte stream on with the contents of every string
longer than `SHORT_STRING` bytes dropped, so a parser never tokenizes an image.

It also stands guard for ijson, whose C backend crashes the process on an integer of some
4,300 digits: a run of number characters longer than `LONG_NUMBER` makes the answer
malformed (MalformedAnswer), and it never reaches the parser.
"""

from __future__ import annotations

import re
from typing import NoReturn

from proxy.core.errors import MalformedAnswer

SHORT_STRING = 1024
"""Longer JSON strings (images, revised prompts) reach the parser empty: never metered."""

LONG_NUMBER = 100
"""Longer runs of number characters outside strings make an answer malformed: ijson's C
backend crashes the process on an integer of some 4,300 digits (token counts are short)."""

_NUMBER_CHARS = b"-+.eE0123456789"
BACKSLASH = ord("\\")
_NUMBER_RUN = re.compile(rb"[-+.eE0-9]*")
_LONG_NUMBER_RUN = re.compile(rb"[-+.eE0-9]{%d,}" % (LONG_NUMBER + 1))


class ShortStrings:
    """A JSON byte stream with the contents of every long string dropped, chunk by chunk.

    Outside strings bytes pass as they are; a string's contents are held until its closing
    quote and passed only if short. Escapes are kept whole, so the output is valid JSON
    exactly when the input is (a truncated input stays truncated).

    A run of number characters (`-+.eE0-9`) outside strings longer than `LONG_NUMBER`, in
    one chunk or across several, raises MalformedAnswer, and so does every later chunk:
    none of it is passed. Only the bytes between strings are searched, so long strings
    are still skipped with `bytes.find` alone.
    """

    def __init__(self, short: int = SHORT_STRING) -> None:
        self._short = short
        """The longest string whose contents are kept."""
        self._inside = False
        self._escape = False  # the last chunk ended on a backslash inside a string
        self._held = bytearray()
        self._long = False
        self._run = 0  # number characters ending the bytes passed (0 inside a string)
        self._refused = False

    def filter(self, chunk: bytes, start: int = 0) -> bytes:
        """`chunk[start:]`, the next bytes of the stream, with what it holds of long strings
        dropped. From a `start` in a chunk that begins a stream without an escape (an
        event's data after its `data: `), the bytes before it are stepped over, not sliced
        off: a completed image's first chunk is not copied for them."""
        if start:
            if self._run or self._escape or self._inside or chunk.find(b"\\", start) >= 0:
                return self.filter(chunk[start:])
            if self._refused:
                self._refuse()
            return self._jump(chunk, start)
        if self._refused:
            self._refuse()
        if self._run:  # the bytes so far end in a number: does the chunk go on with it?
            match = _NUMBER_RUN.match(chunk)
            lead = match.end() if match else 0
            if self._run + lead > LONG_NUMBER:
                self._refuse()
            if lead == len(chunk):
                self._run += lead
                return chunk
            self._run = 0  # the number ends in this chunk; what follows starts afresh
        if self._inside and not self._escape:
            # The chunk goes on with a string: it is that string's up to its first quote,
            # and a chunk of base64 without one is searched for nothing else.
            close = chunk.find(b'"')
            if close < 0:
                return self._within(chunk)
            return self._step(chunk) if b"\\" in chunk else self._jump(chunk, close=close)
        if self._escape or b"\\" in chunk:
            return self._step(chunk)
        return self._jump(chunk)

    def _between(self, chunk: bytes, start: int, stop: int) -> None:
        """Refuse a number too long in `chunk[start:stop]`, bytes between strings."""
        if stop - start > LONG_NUMBER and _LONG_NUMBER_RUN.search(chunk, start, stop):
            self._refuse()

    def _tail(self, chunk: bytes, start: int) -> None:
        """`_between` for `chunk[start:]`, outside strings to the chunk's end; then
        remember the number characters it ends with, for the next chunk."""
        end = len(chunk)
        self._between(chunk, start, end)
        if end > start and chunk[-1] in _NUMBER_CHARS:
            self._run = end - start - len(chunk[start:].rstrip(_NUMBER_CHARS))
        else:
            self._run = 0

    def _refuse(self) -> NoReturn:
        self._refused = True
        raise MalformedAnswer(f"upstream answer has a number over {LONG_NUMBER} characters")

    def _jump(self, chunk: bytes, start: int = 0, close: int | None = None) -> bytes:
        """`filter` for a chunk without escapes (from `start`), where every quote opens or
        closes a string: from quote to quote with `bytes.find`, cutting out only the long
        strings. `close`: the first quote from `start`, when it was already found."""
        find = chunk.find
        out: list[bytes] = []
        kept = search = start  # kept: start of the bytes passed as they are
        if self._inside:  # the chunk goes on with a string from earlier chunks
            if close is None:
                close = find(b'"', start)
            if close < 0:
                self._keep(chunk, start, len(chunk))
                return b""
            self._keep(chunk, start, close)
            if not self._long:
                out.append(bytes(self._held))
            self._inside = False
            self._held.clear()
            kept, search = close, close + 1
        while (opening := find(b'"', search)) >= 0:
            if opening - search > LONG_NUMBER:
                self._between(chunk, search, opening)
            closing = find(b'"', opening + 1)
            if closing < 0:  # the string goes on into the next chunk
                out.append(chunk[kept : opening + 1])
                self._inside, self._long = True, False
                self._held.clear()
                self._keep(chunk, opening + 1, len(chunk))
                return b"".join(out)
            if closing - opening - 1 > self._short:
                out.append(chunk[kept : opening + 1])
                kept = closing
            search = closing + 1
        self._tail(chunk, search)
        out.append(chunk[kept:])
        return b"".join(out)

    def _within(self, chunk: bytes) -> bytes:
        """`filter` for a chunk inside a string, without a quote and not opened by an escaped
        byte: all of it is the string's. Its backslashes escape bytes within it, but for an
        odd run at its end, whose last escapes the next chunk's first byte."""
        run, end = 0, len(chunk)
        while run < end and chunk[end - 1 - run] == BACKSLASH:
            run += 1
        self._escape = run % 2 == 1
        self._keep(chunk, 0, end)
        return b""

    def _step(self, chunk: bytes) -> bytes:
        """`filter` for any chunk: string by string, escape by escape."""
        out = bytearray()
        i, end = 0, len(chunk)
        while i < end:
            if not self._inside:
                quote = chunk.find(b'"', i)
                if quote < 0:
                    self._tail(chunk, i)
                    out += chunk[i:]
                    break
                self._between(chunk, i, quote)
                out += chunk[i : quote + 1]
                self._inside, self._long = True, False
                self._held.clear()
                i = quote + 1
                continue
            start = i
            if self._escape:  # the escaped byte opens this chunk
                self._escape = False
                i += 1
            # Two memchr scans: the next quote, then a backslash before it.
            quote = chunk.find(b'"', i)
            stop = quote if quote >= 0 else end
            backslash = chunk.find(b"\\", i, stop)
            if backslash >= 0:
                stop = backslash
                if stop + 1 < end:
                    i = stop + 2
                else:
                    self._escape, i = True, end
                self._keep(chunk, start, i)
                continue
            if not self._long:
                self._keep(chunk, start, stop)
            if quote < 0:
                break
            if not self._long:
                out += self._held
            out += b'"'
            self._inside = False
            self._held.clear()
            i = stop + 1
        return bytes(out)

    def _keep(self, chunk: bytes, start: int, stop: int) -> None:
        """Hold `chunk[start:stop]` as string contents (not copied once the string is long)."""
        if self._long:
            return
        if len(self._held) + stop - start > self._short:
            self._long = True
            self._held.clear()
        else:
            self._held += chunk[start:stop]
