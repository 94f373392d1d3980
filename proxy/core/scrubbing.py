"""Taking the upstream key out of everything the upstream answers (pure).

An upstream, or a debugging proxy in front of it, may echo the `Authorization`
header Tollgate sent: the company key would then reach a team in a header, a body
or a stream event. `Scrubber.of_key(key)` finds the key in every form an echo is
likely to use and overwrites each occurrence with a mask of the same length:

    the key itself                  sk-proj-abc...      (also as it appears in JSON and
                                                          URLs, for keys made of the usual
                                                          [A-Za-z0-9_-])
    the key JSON- or URL-escaped    only when that differs from the key itself
    the key in standard base64      at each of the three alignments, so base64 of
                                    `Bearer <key>`, of `<key>` alone and of a Basic
                                    `user:<key>` are all caught, whatever precedes it
                                    (for a key of [A-Za-z0-9_-], as OpenAI's are, this is
                                    also its url-safe base64: no `+` or `/` in it)
    the key in UTF-16 and UTF-32    either byte order: a JSON reader takes a body in them
                                    (Python's `json.loads` of bytes, so the SDK's
                                    `response.json()`, tells them by the NULs it starts with)

    the key with JSON `\\uXXXX`     any of its characters written as an escape (every JSON
    escapes                         reader decodes them): the whole run of key characters
                                    and escapes that decodes to hold it is masked

    a masked echo of the key        OpenAI's own way of quoting a key it refuses,
                                    `sk-pro***kb0A`: a run of `*`s with the key's first
                                    `FRAGMENT` characters in the key characters before
                                    it, or its last in those after it (`Fragments`); the
                                    whole echo is masked

Not covered: url-safe base64 of a key with other characters, hex, other encodings,
JSON escapes in a UTF-16 or UTF-32 body, and pieces of the key not next to a run of
`*`s (or shorter than `FRAGMENT`). In base64 the character at
each end of the encoded key that also carries bits of its neighbours is left as it
is (at most four bits of the key's first and of its last byte).

The mask keeps the length: JSON stays valid, the bytes after it keep their
offsets, and any length already computed (a spooled answer's Content-Length)
stays true. It reads `[redacted]` followed by `*`s, so whoever meets one knows
what happened (in a UTF-16 or UTF-32 form, written in that encoding).

Bodies are scrubbed chunk by chunk. Which forms a chunk holds is found by one pass of
Hyperscan (Intel's multi-pattern matcher, SIMD) for all of them at once: a 2 MB answer
searched for the key's six forms in 0.35 ms where a search per form took 0.75 ms. Where
Hyperscan cannot run (no wheel for the platform, a CPU without SSSE3), each form is
looked for in turn with `bytes.find`, and a form without a rare byte to look for first
(every base64 form) with the C library's `memmem` where there is one: in base64 text,
two to three times faster than `bytes.find` for a short needle (`contains`). The forms
found are masked with `bytes.replace`.
`ChunkScrubber` holds back the end of a chunk only while it could be the start of a
key that the next chunk completes: normally nothing is held, and an SSE event
(which ends with a blank line) is never held.
"""

from __future__ import annotations

import base64
import ctypes
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any
from urllib.parse import quote

