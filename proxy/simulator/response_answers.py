"""The bodies of the Responses API: the `response` object, its SSE events and the
input-items page (pure).

A response's output lists its reasoning item first (when `include` asks for its
encrypted content and the model reasons), then its image_generation_call items (the model
calls the tool, then writes), then its message; or, when the model calls a function, that
function_call item in place of the images and the message. Events carry a `sequence_number` from 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from proxy.simulator.answers import sse
from proxy.simulator.billing import BilledUsage, MainlineUsage
from proxy.simulator.pictures import encoded_b64
from proxy.simulator.response_tokens import ResponseTokens, image_gen_usage
from proxy.simulator.responses import ResponseOrder, encrypted_reasoning

Status = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
FrameKind = Literal["event", "terminal"]
FAILURE = {"code": "server_error", "message": "The model failed to generate a response."}


@dataclass(frozen=True)
class Snapshot:
    """One response at one moment: what `response_json` renders."""

    id: str
    order: ResponseOrder
    tokens: ResponseTokens
    created_at: int
    status: Status
    padding: int = 0
    with_usage: bool = True
    tool_counted: bool = True
    """False: `tool_usage.image_gen` reports zero counts (the `zerotool` fault)."""
    calls_skipped: int = 0
    """The image calls, the last ones, whose tokens `tool_usage.image_gen` leaves out (the
    `skipcall` fault)."""

    def image_id(self, index: int) -> str:
        return f"ig_{self.id.removeprefix('resp_')}{index:02d}"

    @property
    def message_id(self) -> str:
        return f"msg_{self.id.removeprefix('resp_')}"


def usage_json(mainline: MainlineUsage) -> dict[str, Any]:
    """The top-level `usage`: the mainline model's tokens."""
    return {
        "input_tokens": mainline.input,
        "input_tokens_details": {
            "cached_tokens": mainline.cached_input,
            "cache_write_tokens": mainline.cache_write,
        },
        "output_tokens": mainline.output,
        "output_tokens_details": {"reasoning_tokens": mainline.reasoning},
        "total_tokens": mainline.input + mainline.output,
    }


def tool_usage_json(image: BilledUsage) -> dict[str, Any]:
    """`tool_usage`: the image tool's tokens summed over its calls (no web searches)."""
    inputs = image.text_input + image.image_input
    return {
        "image_gen": {
            "input_tokens": inputs,
            "input_tokens_details": {
                "text_tokens": image.text_input,
                "image_tokens": image.image_input,
            },
            "output_tokens": image.image_output,
            "output_tokens_details": {"image_tokens": image.image_output, "text_tokens": 0},
            "total_tokens": inputs + image.image_output,
        },
        "web_search": {"num_requests": 0},
    }


def image_b64(order: ResponseOrder, padding: int) -> str:
    tool = order.tool
    assert tool is not None
    transparent = tool.background == "transparent"
    return encoded_b64(
        tool.width, tool.height, tool.output_format, tool.compression, padding, transparent
    )


def image_item(snap: Snapshot, index: int, *, done: bool) -> dict[str, Any]:
    """An image_generation_call item, with its image once done."""
    tool = snap.order.tool
    assert tool is not None
    return {
        "id": snap.image_id(index),
        "type": "image_generation_call",
        "status": "completed" if done else "in_progress",
        "result": image_b64(snap.order, snap.padding) if done else None,
        "action": snap.order.action,
        "background": tool.background,
        "output_format": tool.output_format,
        "quality": tool.quality,
        "size": tool.size,
        "revised_prompt": snap.order.revised_prompt,
    }


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(snap: Snapshot, *, done: bool) -> dict[str, Any]:
    """The assistant's message: empty while in progress; a reasoning model's labelled its
    final answer (`phase`, which the SDK asks to send back)."""
    status = "incomplete" if snap.tokens.incomplete else "completed"
    item = {
        "id": snap.message_id,
        "type": "message",
        "role": "assistant",
        "status": status if done else "in_progress",
        "content": [output_text(snap.tokens.answer)] if done else [],
    }
    if snap.order.model.reasoning:
        item["phase"] = "final_answer"
    return item


