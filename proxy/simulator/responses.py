"""The Responses API with the `image_generation` tool: a JSON body becomes a
`ResponseOrder` or the ApiError OpenAI would answer (pure).

How many images a response makes (OpenAI's model decides; this is the simulator's rule):
    0 when no image_generation tool is offered or `tool_choice` is "none";
    else 1, or N with an `[[images:N]]` marker in the last user text (0 ≤ N ≤
    MAX_IMAGE_CALLS; at least 1 when `tool_choice` requires the tool);
    never more than `max_tool_calls`.
The revised prompt the tool receives is that user text with its `[[…]]` markers removed.
Its token rules are in `response_tokens`.

An input message that carries an `id` is read as OpenAI reads it: the item stored under
that id (`Resolver`: an input message or the answer of a stored response), whatever
content the request sends with it; an id nothing was stored under is a 404.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from proxy.core.models import InputImage
from proxy.simulator.catalogue import DEFAULT_TOOL_MODEL, MAINLINE_MODELS, MODELS, MainlineRule
from proxy.simulator.forms import RawRequest
from proxy.simulator.refusals import ApiError, invalid, missing
from proxy.simulator.validation import ImageOrder, data_url_image, validate

MAX_IMAGE_CALLS = 4
MIN_MAX_OUTPUT_TOKENS = 16
_IMAGES_MARKER = re.compile(r"\[\[images:(\d+)\]\]")
_ANY_MARKER = re.compile(r"\s*\[\[[a-z]+:[a-z0-9]+\]\]\s*")
DEFAULT_REVISED_PROMPT = "An image."

TOOL_PARAMS = frozenset(
    {
        "type",
        "action",
        "background",
        "complexity",
        "frame_count",
        "frame_duration_ms",
        "input_fidelity",
        "input_image_mask",
        "model",
        "moderation",
        "output_compression",
        "output_format",
        "partial_images",
        "quality",
        "size",
        "svg",
    }
)
# The SDK's parameters: accepted and, but for the ones the order keeps, without effect.
BODY_PARAMS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "max_tool_calls",
        "stream",
        "stream_options",
        "background",
        "previous_response_id",
        "store",
        "metadata",
        "temperature",
        "top_p",
        "parallel_tool_calls",
        "user",
        "text",
        "reasoning",
        "truncation",
        "include",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "top_logprobs",
        "access_programs",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "moderation",
        "prompt",
        "prompt_cache_options",
        "prompt_cache_retention",
    }
)
TOOL_CHOICES = ("none", "auto", "required")
ROLES = ("user", "system", "developer", "assistant")
Action = Literal["generate", "edit"]
StoredItem = tuple[list[str], list[InputImage]]
Resolver = Callable[[str, bool], StoredItem]
"""The texts and images stored under an item id (given whether the request is stored), or
the ApiError OpenAI answers for an id it stored nothing under."""


@dataclass(frozen=True)
class ResponseOrder:
    """A valid Responses request: what the simulator will answer and bill."""

    model: MainlineRule
    texts: tuple[str, ...]
    """The instructions and every input text, as the mainline model reads them."""
    prompt: str
    """The last user text, the fault markers found in it included."""
    messages: tuple[dict[str, Any], ...]
    """The input as message items (for `input_items`)."""
    images: tuple[InputImage, ...]
    tool: ImageOrder | None
    """The image_generation tool's order for one call (None: no image tool offered)."""
    tools: tuple[dict[str, Any], ...]
    tool_choice: str | dict[str, Any]
    image_calls: int
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = None
    instructions: str | None = None

    @property
    def revised_prompt(self) -> str:
        return revised(self.prompt)

    @property
    def action(self) -> Action:
        return "edit" if self.images else "generate"


def revised(prompt: str) -> str:
    """The prompt the mainline model hands the image tool: the user's, markers removed."""
    return _ANY_MARKER.sub(" ", prompt).strip() or DEFAULT_REVISED_PROMPT


def _typed(value: Any, kind: type, param: str, expected: str) -> Any:
    """`value` when it is None or of `kind` (a bool is no integer), else OpenAI's 400."""
    if value is None or (isinstance(value, kind) and (kind is bool or type(value) is not bool)):
        return value
    raise invalid(
        f"Invalid type for '{param}': expected {expected}, but got {type(value).__name__}.",
        param=param,
        code="invalid_type",
    )


