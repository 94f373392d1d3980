"""What a Responses API answer bills, read as it passes (pure).

A response object carries its mainline model's `usage` (`input_tokens`, of which
`input_tokens_details.cached_tokens` were cached and `cache_write_tokens` written to the
prompt cache; `output_tokens`, reasoning included)
and, when the image tool ran, `tool_usage.image_gen` in the Images API's usage shape.
Typed SDKs drop `tool_usage`; Tollgate reads the raw JSON. A response with an image call
(completed, or begun: cut short or failed, it may have rendered) that reports no
`tool_usage`, or fewer image-tool output tokens than images made (the usage of some calls
missing from it), is metered as having no usage: charged its bound, flagged (never $0 for
the images). The completed calls' `quality` and `size` go with what is metered: a usage
with fewer image output tokens than those calls bill at the least is charged its bound too
(`settlement.image_output_short`). In a stream, an image call announced done
(`response.output_item.done`) is an image made, and one announced at all a call present,
even when the terminal event leaves it out of its `output`.

Images travel as base64 in `result` and `partial_image_b64`: like the Images meters, the
JSON reaches the parser with every long string emptied (`ShortStrings`), and partial-image
events are never parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from proxy.core.errors import MalformedAnswer, RequestError
from proxy.core.metering import token_count, usage_from_openai
from proxy.core.models import Usage
from proxy.core.settlement import Call, Metered, StreamEnd
from proxy.core.short_strings import ShortStrings
from proxy.core.sse import EventSplitter, error_event, sse_event

PENDING = frozenset({"queued", "in_progress"})
"""Statuses of a response that has not ended (a background one)."""
TERMINAL_EVENTS = frozenset({"response.completed", "response.failed", "response.incomplete"})
OPENING_EVENTS = frozenset({"response.created", "response.queued", "response.in_progress"})
PARTIAL_EVENT = b"response.image_generation_call.partial_image"
ITEM_DONE = "response.output_item.done"
ITEM_EVENTS = frozenset({"response.output_item.added", ITEM_DONE})
CALL_EVENTS = "response.image_generation_call."
"""The prefix of an image call's own events (`in_progress`, `generating`, `completed`)."""


def read_response(response: Any, seen: tuple[Call, ...] = (), begun: bool = False) -> Metered:
    """What a response object bills; MalformedAnswer when it is not one. `seen`: the image
    calls a stream announced done before it, counted when its `output` lists fewer;
    `begun`: the stream announced an image call (the image tool ran)."""
    if not isinstance(response, Mapping) or not isinstance(response.get("status"), str):
        raise MalformedAnswer("upstream answer is not a response object")
    status = response["status"]
    response_id = response.get("id") if isinstance(response.get("id"), str) else None
    output = response.get("output")
    calls = tuple(
        call
        for item in (output if isinstance(output, list) else ())
        if (call := completed_call(item)) is not None
    )
    if len(calls) < len(seen):
        calls = seen
    images = len(calls)
    # A call that has not completed (cut short, failed) may still have rendered and billed.
    ran = (
        images > 0
        or begun
        or any(
            isinstance(item, Mapping) and item.get("type") == "image_generation_call"
            for item in (output if isinstance(output, list) else ())
        )
    )
    usage = response_usage(response, images, ran)
    return Metered(usage, images, response_id, status in PENDING, status, calls, ran)


def completed_call(item: Any) -> Call | None:
    """The `quality` and `size` of `item` when it is a completed image call."""
    if (
        isinstance(item, Mapping)
        and item.get("type") == "image_generation_call"
        and item.get("status") == "completed"
    ):
        return _text(item.get("quality")), _text(item.get("size"))
    return None


def _text(value: Any) -> str:
    """An image call's `quality` or `size` ("auto" when it names none: the least it bills
    is then the least of any)."""
    return value if isinstance(value, str) else "auto"


def response_usage(response: Mapping[str, Any], images: int, ran: bool = False) -> Usage | None:
    """The mainline usage plus the image tool's (needed when `images` were made or the tool
    otherwise `ran`: an image call is present); None when either is missing but needed, or
    holds a count that is not a whole number from 0 to `MAX_TOKENS` (`token_count`)."""
    main = response.get("usage")
    if not isinstance(main, Mapping):
        return None
    tool_usage = response.get("tool_usage")
    image_gen = tool_usage.get("image_gen") if isinstance(tool_usage, Mapping) else None
    tool = usage_from_openai(image_gen)
    if tool is None:
        if images or ran or image_gen is not None:
            # Image calls present (or usage of theirs unreadable): the bound, flagged.
            return None
        tool = Usage()
    elif tool.image_output + tool.text_output + tool.unclassified_output < images:
        # Every image made bills output tokens: fewer than one each means the usage of
        # some calls was not recorded (OpenAI's `image_gen` skips "calls with missing or
        # incomplete usage records", and reports none as zero counts), not that they were
        # free: the bound, flagged.
        return None
    details = main.get("input_tokens_details")
    if not isinstance(details, Mapping):
        details = {}
    input_tokens = token_count(main.get("input_tokens"))
    output_tokens = token_count(main.get("output_tokens"))
    cached = token_count(details.get("cached_tokens", 0))
    # Input written to the prompt cache: billed above the input rate from gpt-5.6 on.
    written = token_count(details.get("cache_write_tokens", 0))
    if input_tokens is None or output_tokens is None or cached is None or written is None:
        return None
    cached = min(cached, input_tokens)
    return tool + Usage(
        mainline_input=input_tokens - cached,
        mainline_cached_input=cached,
        mainline_output=output_tokens,
        mainline_cache_write=min(written, input_tokens - cached),
    )