MARKER = "[redacted]"
MIN_KEY_LENGTH = 8
"""Shorter keys are not scrubbed: they would match ordinary text (and are no real key)."""
# Bytes that are common in image answers (base64 images, JSON punctuation): a needle is
# looked for by `memchr` on its first byte outside this set, when it has one.
_COMMON = frozenset(b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="{}[]:, \n')
# Past this many anchors that are not the needle, one `in` (two-way search) is cheaper.
_ANCHOR_TRIES = 16


def _memmem() -> Callable[[bytes, int, bytes, int], int | None] | None:
    """The C library's `memmem` (None where there is none): CPython's `bytes.find` skips
    little in base64 text for a needle of a few dozen bytes, where glibc's compares two
    bytes at a time (0.27 -> 0.11 ms for 22 bytes in 2 MB)."""
    try:
        found = ctypes.CDLL(None).memmem
    except (OSError, AttributeError, TypeError):
        return None
    found.restype = ctypes.c_void_p
    found.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    return found


_MEMMEM = _memmem()


def _hyperscan() -> Any:
    """The `hyperscan` module, or None where it has no wheel (each form is then searched
    for in turn)."""
    try:
        import hyperscan
    except ImportError:
        return None
    return hyperscan


hyperscan = _hyperscan()


def contains(data: bytes, needle: bytes) -> bool:
    """`needle in data`, with `memmem` when there is one."""
    if _MEMMEM is None or not needle:
        return needle in data
    return _MEMMEM(data, len(data), needle, len(needle)) is not None


def mask(length: int) -> str:
    """`[redacted]***...`, exactly `length` characters (cut short for short keys)."""
    return (MARKER + "*" * max(length - len(MARKER), 0))[:length]


def encodings(key: str) -> list[str]:
    """The forms of `key` an echo may carry, without duplicates (see the module doc)."""
    forms = [key, json.dumps(key)[1:-1], key.replace("/", "\\/"), quote(key, safe="")]
    raw = key.encode()
    for offset in range(3):
        # Encoded after `offset` other bytes, the characters that stand for the key's
        # bits alone start after those that mix in the bytes before it, and end before
        # those that mix in the bytes after it (6 bits a character).
        encoded = base64.b64encode(b"\0" * offset + raw).decode("ascii")
        start = (offset * 8 + 5) // 6
        end = (offset + len(raw)) * 8 // 6
        forms.append(encoded[start:end])
    if key.isascii():
        # In UTF-16 or UTF-32, either byte order, an ASCII key is its characters with one
        # or three NULs between each (and one set more before or after them, by the order:
        # left out, so that one form covers both orders).
        forms += ["\0".join(key), "\0\0\0".join(key)]
    return list(dict.fromkeys(forms))


@dataclass(frozen=True, slots=True)
class Needle:
    """One form of the key, as bytes, with its mask and the byte to look for first."""

    text: str
    data: bytes
    masked: bytes
    anchor: bytes
    """A byte of `data` rarely seen in answers, or b"" when every byte is common."""
    anchor_at: int

    @classmethod
    def of(cls, text: str) -> Needle:
        data = text.encode()
        at = next((i for i, byte in enumerate(data) if byte not in _COMMON), -1)
        anchor = data[at : at + 1] if at >= 0 else b""
        masked = mask(len(data))
        if "\0" in text:
            # A UTF-16 or UTF-32 form, its characters with NULs between: so is its mask,
            # which then reads `[redacted]***` in that encoding too.
            chars = text.replace("\0", "")
            gap = (len(text) - len(chars)) // max(len(chars) - 1, 1)
            masked = ("\0" * gap).join(mask(len(chars)))
        return cls(text, data, masked.encode(), anchor, at)

    def found_in(self, data: bytes) -> bool:
        if not self.anchor:
            return contains(data, self.data)
        at = data.find(self.anchor, self.anchor_at)
        for _ in range(_ANCHOR_TRIES):
            if at < 0:
                return False
            if data.startswith(self.data, at - self.anchor_at):
                return True
            at = data.find(self.anchor, at + 1)
        return contains(data, self.data)

    def started_at_end(self, data: bytes) -> int:
        """How many bytes at the end of `data` could begin this needle (0: none)."""
        start = max(len(data) - len(self.data) + 1, 0)
        if self.anchor and data.find(self.anchor, start + self.anchor_at) < 0:
            # A start longer than `anchor_at` bytes would hold the anchor: only those no
            # longer can be there (a UTF-16 form's NUL, in a UTF-8 answer).
            start = max(len(data) - self.anchor_at, start)
        first, second = self.data[:1], self.data[1:2]
        at = data.find(first, start)
        while at >= 0:
            # The second byte first: no copy of the end for most places that do not begin
            # it (a long form's end, in base64, holds dozens of its first byte).
            if data[at + 1 : at + 2] in (second, b"") and self.data.startswith(data[at:]):
                return len(data) - at
            at = data.find(first, at + 1)
        return 0


class Patterns:
    """Which of some needles occur in bytes, found in one Hyperscan pass for them all.

    `of` gives None where Hyperscan cannot run. A scan needs scratch space that no other
    scan uses at the same time: each takes one from the spares (made when there is none,
    as when two threads scan at once) and puts it back."""

    def __init__(self, database: Any) -> None:
        self._database = database
        self._spares: list[Any] = []

    @classmethod
    def of(cls, needles: Sequence[Needle]) -> Patterns | None:
        if hyperscan is None or not needles:
            return None
        try:
            database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            database.compile(
                expressions=[n.data for n in needles],
                ids=list(range(len(needles))),
                flags=hyperscan.HS_FLAG_SINGLEMATCH,
                literal=True,
            )
        except hyperscan.HyperscanError:  # e.g. a CPU without the instructions it needs
            return None
        return cls(database)

    def found(self, data: bytes) -> set[int]:
        """The indexes of the needles that occur in `data`."""
        try:
            scratch = self._spares.pop()  # atomic: two threads never take the same one
        except IndexError:
            scratch = hyperscan.Scratch(self._database)
        found: set[int] = set()
        try:
            self._database.scan(data, match_event_handler=_found, context=found, scratch=scratch)
        finally:
            self._spares.append(scratch)
        return found


def _found(index: int, start: int, end: int, flags: int, found: set[int]) -> None:
    found.add(index)


class Scrubber:
    """Masks every occurrence of a secret's forms in bytes, text and headers.

    `patterns=False` searches for each form in turn, as where Hyperscan cannot run."""

    def __init__(
        self,
        forms: Iterable[str],
        *,
        patterns: bool = True,
        escaped: str | None = None,
        fragments: str | None = None,
    ) -> None:
        self.needles = tuple(Needle.of(f) for f in forms if f)
        self.form_bytes = frozenset(b"".join(n.data for n in self.needles))
        """Every byte found in some form."""
        self._narrow = tuple(n for n in self.needles if NUL not in n.data)
        self._wide = tuple(n for n in self.needles if NUL in n.data)
        """The UTF-16 and UTF-32 forms: searched only in bytes holding a NUL, as no UTF-8
        answer does (one `memchr`); Hyperscan's literals cannot hold one."""
        self.escapes = Escapes.of(escaped) if escaped else None
        """The key written with JSON escapes (`Escapes`), when it is scrubbed so."""
        self.fragments = Fragments(fragments.encode()) if fragments else None
        """Masked echoes of the key (`Fragments`), when it is scrubbed of them."""
        self._patterns = Patterns.of(self._narrow) if patterns else None

    @classmethod
    def of_key(cls, key: str | None) -> Scrubber:
        """The scrubber of an upstream key (of nothing for a missing or toy key)."""
        if not key or len(key) < MIN_KEY_LENGTH:
            return cls(())
        return cls(encodings(key), escaped=key, fragments=key)

    def __bool__(self) -> bool:
        return bool(self.needles)

    @property
    def searches_at_once(self) -> bool:
        """Whether one Hyperscan pass finds every form (else each is searched for)."""
        return self._patterns is not None

    def data(self, data: bytes) -> bytes:
        """`data` with every form of the secret masked."""
        # Masked echoes first, as the upstream wrote them: the stars of a mask of the whole
        # key must not make an echo of what follows it.
        if self.fragments is not None and STAR in data:
            data = self.fragments.masked(data)
        if self.escapes is not None and BACKSLASH in data:
            data = self.escapes.masked(data)
        if self._patterns is not None:
            found = self._patterns.found(data)
            # In the needles' order, as below: a mask may break another form's occurrence
            # that overlaps it, which is then not found (nor masked) again.
            for index, needle in enumerate(self._narrow):
                if index in found and needle.data in data:
                    data = data.replace(needle.data, needle.masked)
        else:
            for needle in self._narrow:
                if needle.found_in(data):
                    data = data.replace(needle.data, needle.masked)
        if self._wide and NUL in data:
            for needle in self._wide:
                if needle.data in data:
                    data = data.replace(needle.data, needle.masked)
        return data

    def text(self, text: str) -> str:
        if self.fragments is not None and "*" in text:
            raw = text.encode("utf-8", "surrogateescape")
            text = self.fragments.masked(raw).decode("utf-8", "surrogateescape")
        for needle in self.needles:
            if needle.text in text:
                text = text.replace(needle.text, needle.masked.decode())
        return text

    def quoted_in(self, data: bytes) -> bool:
        """Whether `data` holds the key in any form this scrubber masks, whole or a masked
        echo of a piece of it (an error quoting it is then not passed on at all)."""
        return self.data(data) != data

    def pairs(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]] | None:
        """Header (name, value) pairs with the secret masked in the values, or None when
        no header carries it (the usual case: nothing is copied). A header whose name
        carries it is dropped: the mask's brackets are not allowed in a header name. So is
        one whose value carries it with blanks inside (a folded line, `obs-fold`, which
        the HTTP client joins with a space)."""
        pairs = list(pairs)
        # One search of each form in every name and value at once, the usual answer
        # carrying none: a form in any of them is in the joined text (one found only
        # across two of them is then looked for in each, and is not there). Blanks are
        # taken out first: no form holds one.
        joined = _unblanked("\n".join(chain.from_iterable(pairs)))
        echoed = self.fragments is not None and "*" in joined and self.text(joined) != joined
        if not echoed and not any(n.text in joined for n in self.needles):
            return None
        kept = [(k, self.text(v)) for k, v in pairs if self.text(k) == k]
        kept = [(k, v) for k, v in kept if self.text(_unblanked(v)) == _unblanked(v)]
        return kept if kept != pairs else None

    def stream(self) -> ChunkScrubber:
        return ChunkScrubber(self)