def function_call_item(snap: Snapshot, *, done: bool) -> dict[str, Any]:
    """The function call that ends the response: its arguments once written."""
    assert snap.order.function_call is not None
    short = snap.id.removeprefix("resp_")
    return {
        "id": f"fc_{short}",
        "type": "function_call",
        "status": "completed" if done else "in_progress",
        "arguments": snap.order.call_arguments if done else "",
        "call_id": f"call_{short}",
        "name": snap.order.function_call,
    }


def summary_text(prompt: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": f"**Planning the image**\n\nThe user asks: {prompt}"}


def reasoning_items(snap: Snapshot) -> list[dict[str, Any]]:
    """The reasoning item, with its encrypted content, when the request asked for it."""
    if not (snap.order.encrypted_reasoning and snap.order.model.reasoning):
        return []
    return [
        {
            "id": f"rs_{snap.id.removeprefix('resp_')}",
            "type": "reasoning",
            "summary": [summary_text(snap.order.revised_prompt)] if snap.order.summary else [],
            "encrypted_content": encrypted_reasoning(snap.tokens.mainline.reasoning, snap.id),
        }
    ]


def _output(snap: Snapshot) -> list[dict[str, Any]]:
    if snap.status in ("queued", "in_progress", "cancelled"):
        return []
    images = [image_item(snap, i, done=True) for i in range(snap.order.image_calls)]
    if snap.status == "failed":
        return [*reasoning_items(snap), *images]
    if snap.order.function_call is not None:
        return [*reasoning_items(snap), function_call_item(snap, done=True)]
    return [*reasoning_items(snap), *images, message_item(snap, done=True)]


def response_json(snap: Snapshot) -> dict[str, Any]:
    """The `response` object as OpenAI returns it from create, retrieve and cancel."""
    order, status = snap.order, snap.status
    billed = status in ("completed", "incomplete", "failed", "cancelled") and snap.with_usage
    return {
        "id": snap.id,
        "object": "response",
        "created_at": snap.created_at,
        "status": status,
        "background": order.background,
        "error": FAILURE if status == "failed" else None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": order.instructions,
        "max_output_tokens": order.max_output_tokens,
        "max_tool_calls": order.max_tool_calls,
        "metadata": {},
        "model": order.model.name,
        "output": _output(snap),
        "parallel_tool_calls": True,
        "previous_response_id": order.previous_response_id,
        "store": order.store,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": order.tool_choice,
        "tools": list(order.tools),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage_json(snap.tokens.mainline) if billed else None,
        "tool_usage": tool_usage_json(counted_usage(snap)) if billed else None,
    }


def counted_usage(snap: Snapshot) -> BilledUsage:
    """The image tool's tokens as `tool_usage.image_gen` reports them: all of them, none
    (`zerotool`), or those of the calls before the skipped ones (`skipcall`)."""
    if not snap.tool_counted:
        return BilledUsage()
    if snap.calls_skipped:
        counted = max(snap.order.image_calls - snap.calls_skipped, 0)
        return image_gen_usage(replace(snap.order, image_calls=counted))
    return snap.tokens.image_gen


def input_items_page(order: ResponseOrder, response_id: str, *, ascending: bool) -> dict[str, Any]:
    """`GET /v1/responses/{id}/input_items`: the input as message items, one page."""
    short = response_id.removeprefix("resp_")
    items = [
        {"id": f"msg_in{index:02d}{short}", "status": "completed", **message}
        for index, message in enumerate(order.messages)
    ]
    if not ascending:
        items.reverse()
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": False,
    }


class _Events:
    """The events of one stream, numbered as they are added."""

    def __init__(self) -> None:
        self.frames: list[tuple[FrameKind, bytes]] = []

    def add(self, kind: str, fields: dict[str, Any], frame: FrameKind = "event") -> None:
        data = {"type": kind, "sequence_number": len(self.frames), **fields}
        self.frames.append((frame, sse(kind, data)))


