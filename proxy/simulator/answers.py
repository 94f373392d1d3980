"""The bodies the simulator answers with: JSON responses and SSE events (pure)."""

from __future__ import annotations

import json
from typing import Any

from proxy.simulator.pictures import encoded_b64
from proxy.simulator.tokens import Tokens
from proxy.simulator.validation import ImageOrder

EVENT_PREFIX = {"generations": "image_generation", "edits": "image_edit", "variations": "image"}


def usage_json(
    *,
    text: int,
    image: int,
    output: int,
    details: bool,
    text_output: int = 0,
    undetailed: bool = False,
) -> dict[str, Any]:
    """OpenAI's `usage` object; `output_tokens_details` only when the model reports it (or
    there is text output to report), never when `undetailed`."""
    usage: dict[str, Any] = {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output + text_output,
        "total_tokens": text + image + output + text_output,
    }
    if (details or text_output) and not undetailed:
        usage["output_tokens_details"] = {"image_tokens": output, "text_tokens": text_output}
    return usage


def _b64(order: ImageOrder, padding: int) -> str:
    return encoded_b64(
        order.width,
        order.height,
        order.output_format,
        order.compression,
        padding,
        order.background == "transparent",
    )


def response_body(
    order: ImageOrder,
    tokens: Tokens,
    *,
    created: int,
    padding: int,
    request_id: str,
    with_usage: bool = True,
) -> dict[str, Any]:
    """The non-stream answer: `created`, `data` and, for GPT models, the effective knobs
    (and the effective end-user id, when the request named one)."""
    if order.model.is_dalle:
        data: list[dict[str, Any]] = []
        for index in range(order.n):
            item: dict[str, Any] = (
                {"url": f"http://127.0.0.1/_sim/images/{request_id}-{index}.png"}
                if order.response_format == "url"
                else {"b64_json": _b64(order, padding)}
            )
            if order.model.name == "dall-e-3":
                item["revised_prompt"] = order.prompt
            data.append(item)
        return {"created": created, "data": data}
    body: dict[str, Any] = {
        "created": created,
        "data": [{"b64_json": _b64(order, padding)} for _ in range(order.n)],
        "background": order.background,
        "output_format": order.output_format,
        "quality": order.quality,
        "size": order.size,
    }
    if order.safety_identifier:
        body["safety_identifier"] = order.safety_identifier
    if with_usage:
        body["usage"] = usage_json(
            text=tokens.text_input,
            image=tokens.image_input,
            output=tokens.output_total,
            details=order.model.output_details,
            text_output=tokens.text_output,
            undetailed=tokens.undetailed,
        )
    return body


def models_page(names: list[str]) -> dict[str, Any]:
    """`GET /v1/models`: OpenAI's list shape."""
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "system"} for n in names],
    }


def sse(event_type: str, data: dict[str, Any]) -> bytes:
    """One server-sent event frame."""
    return f"event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(
    order: ImageOrder,
    tokens: Tokens,
    *,
    created: int,
    padding: int,
    extra: dict[str, Any] | None = None,
) -> list[tuple[str, bytes]]:
    """The stream of an order, as (kind, frame): per image its partials, then its completed.

    Each completed event carries its image's input tokens (the input is billed per
    image); the completed usages sum to the non-stream usage plus 100 tokens per
    partial. `extra` fields go in every event.
    """
    prefix = EVENT_PREFIX[order.endpoint]
    common: dict[str, Any] = {
        "background": order.background,
        "created_at": created,
        "output_format": order.output_format,
        "quality": order.quality,
        "size": order.size,
        **(extra or {}),
    }
    b64 = _b64(order, padding)
    frames: list[tuple[str, bytes]] = []
    for image in range(order.n):
        for index in range(tokens.partials_per_image):
            kind = f"{prefix}.partial_image"
            payload = {"type": kind, "b64_json": b64, **common, "partial_image_index": index}
            frames.append(("partial", sse(kind, payload)))
        first = image == 0
        usage = usage_json(
            text=tokens.text_input_per_image,
            image=tokens.image_input_per_image,
            output=tokens.output_per_completed,
            details=False,
            text_output=tokens.text_output if first else 0,
            undetailed=tokens.undetailed,
        )
        kind = f"{prefix}.completed"
        completed = {"type": kind, "b64_json": b64, **common, "usage": usage}
        if order.safety_identifier:
            completed["safety_identifier"] = order.safety_identifier
        frames.append(("completed", sse(kind, completed)))
    return frames