def _unblanked(text: str) -> str:
    return text.replace(" ", "").replace("\t", "")


NUL = b"\0"
"""In every UTF-16 or UTF-32 form of the key, and in no UTF-8 text."""
ESCAPE = b"\\u"
"""What starts a JSON escape of a character."""
BACKSLASH = b"\\"
"""What every JSON escape starts with: bytes without one (base64 never has one) need no
escaped search, and looking for a single byte is a `memchr`, where looking for `\\u` in
base64, full of `u`s, costs some 60 µs per 64 KiB."""
_ESCAPE_OF = re.compile(rb"\\u([0-9a-fA-F]{4})")


class Escapes:
    """The key written with JSON `\\uXXXX` escapes for any of its characters.

    A run of bytes that are the key's characters or escapes is decoded; when the decoded
    run holds the key, the whole run is masked (its length kept). Only bytes holding a
    backslash are searched (`BACKSLASH`), so an answer without one costs a single `memchr`.
    """

    def __init__(self, key: bytes, run: re.Pattern[bytes], tail: re.Pattern[bytes]) -> None:
        self.key = key
        self._run = run
        self._tail = tail
        self.longest = 6 * len(key)
        """The most bytes an escaped key takes (every character escaped)."""

    @classmethod
    def of(cls, key: str) -> Escapes:
        chars = b"".join(re.escape(bytes([c])) for c in sorted(set(key.encode())))
        unit = rb"(?:[" + chars + rb"]|\\u[0-9a-fA-F]{4})"
        # What may end a chunk inside an escaped key: units, then part of an escape.
        tail = unit + rb"*(?:\\(?:u[0-9a-fA-F]{0,3})?)?\Z"
        return cls(key.encode(), re.compile(unit + rb"+"), re.compile(tail))

    def masked(self, data: bytes) -> bytes:
        """`data` with every run that decodes to hold the key masked. Only the bytes around
        each escape are read: an escaped key holds one, and lies within `longest` bytes of
        each of its escapes (a megabyte of base64 is never run through the pattern)."""
        at = _next_escape(data, 0)
        while at >= 0:
            low = max(at - self.longest, 0)
            window = data[low : at + self.longest]
            after = at + len(ESCAPE)
            for found in self._run.finditer(window):
                if found.start() <= at - low < found.end():
                    masked = self._mask_run(found[0])
                    if masked is not found[0]:
                        start, end = low + found.start(), low + found.end()
                        data = data[:start] + masked + data[end:]
                        after = end
                    break
            at = _next_escape(data, after)
        return data

    def _mask_run(self, run: bytes) -> bytes:
        if len(run) < len(self.key):
            return run
        decoded = _ESCAPE_OF.sub(lambda e: _decoded(int(e[1], 16)), run)
        return mask(len(run)).encode() if self.key in decoded else run

    def held(self, data: bytes) -> int:
        """How many bytes at the end of `data` could begin an escaped key (0: none): the
        trailing run of key characters and escapes, when it holds an escape."""
        start = max(len(data) - self.longest, 0)
        if data.find(BACKSLASH, start) < 0:
            return 0
        found = self._tail.search(data, start)
        if found is None or b"\\" not in found[0]:
            return 0
        return len(found[0])


