"""Usage out of upstream answers, as they stream past (pure: bytes in, Usage out).

A non-streamed image answer is megabytes of base64 with `usage` at its end:
`BodyMeter` finds it with ijson's incremental C parser, chunk by chunk, without
holding the body (a small answer is held and read in one `json.loads`, with the
same result). `SseMeter` follows a server-sent event stream and sums the `usage`
of its `*.completed` events.

ijson's C backend crashes the process on an integer of some 4,300 digits, and raises
`decimal.InvalidOperation` on an exponent past 10**18: no number longer than
`LONG_NUMBER` characters ever reaches it (`ShortStrings`, in `proxy.core.short_strings`,
refuses the answer), and its arithmetic errors are read as JSON errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import ijson

from proxy.core.errors import MalformedAnswer
from proxy.core.models import Usage
from proxy.core.short_strings import ShortStrings
from proxy.core.sse import DONE, EventSplitter, run_on_data, sse_event_parts

INPUT_DETAILS = {
    "text_tokens": "text_input",
    "image_tokens": "image_input",
    "cached_text_tokens": "cached_text_input",
    "cached_image_tokens": "cached_image_input",
}
OUTPUT_DETAILS = {"image_tokens": "image_output", "text_tokens": "text_output"}


def usage_from_openai(raw: Any) -> Usage | None:
    """OpenAI's `usage` object as a Usage; None when absent or not one that can be believed.

    `output_tokens_details` may be missing: the output tokens are then image output.
    No reported token vanishes: a detail of a kind Tollgate does not know, or a total
    above the sum of its known details, is counted as unclassified (the larger of the
    two, since the unknown details may be what the total's excess is).

    OpenAI always reports `input_tokens` and `output_tokens` as integers. A usage without
    them, or with a count that is not a whole number from 0 to `MAX_TOKENS` (a string, a
    negative, a float, an absurd size), says nothing reliable about what was billed: it is
    None, and the answer is charged its bound, flagged, never the $0 its counts would read
    as.
    """
    if not isinstance(raw, Mapping):
        return None
    input_tokens = token_count(raw.get("input_tokens"))
    output_tokens = token_count(raw.get("output_tokens"))
    if input_tokens is None or output_tokens is None:
        return None
    input_details = raw.get("input_tokens_details")
    output_details = raw.get("output_tokens_details")
    kinds: dict[str, int] = {}
    if isinstance(input_details, Mapping):
        unclassified_input = _details(input_details, INPUT_DETAILS, input_tokens, kinds)
    else:
        kinds["text_input"], unclassified_input = input_tokens, 0
    if isinstance(output_details, Mapping):
        unclassified_output = _details(output_details, OUTPUT_DETAILS, output_tokens, kinds)
    else:
        kinds["image_output"], unclassified_output = output_tokens, 0
    if unclassified_input is None or unclassified_output is None:
        return None
    return Usage(
        **kinds,
        unclassified_input=unclassified_input,
        unclassified_output=unclassified_output,
    )


def _details(
    details: Mapping[str, Any], known: Mapping[str, str], total: int, kinds: dict[str, int]
) -> int | None:
    """Put the known details of `details` in `kinds`; return the tokens they leave out, or
    None when a known detail is not a count. A detail of an unknown kind that is not a count
    (a nested object a newer API may add) counts nothing by itself: the total covers it."""
    classified = unknown = 0
    for name, value in details.items():
        tokens = token_count(value)
        kind = known.get(name)
        if kind is None:
            unknown += tokens or 0
        elif tokens is None:
            return None
        else:
            kinds[kind] = tokens
            classified += tokens
    return max(total - classified, unknown)


MAX_TOKENS = 2**31 - 1
"""The most tokens one count of a usage can be believed to hold (OpenAI's counts are 32-bit;
its own `max_output_tokens` stops there). Past it a count is not read: what it would cost
does not fit the ledger's integers, and no image request bills so much."""


def token_count(value: Any) -> int | None:
    """A usage count: a whole number from 0 to MAX_TOKENS; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


SMALL_BODY = 64 * 1024
"""Answers up to this size are held (the spool holds them in memory too) and read at once."""


class BodyMeter:
    """Feed a JSON answer chunk by chunk; `finish()` gives its usage and image count.

    The parser never sees the base64: `ShortStrings` empties every string longer than
    `SHORT_STRING` bytes on the way in (found with `bytes.find`), so a 2 MB image costs
    neither a tokenizer pass nor a 2 MB string per answer in flight.

    An answer with a number longer than `LONG_NUMBER` characters is malformed (ijson's
    C backend would crash on it): refused by `ShortStrings` as it passes.

    Stepping through ijson's events in Python costs more than the parse itself for a small
    answer, so up to `small` bytes the chunks are only held, and `finish()` reads them with
    one `json.loads` (`_read_whole`); a longer answer is streamed from the first byte past
    `small`. Both ways give the same result; a small answer's errors come from `finish()`.
    """

    def __init__(self, small: int = SMALL_BODY) -> None:
        self._small = small
        self._held: list[bytes] | None = []  # None once streaming
        self._size = 0
        self._strings = ShortStrings()
        self._found: list[Any] = ijson.sendable_list()
        self._parser: Any = None  # made when streaming starts: a small answer never needs it

    def feed(self, chunk: bytes) -> None:
        if self._held is not None:
            self._size += len(chunk)
            if self._size <= self._small:
                self._held.append(chunk)
                return
            held, self._held = self._held, None
            self._stream(self._strings.filter(b"".join(held)))
        self._stream(self._strings.filter(chunk))

    def finish(self) -> tuple[Usage | None, int]:
        """(usage or None, number of images in `data`); MalformedAnswer if the JSON is cut."""
        if self._held is not None:
            data = self._strings.filter(b"".join(self._held))
            whole = _read_whole(data)
            if whole is not None:
                return whole
            self._stream(data)  # only ijson can tell: let it read what it would have streamed
        try:
            self._streaming().close()
        except (ijson.JSONError, UnicodeDecodeError, ArithmeticError) as exc:
            raise MalformedAnswer(f"upstream answer is not JSON: {exc}") from None
        usage: Usage | None = None
        images = 0
        for kind, value in self._found:
            if kind == "usage":
                usage = usage_from_openai(value)
            else:
                images += 1
        return usage, images

    def _stream(self, data: bytes) -> None:
        """Send filtered bytes to ijson."""
        if not data:
            return  # all inside a long string (and an empty send would mean the end to ijson)
        try:
            self._streaming().send(data)
        except (ijson.JSONError, UnicodeDecodeError, ArithmeticError) as exc:
            # UnicodeDecodeError: yajl passes some bytes that are not UTF-8 (an encoded
            # surrogate, a lone `\udc00` escape) on to a decode that refuses them.
            # ArithmeticError: `decimal.InvalidOperation`, for an exponent out of its range.
            raise MalformedAnswer(f"upstream answer is not JSON: {exc}") from None

    def _streaming(self) -> Any:
        """ijson's parser, made on first use: from then on every chunk goes to it."""
        if self._parser is None:
            self._held = None
            self._parser = ijson.parse_coro(_UsageSink(self._found))
        return self._parser


def _read_whole(data: bytes) -> tuple[Usage | None, int] | None:
    """What `_UsageSink` would find in `data` (filtered), read with one `json.loads`; None
    when only ijson can tell.

    ijson reads `usage` (an object) and counts the objects at the prefix `data.item`; on
    a plain parse that is the top-level `usage` and the objects in a top-level `data`
    list. Where the two could part, ijson decides: JSON that `json` refuses or reads its
    own way (NaN, surrogate escapes, repeated keys), and a `data` that is an object or a
    key named `data.item`, which ijson's dotted prefixes would confuse with items.
    Non-integers are read as ijson reads them, as `Decimal`s (which refuse an exponent
    past 10**18 where a float would be infinite).
    """
    if _SURROGATE_ESCAPE.search(data):
        return None
    try:
        answer = json.loads(
            data.decode(),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
            parse_float=Decimal,
        )
    except (ValueError, RecursionError, ArithmeticError):
        return None
    if not isinstance(answer, dict):
        return None, 0  # ijson finds nothing under a top-level array or scalar
    items = answer.get("data")
    if isinstance(items, dict) or "data.item" in answer:
        return None
    images = sum(isinstance(item, dict) for item in items) if isinstance(items, list) else 0
    return usage_from_openai(answer.get("usage")), images


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a repeated key")  # ijson would see each: let it decide
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@ijson.coroutine  # type: ignore[untyped-decorator]
def _UsageSink(found: list[Any]) -> Any:
    """Receive (prefix, event, value) events; keep `usage` whole and count `data` items."""
    builder: ijson.ObjectBuilder | None = None
    while True:
        prefix, event, value = yield
        if builder is not None:
            if prefix == "usage" and event == "end_map":
                found.append(("usage", builder.value))
                builder = None
            else:
                builder.event(event, value)
        elif prefix == "usage" and event == "start_map":
            builder = ijson.ObjectBuilder()
            builder.event(event, value)
        elif prefix == "data" and event == "start_map":
            pass
        elif prefix == "data.item" and event == "start_map":
            found.append(("image", None))


COMPLETED_SUFFIX = ".completed"
PARTIAL_SUFFIX = ".partial_image"


class SseMeter:
    """Follow a server-sent event stream; sum the usage of its `*.completed` events.

    Each event's JSON reaches ijson through `ShortStrings`, like a plain answer: the
    base64 of a completed image (megabytes) is never tokenized, and a number longer than
    `LONG_NUMBER` characters, which ijson's C backend would crash on, never reaches it.
    An event that cannot be read is counted in `unreadable` (its usage is unknown), and a
    completed event without a usage that can be believed in `unmetered`.
    """

    def __init__(self) -> None:
        self._events = EventSplitter()
        self.usage = Usage()
        self.completed = 0
        self.partials = 0
        self.unreadable = 0
        self.unmetered = 0
        """Completed events without a usage that can be believed (OpenAI's always carry
        one): what their images billed is unknown."""
        self.error: Any = None
        self._early: DataSoFar | None = None
        """The data of the event begun, filtered so far."""
        self._unfollowed = b""
        """The first part of the event begun, when it is not one to follow."""

    def feed(self, chunk: bytes) -> None:
        early = self._early
        for parts in self._events.feed_parts(chunk):
            if early is not None and early.ends_in(parts):
                self._early_event(early, parts)
            else:
                self._event(*sse_event_parts(parts))
            early = self._early = None  # only the first event a chunk ends was followed
        self._follow()

    @property
    def inside(self) -> bool:
        """The stream so far stops inside an event."""
        return self._events.inside

    def finish(self) -> None:
        """The stream ended: a last event may lack its blank line."""
        self._early = None
        rest = self._events.rest()
        if rest.strip():
            self._event(*sse_event_parts([rest]))

    def _follow(self) -> None:
        """Filter the data of the event begun so far (`DataSoFar`), when it is one that
        `sse_event_parts` reads in parts and no partial image."""
        held = self._events.held
        if not held:
            return
        if self._early is None:
            first = held[0]
            if first is self._unfollowed:
                return
            found = run_on_data(first)
            # Nor one whose data's leading spaces may go on into its next part.
            if (
                found is None
                or found[0].endswith(PARTIAL_SUFFIX.encode())
                or found[1] == len(first)
            ):
                self._unfollowed = first
                return
            self._early = DataSoFar(found[1])
        self._early.follow(held)

    def _early_event(self, early: DataSoFar, parts: list[bytes]) -> None:
        """The event `parts`, its data filtered as its parts came: read as `_event` reads
        one."""
        early.follow(parts)
        if early.size == len(DONE) and b"".join(parts)[early.start :] == DONE:
            return
        if early.refused:
            self.unreadable += 1
            return
        self._read(b"".join(early.short))

    def _event(self, name: bytes, payload: list[bytes] | None, start: int) -> None:
        """One event: its data is `payload` joined, read from `start` (`sse_event_parts`)."""
        if payload is None:
            return
        if name.endswith(PARTIAL_SUFFIX.encode()):
            # Partial images carry only pixels: never parse their base64.
            self.partials += 1
            return
        if sum(map(len, payload)) - start == len(DONE) and b"".join(payload)[start:] == DONE:
            return
        try:
            strings = ShortStrings()  # piece by piece: the data is never joined whole
            first = [strings.filter(payload[0], start)] if payload else []
            short = b"".join(first + [strings.filter(piece) for piece in payload[1:]])
        except MalformedAnswer:
            self.unreadable += 1
            return
        self._read(short)

    def _read(self, short: bytes) -> None:
        """An event's data, its long strings emptied: a partial image, an error, or a
        completed image and its usage."""
        # A buffer the size of the data: ijson's default is 64 KiB, zeroed at each parse,
        # which cost more than parsing an event's few hundred bytes.
        size = len(short) + 1
        try:
            kind: Any = ""
            error: Any = None
            for prefix, _, value in ijson.parse(short, buf_size=size):
                if prefix == "type":
                    kind = value
                elif prefix == "error" and value is not None:
                    error = True
            if isinstance(kind, str) and kind.endswith(PARTIAL_SUFFIX):
                self.partials += 1
                return
            if error is not None:
                self.error = next(ijson.items(short, "error", buf_size=size), True)
                return
            if isinstance(kind, str) and kind.endswith(COMPLETED_SUFFIX):
                usage = usage_from_openai(next(ijson.items(short, "usage", buf_size=size), None))
                self.completed += 1
                if usage is None:
                    self.unmetered += 1
                else:
                    self.usage = self.usage + usage
        except (ijson.JSONError, UnicodeDecodeError, ArithmeticError):
            # UnicodeDecodeError and ArithmeticError: as in BodyMeter._stream.
            self.unreadable += 1


class DataSoFar:
    """The data of an event that has not ended, its long strings dropped (`ShortStrings`)
    part by part as the parts come, while their bytes are still in the CPU's caches: left
    to its end, a completed image's megabytes are read again from memory, which with a
    few streams at once no longer holds them in cache.

    Its first part ends inside its only data line (`run_on_data`), which the later parts
    go on with."""

    def __init__(self, start: int) -> None:
        self.start = start
        """Where the data begins in the first part."""
        self.parts: list[bytes] = []
        self.size = -start
        """The bytes of data so far."""
        self.short: list[bytes] = []
        self.refused = False
        """A number too long (`ShortStrings`): the event cannot be read."""
        self._strings = ShortStrings()

    def follow(self, parts: Sequence[bytes]) -> None:
        """Filter the parts of `parts` (the event's, from its first) not yet filtered."""
        for part in parts[len(self.parts) :]:
            start = 0 if self.parts else self.start
            self.parts.append(part)
            self.size += len(part)
            if not self.refused:
                try:
                    self.short.append(self._strings.filter(part, start))
                except MalformedAnswer:
                    self.refused = True

    def ends_in(self, parts: list[bytes]) -> bool:
        """Whether the event `parts` (as `EventSplitter.feed_parts` gives it) is this one,
        given in the parts followed and more (not joined into one)."""
        return (
            len(parts) > 1
            and len(parts) >= len(self.parts)
            and all(a is b for a, b in zip(self.parts, parts, strict=False))
        )