def both(first: Metered, second: Metered) -> Metered:
    """Two terminal events of one stream, summed (unknown usage stays unknown)."""
    usage = None
    if first.usage is not None and second.usage is not None:
        usage = first.usage + second.usage
    return Metered(
        usage,
        first.images + second.images,
        first.response_id or second.response_id,
        second.pending,
        second.status,
        first.calls + second.calls,
        first.ran or second.ran,
    )


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MalformedAnswer(f"upstream answer is not JSON: {exc}") from None


class ResponseAnswer:
    """A whole response object, fed chunk by chunk: long strings dropped on the way in."""

    def __init__(self) -> None:
        self._strings = ShortStrings()
        self._kept: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self._kept.append(self._strings.filter(chunk))

    def finish(self) -> Metered:
        return read_response(_loads(b"".join(self._kept)))


class ResponseEvents:
    """A Responses stream: its id from the opening event, what it bills from the terminal
    event (`response.completed`, `.failed` or `.incomplete`), and an `error` event if one
    came. Partial images are counted, never parsed; image calls announced (begun, done)
    are kept, and the terminal event is read with them (`read_response`)."""

    def __init__(self) -> None:
        self._events = EventSplitter()
        self.response_id: str | None = None
        self.ended: Metered | None = None
        self.error: Any = None
        self.partials = 0
        self.unreadable = 0
        self.done: list[Call] = []
        self.begun = False

    def feed(self, chunk: bytes) -> None:
        for event in self._events.feed(chunk):
            self._event(event)

    def cut_short(self, failure: RequestError) -> bytes:
        """An `error` event, as for an image stream; with `code`, `message` and `param`
        beside its `error`, the fields of the Responses API's own error event. The
        response the stream named is followed to its end and charged what it bills."""
        message = f"The upstream's stream broke off before its end. {failure.message}"
        if self.response_id:
            message += f" Response {self.response_id} may still end: retrieve it by its id."
        error = {**failure.body()["error"], "message": message}
        beside = {"code": error["code"], "message": message, "param": None}
        return error_event(error, inside=self._events.inside, **beside)

    def end(self, broken: str | None) -> StreamEnd:
        rest = self._events.rest()
        if broken is None and rest.strip():
            self._event(rest)  # a last event may lack its blank line
        ended = self.ended
        return StreamEnd(
            completed=ended.images if ended else 0,
            usage=ended.usage if ended else None,
            error=self.error,
            unreadable=self.unreadable,
            broken=broken,
            terminal=ended is not None,
            response_id=self.response_id or (ended.response_id if ended else None),
            status=ended.status if ended else None,
            partials=self.partials,
            calls=ended.calls if ended else (),
            ran=ended.ran if ended else False,
        )

    def _event(self, raw: bytes) -> None:
        name, payload = sse_event(raw)
        if payload is None:
            return
        if name == PARTIAL_EVENT:
            self.partials += 1
            return
        try:
            event = _loads(ShortStrings().filter(payload))
            kind = event.get("type") if isinstance(event, Mapping) else None
            if kind in OPENING_EVENTS and isinstance(event.get("response"), Mapping):
                found = event["response"].get("id")
                self.response_id = found if isinstance(found, str) else self.response_id
            elif kind in ITEM_EVENTS:
                item = event.get("item")
                if isinstance(item, Mapping) and item.get("type") == "image_generation_call":
                    self.begun = True
                if kind == ITEM_DONE and (call := completed_call(item)) is not None:
                    self.done.append(call)
            elif isinstance(kind, str) and kind.startswith(CALL_EVENTS):
                self.begun = True
            elif kind in TERMINAL_EVENTS:
                ended = read_response(event.get("response"), tuple(self.done), self.begun)
                if self.ended is not None:
                    # A stream ends once: a second end leaves what was billed unknown.
                    # Both are kept (summed), so the bound charged is never below either.
                    self.unreadable += 1
                    ended = both(self.ended, ended)
                self.ended = ended
            elif kind == "error":
                self.error = event.get("error") or event
        except MalformedAnswer:
            self.unreadable += 1