def _next_escape(data: bytes, start: int) -> int:
    """Where the next `\\u` escape at or after `start` begins in `data`; -1 when none does
    (an escaped backslash, `\\\\`, is stepped over whole)."""
    at = data.find(BACKSLASH, start)
    while at >= 0 and data[at + 1 : at + 2] != b"u":
        at = data.find(BACKSLASH, at + 2)
    return at


def _decoded(code: int) -> bytes:
    """An escaped character as the byte it stands for; one that is no key byte as NUL."""
    return bytes([code]) if code < 0x80 else b"\0"


STAR = b"*"
"""What every masked echo of the key holds; bytes without one (base64, most JSON) need no
search for one (a `memchr`: some 16 µs per 2 MB answer)."""
FRAGMENT = 3
"""The fewest characters of the key's start or end that make a masked echo: `sk-***` is
one (a piece of the start), `***ab` is not (two characters of the end)."""
KEY_CHARACTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
"""What a masked echo's pieces of the key are written with."""
_STARS = re.compile(rb"\*{3,}")
_KEY_RUN = re.compile(rb"[A-Za-z0-9_-]*")


def _key_run_end(data: bytes, at: int) -> int:
    """Where the run of key characters from `at` ends."""
    found = _KEY_RUN.match(data, at)
    return found.end() if found is not None else at