def _image_events(events: _Events, snap: Snapshot, index: int, at: int) -> None:
    """One image call (output item `at`): added, in progress, generating, its partials,
    completed, done."""
    where = {"item_id": snap.image_id(index), "output_index": at}
    events.add(
        "response.output_item.added",
        {"output_index": at, "item": image_item(snap, index, done=False)},
    )
    events.add("response.image_generation_call.in_progress", where)
    events.add("response.image_generation_call.generating", where)
    tool = snap.order.tool
    assert tool is not None
    shape = {
        "background": tool.background,
        "output_format": tool.output_format,
        "quality": tool.quality,
        "size": tool.size,
    }
    for partial in range(tool.partial_images):
        events.add(
            "response.image_generation_call.partial_image",
            {
                **where,
                "partial_image_index": partial,
                "partial_image_b64": image_b64(snap.order, snap.padding),
                **shape,
            },
        )
    events.add("response.image_generation_call.completed", where)
    events.add(
        "response.output_item.done",
        {"output_index": at, "item": image_item(snap, index, done=True)},
    )


def _message_events(events: _Events, snap: Snapshot, index: int) -> None:
    """The message: added, its text part, the text in word deltas, done."""
    where = {"item_id": snap.message_id, "output_index": index}
    text = snap.tokens.answer
    events.add(
        "response.output_item.added",
        {"output_index": index, "item": message_item(snap, done=False)},
    )
    events.add(
        "response.content_part.added", {**where, "content_index": 0, "part": output_text("")}
    )
    words = text.split(" ")
    for n, word in enumerate(words):
        delta = word if n == len(words) - 1 else f"{word} "
        if delta:
            events.add(
                "response.output_text.delta",
                {**where, "content_index": 0, "delta": delta, "logprobs": []},
            )
    events.add(
        "response.output_text.done", {**where, "content_index": 0, "text": text, "logprobs": []}
    )
    events.add(
        "response.content_part.done", {**where, "content_index": 0, "part": output_text(text)}
    )
    events.add(
        "response.output_item.done", {"output_index": index, "item": message_item(snap, done=True)}
    )


def _call_events(events: _Events, snap: Snapshot, index: int) -> None:
    """The function call: added, its arguments in one delta, done."""
    done = function_call_item(snap, done=True)
    where = {"item_id": done["id"], "output_index": index}
    events.add(
        "response.output_item.added",
        {"output_index": index, "item": function_call_item(snap, done=False)},
    )
    events.add("response.function_call_arguments.delta", {**where, "delta": done["arguments"]})
    events.add(
        "response.function_call_arguments.done",
        {**where, "name": done["name"], "arguments": done["arguments"]},
    )
    events.add("response.output_item.done", {"output_index": index, "item": done})


def stream_frames(snap: Snapshot) -> list[tuple[FrameKind, bytes]]:
    """The whole stream of a response whose end is `snap` (completed, incomplete or
    failed): the last frame, the terminal event, carries the response with its usage."""
    events = _Events()
    opening = Snapshot(snap.id, snap.order, snap.tokens, snap.created_at, "in_progress")
    events.add("response.created", {"response": response_json(opening)})
    events.add("response.in_progress", {"response": response_json(opening)})
    reasoning = reasoning_items(snap)
    for item in reasoning:
        added = {**item, "encrypted_content": None}
        events.add("response.output_item.added", {"output_index": 0, "item": added})
        events.add("response.output_item.done", {"output_index": 0, "item": item})
    for index in range(snap.order.image_calls):
        _image_events(events, snap, index, len(reasoning) + index)
    if snap.status != "failed" and snap.order.function_call is not None:
        _call_events(events, snap, len(reasoning))
    elif snap.status != "failed":
        _message_events(events, snap, len(reasoning) + snap.order.image_calls)
    events.add(f"response.{snap.status}", {"response": response_json(snap)}, "terminal")
    return events.frames
