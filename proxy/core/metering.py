"""Usage out of upstream answers, as they stream past (pure: bytes in, Usage out).

A non-streamed image answer is megabytes of base64 with `usage` at its end:
`BodyMeter` finds it with ijson's incremental C parser, chunk by chunk, without
holding the body (a small answer is held and read in one `json.loads`, with the
same result). `SseMeter` follows a server-sent event stream and sums the `usage`
of its `*.completed` events.

ijson's C backend crashes the process on an integer of some 4,300 digits, and raises
`decimal.InvalidOperation` on an exponent past 10**18: no number longer than
`LONG_NUMBER` characters ever reaches it (`ShortStrings` refuses the answer), and its
arithmetic errors are read as JSON errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NoReturn

import ijson

from proxy.core.errors import TollgateError
from proxy.core.models import Usage
from proxy.core.sse import DONE, EventSplitter, sse_event_parts


class MalformedAnswer(TollgateError):
    """The upstream answered 2xx with a body that is not what OpenAI sends."""


INPUT_DETAILS = {
    "text_tokens": "text_input",
    "image_tokens": "image_input",
    "cached_text_tokens": "cached_text_input",
    "cached_image_tokens": "cached_image_input",
}
OUTPUT_DETAILS = {"image_tokens": "image_output", "text_tokens": "text_output"}


def usage_from_openai(raw: Any) -> Usage | None:
    """OpenAI's `usage` object as a Usage; None when absent or not an object.

    `output_tokens_details` may be missing: the output tokens are then image output.
    No reported token vanishes: a detail of a kind Tollgate does not know, or a total
    above the sum of its known details, is counted as unclassified (the larger of the
    two, since the unknown details may be what the total's excess is).
    """
    if not isinstance(raw, Mapping):
        return None
    input_details = raw.get("input_tokens_details")
    output_details = raw.get("output_tokens_details")
    input_tokens = token_count(raw.get("input_tokens"))
    output_tokens = token_count(raw.get("output_tokens"))
    kinds: dict[str, int] = {}
    if isinstance(input_details, Mapping):
        unclassified_input = _details(input_details, INPUT_DETAILS, input_tokens, kinds)
    else:
        kinds["text_input"], unclassified_input = input_tokens, 0
    if isinstance(output_details, Mapping):
        unclassified_output = _details(output_details, OUTPUT_DETAILS, output_tokens, kinds)
    else:
        kinds["image_output"], unclassified_output = output_tokens, 0
    return Usage(
        **kinds,
        unclassified_input=unclassified_input,
        unclassified_output=unclassified_output,
    )


def _details(
    details: Mapping[str, Any], known: Mapping[str, str], total: int, kinds: dict[str, int]
) -> int:
    """Put the known details of `details` in `kinds`; return the tokens they leave out."""
    classified = unknown = 0
    for name, value in details.items():
        tokens = token_count(value)
        kind = known.get(name)
        if kind is None:
            unknown += tokens
        else:
            kinds[kind] = tokens
            classified += tokens
    return max(total - classified, unknown)


def token_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


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


SHORT_STRING = 1024
"""Longer JSON strings (images, revised prompts) reach the parser empty: never metered."""

LONG_NUMBER = 100
"""Longer runs of number characters outside strings make an answer malformed: ijson's C
backend crashes the process on an integer of some 4,300 digits (token counts are short)."""

_NUMBER_CHARS = b"-+.eE0123456789"
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

    def __init__(self) -> None:
        self._inside = False
        self._escape = False  # the last chunk ended on a backslash inside a string
        self._held = bytearray()
        self._long = False
        self._run = 0  # number characters ending the bytes passed (0 inside a string)
        self._refused = False

    def filter(self, chunk: bytes) -> bytes:
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

    def _jump(self, chunk: bytes) -> bytes:
        """`filter` for a chunk without escapes, where every quote opens or closes a string:
        from quote to quote with `bytes.find`, cutting out only the long strings."""
        find = chunk.find
        out: list[bytes] = []
        kept = search = 0  # kept: start of the bytes passed as they are
        if self._inside:  # the chunk goes on with a string from earlier chunks
            close = find(b'"')
            if close < 0:
                self._keep(chunk, 0, len(chunk))
                return b""
            self._keep(chunk, 0, close)
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
            if closing - opening - 1 > SHORT_STRING:
                out.append(chunk[kept : opening + 1])
                kept = closing
            search = closing + 1
        self._tail(chunk, search)
        out.append(chunk[kept:])
        return b"".join(out)

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
        if len(self._held) + stop - start > SHORT_STRING:
            self._long = True
            self._held.clear()
        else:
            self._held += chunk[start:stop]


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
    An event that cannot be read is counted in `unreadable` (its usage is unknown).
    """

    def __init__(self) -> None:
        self._events = EventSplitter()
        self.usage = Usage()
        self.completed = 0
        self.partials = 0
        self.unreadable = 0
        self.error: Any = None

    def feed(self, chunk: bytes) -> None:
        for parts in self._events.feed_parts(chunk):
            self._event(*sse_event_parts(parts))

    def finish(self) -> None:
        """The stream ended: a last event may lack its blank line."""
        rest = self._events.rest()
        if rest.strip():
            self._event(*sse_event_parts([rest]))

    def _event(self, name: bytes, payload: list[bytes] | None) -> None:
        if payload is None:
            return
        if name.endswith(PARTIAL_SUFFIX.encode()):
            # Partial images carry only pixels: never parse their base64.
            self.partials += 1
            return
        if sum(map(len, payload)) == len(DONE) and b"".join(payload) == DONE:
            return
        try:
            strings = ShortStrings()  # piece by piece: the data is never joined whole
            short = b"".join([strings.filter(piece) for piece in payload])
            kind: Any = ""
            error: Any = None
            for prefix, _, value in ijson.parse(short):
                if prefix == "type":
                    kind = value
                elif prefix == "error" and value is not None:
                    error = True
            if isinstance(kind, str) and kind.endswith(PARTIAL_SUFFIX):
                self.partials += 1
                return
            if error is not None:
                self.error = next(ijson.items(short, "error"), True)
                return
            if isinstance(kind, str) and kind.endswith(COMPLETED_SUFFIX):
                usage = usage_from_openai(next(ijson.items(short, "usage"), None))
                self.completed += 1
                if usage is not None:
                    self.usage = self.usage + usage
        except (ijson.JSONError, UnicodeDecodeError, ArithmeticError, MalformedAnswer):
            # UnicodeDecodeError and ArithmeticError: as in BodyMeter._stream.
            self.unreadable += 1