def _minimum(value: int | None, low: int, param: str) -> None:
    if value is not None and value < low:
        raise invalid(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, "
            f"but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )


def _unknown(keys: Any, known: frozenset[str], prefix: str) -> None:
    for key in keys:
        if key not in known:
            raise invalid(
                f"Unknown parameter: '{prefix}{key}'.",
                param=f"{prefix}{key}",
                code="unknown_parameter",
            )


def _part(part: Any, param: str) -> tuple[str | None, InputImage | None, dict[str, Any]]:
    """One content part: its text or image, and the part as stored."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return part["text"], None, {"type": kind, "text": part["text"]}
    if kind == "input_image":
        ref = part.get("image_url") or part.get("file_id")
        if isinstance(ref, str) and ref:
            stored = {"type": "input_image", "detail": part.get("detail") or "auto"}
            stored.update({k: part[k] for k in ("image_url", "file_id") if part.get(k)})
            return None, data_url_image(ref), stored
        raise invalid(
            f"Invalid '{param}': an input_image needs an 'image_url' or a 'file_id'.",
            param=param,
        )
    raise invalid(
        f"Invalid value: '{kind}'. Supported values are: 'input_text', 'output_text' and "
        "'input_image'.",
        param=f"{param}.type",
    )


def _message(
    item: Any, index: int, resolve: Resolver | None, store: bool
) -> tuple[str, list[str], list[InputImage], dict[str, Any]]:
    """One input item: its role, texts, images and the message item as stored; with an
    `id`, the texts and images are the ones stored under it."""
    param = f"input[{index}]"
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise invalid(f"Invalid '{param}': the simulator accepts message items only.", param=param)
    role = item.get("role")
    if role not in ROLES:
        raise invalid(
            f"Invalid value: '{role}'. Supported values are: 'user', 'system', 'developer', "
            "and 'assistant'.",
            param=f"{param}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise missing(f"{param}.content")
    texts, images, parts = [], [], []
    for n, raw in enumerate(content):
        text, image, stored = _part(raw, f"{param}.content[{n}]")
        texts += [text] if text is not None else []
        images += [image] if image is not None else []
        parts.append(stored)
    item_id = item.get("id")
    if item_id is not None and resolve is not None:
        if not isinstance(item_id, str) or not item_id:
            raise invalid(f"Invalid '{param}.id': expected a string.", param=f"{param}.id")
        texts, images = resolve(item_id, store)
    return role, texts, images, {"type": "message", "role": role, "content": parts}


def _input(
    value: Any, resolve: Resolver | None = None, store: bool = True
) -> tuple[str, list[str], list[InputImage], list[dict[str, Any]]]:
    """The input: the last user text, all texts, the images and the message items."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise missing("input")
    prompt, texts, images, messages = "", [], [], []
    for index, item in enumerate(value):
        role, item_texts, item_images, stored = _message(item, index, resolve, store)
        if role == "user" and item_texts:
            prompt = item_texts[-1]
        texts += item_texts
        images += item_images
        messages.append(stored)
    return prompt, texts, images, messages


def _image_tool(tool: dict[str, Any], index: int, stream: bool, prompt: str) -> ImageOrder:
    """The tool's order for one call, checked by the Images path's validation."""
    prefix = f"tools[{index}]."
    _unknown(tool, TOOL_PARAMS, prefix)
    name = tool.get("model") or DEFAULT_TOOL_MODEL
    model = MODELS.get(name) if isinstance(name, str) else None
    if model is None or model.is_dalle:
        names = ", ".join(f"'{m}'" for m, rule in MODELS.items() if not rule.is_dalle)
        raise invalid(
            f"Invalid value: '{name}'. Supported values are: {names}.", param=f"{prefix}model"
        )
    enums: dict[str, tuple[str, ...]] = {
        "action": ("generate", "edit", "auto"),
        "moderation": ("auto", "low"),
    }
    for key, allowed in enums.items():
        value = _typed(tool.get(key), str, prefix + key, "a string")
        if value is not None and value not in allowed:
            choices = ", ".join(f"'{v}'" for v in allowed)
            raise invalid(
                f"Invalid value: '{value}'. Supported values are: {choices}.", param=prefix + key
            )
    # The Images path checks what the two APIs share; the rest has no effect here.
    shared = ("model", "quality", "size", "output_format", "output_compression", "background")
    fields = {k: v for k, v in tool.items() if k in (*shared, "partial_images", "input_fidelity")}
    fields.update(model=name, prompt=prompt, stream=True)
    try:
        order = validate(RawRequest("generations", "json", fields))
    except ApiError as error:
        param = f"{prefix}{error.param}" if error.param else None
        raise ApiError(error.status, error.message, param=param, code=error.code) from error
    return replace(order, stream=stream, partial_images=order.partial_images if stream else 0)


def _tool_choice(value: Any) -> str | dict[str, Any]:
    if value is None:
        return "auto"
    if isinstance(value, str) and value in TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "image_generation":
        return {"type": "image_generation"}
    raise invalid(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
        "{'type': 'image_generation'}.",
        param="tool_choice",
    )


def _tools(
    value: Any, stream: bool, prompt: str
) -> tuple[tuple[dict[str, Any], ...], ImageOrder | None]:
    """The tools as sent and the image tool's order (the simulator offers no other tool)."""
    value = _typed(value, list, "tools", "an array")
    tool = None
    for index, item in enumerate(value or []):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind != "image_generation":
            raise invalid(
                f"Invalid value: '{kind}'. The simulator supports 'image_generation' only.",
                param=f"tools[{index}].type",
            )
        if tool is not None:
            raise invalid(
                "Duplicate tool: 'image_generation' may be given once.", param=f"tools[{index}]"
            )
        tool = _image_tool(item, index, stream, prompt)
    return tuple(value or ()), tool


def _image_calls(prompt: str, tool: ImageOrder | None, choice: Any, cap: int | None) -> int:
    if tool is None or choice == "none":
        return 0
    marked = _IMAGES_MARKER.search(prompt)
    calls = min(int(marked[1]), MAX_IMAGE_CALLS) if marked else 1
    if choice != "auto":
        calls = max(calls, 1)
    return calls if cap is None else min(calls, cap)


def read_order(body: dict[str, Any], resolve: Resolver | None = None) -> ResponseOrder:
    """The order a Responses body describes, or the ApiError OpenAI would answer it with;
    `resolve` reads the items stored under the ids the input names (None: ids unread)."""
    _unknown(body, BODY_PARAMS, "")
    name = _typed(body.get("model"), str, "model", "a string")
    if not name:
        raise missing("model")
    model = MAINLINE_MODELS.get(name)
    if model is None:
        raise invalid(
            f"The requested model '{name}' does not exist or cannot use the image_generation tool.",
            param="model",
            code="model_not_found",
        )
    instructions = _typed(body.get("instructions"), str, "instructions", "a string")
    store = _typed(body.get("store"), bool, "store", "a boolean") is not False
    prompt, texts, images, messages = _input(body.get("input"), resolve, store)
    stream = bool(_typed(body.get("stream"), bool, "stream", "a boolean"))
    background = bool(_typed(body.get("background"), bool, "background", "a boolean"))
    if background and not store:
        raise invalid("Background mode requires 'store' to be true.", param="background")
    tools, tool = _tools(body.get("tools"), stream, revised(prompt))
    max_output = _typed(body.get("max_output_tokens"), int, "max_output_tokens", "an integer")
    _minimum(max_output, MIN_MAX_OUTPUT_TOKENS, "max_output_tokens")
    max_calls = _typed(body.get("max_tool_calls"), int, "max_tool_calls", "an integer")
    _minimum(max_calls, 1, "max_tool_calls")
    choice = _tool_choice(body.get("tool_choice"))
    if choice != "auto" and choice != "none" and tool is None:
        raise invalid("Tool choice 'required' needs a tool in 'tools'.", param="tool_choice")
    return ResponseOrder(
        model=model,
        texts=(*([instructions] if instructions else []), *texts),
        prompt=prompt,
        messages=tuple(messages),
        images=tuple(images),
        tool=replace(tool, images=tuple(images)) if tool else None,
        tools=tools,
        tool_choice=choice,
        image_calls=_image_calls(prompt, tool, choice, max_calls),
        max_output_tokens=max_output,
        max_tool_calls=max_calls,
        stream=stream,
        background=background,
        store=store,
        previous_response_id=_typed(
            body.get("previous_response_id"), str, "previous_response_id", "a string"
        ),
        instructions=instructions,
    )