def _key_run_start(data: bytes, low: int, at: int) -> int:
    """Where the run of key characters that ends at `at` begins, `low` at the earliest (read
    backwards in one pass, on a reversed copy)."""
    return at - _key_run_end(data[low:at][::-1], 0)


_ECHO_RUN = re.compile(rb"[A-Za-z0-9_*-]*")


def _echo_run_start(data: bytes, low: int, at: int) -> int:
    """Where the run of key characters and `*`s that ends at `at` begins, `low` at the
    earliest."""
    found = _ECHO_RUN.match(data[low:at][::-1])
    return at - (found.end() if found is not None else 0)


class Fragments:
    """Masked echoes of a key: `sk-pro***kb0A`, as OpenAI quotes a key it refuses.

    A run of three or more `*`s with key characters on either side is an echo when the
    characters before it hold the key's first `FRAGMENT`, or those after it its last
    `FRAGMENT`; the whole run (both sides and the `*`s) is masked, its length kept.
    Whether it is masked never depends on more of the key than those: a team can have the
    upstream echo text of its choosing (a file's content, `GET /v1/files/{id}/content`),
    and were `sk-proj-X***` masked only when `X` is the key's next character, each guess
    would come back answered, and the key be read a character at a time. Each byte is
    looked at a bounded number of times, whatever the text around the `*`s: a long run
    of letters before them (an answer's text is the upstream's, and may echo a prompt)
    costs no more than reading it."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def quotes(self, before: bytes, after: bytes) -> bool:
        key = self.key
        # Only the key's length of either side can hold a piece of it.
        before, after = before[-len(key) :], after[: len(key)]
        return key[:FRAGMENT] in before or key[-FRAGMENT:] in after

    def masked(self, data: bytes) -> bytes:
        """`data` with every masked echo of the key masked again, whole. The key characters
        between two runs of `*`s are read as the end of the first echo and the start of
        the next (`x***sk-pro***kb0A`: `sk-pro` starts the second), and masks that meet
        are joined."""
        key = self.key
        head, tail = key[:FRAGMENT], key[-FRAGMENT:]
        if head not in data and tail not in data:
            return data  # an echo holds one or the other: most text with `*`s holds neither
        spans: list[list[int]] = []  # [first, last) of each mask, in order
        stars_end = 0  # the end of the last run of `*`s: no run of key characters spans it
        reach = len(key)
        for stars in _STARS.finditer(data):
            start, end = stars.span()
            last = _key_run_end(data, end)
            near = max(stars_end, start - reach)
            low = stars_end
            stars_end = end
            if data.find(head, near, start) < 0 and data.find(tail, end, last) < 0:
                continue  # no piece of the key on either side
            first = _key_run_start(data, near, start)
            if not self.quotes(data[first:start], data[end:last]):
                continue
            if first == near:
                first = _key_run_start(data, low, first)  # the whole run is masked
            if spans and first < spans[-1][1]:
                spans[-1][1] = last  # it meets the mask before it: one mask
            else:
                spans.append([first, last])
        if not spans:
            return data
        parts: list[bytes] = []
        written = 0
        for first, last in spans:
            parts += (data[written:first], mask(last - first).encode())
            written = last
        parts.append(data[written:])
        return b"".join(parts)

    @staticmethod
    def held(data: bytes) -> int:
        """How many bytes at the end of `data` could be an echo the next chunk completes
        (0: none): a trailing run of key characters with `*`s in it, the whole run (an echo
        it ends with may begin past an earlier run of `*`s, `sk-pro***kb0A***`: cut there,
        the end of the key before the last `*`s would go out with no start before it)."""
        since = max(len(data) - HELD_ECHO, 0)
        star = data.rfind(STAR, since)
        if star < 0:
            return 0
        tail = _KEY_RUN.match(data, star + 1)
        if tail is None or tail.end() != len(data):
            return 0
        return len(data) - _echo_run_start(data, since, star)


HELD_ECHO = 1024
"""The longest end of a chunk held back as the start of a masked echo."""


class ChunkScrubber:
    """Scrubs a body that arrives in chunks, including a key split across chunks.

    `feed` returns what can be passed on now; `finish` returns the bytes held back.
    """

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        # A masked echo the next chunk may complete is held as it came, unmasked: masked
        # now, the rest of it (the key's last characters) would go out after the mask.
        echo = Fragments.held(data) if self._scrubber.fragments is not None else 0
        echo_tail = data[len(data) - echo :]
        data = self._scrubber.data(data[: len(data) - echo])
        # Only data whose last byte is in some form can end with the start of one: a JSON
        # answer's `}` or an event's blank line never is.
        ends_in_form = bool(data) and data[-1] in self._scrubber.form_bytes
        hold = ends_in_form and max(n.started_at_end(data) for n in self._scrubber.needles)
        escapes = self._scrubber.escapes
        if escapes is not None:
            hold = max(hold, escapes.held(data))
        if not hold:
            self._held = echo_tail
            return data
        self._held = data[-hold:] + echo_tail
        return data[:-hold]

    def finish(self) -> bytes:
        """The end of the body: what was held back is no whole key, so it goes out (masked,
        as it may end with a masked echo held unmasked)."""
        held, self._held = self._held, b""
        return self._scrubber.data(held) if held else held
